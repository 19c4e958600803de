"""`varsctl backup restore`, `varsctl reset` and `varsctl backup diff`: the admin's undo for varstores.

Restore puts a verified backup back; reset is the safe `virsh start --reset-nvram`: a
fresh copy of the template of the build the domain is bound to. Both are offline
writes (`VarstoreWriter`): shut-off domains only, the current store backed up first,
written atomically, read back, verified and journaled, so undo (restore the
`before-write` backup) and a later restore both work.

A backup or template whose varstore layout does not fit the domain's code is refused
with the reason: code hard-codes where its variables are, and on x86 a mismatch fails
silently (every variable change is lost). The layout the code wants comes from the
build the domain's code is (catalog or archive), else its template, else the current
file.
"""

from __future__ import annotations

from dataclasses import dataclass

from varsd.adapters import fsio, virtfw
from varsd.adapters.libvirt_api import DomainRef
from varsd.clock import stamp
from varsd.domain.xml import parse_domain
from varsd.engine.backups import BackupError, BackupStore, read_offline
from varsd.engine.offline_write import VarstoreWriter, WriteRefused, WriteResult
from varsd.engine.reconciler import Reconciler
from varsd.errors import VarsdError, VarstoreError
from varsd.firmware.archive import is_archive_path, sha_of_archive_path
from varsd.model.backup import BackupRecord
from varsd.model.domain import DomainFirmware
from varsd.model.firmware import VarstoreLayout
from varsd.planning.varstore_diff import VariableDiff, diff_variables


@dataclass(frozen=True)
class DomainVarstore:
    """A domain's varstore file and what its code needs."""

    ref: DomainRef
    firmware: DomainFirmware
    path: str
    layout: VarstoreLayout | None
    layout_source: str  # where `layout` came from, for messages
    template: str | None


@dataclass(frozen=True)
class RestoreResult:
    target: DomainVarstore
    backup: BackupRecord  # what was (or would be) restored
    write: WriteResult | None  # None for a dry run
    diff: list[VariableDiff]  # current -> restored


@dataclass(frozen=True)
class ResetResult:
    target: DomainVarstore
    template: str
    write: WriteResult | None
    diff: list[VariableDiff]  # current -> template: what the reset loses (kept in write.backup)


def describe(var) -> str:
    return virtfw.describe_variable(var)


def variables(data: bytes | None, what: str) -> dict:
    if data is None:
        return {}
    try:
        return virtfw.variables_of_bytes(data, what)
    except VarstoreError:
        return {}


