"""Typed records for one domain's firmware: what its XML says and what its files are.

These are plain data: `varsd.domain.xml` builds them from domain XML, the engine adds
`FileFacts` read from disk, and the pure planner decides from them alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum

from varsd.clock import stamp
from varsd.model.firmware import VarstoreLayout


class FirmwareConfig(StrEnum):
    """The firmware configuration classes (see README: which ones are right)."""

    NONE = "none"  # SeaBIOS or no firmware at all
    BIOS_ROM = "bios-rom"  # OVMF as -bios / <loader type='rom'>: no persistent variables
    CODE_ONLY = "code-only"  # one pflash with only code: varstore range unbacked
    UNIFIED = "unified"  # one pflash with a private OVMF.fd: right, not upgradable
    SPLIT = "split"  # code read-only + private varstore: the normal case
    AUTOSELECT = "autoselect"  # <os firmware='efi'> left to libvirt
    STATELESS = "stateless"  # <loader stateless='yes'>
    CONFIDENTIAL = "confidential"  # SEV/SEV-ES/SNP/TDX: firmware must not be split
    # libvirt 12.1+ <varstore>: variables in a JSON file served by QEMU's uefi-vars device,
    # the firmware a ROM. Never rewritten into pflash (that would drop every variable).
    HOST_VARSTORE = "uefi-vars"
    # not classified: reading or planning the domain failed (see its error), or firmware
    # arguments in <qemu:commandline> varsd does not fully understand
    UNKNOWN = "unknown"


class PinKind(StrEnum):
    """Who holds a domain on a build, so each release undoes only its own hold.

    `admin` is `varsctl pin` (only `varsctl unpin` lifts it); `policy` is
    `upgrade_policy = "manual"` holding a new build back (lifted by `varsctl upgrade
    approve`, or by the policy going back to auto); `incompatible` is varsd keeping a
    domain on its archived build because the central one no longer fits its varstore
    (lifted by `varsctl migrate`, or when a fitting central build returns).
    """

    ADMIN = "admin"
    POLICY = "policy"
    INCOMPATIBLE = "incompatible"


class Status(StrEnum):
    """What `varsctl status` reports per domain."""

    OK = "ok"
    PENDING_COLD_BOOT = "pending-cold-boot"
    PINNED = "pinned"
    NEEDS_MIGRATION = "needs-migration"
    UNMANAGED = "unmanaged"
    ERROR = "error"


ATTENTION = frozenset({Status.ERROR, Status.NEEDS_MIGRATION})
"""Statuses that need an admin: a command reporting one exits 1."""


@dataclass(frozen=True)
class VarsdMetadata:
    """varsd's own record inside the domain's <metadata> (our XML namespace)."""

    opt_out: bool = False
    build_code_path: str | None = None  # central code the domain is bound to
    build_code_sha256: str | None = None
    template_path: str | None = None  # where the varstore came from
    template_sha256: str | None = None
    varstore_source: str | None = None  # "template" or "unified:<path>"
    provisioned_at: datetime | None = None  # aware; the XML holds its clock.stamp
    pinned_sha256: str | None = None  # build the domain is held on (see PinKind)
    pin_by: str | None = None  # a PinKind value; None on a pin means admin (older varsd)
    pin_reason: str | None = None
    pinned_at: datetime | None = None
    booted_sha256: str | None = None  # live metadata: what this QEMU process runs
    # The manage= value as written, for messages: anything but 'yes' opts out (the safe
    # reading of a typo), and the admin is told which value it was.
    manage: str | None = field(default=None, compare=False)

    @property
    def opt_out_reason(self) -> str:
        """Why a domain is opted out, in the words of its own XML."""
        value = (self.manage or "no").strip().lower()
        if value in ("no", "off", "false", "0"):
            return f"opted out (varsd metadata manage='{self.manage or 'no'}')"
        return (f"opted out: varsd metadata manage='{self.manage}' is neither 'yes' nor 'no', so varsd leaves the "
                "domain alone; write manage='no' to keep it so, or run 'varsctl opt-in' to manage it")

    @property
    def pin_kind(self) -> PinKind | None:
        """Who pinned; an unknown or missing `by` counts as admin, whom varsd never overrules."""
        if not self.pinned_sha256:
            return None
        try:
            return PinKind(self.pin_by) if self.pin_by else PinKind.ADMIN
        except ValueError:
            return PinKind.ADMIN

    def without_pin(self) -> VarsdMetadata:
        """The same record with no hold (what unpin, approve and migrate write)."""
        return replace(self, pinned_sha256=None, pin_by=None, pin_reason=None, pinned_at=None)


@dataclass(frozen=True)
class DomainFirmware:
    """The firmware-relevant part of one domain XML, nothing else."""

    name: str
    uuid: str
    arch: str | None
    machine: str | None
    domain_type: str | None = None
    os_firmware: str | None = None  # <os firmware='efi'>
    loader_path: str | None = None
    loader_type: str | None = None  # 'rom' | 'pflash' | None
    loader_readonly: bool | None = None
    loader_secure: bool | None = None
    loader_stateless: bool | None = None
    nvram_path: str | None = None
    nvram_template: str | None = None
    smm: bool = False
    acpi: bool = False  # <features><acpi/>: libvirt refuses UEFI pflash on x86 without it
    launch_security: str | None = None  # 'sev', 'sev-snp', 'tdx', ... when present
    cmdline_bios: str | None = None  # the -bios image QEMU uses from <qemu:commandline> (last one wins)
    # Firmware arguments in <qemu:commandline> that a repair moves into <loader>/<nvram>;
    # with `cmdline_pflash` the loader_*/nvram_path fields above were read from them.
    cmdline_firmware: bool = False
    cmdline_pflash: bool = False
    cmdline_problem: str | None = None  # firmware arguments varsd does not fully understand
    tpm: str | None = None  # "<model>/<backend type>" of a <devices><tpm>, e.g. "tpm-crb/emulator"
    host_varstore: bool = False  # an <os><varstore> element (libvirt 12.1+)
    host_varstore_path: str | None = None  # <varstore path=...>: the JSON file
    host_varstore_template: str | None = None  # <varstore template=...>
    metadata: VarsdMetadata = field(default_factory=VarsdMetadata)
    # From the live XML's boot record (varsd.engine.boots): the digest of the code file
    # this QEMU process opened at start, which a package upgrade does not change.
    booted_sha256: str | None = None


@dataclass(frozen=True)
class FileFacts:
    """What the engine read from one file the domain XML names.

    `varstore_layout` is set when the file *begins with* an edk2 varstore (a varstore
    file, or a unified image whose leading bytes are one); `None` otherwise.
    """

    path: str
    exists: bool
    size: int = 0
    sha256: str | None = None
    realpath: str | None = None
    varstore_layout: VarstoreLayout | None = None
    # For a unified image: digest of the code part after the leading varstore, so the
    # planner can recognise which build the image was made from.
    trailing_sha256: str | None = None
    error: str | None = None  # unreadable, corrupt, ...
    # All erased flash of a flash device's size: a varstore the firmware has not formatted yet
    # (a never-booted AAVMF guest's copy of the blank AAVMF_VARS.fd).
    blank: bool = False
    # This process may not read it (a non-root admin's `status`; varstores are the qemu
    # user's, 0600): its content is unknown, not wrong.
    unreadable: bool = False


@dataclass(frozen=True)
class DomainRef:
    """A snapshot of one domain's identity and run state at the time of the call."""

    uuid: str
    name: str
    state: str
    active: bool
    persistent: bool

    @property
    def label(self) -> str:
        """How messages name this domain."""
        return f"domain '{self.name}' ({self.uuid})"


@dataclass(frozen=True)
class AttemptFailure:
    """A domain's last failed attempt to act, as the state database keeps it.

    It stands until an attempt succeeds or the domain's definition changes
    (`definition_sha256` is the persistent XML the attempt was planned from).
    """

    uuid: str
    name: str
    first_at: datetime  # first failure of this run of failures
    at: datetime  # the latest one
    action: str  # what was being done, e.g. "create varstore /var/lib/.../x_VARS.fd"
    error: str
    count: int
    definition_sha256: str

    def as_dict(self) -> dict:
        return {"at": stamp(self.at), "first_at": stamp(self.first_at), "action": self.action, "error": self.error,
                "count": self.count}

    def describe(self) -> str:
        times = f"{self.count} attempts since {stamp(self.first_at)}" if self.count > 1 else "once"
        return f"last attempt failed at {stamp(self.at)} ({times}): {self.action}: {self.error}"
