"""`varsctl migrate`: move a domain's variables into another build's varstore layout.

Why this exists: code hard-codes where its varstore lives, so a domain whose varstore
has the 2 MiB layout cannot boot 4 MiB code (and on x86 fails *silently*: variable
changes are lost). When the distro drops or replaces the build a domain's varstore
was made for, varsd keeps the domain on what it can boot and reports
`needs-migration`; this module is the explicit admin operation that then moves every
variable (boot entries, BootOrder, PK/KEK/db/dbx, MokList, shim's SBAT level, ...)
into a fresh copy of the target build's template and binds the domain to that
build's central code. It is the only place in varsd that rewrites an existing
varstore, and only on request.

Theory of operation:

- What to migrate to, and whether at all, is decided by the pure planner
  (`varsd.planning.migration.plan_migration`); this module carries it out.
- `Migrator.migrate(ref)` is the shell, under the domain's lock:
  1. read the varstore (never through a symlink) and plan;
  2. build the new store's bytes with virt-firmware and verify them in memory
     (every old variable present with equal attributes and data, nothing else, the
     target template's layout). Variables that do not fit fail *here*: nothing
     has been written yet;
  3. back the old store up into the backup store (`varsd.engine.backups`:
     `<state_dir>/backups/objects/<sha256>.fd`, 0600, verified; indexed with reason
     `before-write:migrate`, so `varsctl backup restore` can undo it);
  4. replace the varstore atomically at the same path (so `virsh undefine --nvram`
     still finds it; owner and mode kept), after checking that the domain is still
     shut off and the file still holds what was read;
  5. read it back and verify again;
  6. redefine the domain (journaled with its old XML) to the target's central code,
     template, Secure Boot and SMM, and bind varsd's metadata to the build.
  Any failure after step 3 puts the backup back byte for byte; the XML is changed
  only in the last step, so a failure leaves it as it was. Steps 3-6 run with the
  write announced to the libvirt QEMU hook (`offline_write.InHand`): a `virsh start`
  meanwhile waits for it, and one that stopped waiting makes the write refused.
- A private unified image (`unified`) is migrated into a *new* private varstore: the
  image is only read, never changed, and stays on disk for the admin to remove.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from varsd.adapters import fsio, virtfw
from varsd.clock import SYSTEM, Clock
from varsd.config import Config
from varsd.domain.classify import classify, firmware_image_path
from varsd.domain.xml import parse_domain
from varsd.engine.backups import BackupStore, open_store
from varsd.engine.offline_write import InHand
from varsd.engine.reconciler import Reconciler
from varsd.engine.transaction import Transaction
from varsd.errors import VarsdError, VarstoreError
from varsd.model.backup import before_write
from varsd.model.domain import DomainFirmware, DomainRef, FileFacts, FirmwareConfig, Status
from varsd.model.firmware import VarstoreLayout
from varsd.model.journal import ChangeKind
from varsd.model.varstore import EfiVariable
from varsd.planning.migration import (
    MigrationFacts,
    MigrationPlan,
    VarstoreFacts,
    compare_variables,
    enrolled_keys,
    plan_migration,
)


class MigrationFailed(VarsdError):
    """A step failed; the message says what was restored (and what was not)."""


# -- the shell ------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationResult:
    """A migration that was carried out (or, with `dry_run`, would be)."""

    plan: MigrationPlan
    backup: str | None  # None for a dry run
    variables: int
    done: bool


def _read_source(fw: DomainFirmware, config: FirmwareConfig, image: FileFacts | None) -> tuple[
        VarstoreFacts | None, bytes, dict[str, EfiVariable]]:
    """The variables' file as facts, its varstore bytes and its variables (never via a symlink)."""
    path = fw.loader_path if config is FirmwareConfig.UNIFIED else fw.nvram_path
    if path is None:
        return None, b"", {}
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, b"", {}
    except OSError as exc:
        return VarstoreFacts(path=path, size=0, error=f"cannot stat: {fsio.describe_oserror(exc)}"), b"", {}
    if stat.S_ISLNK(st.st_mode) and config is not FirmwareConfig.UNIFIED:
        return VarstoreFacts(path=path, size=st.st_size, symlink=True), b"", {}
    try:
        data = fsio.read_file(path, follow_symlinks=config is FirmwareConfig.UNIFIED)
        layout = virtfw.layout_of_bytes(data, path)
        data = data[: layout.size] if config is FirmwareConfig.UNIFIED else data
        variables = virtfw.variables_of_bytes(data, path)
    except (fsio.ReadError, VarstoreError) as exc:
        return VarstoreFacts(path=path, size=st.st_size, error=str(exc)), b"", {}
    facts = VarstoreFacts(
        path=path, size=st.st_size, layout=layout, variables=len(variables), enrolled_keys=enrolled_keys(variables)
    )
    return facts, data, variables