class Restorer:
    def __init__(self, rec: Reconciler, writer: VarstoreWriter) -> None:
        self.rec = rec
        self.writer = writer

    @property
    def store(self) -> BackupStore:
        return self.writer.store

    # -- what the domain needs -------------------------------------------------------------

    def target(self, ref: DomainRef) -> DomainVarstore:
        fw = parse_domain(self.rec.hv.persistent_xml(ref.uuid))
        if not fw.nvram_path:
            raise WriteRefused(f"domain '{ref.name}' has no file-backed varstore (<nvram>) in its definition")
        build = self.rec.catalog.by_code_path(fw.loader_path) if fw.loader_path else None
        template = fw.metadata.template_path or fw.nvram_template or (build.template_path if build else None)
        if build is not None:
            return DomainVarstore(ref, fw, fw.nvram_path, build.layout, f"its code {build.label}", template)
        if is_archive_path(self.rec.archive.directory, fw.loader_path):
            known = self.rec.journal.archived_builds().get(sha_of_archive_path(fw.loader_path or "") or "")
            if known is not None and known.layout is not None:
                return DomainVarstore(ref, fw, fw.nvram_path, known.layout, f"its archived code {fw.loader_path}",
                                      template)
        for path, what in ((template, "its template"), (fw.nvram_path, "its current varstore")):
            if path:
                try:
                    return DomainVarstore(ref, fw, fw.nvram_path, virtfw.read_layout(path), f"{what} {path}",
                                          template)
                except VarstoreError:
                    continue
        return DomainVarstore(ref, fw, fw.nvram_path, None, "nothing (no known build, template or varstore)",
                              template)

    def _check(self, t: DomainVarstore, what: str):
        def check(data: bytes) -> None:
            got = virtfw.layout_of_bytes(data, what)
            if t.layout is None:
                raise VarstoreError(f"cannot tell which varstore layout the code of domain '{t.ref.name}' needs "
                                    f"({t.layout_source}); refusing to guess")
            if got != t.layout:
                raise VarstoreError(
                    f"{what} has the varstore layout {got.describe()}, but the domain's code needs "
                    f"{t.layout.describe()} (from {t.layout_source}): that code would silently lose every "
                    "variable change. Use a backup of this layout, or 'varsctl migrate' after restoring")
            if len(data) != got.size:
                raise VarstoreError(f"{what} is {len(data)} bytes but its varstore is {got.size}")
        return check

    # -- choosing a backup -----------------------------------------------------------------

    def candidates(self, ref: DomainRef, source: str | None) -> list[BackupRecord]:
        """This domain's backups, or with `source` (a name or UUID) another domain's, oldest first."""
        index = self.store.index
        if source is None:
            return index.records(ref.uuid)
        by_uuid = index.records(source.lower())
        return by_uuid if by_uuid else index.by_name(source)

    def choose(self, ref: DomainRef, backup_id: int | None = None, source: str | None = None,
               current_sha256: str | None = None) -> BackupRecord:
        """The backup `backup_id`, else the newest one that holds something other than the
        varstore now (`current_sha256`): after `--reset-nvram`, or `undefine --nvram` and a
        define that made a fresh store, the newest backup may be of that fresh store (taken
        at the next stop), and restoring it would change nothing."""
        found = self.candidates(ref, source)
        whose = f"domain '{source}'" if source else f"domain '{ref.name}' ({ref.uuid})"
        if backup_id is not None:
            record = next((r for r in found if r.id == backup_id), None)
            if record is None:
                other = self.store.index.get(backup_id)
                if other is None:
                    raise BackupError(f"no backup #{backup_id} (see 'varsctl backup list')")
                raise BackupError(f"backup #{backup_id} is of domain '{other.name}' ({other.uuid}), not of {whose}; "
                                  f"add --from {other.uuid} to restore it into '{ref.name}'")
            return record
        if not found:
            raise BackupError(f"no backups of {whose} (see 'varsctl backup list'; --from NAME|UUID takes another "
                              "domain's, e.g. of the same guest defined earlier under another UUID)")
        different = [r for r in found if r.sha256 != current_sha256]
        return (different or found)[-1]

    # -- restore ---------------------------------------------------------------------------

    def restore(self, ref: DomainRef, *, backup_id: int | None = None, source: str | None = None,
                dry_run: bool = False, on_stage=None) -> RestoreResult:
        t = self.target(ref)
        current = _current(t.path)
        record = self.choose(ref, backup_id, source, fsio.sha256_bytes(current) if current is not None else None)
        data = self.store.load(record)  # verified; a damaged backup stops here
        what = f"backup #{record.id} of '{record.name}'"
        try:
            self._check(t, what)(data)
        except VarstoreError as exc:
            raise WriteRefused(f"domain '{ref.name}': restore refused: {exc}") from None
        diff = diff_variables(variables(current, t.path), variables(data, what), describe)
        if dry_run:
            if self.rec.hv.is_running(ref.uuid):
                raise WriteRefused(f"domain '{ref.name}' is running: restore works on shut-off domains only")
            return RestoreResult(t, record, None, diff)

        def transform(_old: bytes | None) -> bytes:
            return self.store.load(record)  # verified again, right before the write

        result = self.writer.write(ref, transform, op="restore", path=t.path, check=self._check(t, what),
                                   on_stage=on_stage)
        return RestoreResult(t, record, result, diff)

    # -- reset -----------------------------------------------------------------------------

    def reset(self, ref: DomainRef, *, dry_run: bool = False, on_stage=None) -> ResetResult:
        t = self.target(ref)
        if not t.template:
            raise WriteRefused(f"domain '{ref.name}': no template is known for its build (neither varsd's "
                               "metadata, its <nvram template=...>, nor a catalog build of its code names one)")
        try:
            data = fsio.read_file(t.template)
        except fsio.ReadError as exc:
            raise WriteRefused(f"domain '{ref.name}': cannot read its template: {exc}") from None
        try:
            self._check(t, f"template {t.template}")(data)
        except VarstoreError as exc:
            raise WriteRefused(f"domain '{ref.name}': reset refused: {exc}") from None
        current = _current(t.path)
        diff = diff_variables(variables(current, t.path), variables(data, t.template), describe)
        if dry_run:
            return ResetResult(t, t.template, None, diff)
        result = self.writer.write(ref, lambda _old: data, op="reset", path=t.path,
                                   check=self._check(t, f"template {t.template}"), on_stage=on_stage)
        return ResetResult(t, t.template, result, diff)

    # -- diff ------------------------------------------------------------------------------

    def diff(self, ref: DomainRef | None, first: BackupRecord | None, second: BackupRecord | None
             ) -> tuple[str, str, list[VariableDiff]]:
        """(from label, to label, differences): two backups, a backup and now, or newest backup and now."""
        if first is None:
            if ref is None:
                raise BackupError("name a domain or two backups")
            found = self.store.index.records(ref.uuid)
            if not found:
                raise BackupError(f"no backups of domain '{ref.name}'")
            first = found[-1]
        a = self.store.load(first)
        if second is not None:
            b, label = self.store.load(second), f"backup #{second.id} ({stamp(second.taken)})"
        else:
            if ref is None:
                raise BackupError("comparing with the current varstore needs the domain")
            path = self.target(ref).path
            b, label = _current(path), f"now ({path})"
            if b is None:
                raise BackupError(f"{path}: no varstore file now (virsh undefine --nvram?); restore a backup first")
        return (f"backup #{first.id} ({stamp(first.taken)})", label,
                diff_variables(variables(a, "backup"), variables(b, label), describe))


def _current(path: str) -> bytes | None:
    try:
        return read_offline(path)
    except VarsdError:
        return None
