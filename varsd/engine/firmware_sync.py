"""Firmware sync: notice what the package manager changed, archive it, plan every domain.

`varsctl firmware sync` (what package hooks run) and the daemon share this module.

Theory of operation:
- `refresh` needs no libvirt: it loads the catalog, stores every code image the
  catalog lists in the archive, and compares each watched code path's digest with
  `firmware_history`, recording `appeared`, `changed` and `removed`. Watched paths are
  the catalog's code images plus every path recorded before (so a file whose
  descriptor is momentarily unreadable is still hashed, not reported removed), plus
  the code images managed domains use. Only a file that is really gone is `removed`.
- `sync` = refresh, then every domain: boot records for running domains that lack
  one (QEMU's open file says which build it runs), a reconcile with the fresh catalog
  (the upgrade rules of `varsd.planning.upgrade` decide), the code images domains use
  archived and watched, their digests marked used, and the archive pruned.
- Safe with or without the daemon: history and archive writes happen under one
  host-wide lock, domain changes under each domain's lock (the reconciler's).
- Quick and idempotent: a second sync finds no change, archives nothing and plans no
  action. It never raises for a domain's or a descriptor's problem; those are
  reported, and `SyncReport.exit_code` says what a package hook's log should show:
  0 done, 1 something needs attention (a domain in error or needs-migration, a
  descriptor or archive problem), 2 could not run (configuration, state dir, libvirt).
- `watch_signature` is the daemon's cheap change signal: stat() of the descriptor
  directories, their entries and every watched image (no reads, no hashing).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.clock import SYSTEM, Clock, stamp
from varsd.config import Config
from varsd.domain.classify import firmware_image_path
from varsd.domain.xml import parse_domain
from varsd.engine.boots import record_boot
from varsd.engine.fetch import Seen, fetched
from varsd.engine.inspect import FileInspector
from varsd.engine.lock import host_lock
from varsd.engine.reconciler import Outcome, Reconciler, Written
from varsd.errors import HypervisorError, VarsdError
from varsd.firmware.archive import Archive, ArchiveError, is_archive_path
from varsd.firmware.catalog import load_configured
from varsd.messages import about_domain, for_row
from varsd.model.domain import ATTENTION, DomainFirmware, DomainRef, FirmwareConfig, Status
from varsd.model.exit import Exit
from varsd.model.firmware import Catalog
from varsd.planning.repair import DomainFacts, Plan

log = logging.getLogger("varsd.firmware")

EXIT_OK, EXIT_ATTENTION, EXIT_FAILED = Exit.OK, Exit.ATTENTION, Exit.USAGE  # README: exit codes


@dataclass(frozen=True)
class FirmwareChange:
    """A watched code image path that appeared, changed digest or was removed."""

    code_path: str
    event: str
    sha256: str
    previous: str | None = None

    def describe(self) -> str:
        if self.event == "changed":
            return f"{self.code_path}: changed {(self.previous or '?')[:12]} -> {self.sha256[:12]}"
        return f"{self.code_path}: {self.event} ({self.sha256[:12]})"

    def as_dict(self) -> dict:
        return {"path": self.code_path, "event": self.event, "sha256": self.sha256, "previous": self.previous}


@dataclass(frozen=True)
class Refresh:
    """What `refresh` found: changes, newly archived images, and problems to report."""

    catalog: Catalog
    changes: tuple[FirmwareChange, ...] = ()
    archived: tuple[str, ...] = ()  # "sha256 path" of images stored now
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class SyncReport:
    refresh: Refresh | None = None
    outcomes: tuple[Outcome, ...] = ()
    archived: tuple[str, ...] = ()  # images domains use, stored now
    pruned: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    error: str | None = None  # why the sync could not run (completely)

    @property
    def all_problems(self) -> tuple[str, ...]:
        return (self.refresh.problems if self.refresh else ()) + self.problems

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return EXIT_FAILED
        if self.all_problems or any(o.status in ATTENTION for o in self.outcomes):
            return EXIT_ATTENTION
        return EXIT_OK

    def as_dict(self) -> dict:
        refresh = self.refresh
        return {
            "firmware": {
                "changes": [c.as_dict() for c in refresh.changes] if refresh else [],
                "archived": list(refresh.archived if refresh else ()) + list(self.archived),
                "pruned": list(self.pruned),
                "problems": list(self.all_problems),
            },
            "domains": [o.as_dict() for o in self.outcomes],
            "error": self.error,
            "exit_code": self.exit_code,
        }


def _archive_catalog(archive: Archive, journal: Journal, catalog: Catalog, at: datetime,
                     inspector: FileInspector) -> tuple[list[str], list[str]]:
    archived, problems = [], []
    done: set[str] = set()
    for build in catalog.builds:
        if build.code_sha256 in done:
            continue
        done.add(build.code_sha256)
        try:
            # A build archived before whose file still is that build (the digest `refresh` takes
            # anyway, cached by stat) is not read and hashed a second time to be stored again.
            if inspector.inspect(build.code_path, digest=True).sha256 == build.code_sha256 \
                    and archive.verify(build.code_sha256).ok:
                journal.note_archived(sha256=build.code_sha256, code_path=build.code_path, size=build.code_size,
                                      at=at, layout=build.layout, features=build.features)
                continue
            stored = archive.store_file(build.code_path, expect_sha256=build.code_sha256)
            journal.note_archived(sha256=build.code_sha256, code_path=build.code_path, size=build.code_size, at=at,
                                  layout=build.layout, features=build.features)
        except VarsdError as exc:
            problems.append(str(exc))
            continue
        if stored.replaced_corrupt:
            problems.append(f"{stored.entry.path} was corrupt; replaced from {build.code_path} "
                            f"(the corrupt file is kept as {stored.replaced_corrupt})")
        if stored.created:
            archived.append(f"{build.code_sha256} {build.code_path}")
    return archived, problems


def _record_changes(
    journal: Journal, inspector: FileInspector, current: dict[str, str], at: datetime, watch_known: bool = True
) -> list[FirmwareChange]:
    """Compare `current` (path -> digest) and, with `watch_known`, every path seen before."""
    known = journal.firmware_state()
    now = dict(current)
    if watch_known:
        for path in known.keys() - now.keys():
            facts = inspector.inspect(path, digest=True)
            if facts.exists and facts.sha256:
                now[path] = facts.sha256
            elif not facts.exists and facts.error is None:
                now[path] = ""  # gone
            # unreadable: no claim either way (a glitch must not become a "removed")
    changes = []
    for path in sorted(now):
        sha, before = now[path], known.get(path)
        if sha == "":
            if before is not None:
                changes.append(FirmwareChange(path, "removed", before, before))
        elif before is None:
            changes.append(FirmwareChange(path, "appeared", sha))
        elif before != sha:
            changes.append(FirmwareChange(path, "changed", sha, before))
    if changes:
        journal.record_firmware(at, [(c.code_path, c.sha256, c.event) for c in changes])
        for c in changes:
            log.info("firmware %s", c.describe())
    return changes


def refresh(
    cfg: Config,
    journal: Journal,
    archive: Archive,
    *,
    catalog: Catalog | None = None,
    inspector: FileInspector | None = None,
    clock: Clock = SYSTEM,
) -> Refresh:
    """Archive the catalog's images and record what changed (module doc); no libvirt."""
    catalog = catalog if catalog is not None else load_configured(cfg)
    inspector = inspector or FileInspector()
    problems = [p.message for p in catalog.problems]
    at = clock.now()
    with host_lock(cfg.firmware_lock_path, doing="firmware sync"):
        try:
            archive.prepare()
        except ArchiveError as exc:
            problems.append(str(exc))
            archived: list[str] = []
        else:
            archived, more = _archive_catalog(archive, journal, catalog, at, inspector)
            problems += more
        current = {}
        for build in catalog.builds:
            facts = inspector.inspect(build.code_path, digest=True)
            # What is there now, not what the catalog read: a later load compares again.
            if facts.exists and facts.sha256:
                current[build.code_path] = facts.sha256
        changes = _record_changes(journal, inspector, current, at)
    return Refresh(catalog, tuple(changes), tuple(archived), tuple(problems))


