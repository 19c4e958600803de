"""The imperative shell around the planner: read a domain, plan, act, journal.

One `Reconciler` serves `varsctl reconcile` and the daemon alike. For each domain it
re-reads the persistent (and live) XML from libvirt rather than trusting any event,
gathers file facts, asks the pure planner, and executes the actions in order under
the domain's lock, in the one write transaction (`engine.transaction`). Every XML
change is journaled with the previous XML before libvirt sees it, and whoever takes the
lock first settles entries an actor killed mid-define left `pending`. A failure in one
domain becomes that domain's `error` outcome (a busy lock, in the daemon, a retry); it
never stops the pass. An unusable state dir is the host's problem, not the domain's: it
is raised (exit 2).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import islice

from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.adapters.plan_memo_store import PlanMemoStore
from varsd.clock import SYSTEM, Clock
from varsd.config import Config
from varsd.domain.classify import firmware_image_path
from varsd.domain.xml import firmware_signature, parse_domain
from varsd.engine import plan_memo
from varsd.engine.fetch import Seen
from varsd.engine.inspect import FileInspector
from varsd.engine.lock import host_lock
from varsd.engine.provision import (
    inspect_json_varstore,
    preflight,
    preflight_json,
    provision_json_varstore,
    provision_varstore,
)
from varsd.engine.transaction import PlannedWrite, Transaction, Writer
from varsd.engine.varstore_users import VarstoreIndex
from varsd.errors import HypervisorError, LockBusy, ProvisionError, StateDirError, VarsdError
from varsd.firmware.archive import Archive, ArchiveError, ArchiveIndex
from varsd.messages import about_domain
from varsd.model.domain import AttemptFailure, DomainFirmware, DomainRef, FirmwareConfig, Status
from varsd.model.firmware import Build, Catalog, UpgradePolicy
from varsd.planning import sharing
from varsd.planning.repair import (
    CreateJsonVarstore,
    CreateVarstore,
    DomainFacts,
    Plan,
    Redefine,
    plan_repair,
    varstore_names,
    varstore_path,
)
from varsd.planning.upgrade import UpgradeContext
from varsd.retry import SETTINGS, Action, Purpose, decide

log = logging.getLogger("varsd.reconcile")


@dataclass(frozen=True)
class Outcome:
    """One domain's result: the plan, what was done, and the status to report."""

    ref: DomainRef
    plan: Plan
    done: tuple[str, ...] = ()
    unrepaired: bool = False  # a firmware repair was planned but not made (dry run, status)
    retry: bool = False  # a transient libvirt failure on this domain: worth another look later
    boot_unrecorded: bool = False  # running, and its live XML has no boot record (varsd was not watching)
    busy: bool = False  # another actor held the domain's lock: a retry, not a failure
    failure: AttemptFailure | None = None  # the last attempt to carry out this plan failed
    blocked: str | None = None  # why the planned repair cannot be made now (checked before acting)
    cleared: AttemptFailure | None = None  # a failure this attempt's success put an end to

    @property
    def status(self) -> Status:
        """A repair that was planned but not (yet) done is not ok: the domain is wrong now."""
        if self.unrepaired or self.failure is not None or self.blocked:
            return Status.ERROR
        return self.plan.status

    @property
    def detail(self) -> str:
        """What the admin reads: never a promise the daemon has already failed to keep."""
        if self.failure is not None:
            return f"{self.failure.describe()} (planned: {self.plan.detail})"
        if self.blocked:
            return f"cannot be repaired: {self.blocked} (planned: {self.plan.detail})"
        if self.unrepaired:
            return f"needs repair, which 'varsctl reconcile' or the daemon does: {self.plan.detail}"
        return self.plan.detail

    @property
    def changed(self) -> bool:
        return bool(self.done)

    @property
    def problem(self) -> tuple[str, str] | None:
        """What is wrong, stable from pass to pass (no times, no counts): the daemon logs a
        problem when it first appears and when it goes away, not on every pass."""
        if self.failure is not None:
            return (self.failure.action, self.failure.error)
        if self.status in (Status.ERROR, Status.NEEDS_MIGRATION):
            return (self.status.value, self.detail)
        return None

    def as_dict(self) -> dict:
        return {
            "name": self.ref.name,
            "uuid": self.ref.uuid,
            "state": self.ref.state,
            "config": self.plan.config.value,
            "code": self.plan.code,
            "varstore": self.plan.varstore,
            "status": self.status.value,
            "detail": self.detail,
            "build": self.plan.build.code_sha256 if self.plan.build else None,
            "code_sha256": self.plan.next_boot_sha256,
            "changes": list(self.done),
            "last_error": self.failure.as_dict() if self.failure is not None else None,
        }