def _verify_store(data: bytes, old: Mapping[str, EfiVariable], layout: VarstoreLayout, what: str) -> None:
    try:
        got_layout = virtfw.layout_of_bytes(data, what)
        got = virtfw.variables_of_bytes(data, what)
    except VarstoreError as exc:
        raise MigrationFailed(f"{what}: {exc}") from None
    if got_layout != layout:
        raise MigrationFailed(f"{what}: layout {got_layout.describe()}, expected the template's {layout.describe()}")
    diff = compare_variables(old, got)
    if diff:
        raise MigrationFailed(f"{what}: variables differ from the old store ({diff})")


def replace_file(path: str, data: bytes, *, expect: bytes | None = None) -> None:
    """fsio.replace_atomic, failing as a MigrationFailed (the one error migrate reports)."""
    try:
        fsio.replace_atomic(path, data, expect=expect)
    except fsio.ReplaceError as exc:
        raise MigrationFailed(str(exc)) from None


def _remove_if(path: str, data: bytes) -> None:
    """Remove a store we created, if it still holds what we wrote."""
    try:
        if fsio.read_file(path, follow_symlinks=False) == data:
            os.unlink(path)
    except (OSError, fsio.ReadError):
        pass


class Migrator:
    """Runs migrations with one reconciler (config, libvirt, catalog, journal)."""

    def __init__(self, rec: Reconciler, *, clock: Clock = SYSTEM, store: BackupStore | None = None) -> None:
        self.rec = rec
        self.clock = clock
        self._store = store

    @property
    def store(self) -> BackupStore:
        if self._store is None:
            self._store = open_store(self.cfg, clock=self.clock)
        return self._store

    @property
    def cfg(self) -> Config:
        return self.rec.cfg

    def _facts(self, ref: DomainRef) -> tuple[MigrationFacts, bytes, dict[str, EfiVariable]]:
        hv = self.rec.hv
        ref = hv.lookup(ref.uuid)
        xml = hv.persistent_xml(ref.uuid)
        fw = parse_domain(xml)
        image_path = firmware_image_path(fw)
        image = self.rec.inspector.inspect(image_path, digest=True) if image_path else None
        config = classify(fw, image, self.rec.catalog)
        source, data, variables = _read_source(fw, config, image)
        facts = MigrationFacts(
            xml=xml, firmware=fw, state=ref.state, active=ref.active, persistent=ref.persistent,
            excluded=self.cfg.is_excluded(ref.name, ref.uuid), image=image, source=source,
        )
        return facts, data, variables

    def plan(self, ref: DomainRef, *, to: str | None = None) -> MigrationPlan:
        """The migration `migrate` would carry out now (no lock, nothing written)."""
        facts, _, _ = self._facts(ref)
        return plan_migration(facts, self.rec.catalog, to=to, nvram_dir=self.cfg.nvram_dir,
                              now=self.clock.now())

    def migrate(self, ref: DomainRef, *, to: str | None = None) -> MigrationResult:
        """Migrate one shut-off domain (module steps), under its lock."""
        with self.rec.writer.transaction(ref, "migrating") as tx, \
                InHand(self.cfg.offline_dir, ref.uuid, op="migrate", wait=self.cfg.start_wait) as hand:
            now = self.clock.now()
            facts, old_bytes, old_vars = self._facts(ref)
            plan = plan_migration(facts, self.rec.catalog, to=to, nvram_dir=self.cfg.nvram_dir, now=now)
            return self._carry_out(tx, facts, plan, old_bytes, old_vars, now, hand)

    def _carry_out(
        self, tx: Transaction, facts: MigrationFacts, plan: MigrationPlan, old_bytes: bytes,
        old_vars: dict[str, EfiVariable], now: datetime, hand: InHand,
    ) -> MigrationResult:
        name = plan.name
        # 2. new bytes, verified in memory: a store that does not fit fails before any write.
        try:
            new_bytes = virtfw.migrate_variables(plan.source, plan.template, template_length=plan.target_layout.size)
        except VarstoreError as exc:
            raise MigrationFailed(f"domain '{name}': cannot migrate: {exc}; nothing was changed") from None
        try:
            _verify_store(new_bytes, old_vars, plan.target_layout, f"migrated copy of {plan.source}")
        except MigrationFailed as exc:
            raise MigrationFailed(f"domain '{name}': {exc}; nothing was changed") from None

        # 3. backup, verified.
        try:
            record = self.store.add(uuid=plan.uuid, name=name, data=old_bytes, reason=before_write("migrate"),
                                    source=plan.source)
        except VarsdError as exc:
            raise MigrationFailed(f"domain '{name}': cannot back up the varstore: {exc}; nothing was changed") from None
        backup = self.store.object_path(record.sha256)
        index = self.store.index
        write_id = index.record_write(at=now, uuid=plan.uuid, name=name, op="migrate", path=plan.varstore,
                                      before_sha256=record.sha256 if plan.in_place else None,
                                      after_sha256=fsio.sha256_bytes(new_bytes), backup_id=record.id)

        # 4.-6. write, read back, redefine; any failure puts the old store back.
        hv = self.rec.hv
        written = False
        try:
            if hv.lookup(plan.uuid).active:
                raise MigrationFailed("the domain was started meanwhile")
            with hand.commit():  # refused if a start stopped waiting for this write
                if plan.in_place:
                    written = True  # from here on, whatever failed, the old store is put back
                    replace_file(plan.varstore, new_bytes, expect=old_bytes)
                else:
                    try:
                        fsio.create_exclusive(plan.varstore, new_bytes, mode=0o600, uid=self.rec.owner[0],
                                              gid=self.rec.owner[1])
                    except VarsdError as exc:
                        raise MigrationFailed(str(exc)) from None
            written = True
            try:
                on_disk = fsio.read_file(plan.varstore, follow_symlinks=False)
            except fsio.ReadError as exc:
                raise MigrationFailed(f"cannot read back {plan.varstore}: {exc}") from None
            if on_disk != new_bytes:
                raise MigrationFailed(f"{plan.varstore} does not read back as written")
            _verify_store(on_disk, old_vars, plan.target_layout, plan.varstore)
            tx.write(plan.new_xml, plan.reason, planned_from=facts.xml, kind=ChangeKind.MIGRATION)
        except BaseException as exc:
            restored = self._restore(plan, old_bytes, new_bytes, backup) if written else "nothing was written"
            with contextlib.suppress(VarsdError):
                index.settle_write(write_id, f"failed: {exc}")
            if isinstance(exc, VarsdError):
                raise MigrationFailed(
                    f"domain '{name}': migration failed: {exc}; {restored}; varsd did not change the domain's XML"
                ) from None
            raise
        if hv.lookup(plan.uuid).active:
            # Started between our last check and the redefine: that QEMU process runs the
            # old code with the migrated varstore. Nothing to undo (the store holds every
            # variable); the admin must cold-boot it onto the new code now.
            raise MigrationFailed(
                f"domain '{name}' was started while it was being migrated: its variables are migrated and its "
                "definition now names the new build, but the running QEMU still has the old code; shut it down "
                f"and start it again now (backup: {backup})"
            )
        index.settle_write(write_id, "applied")
        self.store.note_written(plan.uuid, plan.varstore, new_bytes)
        # Like any binding: keep a copy of the build, before an upgrade can replace it.
        self.rec.archive_build(plan.target)
        return MigrationResult(plan=plan, backup=backup, variables=len(old_vars), done=True)

    def _running(self, uuid: str) -> bool:
        try:
            return self.rec.hv.lookup(uuid).active
        except VarsdError:
            return True  # cannot tell: act as if it ran, never overwrite what it may have written

    def _restore(self, plan: MigrationPlan, old_bytes: bytes, new_bytes: bytes, backup: str) -> str:
        """Undo the write; returns what happened, for the error message."""
        if not plan.in_place:
            _remove_if(plan.varstore, new_bytes)
            return f"the new varstore {plan.varstore} was removed"
        try:
            current = fsio.read_file(plan.varstore, follow_symlinks=False)
        except fsio.ReadError:
            current = None
        if current == old_bytes:
            return f"the varstore is unchanged (backup: {backup})"
        if current != new_bytes and self._running(plan.uuid):
            # Not what we wrote, and a guest runs on it: it may hold newer variables than
            # the backup. Putting the backup over it could lose them: leave it, say so.
            return (f"the domain was started meanwhile and its varstore {plan.varstore} was left as it is; "
                    f"the pre-migration copy is {backup}")
        try:
            replace_file(plan.varstore, old_bytes, expect=current)
            if fsio.read_file(plan.varstore, follow_symlinks=False) != old_bytes:
                raise MigrationFailed("restored file does not read back equal to the backup")
        except (MigrationFailed, fsio.ReadError) as exc:
            return (f"RESTORING THE VARSTORE FAILED ({exc}): copy the backup {backup} back to {plan.varstore} "
                    "(cp --preserve=mode,ownership) before starting the domain")
        return f"the varstore was restored from the backup {backup}"


# -- --all --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A domain `migrate --all` looked at: it needs a migration; `skip` says why it is not done now."""

    ref: DomainRef
    detail: str
    skip: str | None = None


def needs_migration(rec: Reconciler, refs: list[DomainRef]) -> tuple[list[Candidate], list[tuple[DomainRef, str]]]:
    """Domains whose status is `needs-migration` (running ones marked skip), and read errors."""
    found: list[Candidate] = []
    errors: list[tuple[DomainRef, str]] = []
    for ref in refs:
        try:
            _, plan = rec.examine(ref)
        except VarsdError as exc:
            errors.append((ref, str(exc)))
            continue
        if plan.status is not Status.NEEDS_MIGRATION:
            continue
        skip = f"is {ref.state}; shut it down, then run 'varsctl migrate {ref.name}'" if ref.active else None
        found.append(Candidate(ref=ref, detail=plan.detail, skip=skip))
    return found, errors