def watch_signature(cfg: Config, catalog: Catalog, watched: Iterable[str] = ()) -> tuple:
    """Cheap change signal: stat() of descriptor dirs, their entries and watched images."""

    def key(path: str) -> tuple:
        try:
            st = os.stat(path)
        except OSError as exc:
            return (path, exc.errno)
        return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    parts: list[tuple] = []
    for d in cfg.firmware_dirs:
        parts.append(key(d))
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        parts += [key(os.path.join(d, n)) for n in names]
    paths = {p for b in catalog.builds for p in (b.code_path, b.template_path) if p}
    paths |= {p for e in cfg.extra_firmware for p in (e.code, e.template)}
    paths |= set(watched)
    parts += [key(p) for p in sorted(paths)]
    return tuple(parts)


def _in_use(rec: Reconciler, ref: DomainRef, seen: Seen | None = None) -> tuple[set[str], dict[str, str]]:
    """Digests this domain is bound to, pinned to, running or pointing at, and the code
    images it uses that belong in the archive (path -> digest): split loaders that are
    pure code (never a unified image: it holds the guest's variables)."""
    facts, plan = rec.examine(ref, seen)
    return _used_by(rec, facts.firmware, facts, plan)


def _used_by(rec: Reconciler, fw: DomainFirmware, facts: DomainFacts, plan: Plan) -> tuple[set[str], dict[str, str]]:
    """`_in_use` of the definition `fw`, whose loader image, live state and class are those
    of `facts` and `plan`."""
    md = fw.metadata
    shas = {s for s in (md.build_code_sha256, md.pinned_sha256) if s}
    if facts.live is not None and facts.live.booted_sha256:
        shas.add(facts.live.booted_sha256)
    images: dict[str, str] = {}
    image = facts.image
    if image is not None and image.exists and image.sha256:
        shas.add(image.sha256)
        managed = plan.status is not Status.UNMANAGED
        path = firmware_image_path(fw)
        if managed and plan.config is FirmwareConfig.SPLIT and image.varstore_layout is None and path \
                and not is_archive_path(rec.archive.directory, path):
            images[path] = image.sha256
    return shas, images