def _outcome(ref: DomainRef, facts: DomainFacts, plan: Plan, done: tuple[str, ...], *,
             unrepaired: bool = False) -> Outcome:
    live = facts.live
    return Outcome(ref, plan, done, unrepaired=unrepaired,
                   boot_unrecorded=live is not None and live.booted_sha256 is None)


def _definition_sha(xml: str) -> str:
    return hashlib.sha256(xml.encode("utf-8")).hexdigest()


def _discard_unused_varstore(ref: DomainRef, path: str) -> None:
    """Remove a varstore this plan just created from a template when the change that was to
    use it failed: no definition names it and no guest ever ran on it, so nothing is lost,
    and no orphan is left for the next pass to trip over."""
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
            log.info("%s: removed %s again (the change that was to use it failed)", ref.label, path)
    except OSError as exc:
        log.warning("%s: could not remove unused varstore %s: %s", ref.label, path, exc.strerror)


def _error(ref: DomainRef, exc: VarsdError, *, retry: bool = False) -> Outcome:
    """A domain whose look or action failed: its class is not known (never `none`, which
    means SeaBIOS), and the message names the domain once."""
    return Outcome(ref, Plan(FirmwareConfig.UNKNOWN, Status.ERROR, about_domain(ref.name, exc, ref.uuid)), retry=retry)


@dataclass(frozen=True)
class _Memo:
    """The inputs a compliant plan was made from; equal inputs give the same plan."""

    xml: str
    live_xml: str | None
    catalog: Catalog
    upgrades: UpgradeContext
    excluded: bool
    persistent: bool
    paths: tuple[str, ...]
    stats: tuple
    facts: DomainFacts
    plan: Plan


def _changes_firmware(facts: DomainFacts, plan: Plan) -> bool:
    """Whether the plan repairs firmware (vs. bookkeeping such as recording the binding)."""
    before = firmware_signature(facts.xml)
    return any(
        isinstance(a, CreateVarstore | CreateJsonVarstore)
        or (isinstance(a, Redefine) and firmware_signature(a.xml) != before)
        for a in plan.actions
    )


@dataclass(frozen=True)
class Written:
    """A domain `reconcile_batch` wrote: the facts and plan of the change, and the
    definition libvirt stored."""

    facts: DomainFacts
    plan: Plan
    stored: str


@dataclass(frozen=True)
class BatchPass:
    """What `reconcile_batch` did: an outcome per domain (in order), the domains it wrote in
    batches, and those found compliant in the XML the caller had read (nothing read since)."""

    outcomes: list[Outcome]
    written: dict[str, Written]
    as_seen: set[str]


BATCH = 100  # domains whose locks a batch holds at once (one journal transaction each)
ARCHIVE_RECHECK = 1.0  # seconds an archive snapshot serves the planner before it is re-listed


