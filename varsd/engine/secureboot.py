"""Secure Boot certificates across a host: the audit and the staged rollout of Microsoft's 2023 CAs.

The shell around `varsd.firmware.secureboot`:
- `KeyReader` parses each varstore content once: keyed by stat, then by sha256, so a
  fleet of identical stores (every guest fresh from one template) costs one parse.
- `SecureBoot.audit_*` report every domain and every template new guests would get.
- `SecureBoot.update` adds the certificates: a shut-off guest is backed up, written
  atomically, read back and verified, and journaled; a running one is queued and
  updated once it has stopped, before it starts again (`apply_queued`). Guests with a
  vTPM are refused without `tpm_ack`, with the PCR7 prediction where virt-firmware can
  compute one. Nothing is ever removed from a store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from varsd.adapters import fsio, virtfw
from varsd.adapters.filecache import ContentCache, stat_key
from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.clock import Clock
from varsd.domain.classify import classify, firmware_image_path
from varsd.domain.xml import parse_domain
from varsd.engine.offline_write import VarstoreWriter
from varsd.engine.reconciler import Reconciler
from varsd.errors import VarsdError, VarstoreError
from varsd.firmware.secureboot import judge
from varsd.messages import about_domain, for_row
from varsd.model.domain import DomainFirmware, DomainRef, FileFacts, FirmwareConfig
from varsd.model.firmware import Build, Catalog, MappingMode
from varsd.model.secureboot import Judgement, Ms2023State, Pcr7, SecureBootVars, ShippedCert
from varsd.planning.repair import wants_secure_boot

log = logging.getLogger("varsd.secureboot")

UPDATE_OP = "secureboot-update"  # the offline write's op: backups say "before-write:secureboot-update"


@dataclass(frozen=True)
class StoreKeys:
    """One store's content digest and Secure Boot keys (or why they could not be read)."""

    path: str
    sha256: str | None
    keys: SecureBootVars | None
    error: str | None = None


class KeyReader:
    """Reads stores' Secure Boot keys, parsing each distinct content once."""

    MAX_DIGESTS = 4096

    def __init__(self) -> None:
        self._by_stat: ContentCache[str] = ContentCache()  # path -> digest, while its stat key holds
        # digest -> (keys, error, the path the error names)
        self._by_digest: dict[str, tuple[SecureBootVars | None, str | None, str]] = {}
        self.parses = 0  # distinct contents parsed (the benchmark and tests read it)

    def read(self, path: str, *, follow_symlinks: bool = False) -> StoreKeys:
        try:
            key = stat_key(os.stat(path, follow_symlinks=follow_symlinks))
        except OSError as exc:
            return StoreKeys(path, None, None, f"{path}: {fsio.describe_oserror(exc)}")
        read: list[bytes] = []

        def digest() -> str:
            read.append(fsio.read_file(path, follow_symlinks=follow_symlinks))
            return hashlib.sha256(read[0]).hexdigest()

        try:
            sha = self._by_stat.get((path, follow_symlinks), key, digest)
            if sha in self._by_digest:
                return self._keys(path, sha)
            data = read[0] if read else fsio.read_file(path, follow_symlinks=follow_symlinks)
        except fsio.ReadError as exc:
            return StoreKeys(path, None, None, str(exc))
        return self.of_bytes(data, path, sha)

    def of_bytes(self, data: bytes, path: str, sha: str | None = None) -> StoreKeys:
        sha = sha or hashlib.sha256(data).hexdigest()
        if sha not in self._by_digest:
            if len(self._by_digest) >= self.MAX_DIGESTS:
                # A long-running daemon sees a new digest at every boot (OVMF rewrites the store):
                # keep what some path still has, drop the rest.
                live = set(self._by_stat.values())
                self._by_digest = {d: v for d, v in self._by_digest.items() if d in live}
            self.parses += 1
            try:
                self._by_digest[sha] = (virtfw.secure_boot_vars_of_bytes(data, path), None, path)
            except VarstoreError as exc:
                self._by_digest[sha] = (None, str(exc), path)
        return self._keys(path, sha)

    def _keys(self, path: str, sha: str) -> StoreKeys:
        keys, error, named = self._by_digest[sha]
        return StoreKeys(path, sha, keys, error.replace(named, path) if error else None)