def _written_in_use(rec: Reconciler, ref: DomainRef, written: Written) -> tuple[set[str], dict[str, str]]:
    """`_in_use` of a domain the sync just wrote: a change of only varsd's record leaves its
    loader, live state and class as planned (its new binding is read from what libvirt
    stored); any other change is looked at again."""
    after = parse_domain(written.stored)
    if replace(after, metadata=written.facts.firmware.metadata) != written.facts.firmware:
        return _in_use(rec, ref)
    return _used_by(rec, after, written.facts, written.plan)


def _read_all(rec: Reconciler, refs: list[DomainRef], complete: bool) -> tuple[dict[str, Seen],
                                                                              dict[str, DomainFirmware]]:
    """Every domain's XML, read once and parsed once; with `complete` (they are all the
    domains there are) the varstore index is filled from them, not read again."""
    seen: dict[str, Seen] = {}
    parsed: dict[str, DomainFirmware] = {}
    for _, ref, xmls in fetched(rec.hv, refs):
        if xmls is None:
            continue  # the one-domain way reads it again and reports it
        try:
            fw = parse_domain(xmls[0])
        except VarsdError:
            continue
        seen[ref.uuid], parsed[ref.uuid] = xmls, fw
        rec.varstores.register(fw, running=xmls[1] is not None, persistent=ref.persistent)
    if complete and len(seen) == len(refs):
        rec.varstores.mark_filled()
    return seen, parsed