class Reconciler:
    def __init__(
        self,
        cfg: Config,
        hv: Hypervisor,
        catalog: Catalog,
        journal: Journal,
        owner: tuple[int, int],
        *,
        actor: str = "varsctl",
        clock: Clock = SYSTEM,
        inspector: FileInspector | None = None,
        archive: Archive | None = None,
        lock_wait: float | None = None,
        on_wait: Callable[[str], None] | None = None,
        memo_store: PlanMemoStore | None = None,
    ) -> None:
        self.cfg = cfg
        self.hv = hv
        self.catalog = catalog
        self.journal = journal
        self.owner = owner
        self.actor = actor
        self.clock = clock
        self.inspector = inspector or FileInspector()
        self.archive = archive if archive is not None else Archive(cfg.archive_dir, state_dir=cfg.state_dir)
        self._memo: dict[str, _Memo] = {}
        self.memo_store = memo_store  # the memo, persisted for fresh processes (varsd.engine.plan_memo)
        # None: wait as long as the holder of a domain's lock progresses (varsctl); a bound
        # (the daemon) makes a busy domain a retry instead of a blocked worker.
        self.lock_wait = lock_wait
        self.varstores = VarstoreIndex(
            hv, lambda fw: varstore_path(cfg.nvram_dir, fw.name, fw.uuid),
            lambda fw, persistent: persistent and not fw.metadata.opt_out and not cfg.is_excluded(fw.name, fw.uuid))
        self._rechecks_lock = threading.Lock()
        self.rechecks: set[str] = set()  # domains to look at again (see _sharing)
        self._failed: set[str] | None = None  # uuids with a recorded failed attempt (loaded lazily)
        self._upgrades: tuple[float, UpgradeContext] | None = None
        self._archive_lock = threading.Lock()
        self._archive_tried: dict[str, float] = {}  # sha -> monotonic time of a failed attempt
        self.retry = SETTINGS
        self.writer = Writer(hv, journal, self.archive, cfg.domain_lock_path, actor=actor, clock=clock,
                             on_corrupt_archive=self._invalidate_archive, lock_wait=lock_wait, on_wait=on_wait)

    # -- upgrade context -----------------------------------------------------------

    def upgrade_context(self, *, policy: UpgradePolicy | None = None) -> UpgradeContext:
        """Policy and a verified archive snapshot for the planner, re-listed at most every
        ARCHIVE_RECHECK seconds (a full pass must not re-list the archive per domain)."""
        with self._archive_lock:
            cached = self._upgrades
            if cached is None or self.clock.monotonic() - cached[0] > ARCHIVE_RECHECK \
                    or cached[1].policy != self.cfg.upgrade_policy:
                try:
                    index = self.archive.index()
                except ArchiveError as exc:
                    log.error("%s", exc)
                    index = ArchiveIndex(self.archive.directory)
                try:
                    features = {sha: b.features for sha, b in self.journal.archived_builds().items()
                                if b.layout is not None}
                except VarsdError as exc:
                    log.error("%s", exc)
                    features = {}
                fresh = UpgradeContext(policy=self.cfg.upgrade_policy, archive=index, features=features)
                if cached is not None and cached[1] == fresh:
                    fresh = cached[1]  # the same object: memoised plans stay valid (they compare identity)
                cached = (self.clock.monotonic(), fresh)
                self._upgrades = cached
        ctx = cached[1]
        return ctx if policy is None or policy == ctx.policy else replace(ctx, policy=policy)

    def _invalidate_archive(self) -> None:
        with self._archive_lock:
            self._upgrades = None

    def archive_build(self, build: Build | None) -> None:
        """Keep a copy of the build a domain is bound to, before an upgrade can replace it.

        Best effort: a failure is logged and retried later, never a domain error (the
        file may have been replaced since the catalog was read; the next catalog
        reload archives what is there now).
        """
        if build is None:
            return
        sha = build.code_sha256
        if sha in self.upgrade_context().archive.verified:
            return
        with self._archive_lock:
            tried = self._archive_tried.get(sha)
            if tried is not None and self.clock.monotonic() - tried < decide(
                    ArchiveError(sha), purpose=Purpose.ARCHIVE, settings=self.retry).delay:
                return
            self._archive_tried[sha] = self.clock.monotonic()
        try:
            with host_lock(self.cfg.firmware_lock_path):
                stored = self.archive.store_file(build.code_path, expect_sha256=sha)
                at = self.clock.now()
                self.journal.note_archived(sha256=sha, code_path=build.code_path, size=stored.entry.size,
                                           at=at, layout=build.layout, features=build.features)
                # The first sight of a build is history too, so a later sync reports a change
                # of it as `changed`, not as `appeared`.
                known = self.journal.firmware_state().get(build.code_path)
                if known != sha:
                    event = "appeared" if known is None else "changed"
                    self.journal.record_firmware(at, [(build.code_path, sha, event)])
        except VarsdError as exc:
            log.warning("firmware archive: %s", exc)
            return
        with self._archive_lock:
            self._archive_tried.pop(sha, None)
        if stored.created:
            log.info("firmware archive: stored build %s from %s", sha[:12], build.code_path)
        self._invalidate_archive()

    # -- reading -----------------------------------------------------------------

    def examine(self, ref: DomainRef, seen: Seen | None = None,
                parsed: DomainFirmware | None = None) -> tuple[DomainFacts, Plan]:
        """Read the domain now and plan; a compliant domain whose inputs are unchanged
        since the last look (same XML text, same file stat keys, same catalog) reuses
        its plan, so a full pass costs about one XML fetch per domain. `seen`: the
        persistent and live XML the caller has just read (status, sync); `parsed`: that
        persistent XML parsed."""
        if seen is not None:
            xml, live_xml = seen
        else:
            xml = self.hv.persistent_xml(ref.uuid)
            live_xml = self.hv.live_xml(ref.uuid) if ref.active else None
        excluded = self.cfg.is_excluded(ref.name, ref.uuid)
        upgrades = self.upgrade_context()
        memo = self._memo.get(ref.uuid)
        if (
            memo is not None
            and memo.xml == xml
            and memo.live_xml == live_xml
            and memo.catalog is self.catalog
            and memo.upgrades is upgrades
            and memo.excluded == excluded
            and memo.persistent == ref.persistent
            and memo.stats == tuple(self.inspector.stat_key(p) for p in memo.paths)
        ):
            return memo.facts, memo.plan
        facts = self.facts(xml, live_xml, excluded=excluded, persistent=ref.persistent,
                           parsed=parsed if seen is not None else None)
        plan = plan_repair(facts, self.catalog, self.cfg.nvram_dir, self.clock.now(), upgrades)
        if plan.actions or facts.sharing is not None:  # a sharer's plan follows the others' state
            self._memo.pop(ref.uuid, None)
        else:
            fw = facts.firmware
            paths = tuple(p for p in (firmware_image_path(fw), fw.nvram_path, fw.host_varstore_path) if p)
            self._memo[ref.uuid] = _Memo(
                xml, live_xml, self.catalog, upgrades, excluded, ref.persistent, paths,
                tuple(self.inspector.stat_key(p) for p in paths), facts, plan,
            )
            self._persist(ref, xml, live_xml, excluded, upgrades, facts, plan, paths)
        return facts, plan

    def _persist(self, ref: DomainRef, xml: str, live_xml: str | None, excluded: bool, upgrades: UpgradeContext,
                 facts: DomainFacts, plan: Plan, paths: tuple[str, ...]) -> None:
        """Write a compliant plan's memo row (varsd.engine.plan_memo), when the files are
        still what the plan read: a file changed since must not get the old plan's row."""
        store = self.memo_store
        if store is None or not store.writable:
            return
        fw = facts.firmware
        files = [plan_memo.file_key(p) for p in paths]
        image_path = firmware_image_path(fw)
        if image_path and self.inspector.inspect(image_path, digest=True) != facts.image:
            return
        if fw.nvram_path and self.inspector.inspect(fw.nvram_path, digest=False) != facts.nvram:
            return
        user, realpath, digest = None, None, None
        if fw.nvram_path:
            user, realpath = self.varstores.entry_of(fw, persistent=ref.persistent)
            if facts.nvram is not None and facts.nvram.exists:
                digest = plan_memo.varstore_digest(fw.nvram_path)
        key = plan_memo.memo_key(plan_memo.context_digest(self.catalog, upgrades, self.cfg.nvram_dir), xml, live_xml,
                                 excluded=excluded, persistent=ref.persistent, files=files)
        row = plan_memo.encode(plan, boot_unrecorded=facts.live is not None and facts.live.booted_sha256 is None,
                               nvram_path=fw.nvram_path, user=user, realpath=realpath, varstore=digest)
        store.put(ref.uuid, plan_memo.stored(key, list(paths), row))

    def facts(self, xml: str, live_xml: str | None, *, excluded: bool = False, persistent: bool = True,
              parsed: DomainFirmware | None = None) -> DomainFacts:
        """What the planner looks at for this XML: parsed (`parsed`, when the caller has), plus
        the files it names."""
        fw = parsed if parsed is not None else parse_domain(xml)
        live = parse_domain(live_xml) if live_xml else None
        image_path = firmware_image_path(fw)
        image = self.inspector.inspect(image_path, digest=True) if image_path else None
        nvram = self.inspector.inspect(fw.nvram_path, digest=False) if fw.nvram_path else None
        json_store = inspect_json_varstore(fw.host_varstore_path) if fw.host_varstore_path else None
        return DomainFacts(
            xml=xml, firmware=fw, live=live, image=image, nvram=nvram, excluded=excluded, persistent=persistent,
            json_varstore=json_store,
            sharing=self._sharing(fw, running=live is not None, persistent=persistent),
            other_varstores=self.varstores.taken(
                [p for p in (fw.nvram_path, *islice(varstore_names(self.cfg.nvram_dir, fw), 8)) if p], fw.uuid),
        )

    def _sharing(self, fw: DomainFirmware, *, running: bool, persistent: bool) -> sharing.Sharing | None:
        """Who else uses this domain's varstore file (by identity, host-wide, whatever the
        order domains are seen in). A sharer whose compliant plan is memoised did not know:
        its memo is dropped and it is listed in `rechecks`."""
        me, others = self.varstores.note(fw, running=running, persistent=persistent)
        if me is None or not others:
            return None
        for o in others:
            if self._memo.pop(o.uuid, None) is not None:
                with self._rechecks_lock:
                    self.rechecks.add(o.uuid)
        return sharing.decide(me, others)

    def plan_xml(self, ref: DomainRef, xml: str, *, policy: UpgradePolicy | None = None) -> tuple[DomainFacts, Plan]:
        """Plan for a definition the domain does not have yet (what varsctl pin, unpin and
        approve are about to write), so their one redefinition is already what the planner
        wants and the daemon has nothing left to change. Never memoised."""
        live_xml = self.hv.live_xml(ref.uuid) if ref.active else None
        facts = self.facts(xml, live_xml, excluded=self.cfg.is_excluded(ref.name, ref.uuid), persistent=ref.persistent)
        return facts, plan_repair(facts, self.catalog, self.cfg.nvram_dir, self.clock.now(),
                                  self.upgrade_context(policy=policy))

    def forget(self, uuid: str) -> str | None:
        """Drop what is remembered of a domain that is gone; returns its last varstore path."""
        path = self.varstores.forget(uuid)
        memo = self._memo.pop(uuid, None)
        if self.memo_store is not None:
            self.memo_store.drop(uuid)
        return memo.facts.firmware.nvram_path if memo is not None else path

    # -- acting ------------------------------------------------------------------

    def reconcile(self, ref: DomainRef, *, apply: bool = True, seen: tuple[str, str | None] | None = None) -> Outcome:
        """Bring one domain to its planned state; never raises for a domain problem.

        Looking is lock-free; acting happens under the domain's lock after a fresh
        look, so varsd and varsctl never act on one domain at once, and neither acts
        on what it read before the other changed it.
        """
        try:
            outcome = self._reconcile(ref, apply, seen)
            if apply:
                self.archive_build(outcome.plan.build)
            return outcome
        except StateDirError:
            raise  # the host's configuration, not this domain: the caller says so once (exit 2)
        except LockBusy as exc:
            if self.lock_wait is None:  # varsctl waited as long as the holder lived and progressed
                outcome = _error(ref, exc)
                log.error("%s", outcome.detail)
                return outcome
            # The daemon: another actor is on it (or its holder froze); the retry policy
            # (Purpose.LOCK) says when to look again. Not an error.
            log.info("%s", about_domain(ref.name, f"{exc}; will look again", ref.uuid))
            return replace(_error(ref, exc, retry=True), busy=True)
        except HypervisorError as exc:
            action = decide(exc, alive=not exc.retryable or self.hv.is_alive(), settings=self.retry).action
            if action is Action.RECONNECT:
                raise  # the connection is gone: the caller reconnects and looks again
            # A domain-level failure (a hung QEMU's state-change lock, a refused define):
            # this domain's error, not the host's; `retry` tells the daemon to look again.
            outcome = _error(ref, exc, retry=action is Action.RETRY)
            log.debug("%s", outcome.detail)  # the outcome carries it; callers report it (the daemon once)
            return outcome
        except VarsdError as exc:
            outcome = _error(ref, exc)
            log.debug("%s", outcome.detail)
            return outcome

    def _reconcile(self, ref: DomainRef, apply: bool, seen: tuple[str, str | None] | None = None) -> Outcome:
        if apply and ref.uuid not in self._memo:
            # Not known compliant (a new domain, most likely to need work): look
            # once, in the write transaction, instead of looking twice.
            with self.writer.transaction(ref) as tx:
                facts, plan = self.examine(ref)
                return self._act(tx, facts, plan)
        facts, plan = self.examine(ref, seen)
        if not plan.actions:
            return _outcome(ref, facts, plan, ())
        if not apply:
            return self._look(ref, facts, plan)
        with self.writer.transaction(ref) as tx:
            if tx.xml != facts.xml:
                # Another actor changed it since we looked: look again, in the transaction.
                facts, plan = self.examine(ref)
            return self._act(tx, facts, plan)

    def _look(self, ref: DomainRef, facts: DomainFacts, plan: Plan) -> Outcome:
        """A plan with actions that is not carried out now (status, dry run): report what
        stands in its way (its last failure, or what would make it fail), not a promise."""
        failure = self.journal.failure(ref.uuid)
        if failure is not None and failure.definition_sha256 != _definition_sha(facts.xml):
            failure = None  # the definition changed since: that attempt is history
        blocked = None
        for action in plan.actions:
            if isinstance(action, CreateVarstore):
                blocked = preflight(action.path, action.source, length=action.length, expected_layout=action.layout)
            elif isinstance(action, CreateJsonVarstore):
                blocked = preflight_json(action.path, action.template)
            if blocked:
                break
        out = _outcome(ref, facts, plan, (), unrepaired=_changes_firmware(facts, plan))
        return replace(out, failure=failure, blocked=blocked)

    def _act(self, tx: Transaction, facts: DomainFacts, plan: Plan) -> Outcome:
        """Carry the plan out; a failure is recorded in the state database (and reported)
        until an attempt succeeds or the definition changes."""
        ref = tx.ref
        if not plan.actions:
            return replace(_outcome(ref, facts, plan, ()), cleared=self._clear_failure(ref.uuid))
        attempt: list[str] = []
        try:
            done = self._execute(tx, facts, plan, attempt)
        except VarsdError as exc:
            return self._attempt_failed(ref, facts, plan, exc, attempt[-1] if attempt else "plan")
        return replace(_outcome(ref, facts, plan, done), cleared=self._clear_failure(ref.uuid, force=True))

    def _attempt_failed(self, ref: DomainRef, facts: DomainFacts, plan: Plan, exc: VarsdError,
                        action: str) -> Outcome:
        """The outcome of a failed attempt, recorded in the state database; a lost connection
        is raised instead (the caller reconnects and looks again)."""
        alive = not isinstance(exc, HypervisorError) or not exc.retryable or self.hv.is_alive()
        verdict = decide(exc, alive=alive, settings=self.retry).action
        if verdict is Action.RECONNECT:
            raise exc
        failure = self.journal.note_failure(
            uuid=ref.uuid, name=ref.name, at=self.clock.now(), action=action,
            error=str(exc), definition_sha256=_definition_sha(facts.xml))
        self._failed_uuids().add(ref.uuid)
        return replace(_outcome(ref, facts, plan, ()), failure=failure, retry=verdict is Action.RETRY)

    def _failed_uuids(self) -> set[str]:
        if self._failed is None:
            try:
                self._failed = self.journal.failed_uuids()
            except VarsdError as exc:
                log.error("%s", exc)
                self._failed = set()
        return self._failed

    def _clear_failure(self, uuid: str, *, force: bool = False) -> AttemptFailure | None:
        """An attempt succeeded (or there was nothing left to do): the failure is over.
        Without `force` only a failure this process knows of is looked up (no write per
        compliant domain per pass)."""
        failed = self._failed_uuids()
        if not force and uuid not in failed:
            return None
        failed.discard(uuid)
        try:
            return self.journal.clear_failure(uuid)
        except VarsdError as exc:
            log.error("%s", exc)
            return None

    def _execute(self, tx: Transaction, facts: DomainFacts, plan: Plan,
                 attempt: list[str] | None = None) -> tuple[str, ...]:
        """Carry out the actions in order; `attempt` collects what was being done (for the record)."""
        attempt = [] if attempt is None else attempt
        done: list[str] = []
        created: list[str] = []  # varstores made for this plan that nothing names yet
        named = {facts.firmware.nvram_path}
        try:
            for action in plan.actions:
                if isinstance(action, CreateVarstore):
                    attempt.append(f"create varstore {action.path} from {action.source}")
                    user = self.varstores.user_of(action.path, tx.ref.uuid)
                    keeps = facts.sharing is not None and facts.sharing.keeps \
                        and action.path == facts.firmware.nvram_path
                    if user is not None and not keeps:  # never adopt or share another domain's varstore
                        raise ProvisionError(f"{action.path} is the varstore of domain '{user}'; varsd never "
                                             f"gives it to domain '{tx.ref.name}' as well")
                    result = provision_varstore(
                        action.path, action.source, expected_layout=action.layout, owner=self.owner,
                        length=action.length,
                    )
                    what = "adopted existing identical" if result.adopted else "created"
                    if not result.adopted and action.path not in named:
                        created.append(action.path)
                    done.append(f"{what} varstore {action.path}")
                    log.info("domain '%s': %s varstore %s from %s", tx.ref.name, what, action.path, action.source)
                elif isinstance(action, CreateJsonVarstore):
                    attempt.append(f"provision JSON varstore {action.path} from {action.template}")
                    made = provision_json_varstore(action.path, action.template, owner=self.owner)
                    what = "provisioned JSON" if made else "found already provisioned JSON"
                    done.append(f"{what} varstore {action.path}")
                    log.info("domain '%s': %s varstore %s from %s", tx.ref.name, what, action.path, action.template)
                elif isinstance(action, Redefine):
                    attempt.append(f"redefine ({action.reason})")
                    tx.write(action.xml, action.reason, planned_from=facts.xml)
                    done.append(f"redefined: {action.reason}")
        except BaseException:
            for path in created:
                _discard_unused_varstore(tx.ref, path)
            raise
        return tuple(done)

    def reconcile_batch(self, refs: Sequence[DomainRef], seen: Mapping[str, Seen] | None = None,
                        parsed: Mapping[str, DomainFirmware] | None = None) -> BatchPass:
        """`reconcile` (apply) of many domains, for a pass that changes most of them (an
        upgrade rebinding every domain): each is planned lock-free (from `seen`, its XML just
        read, and `parsed`, that XML parsed, where given); the plans that are one redefinition
        are written BATCH at a time through `Writer.write_batch` (locks, fresh reads, stale
        refusal, one journal transaction, the writes, one settle transaction); every other
        domain, and one that changed since it was planned or whose lock was held, goes the
        one-domain way (`reconcile`)."""
        outcomes: dict[str, Outcome] = {}
        as_seen: set[str] = set()
        written: dict[str, Written] = {}
        batch: list[tuple[DomainRef, DomainFacts, Plan, Redefine]] = []
        singles: list[DomainRef] = []
        for ref in refs:
            try:
                facts, plan = self.examine(ref, (seen or {}).get(ref.uuid), (parsed or {}).get(ref.uuid))
            except StateDirError:
                raise
            except VarsdError:
                singles.append(ref)  # the one-domain way looks again and reports it (naming it once)
                continue
            if not plan.actions:
                outcomes[ref.uuid] = replace(_outcome(ref, facts, plan, ()), cleared=self._clear_failure(ref.uuid))
                if seen is not None and ref.uuid in seen:
                    as_seen.add(ref.uuid)
            elif len(plan.actions) == 1 and isinstance(plan.actions[0], Redefine):
                batch.append((ref, facts, plan, plan.actions[0]))
            else:
                singles.append(ref)
        for start in range(0, len(batch), BATCH):
            singles += self._write_batch(batch[start:start + BATCH], outcomes, written)
        for o in outcomes.values():
            self.archive_build(o.plan.build)  # as `reconcile` does (the singles' below do it themselves)
        for ref in singles:
            outcomes[ref.uuid] = self.reconcile(ref)
        return BatchPass([outcomes[ref.uuid] for ref in refs], written, as_seen)

    def _write_batch(self, batch: list[tuple[DomainRef, DomainFacts, Plan, Redefine]], outcomes: dict[str, Outcome],
                     written: dict[str, Written]) -> list[DomainRef]:
        """One batch through the write path; returns the domains left to the one-domain way."""
        try:
            result = self.writer.write_batch([PlannedWrite(ref, facts.xml, action.xml, action.reason,
                                                           parsed=facts.firmware) for ref, facts, _, action in batch])
        except StateDirError:
            raise
        except VarsdError as exc:  # the journal refused the intents: nothing was written
            log.warning("%s; the domains of this batch are reconciled one by one", exc)
            return [ref for ref, *_ in batch]
        for ref, facts, plan, action in batch:
            if ref.uuid in result.stored:
                written[ref.uuid] = Written(facts, plan, result.stored[ref.uuid])
                outcomes[ref.uuid] = replace(_outcome(ref, facts, plan, (f"redefined: {action.reason}",)),
                                             cleared=self._clear_failure(ref.uuid, force=True))
            elif ref.uuid in result.failed:
                outcomes[ref.uuid] = self._attempt_failed(ref, facts, plan, result.failed[ref.uuid],
                                                          f"redefine ({action.reason})")
        return result.busy + result.stale

    def reconcile_all(self, refs: Iterable[DomainRef] | None = None, *, apply: bool = True) -> list[Outcome]:
        """Every domain once, then again those a later domain's facts changed the view of
        (a varstore found to be another domain's own)."""
        refs = list(self.hv.list_domains() if refs is None else refs)
        outcomes = [self.reconcile(ref, apply=apply) for ref in refs]
        again = self.take_rechecks()
        pairs = zip(refs, outcomes, strict=True)
        return [self.reconcile(ref, apply=apply) if ref.uuid in again else o for ref, o in pairs]

    def take_rechecks(self) -> set[str]:
        with self._rechecks_lock:
            again, self.rechecks = self.rechecks, set()
        return again