@dataclass(frozen=True)
class Audit:
    """One store in `varsctl secureboot status`: a domain's varstore or a template."""

    name: str
    kind: str  # "domain" or "template"
    judgement: Judgement
    varstore: str | None
    secure_build: bool
    keys: SecureBootVars | None = None
    sha256: str | None = None
    uuid: str | None = None
    state: str | None = None  # libvirt run state, for domains
    active: bool = False
    tpm: str | None = None
    code: str | None = None
    origin: str | None = None  # for templates: the descriptor or config entry

    @property
    def state_ms2023(self) -> Ms2023State:
        return self.judgement.state

    def as_dict(self) -> dict:
        k = self.keys
        out: dict = {"name": self.name}
        if self.kind == "domain":
            out |= {"uuid": self.uuid, "state": self.state, "tpm": self.tpm is not None, "tpm_model": self.tpm}
        else:
            out |= {"origin": self.origin}
        out |= {
            "varstore": self.varstore,
            "code": self.code,
            "sha256": self.sha256,
            "secure_boot": {
                "build": self.secure_build,
                "enforcing": bool(self.secure_build and k is not None and k.enforcing),
                "SecureBootEnable": k.secure_boot_enable if k else None,
                "SetupMode": k.setup_mode if k else None,
                "CustomMode": k.custom_mode if k else None,
                "SecureBoot": k.secure_boot if k else None,
            },
            "pk": ({"subject": k.pk[0].subject, "owner": k.pk[0].owner} if k and k.pk else None),
            "kek": [c.as_dict() for c in k.kek] if k else [],
            "db": [c.as_dict() for c in k.db] if k else [],
            "db_hashes": k.db_hashes if k else 0,
            "dbx_entries": k.dbx_entries if k else 0,
            "ms2023": self.judgement.state.value,
            "detail": self.judgement.why,
            "missing": [c.cert.subject for c in self.judgement.missing],
        }
        return out


# Why a domain without a varstore file has no keys to judge, by configuration class.
_NO_STORE = {
    FirmwareConfig.NONE: "not UEFI (SeaBIOS)",
    FirmwareConfig.BIOS_ROM: "OVMF as -bios: variables live in RAM, no keys are stored (the repair gives it a "
                             "varstore)",
    FirmwareConfig.CODE_ONLY: "code-only pflash: no varstore (the repair gives it one)",
    FirmwareConfig.UNIFIED: "private unified image: its keys are inside {fw.loader_path}; varsd updates split "
                            "varstores only (the repair splits it)",
    FirmwareConfig.AUTOSELECT: "firmware='efi' left to libvirt: no varstore named yet",
    FirmwareConfig.STATELESS: "stateless firmware: no varstore",
    FirmwareConfig.CONFIDENTIAL: "confidential guest ({fw.launch_security}): its firmware is measured whole; varsd "
                                 "leaves it alone",
}


class Outcome(StrEnum):
    UPDATED = "updated"
    QUEUED = "queued"
    REFUSED = "refused"
    UNCHANGED = "unchanged"
    WOULD_UPDATE = "would-update"
    WOULD_QUEUE = "would-queue"
    FAILED = "failed"
    HELD = "held"  # not a canary of this run: waits for the canaries to boot


@dataclass(frozen=True)
class UpdateResult:
    name: str
    uuid: str
    outcome: Outcome
    detail: str
    added: tuple[str, ...] = ()
    backup: str | None = None
    pcr7: Pcr7 | None = None
    tpm: bool = False

    def as_dict(self) -> dict:
        return {
            "name": self.name, "uuid": self.uuid, "outcome": self.outcome.value, "detail": self.detail,
            "added": list(self.added), "backup": self.backup, "tpm": self.tpm,
            "pcr7": self.pcr7.as_dict() if self.pcr7 else None,
        }


