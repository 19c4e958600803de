"""The varstore lifecycle libvirt leaves open: copies at stop, scheduled passes, renames, resets.

- **Stop.** Each time a guest stops, its varstore is backed up if it changed since the
  newest backup (one lstat when it did not), so a shut-off guest's current variables
  are always in a backup and `virsh undefine --nvram` loses nothing. The full pass
  does the same for every shut-off domain (a varstore changed while varsd was down).
- **Schedule.** `backup_schedule` (cron) runs a pass over every domain, running ones as
  `backup_running` says, then applies retention (`backup_keep`).
- **Rename.** `virsh domrename` of a shut-off guest leaves `<old>_VARS.fd` in its XML;
  varsd moves the file to `<new>_VARS.fd` (a hard link then unlink in the same
  directory: never overwrites, never rewrites the bytes) and points the XML at it
  (journaled), while the libvirt hook holds back any start.
- **Reset.** A start that replaced the varstore file (`virsh start --reset-nvram`
  recreates it from the template) is noticed at STARTED: a new inode varsd did not
  make, with variables of the previous backup missing. It is logged and recorded with
  the backup that holds the previous variables (`varsctl backup restore --id`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from varsd.adapters import fsio, virtfw
from varsd.adapters.libvirt_api import DomainRef, Hypervisor
from varsd.clock import stamp
from varsd.config import Config
from varsd.domain.xml import parse_domain, replace_nvram_path
from varsd.engine.backups import (
    BackupStore,
    PassResult,
    domain_targets,
    inode_of,
    read_coherent,
    stat_key,
)
from varsd.engine.offline_write import InHand
from varsd.engine.reconciler import Reconciler
from varsd.errors import VarsdError
from varsd.messages import about_domain
from varsd.model.backup import BackupReason, SeenVarstore, VarstoreEvent
from varsd.model.domain import DomainFirmware
from varsd.planning.repair import varstore_path
from varsd.planning.retention import plan_retention

log = logging.getLogger("varsd.lifecycle")

VARS_SUFFIX = "_VARS.fd"


# -- rename (pure decision) ----------------------------------------------------------------


def renamed_varstore(fw: DomainFirmware, nvram_dir: str, others: Iterable[tuple[str, str | None]]) -> str | None:
    """The path a renamed domain's varstore should move to, or None.

    `others` are (name, nvram path) of every *other* defined domain. The varstore is
    libvirt-named for a name no domain has any more (`<old>_VARS.fd` in the nvram dir)
    and no other domain uses it: that is what `virsh domrename` leaves behind."""
    path = fw.nvram_path
    if not path or os.path.dirname(path) != nvram_dir.rstrip("/"):
        return None
    base = os.path.basename(path)
    want = varstore_path(nvram_dir, fw.name, fw.uuid)
    if path == want or not base.endswith(VARS_SUFFIX):
        return None
    old_stem = base[: -len(VARS_SUFFIX)]
    for name, used in others:
        if name == old_stem or used == path:
            return None
    return want


@dataclass(frozen=True)
class Moved:
    old: str
    new: str


# -- the shell ------------------------------------------------------------------------------


class Lifecycle:
    """Reacts to lifecycle events for varstores; one per daemon connection."""

    def __init__(self, cfg: Config, rec: Reconciler, store: BackupStore) -> None:
        self.cfg = cfg
        self.rec = rec
        self.store = store
        self._failing: dict[str, str] = {}  # uuid -> the backup trouble last logged for it

    @property
    def hv(self) -> Hypervisor:
        return self.rec.hv

    def now(self) -> datetime:
        return self.rec.clock.now()

    # -- backups at stop and in passes ---------------------------------------------------

    def backup_offline(self, refs: Iterable[DomainRef], reason: str = BackupReason.STOP) -> list[PassResult]:
        """Back up shut-off domains whose varstore changed (stat-only when it did not)."""
        targets, errors = domain_targets(self.hv, [r for r in refs if not r.active], self.cfg)
        for ref, message in errors:
            self._trouble(ref.name, ref.uuid, f"cannot look for a varstore to back up: {message}", logging.WARNING)
        results = self.store.run_pass(targets, reason=reason)
        self._log_results(results)
        return results

    def scheduled_pass(self) -> list[PassResult]:
        """backup_schedule: every domain, running ones per backup_running; then retention."""
        refs = self.hv.list_domains()
        targets, errors = domain_targets(self.hv, refs, self.cfg, self.rec.catalog)
        for ref, message in errors:
            self._trouble(ref.name, ref.uuid, f"scheduled backup: {message}", logging.WARNING)
        results = self.store.run_pass(targets, reason=BackupReason.SCHEDULE, running_mode=self.cfg.backup_running,
                                      hv=self.hv)
        self._log_results(results)
        self.prune({r.uuid for r in refs})
        return results

    def _trouble(self, name: str, uuid: str, message: str, level: int = logging.ERROR) -> None:
        """A domain's backup trouble is logged once when it starts (or changes), not at every
        pass; later passes with the same trouble log at debug level."""
        level = logging.DEBUG if self._failing.get(uuid) == message else level
        self._failing[uuid] = message
        log.log(level, "%s", about_domain(name, message, uuid))

    def _log_results(self, results: Iterable[PassResult]) -> None:
        for r in results:
            if r.error:
                self._trouble(r.target.name, r.target.uuid, f"backup failed: {r.error}")
                continue
            if self._failing.pop(r.target.uuid, None) is not None:
                log.info("%s", about_domain(r.target.name, "backups work again", r.target.uuid))
            if r.skipped and r.read:
                log.info("%s", about_domain(r.target.name, f"backup skipped: {r.skipped}", r.target.uuid))

    def prune(self, defined: set[str]) -> int:
        plan = plan_retention(self.store.index.records(), self.cfg.backup_keep, self.rec.clock.now(), defined)
        if plan.prune:
            self.store.index.remove([p.record.id for p in plan.prune])
            removed = self.store.remove_unreferenced()
            log.info("backups: pruned %d backup(s), %d file(s), per backup_keep", len(plan.prune), len(removed))
        return len(plan.prune)

    # -- rename ----------------------------------------------------------------------------

    def follow_rename(self, ref: DomainRef) -> Moved | None:
        """Move a renamed shut-off domain's `<old>_VARS.fd` to `<new>_VARS.fd` (module doc)."""
        if ref.active or self.cfg.is_excluded(ref.name, ref.uuid):
            return None  # running: QEMU has the file open by its path, moved when the guest stops
        fw = parse_domain(self.hv.persistent_xml(ref.uuid))
        if fw.metadata.opt_out or not fw.nvram_path or not fw.nvram_path.endswith(VARS_SUFFIX) \
                or fw.nvram_path == varstore_path(self.cfg.nvram_dir, fw.name, fw.uuid):
            return None  # the common case: no listing
        others = []
        for other in self.hv.list_domains():
            if other.uuid == ref.uuid:
                continue
            try:
                others.append((other.name, parse_domain(self.hv.persistent_xml(other.uuid)).nvram_path))
            except VarsdError:
                others.append((other.name, None))
        new = renamed_varstore(fw, self.cfg.nvram_dir, others)
        if new is None:
            return None
        old = fw.nvram_path
        with self.rec.writer.transaction(ref) as tx, \
                InHand(self.cfg.offline_dir, ref.uuid, op="rename", wait=self.cfg.start_wait) as hand:
            ref = self.hv.lookup(ref.uuid)
            xml = tx.xml
            if self.hv.is_running(ref.uuid) or parse_domain(xml).nvram_path != old:
                return None  # started or changed meanwhile: the next event looks again
            if not os.path.lexists(old):
                return None  # never started: libvirt creates the file at first start, under the new name
            with hand.commit():
                try:
                    os.link(old, new, follow_symlinks=False)
                except OSError as exc:
                    raise VarsdError(f"domain '{ref.name}': cannot move its varstore {old} to {new} after the "
                                     f"rename: {fsio.describe_oserror(exc)}") from None
            try:
                tx.write(replace_nvram_path(xml, new),
                         f"varstore follows domrename: {os.path.basename(old)} -> {os.path.basename(new)}")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(new)
                raise
            os.unlink(old)
            _fsync_dir(os.path.dirname(new))
            seen = self.store.index.seen(ref.uuid)
            if seen is not None:
                self.store.index.note_seen(SeenVarstore(ref.uuid, new, stat_key(os.lstat(new)), seen.sha256,
                                                        self.now()))
        log.info("domain '%s': renamed; its varstore moved from %s to %s", ref.name, old, new)
        return Moved(old, new)

    # -- reset at start ----------------------------------------------------------------------

    def check_reset(self, ref: DomainRef) -> VarstoreEvent | None:
        """Did this start replace the varstore with a fresh one (module doc)? Record and say so."""
        seen = self.store.index.seen(ref.uuid)
        if seen is None or self.cfg.is_excluded(ref.name, ref.uuid):
            return None
        try:
            fw = parse_domain(self.hv.live_xml(ref.uuid) or self.hv.persistent_xml(ref.uuid))
        except VarsdError:
            return None
        if fw.nvram_path != seen.path:
            return None
        try:
            st = os.lstat(seen.path)
        except OSError:
            return None
        if inode_of(stat_key(st)) == inode_of(seen.stat_key):
            return None  # QEMU writes in place: same file
        previous = next((r for r in reversed(self.store.index.records(ref.uuid)) if r.sha256 == seen.sha256), None)
        if previous is None:
            return None
        try:
            now = read_coherent(seen.path)
            old = self.store.load(previous)
        except VarsdError as exc:
            log.warning("%s", about_domain(
                ref.name, f"its varstore was replaced at this start, but cannot be compared: {exc}", ref.uuid))
            return None
        cur_vars = virtfw.variables_of_bytes(now, seen.path)
        old_vars = virtfw.variables_of_bytes(old, f"backup #{previous.id}")
        lost = sorted(v.name for k, v in old_vars.items() if k not in cur_vars)
        template = fw.nvram_template or fw.metadata.template_path
        is_template = False
        if template:
            with contextlib.suppress(fsio.ReadError):
                is_template = fsio.read_file(template) == now
        if not lost and not is_template:
            return None
        what = "reset to its template" if is_template else "replaced by a fresh copy"
        shown = ", ".join(lost[:8]) + (f" and {len(lost) - 8} more" if len(lost) > 8 else "")
        detail = (f"varstore {seen.path} was {what} at this start (virsh start --reset-nvram?)"
                  + (f"; lost {len(lost)} variable(s): {shown}" if lost else "")
                  + f". The previous variables are in backup #{previous.id} ({stamp(previous.taken)}): shut the guest "
                  f"down and run 'varsctl backup restore {ref.name} --id {previous.id}' to get them back")
        event = self.store.index.record_event(at=self.now(), uuid=ref.uuid, name=ref.name,
                                              event="reset-to-template" if is_template else "replaced",
                                              detail=detail, backup_id=previous.id)
        # Not the content varsd last saw any more: remember the new file, so this is reported once.
        self.store.index.note_seen(SeenVarstore(ref.uuid, seen.path, stat_key(st), fsio.sha256_bytes(now),
                                                self.now()))
        log.warning("%s", about_domain(ref.name, detail, ref.uuid))
        return event


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
