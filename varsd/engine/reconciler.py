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

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.clock import SYSTEM, Clock, stamp
from varsd.config import Config
from varsd.domain.classify import firmware_image_path
from varsd.domain.xml import firmware_signature, parse_domain
from varsd.engine.inspect import FileInspector
from varsd.engine.lock import host_lock
from varsd.engine.provision import provision_varstore
from varsd.engine.transaction import Transaction, Writer
from varsd.errors import HypervisorError, LockBusy, StateDirError, VarsdError
from varsd.firmware.archive import Archive, ArchiveError, ArchiveIndex
from varsd.messages import about_domain
from varsd.model.domain import DomainRef, FirmwareConfig, Status
from varsd.model.firmware import Build, Catalog, UpgradePolicy
from varsd.planning.repair import CreateVarstore, DomainFacts, Plan, Redefine, plan_repair, varstore_path
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

    @property
    def status(self) -> Status:
        """A repair that was planned but not (yet) done is not ok: the domain is wrong now."""
        if self.unrepaired:
            return Status.ERROR
        return self.plan.status

    @property
    def detail(self) -> str:
        if self.unrepaired:
            return f"needs repair, which 'varsctl reconcile' or the daemon does: {self.plan.detail}"
        return self.plan.detail

    @property
    def changed(self) -> bool:
        return bool(self.done)

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
        }