def sync(
    cfg: Config,
    journal: Journal,
    connect: Callable[[], Hypervisor],
    owner: Callable[[], tuple[int, int]],
    *,
    actor: str = "varsctl",
    clock: Clock = SYSTEM,
    domains: Sequence[str] = (),
) -> SyncReport:
    """`varsctl firmware sync` (module doc). Never raises a VarsdError: it is reported.

    `connect` and `owner` are called only after the libvirt-free part is done, so a
    host whose libvirtd is down still gets its firmware archived and recorded.
    """
    archive = Archive(cfg.archive_dir, state_dir=cfg.state_dir)
    inspector = FileInspector()
    try:
        fresh = refresh(cfg, journal, archive, inspector=inspector, clock=clock)
    except VarsdError as exc:
        return SyncReport(error=str(exc))
    try:
        hv = connect()
        rec = Reconciler(cfg, hv, fresh.catalog, journal, owner(), actor=actor, clock=clock, inspector=inspector,
                         archive=archive)
        refs = [hv.lookup(n) for n in domains] if domains else hv.list_domains()
    except VarsdError as exc:
        return SyncReport(fresh, error=f"{exc}; firmware was archived and recorded, domains were not planned")
    problems: list[str] = []
    try:
        seen, parsed = _read_all(rec, refs, complete=not domains)
    except VarsdError as exc:
        return SyncReport(fresh, error=f"{exc}; firmware was archived and recorded, domains were not planned")
    for ref in refs:
        # Running since before anything recorded its boot (no daemon): QEMU's open file still
        # tells which build it runs, which is what `pending-cold-boot` is judged by.
        if not ref.active:
            continue
        try:
            live_xml = seen[ref.uuid][1] if ref.uuid in seen else hv.live_xml(ref.uuid)
            if live_xml is not None and parse_domain(live_xml).booted_sha256 is None:
                record_boot(hv, ref.uuid, stamp(clock.now()))
                seen.pop(ref.uuid, None)  # its live XML changed: read again
        except VarsdError as exc:
            problems.append(about_domain(ref.name, f"cannot record what it booted: {for_row(ref.name, exc, ref.uuid)}"))
    try:
        # a domain's own problem is its outcome; an error here is the link to libvirt
        done = rec.reconcile_batch(refs, seen, parsed)
    except VarsdError as exc:
        return SyncReport(fresh, problems=tuple(problems),
                          error=f"{exc}; firmware was archived and recorded, not every domain was planned")
    outcomes = tuple(done.outcomes)
    used = {b.code_sha256 for b in fresh.catalog.builds}
    images: dict[str, str] = {}
    complete = not domains
    for ref in refs:
        try:
            if ref.uuid in done.written:
                shas, imgs = _written_in_use(rec, ref, done.written[ref.uuid])
            else:  # compliant as read above: its memoised plan (no fetch); else read again
                shas, imgs = _in_use(rec, ref, seen[ref.uuid] if ref.uuid in done.as_seen else None)
        except VarsdError as exc:
            complete = False  # a domain we could not read may use anything: prune nothing
            problems.append(about_domain(ref.name, exc, ref.uuid))
            continue
        used |= shas
        images.update(imgs)
    archived, pruned = [], []
    at = clock.now()
    try:
        with host_lock(cfg.firmware_lock_path, doing="firmware sync"):
            for path, sha in sorted(images.items()):
                try:
                    stored = archive.store_file(path, expect_sha256=sha)
                    journal.note_archived(sha256=sha, code_path=path, size=stored.entry.size, at=at)
                except VarsdError as exc:
                    problems.append(str(exc))
                    continue
                if stored.created:
                    archived.append(f"{sha} {path}")
            _record_changes(journal, inspector, images, at, watch_known=False)
            journal.touch_archived(used, at)
            if complete:
                last_used = {s: b.last_used for s, b in journal.archived_builds().items()}
                pruned = archive.prune(used, last_used, at, timedelta(days=cfg.archive_retention_days))
                if pruned:
                    journal.forget_archived(pruned)
                    for sha in pruned:
                        log.info("firmware archive: pruned build %s (unused for %d days)", sha[:12],
                                 cfg.archive_retention_days)
    except VarsdError as exc:
        problems.append(str(exc))
    return SyncReport(fresh, outcomes, tuple(archived), tuple(pruned), tuple(problems))


def prune_daemon(
    rec: Reconciler, journal: Journal, refs: Iterable[DomainRef], clock: Clock = SYSTEM
) -> list[str]:
    """The daemon's periodic retention pass: the in-use part of `sync` without reconciling."""
    used = {b.code_sha256 for b in rec.catalog.builds}
    for ref in refs:
        try:
            used |= _in_use(rec, ref)[0]
        except HypervisorError as exc:
            if exc.retryable:
                raise
            return []
        except VarsdError:
            return []
    at = clock.now()
    with host_lock(rec.cfg.firmware_lock_path, doing="firmware sync"):
        journal.touch_archived(used, at)
        last_used = {s: b.last_used for s, b in journal.archived_builds().items()}
        pruned = rec.archive.prune(used, last_used, at, timedelta(days=rec.cfg.archive_retention_days))
        if pruned:
            journal.forget_archived(pruned)
    return pruned


__all__ = [
    "EXIT_ATTENTION", "EXIT_FAILED", "EXIT_OK", "FirmwareChange", "Refresh", "SyncReport",
    "prune_daemon", "refresh", "sync", "watch_signature",
]