@dataclass
class SecureBoot:
    """Audit and rollout with one configuration, libvirt connection, catalog and journal."""

    hv: Hypervisor
    catalog: Catalog
    journal: Journal
    writer_for: Callable[[], VarstoreWriter]  # opened on first write: an audit creates nothing
    inspect: Callable[[str], FileFacts]  # path -> facts with digest (FileInspector.inspect)
    clock: Clock
    actor: str = "varsctl"
    reader: KeyReader = field(default_factory=KeyReader)
    shipped: tuple[ShippedCert, ...] = field(default_factory=virtfw.ms2023_certificates)
    on_stage: Callable[[str], None] | None = None  # passed to the offline write (tests race a start with it)
    _writer: VarstoreWriter | None = field(default=None, init=False, repr=False)

    @property
    def writer(self) -> VarstoreWriter:
        if self._writer is None:
            self._writer = self.writer_for()
        return self._writer

    # -- audit -----------------------------------------------------------------------

    def _secure_code(self, fw: DomainFirmware) -> tuple[bool, str | None, FileFacts | None]:
        path = firmware_image_path(fw)
        image = self.inspect(path) if path else None
        return wants_secure_boot(fw, image, self.catalog), path, image

    def audit_xml(self, ref: DomainRef, xml: str, queue: Iterable[str] = ()) -> tuple[Audit, DomainFirmware]:
        fw = parse_domain(xml)
        secure, code, image = self._secure_code(fw)
        path = fw.nvram_path
        why = None if path else _NO_STORE.get(classify(fw, image, self.catalog))
        if why is not None:
            verdict = Judgement(Ms2023State.NOT_APPLICABLE, why.format(fw=fw))
            return Audit(name=ref.name, kind="domain", judgement=verdict, varstore=None, secure_build=secure,
                         uuid=ref.uuid, state=ref.state, active=ref.active, tpm=fw.tpm, code=code), fw
        if path and secure and not os.path.lexists(path):
            # Never started: libvirt (or varsd's provisioning) makes it from the template; that
            # template's state is in the templates table.
            verdict = Judgement(Ms2023State.NOT_APPLICABLE, f"no varstore yet: made from "
                                f"{fw.nvram_template or 'the build template'} at first start")
            return Audit(name=ref.name, kind="domain", judgement=verdict, varstore=path, secure_build=secure,
                         uuid=ref.uuid, state=ref.state, active=ref.active, tpm=fw.tpm, code=code), fw
        store = self.reader.read(path) if path and secure else None
        verdict = judge(
            store.keys if store else None, secure_code=secure, shipped=self.shipped, varstore=path,
            stateless=bool(fw.loader_stateless), error=store.error if store else None, queued=ref.uuid in queue,
        )
        return Audit(
            name=ref.name, kind="domain", judgement=verdict, varstore=path, secure_build=secure,
            keys=store.keys if store else None, sha256=store.sha256 if store else None, uuid=ref.uuid,
            state=ref.state, active=ref.active, tpm=fw.tpm, code=code,
        ), fw

    def audit_domains(self, refs: Sequence[DomainRef]) -> list[Audit]:
        try:
            queue: Iterable[str] = self.journal.secureboot_queue()
        except VarsdError as exc:  # e.g. a read-only state DB from before the queue existed
            log.debug("no Secure Boot update queue: %s", exc)
            queue = ()
        out = []
        for ref in refs:
            try:
                out.append(self.audit_xml(ref, self.hv.persistent_xml(ref.uuid), queue)[0])
            except VarsdError as exc:
                why = f"cannot read the domain: {for_row(ref.name, exc, ref.uuid)}"
                out.append(Audit(name=ref.name, kind="domain", uuid=ref.uuid, state=ref.state, active=ref.active,
                                 varstore=None, secure_build=False, judgement=Judgement(Ms2023State.BLOCKED, why)))
        return out

    def audit_templates(self) -> list[Audit]:
        """Every varstore template the catalog would provision new guests from.

        With `secureboot_templates = "2023"` that is the derived copy; the shipped
        template it came from is listed too, saying new guests no longer get it."""
        out: list[Audit] = []
        seen: set[str] = set()
        for build in self.catalog.builds:
            if build.mode is not MappingMode.SPLIT or not build.template_path or build.template_path in seen:
                continue
            seen.add(build.template_path)
            if build.derived_from:
                out.append(self._audit_template(build.template_path, build,
                                                f"derived by varsd from {build.derived_from} ({build.origin})"))
                if build.derived_from not in seen:
                    seen.add(build.derived_from)
                    shipped = self._audit_template(build.derived_from, build, build.origin)
                    why = f"{shipped.judgement.why}; new guests get the derived copy {build.template_path}"
                    out.append(dataclasses.replace(shipped, judgement=dataclasses.replace(shipped.judgement, why=why)))
            else:
                out.append(self._audit_template(build.template_path, build, build.origin))
        return out

    def _audit_template(self, path: str, build: Build, origin: str) -> Audit:
        store = self.reader.read(path, follow_symlinks=True) if build.secure_boot else None
        verdict = judge(store.keys if store else None, secure_code=build.secure_boot, shipped=self.shipped,
                        varstore=path, error=store.error if store else None)
        if verdict.state is Ms2023State.UPDATE_AVAILABLE and not build.derived_from:
            verdict = dataclasses.replace(verdict, why=f"2011-only template: every new guest gets a store without "
                                          f"the 2023 certificates ({verdict.why}); secureboot_templates = \"2023\" "
                                          "derives a 2023-ready one")
        return Audit(name=os.path.basename(path), kind="template", judgement=verdict, varstore=path,
                     secure_build=build.secure_boot, keys=store.keys if store else None,
                     sha256=store.sha256 if store else None, code=build.code_path, origin=origin)

    # -- update ----------------------------------------------------------------------

    def update(self, refs: Sequence[DomainRef], *, tpm_ack: bool = False, dry_run: bool = False,
               canary: int | None = None) -> list[UpdateResult]:
        """Update each domain (or queue it); with `canary`, only that many, the rest held."""
        results: list[UpdateResult] = []
        pending_canaries = [] if canary is not None else self.unconfirmed_canaries()
        started = 0
        for ref in refs:
            if canary is not None and started >= canary:
                results.append(self._result(ref, Outcome.HELD, f"not one of the {canary} canaries of this run; "
                                                               "run again once they have booted"))
                continue
            if pending_canaries:
                names = ", ".join(sorted(c for c in pending_canaries))
                results.append(self._result(ref, Outcome.HELD, f"canaries not booted since their update yet: {names}; "
                                                               "boot them, check them, then run again"))
                continue
            try:
                result = self._update_one(ref, tpm_ack=tpm_ack, dry_run=dry_run, canary=canary is not None)
            except VarsdError as exc:
                result = self._result(ref, Outcome.FAILED, for_row(ref.name, exc, ref.uuid))
            if result.outcome in (Outcome.UPDATED, Outcome.QUEUED, Outcome.WOULD_UPDATE, Outcome.WOULD_QUEUE):
                started += 1
            results.append(result)
        if canary is None and not dry_run and not pending_canaries:
            self.journal.forget_canaries()
        return results

    def unconfirmed_canaries(self) -> list[str]:
        """Canaries of an earlier `--canary` run that have not booted since their update.

        A boot shows in the store: OVMF writes its variables (MTC, boot entries) at every
        boot, so the store no longer has the digest varsd wrote; a running canary counts.
        """
        pending = []
        queue = self.journal.secureboot_queue()
        for c in self.journal.canaries():
            try:
                ref = self.hv.lookup(c.uuid)
            except VarsdError:
                continue  # gone: nothing to wait for
            if c.uuid in queue or c.written_sha256 is None:
                if not ref.active or c.uuid in queue:
                    pending.append(c.name)
                continue
            if ref.active:
                continue
            audit, _ = self.audit_xml(ref, self.hv.persistent_xml(ref.uuid))
            if audit.sha256 == c.written_sha256:
                pending.append(c.name)
        return pending

    def _result(self, ref: DomainRef, outcome: Outcome, detail: str, **kw) -> UpdateResult:
        return UpdateResult(name=ref.name, uuid=ref.uuid, outcome=outcome, detail=detail, **kw)

    def _update_one(self, ref: DomainRef, *, tpm_ack: bool, dry_run: bool, canary: bool) -> UpdateResult:
        ref = self.hv.lookup(ref.uuid)
        audit, fw = self.audit_xml(ref, self.hv.persistent_xml(ref.uuid))
        verdict = audit.judgement
        if verdict.state is Ms2023State.OK:
            return self._result(ref, Outcome.UNCHANGED, "already has the Microsoft 2023 certificates")
        if verdict.state is not Ms2023State.UPDATE_AVAILABLE and verdict.state is not Ms2023State.UPDATE_QUEUED:
            return self._result(ref, Outcome.REFUSED, f"{verdict.state.value}: {verdict.why}")
        if not verdict.addable:
            # Everything the installed virt-firmware ships is there (24.11 has no Option ROM CA):
            # nothing to do here, said plainly, and not a failure of every later --all run.
            return self._result(ref, Outcome.UNCHANGED, verdict.why)
        if audit.varstore is None:  # an update is judged available only from a store that was read
            return self._result(ref, Outcome.REFUSED, "no varstore file to update")
        try:
            old = fsio.read_file(audit.varstore, follow_symlinks=False)
            new = virtfw.with_certificates(old, audit.varstore, verdict.addable)
        except (fsio.ReadError, VarstoreError) as exc:
            return self._result(ref, Outcome.FAILED, f"cannot prepare the update: {exc}; nothing was changed")
        added = tuple(s.cert.subject for s in verdict.addable)
        pcr7 = virtfw.predict_pcr7(old, new, audit.varstore) if fw.tpm else None
        if fw.tpm and not tpm_ack:
            return self._result(ref, Outcome.REFUSED, tpm_refusal(fw.tpm, pcr7), pcr7=pcr7, tpm=True, added=added)
        note = _partial_note(verdict)
        if ref.active:
            if dry_run:
                return self._result(ref, Outcome.WOULD_QUEUE, "running: would queue the update for after it stops"
                                    + note, added=added, pcr7=pcr7, tpm=bool(fw.tpm))
            self.journal.queue_secureboot(uuid=ref.uuid, name=ref.name, at=self.clock.now(), actor=self.actor,
                                          tpm_ack=tpm_ack, canary=canary)
            if canary:
                self.journal.note_canary(uuid=ref.uuid, name=ref.name, at=self.clock.now(), written_sha256=None)
            return self._result(ref, Outcome.QUEUED, "running: update-queued; applied after the guest stops, before "
                                "its next start" + note, added=added, pcr7=pcr7, tpm=bool(fw.tpm))
        if dry_run:
            return self._result(ref, Outcome.WOULD_UPDATE, "would back up and add " + ", ".join(added) + note,
                                added=added, pcr7=pcr7, tpm=bool(fw.tpm))
        backup, written = self._write(ref, audit.varstore, fw)
        if canary:
            self.journal.note_canary(uuid=ref.uuid, name=ref.name, at=self.clock.now(), written_sha256=written)
        return self._result(ref, Outcome.UPDATED, "added " + ", ".join(added) + f" (backup {backup})" + note,
                            added=added, backup=backup, pcr7=pcr7, tpm=bool(fw.tpm))

    def _write(self, ref: DomainRef, path: str, fw: DomainFirmware) -> tuple[str, str]:
        """Through the one offline write path: domain lock, hook announcement, shut-off check,
        verified backup, journal, atomic replace, read back, verify. Returns (backup, new sha256)."""
        before: list[SecureBootVars | None] = []
        wanted: list[ShippedCert] = []

        def transform(old: bytes | None) -> bytes:
            if old is None:
                raise VarstoreError(f"{path} does not exist")
            keys = self.reader.of_bytes(old, path)
            verdict = judge(keys.keys, secure_code=True, shipped=self.shipped, varstore=path, error=keys.error)
            if not verdict.addable:
                raise VarstoreError(f"the store changed meanwhile ({verdict.why})")
            before.append(keys.keys)
            wanted.extend(verdict.addable)
            return virtfw.with_certificates(old, path, verdict.addable)

        def check(new: bytes) -> None:
            if virtfw.layout_of_bytes(new, path).size != len(new):
                raise VarstoreError(f"{path}: the new store is not one whole varstore")
            after = self.reader.of_bytes(new, path)
            verdict = judge(after.keys, secure_code=True, shipped=self.shipped, varstore=path, error=after.error)
            if after.keys is None or any(s in verdict.missing for s in wanted) or _lost_any(before[0], after.keys):
                raise VarstoreError(f"{path}: the updated store does not hold exactly the old keys plus the new "
                                    f"({verdict.why})")

        result = self.writer.write(ref, transform, op=UPDATE_OP, path=path, check=check, on_stage=self.on_stage)
        self.journal.unqueue_secureboot(ref.uuid)
        backup = f"#{result.backup.id}" if result.backup is not None else "-"
        log.info("domain '%s': added Microsoft 2023 certificates to %s (backup %s)", ref.name, path, backup)
        return backup, result.after_sha256

    def apply_queued(self, ref: DomainRef, xml: str | None = None) -> UpdateResult | None:
        """Apply a queued update to a domain that has stopped (the daemon, the start hook, a later run)."""
        queued = self.journal.secureboot_queue().get(ref.uuid)
        if queued is None or ref.active:
            return None
        xml = xml if xml is not None else self.hv.persistent_xml(ref.uuid)
        audit, fw = self.audit_xml(ref, xml)
        if audit.judgement.state is Ms2023State.OK:
            self.journal.unqueue_secureboot(ref.uuid)
            return self._result(ref, Outcome.UNCHANGED, "already has the Microsoft 2023 certificates")
        if audit.judgement.state is not Ms2023State.UPDATE_AVAILABLE or not audit.judgement.addable \
                or (fw.tpm and not queued.tpm_ack):
            self.journal.unqueue_secureboot(ref.uuid)
            why = "it has a vTPM and the update was queued without --tpm-ack" if fw.tpm and not queued.tpm_ack \
                else audit.judgement.why
            log.warning("%s", about_domain(ref.name, f"queued Secure Boot update dropped: {why}", ref.uuid))
            return self._result(ref, Outcome.REFUSED, f"queued update dropped: {why}")
        if audit.varstore is None:  # as in _update_one: cannot happen with an update available
            self.journal.unqueue_secureboot(ref.uuid)
            return self._result(ref, Outcome.REFUSED, "queued update dropped: no varstore file to update")
        backup, written = self._write(ref, audit.varstore, fw)
        if queued.canary:
            self.journal.note_canary(uuid=ref.uuid, name=ref.name, at=self.clock.now(), written_sha256=written)
        return self._result(ref, Outcome.UPDATED, f"applied the queued update (backup {backup})", backup=backup)