def _outcome(ref: DomainRef, facts: DomainFacts, plan: Plan, done: tuple[str, ...], *,
             unrepaired: bool = False) -> Outcome:
    live = facts.live
    return Outcome(ref, plan, done, unrepaired=unrepaired,
                   boot_unrecorded=live is not None and live.booted_sha256 is None)


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
        isinstance(a, CreateVarstore) or (isinstance(a, Redefine) and firmware_signature(a.xml) != before)
        for a in plan.actions
    )


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
        # None: wait as long as the holder of a domain's lock progresses (varsctl); a bound
        # (the daemon) makes a busy domain a retry instead of a blocked worker.
        self.lock_wait = lock_wait
        self._owners: dict[str, tuple[str, str]] = {}  # varstore path -> (uuid, name) whose own it is
        self._uses: dict[str, str | None] = {}  # uuid -> varstore path it names
        self._users: dict[str, set[str]] = {}  # varstore path -> uuids naming it (the inverse of _uses)
        self._owned: dict[str, str] = {}  # uuid -> the path in _owners it owns (the inverse of _owners)
        self._owners_lock = threading.Lock()
        self.rechecks: set[str] = set()  # domains to look at again (see _note_varstore)
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
                at = stamp(self.clock.now())
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

    def examine(self, ref: DomainRef) -> tuple[DomainFacts, Plan]:
        """Read the domain now and plan; a compliant domain whose inputs are unchanged
        since the last look (same XML text, same file stat keys, same catalog) reuses
        its plan, so a full pass costs about one XML fetch per domain."""
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
        facts = self.facts(xml, live_xml, excluded=excluded, persistent=ref.persistent)
        plan = plan_repair(facts, self.catalog, self.cfg.nvram_dir, stamp(self.clock.now()), upgrades)
        if plan.actions:
            self._memo.pop(ref.uuid, None)
        else:
            fw = facts.firmware
            paths = tuple(p for p in (firmware_image_path(fw), fw.nvram_path) if p)
            self._memo[ref.uuid] = _Memo(
                xml, live_xml, self.catalog, upgrades, excluded, ref.persistent, paths,
                tuple(self.inspector.stat_key(p) for p in paths), facts, plan,
            )
        return facts, plan

    def facts(self, xml: str, live_xml: str | None, *, excluded: bool = False, persistent: bool = True) -> DomainFacts:
        """What the planner looks at for this XML: parsed, plus the files it names."""
        fw = parse_domain(xml)
        live = parse_domain(live_xml) if live_xml else None
        image_path = firmware_image_path(fw)
        image = self.inspector.inspect(image_path, digest=True) if image_path else None
        nvram = self.inspector.inspect(fw.nvram_path, digest=False) if fw.nvram_path else None
        return DomainFacts(
            xml=xml, firmware=fw, live=live, image=image, nvram=nvram, excluded=excluded, persistent=persistent,
            nvram_shared_with=self._note_varstore(fw),
        )

    def _note_varstore(self, fw) -> str | None:
        """Track which domain's own varstore each path is; the name of *another* domain
        whose own file `fw` names, if any.

        A domain owns the `<name>_VARS.fd` libvirt's naming gives it. When an owner shows
        up after a domain that uses its file was judged fine, that domain's memo is
        dropped (and it is listed in `rechecks`), so the order domains are seen in does
        not matter.
        """
        with self._owners_lock:
            path = fw.nvram_path
            owned = self._owned.get(fw.uuid)
            if owned is not None and owned != path:
                self._disown(fw.uuid)  # its varstore moved
            self._use(fw.uuid, path)
            if not path:
                return None
            if path == varstore_path(self.cfg.nvram_dir, fw.name, fw.uuid):
                previous = self._owners.get(path)
                if previous is not None and previous[0] != fw.uuid:
                    self._owned.pop(previous[0], None)
                self._owners[path] = (fw.uuid, fw.name)
                self._owned[fw.uuid] = path
                for other in self._users.get(path, ()):
                    if other != fw.uuid:
                        self._memo.pop(other, None)
                        self.rechecks.add(other)
                return None
            owner = self._owners.get(path)
            return owner[1] if owner is not None and owner[0] != fw.uuid else None

    # The two indexes keep each look O(1): a full pass over N domains must not cost N^2.
    def _use(self, uuid: str, path: str | None) -> None:
        """Record that `uuid` names `path` (None: no varstore), in `_uses` and its inverse."""
        before = self._uses.get(uuid)
        if before and before != path:
            users = self._users.get(before, set())
            users.discard(uuid)
            if not users:
                self._users.pop(before, None)
        self._uses[uuid] = path
        if path:
            self._users.setdefault(path, set()).add(uuid)

    def _disown(self, uuid: str) -> None:
        """`uuid` no longer owns the path it owned."""
        path = self._owned.pop(uuid, None)
        if path is not None and self._owners.get(path, ("",))[0] == uuid:
            del self._owners[path]

    def plan_xml(self, ref: DomainRef, xml: str, *, policy: UpgradePolicy | None = None) -> tuple[DomainFacts, Plan]:
        """Plan for a definition the domain does not have yet (what varsctl pin, unpin and
        approve are about to write), so their one redefinition is already what the planner
        wants and the daemon has nothing left to change. Never memoised."""
        live_xml = self.hv.live_xml(ref.uuid) if ref.active else None
        facts = self.facts(xml, live_xml, excluded=self.cfg.is_excluded(ref.name, ref.uuid), persistent=ref.persistent)
        return facts, plan_repair(facts, self.catalog, self.cfg.nvram_dir, stamp(self.clock.now()),
                                  self.upgrade_context(policy=policy))

    def forget(self, uuid: str) -> str | None:
        """Drop what is remembered of a domain that is gone; returns its last varstore path."""
        with self._owners_lock:
            self._use(uuid, None)
            self._uses.pop(uuid, None)
            self._disown(uuid)
        memo = self._memo.pop(uuid, None)
        return memo.facts.firmware.nvram_path if memo is not None else None

    # -- acting ------------------------------------------------------------------

    def reconcile(self, ref: DomainRef, *, apply: bool = True) -> Outcome:
        """Bring one domain to its planned state; never raises for a domain problem.

        Looking is lock-free; acting happens under the domain's lock after a fresh
        look, so varsd and varsctl never act on one domain at once, and neither acts
        on what it read before the other changed it.
        """
        try:
            outcome = self._reconcile(ref, apply)
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
            log.info("domain '%s': %s; will look again", ref.name, exc)
            return replace(_error(ref, exc, retry=True), busy=True)
        except HypervisorError as exc:
            action = decide(exc, alive=not exc.retryable or self.hv.is_alive(), settings=self.retry).action
            if action is Action.RECONNECT:
                raise  # the connection is gone: the caller reconnects and looks again
            # A domain-level failure (a hung QEMU's state-change lock, a refused define):
            # this domain's error, not the host's; `retry` tells the daemon to look again.
            outcome = _error(ref, exc, retry=action is Action.RETRY)
            log.error("%s", outcome.detail)
            return outcome
        except VarsdError as exc:
            outcome = _error(ref, exc)
            log.error("%s", outcome.detail)
            return outcome

    def _reconcile(self, ref: DomainRef, apply: bool) -> Outcome:
        if apply and ref.uuid not in self._memo:
            # Not known compliant (a new domain, most likely to need work): look
            # once, in the write transaction, instead of looking twice.
            with self.writer.transaction(ref) as tx:
                facts, plan = self.examine(ref)
                return _outcome(ref, facts, plan, self._execute(tx, facts, plan) if plan.actions else ())
        facts, plan = self.examine(ref)
        if not apply or not plan.actions:
            return _outcome(ref, facts, plan, (), unrepaired=bool(plan.actions) and _changes_firmware(facts, plan))
        with self.writer.transaction(ref) as tx:
            if tx.xml != facts.xml:
                # Another actor changed it since we looked: look again, in the transaction.
                facts, plan = self.examine(ref)
            return _outcome(ref, facts, plan, self._execute(tx, facts, plan) if plan.actions else ())

    def _execute(self, tx: Transaction, facts: DomainFacts, plan: Plan) -> tuple[str, ...]:
        done: list[str] = []
        for action in plan.actions:
            if isinstance(action, CreateVarstore):
                result = provision_varstore(
                    action.path, action.source, expected_layout=action.layout, owner=self.owner, length=action.length
                )
                what = "adopted existing identical" if result.adopted else "created"
                done.append(f"{what} varstore {action.path}")
                log.info("domain '%s': %s varstore %s from %s", tx.ref.name, what, action.path, action.source)
            elif isinstance(action, Redefine):
                tx.write(action.xml, action.reason, planned_from=facts.xml)
                done.append(f"redefined: {action.reason}")
        return tuple(done)

    def reconcile_all(self, refs: Iterable[DomainRef] | None = None, *, apply: bool = True) -> list[Outcome]:
        """Every domain once, then again those a later domain's facts changed the view of
        (a varstore found to be another domain's own)."""
        refs = list(self.hv.list_domains() if refs is None else refs)
        outcomes = [self.reconcile(ref, apply=apply) for ref in refs]
        again = self.take_rechecks()
        pairs = zip(refs, outcomes, strict=True)
        return [self.reconcile(ref, apply=apply) if ref.uuid in again else o for ref, o in pairs]

    def take_rechecks(self) -> set[str]:
        with self._owners_lock:
            again, self.rechecks = self.rechecks, set()
        return again