def _lost_any(before: SecureBootVars | None, after: SecureBootVars | None) -> bool:
    """Whether a certificate of `before` is missing from `after` (nothing may ever be removed)."""
    if before is None or after is None:
        return after is None
    return any({c.sha256 for c in getattr(before, v)} - {c.sha256 for c in getattr(after, v)}
               for v in ("pk", "kek", "db")) or after.dbx_entries < before.dbx_entries


def _partial_note(verdict: Judgement) -> str:
    unshipped = [s.cert.subject for s in verdict.missing if s.der is None]
    if not unshipped:
        return ""
    return (f"; NOT added: {', '.join(unshipped)} (virt-firmware {virtfw.library_version()} does not ship it; "
            "install a newer virt-firmware and run again)")


def tpm_refusal(tpm: str, pcr7: Pcr7 | None) -> str:
    text = (f"has a vTPM ({tpm}): adding KEK/db certificates changes PCR7, so BitLocker or TPM-bound LUKS in the "
            "guest will ask for its recovery key at the next boot. Make sure the recovery keys are at hand (or "
            "suspend BitLocker / re-seal LUKS to PCR7 in the guest), then run again with --tpm-ack")
    if pcr7 is None:
        return text
    if pcr7.changes is None:
        return text + f". PCR7 prediction unavailable: {pcr7.why}"
    return text + (f". PCR7 (sha256, predicted by virt-firmware): before {pcr7.before}, after {pcr7.after}"
                   + (" (changes)" if pcr7.changes else " (unchanged)"))


def for_reconciler(rec: Reconciler, *, writer: VarstoreWriter | None = None) -> SecureBoot:
    """The engine sharing a reconciler's configuration, libvirt, catalog, journal and file cache."""
    cfg = rec.cfg
    return SecureBoot(
        hv=rec.hv, catalog=rec.catalog, journal=rec.journal,
        writer_for=(lambda: writer) if writer is not None else (lambda: VarstoreWriter.for_host(cfg, rec.hv)),
        inspect=lambda p: rec.inspector.inspect(p, digest=True),
        clock=rec.clock, actor=rec.actor,
    )
