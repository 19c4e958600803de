"""Typed records for Secure Boot keys in a varstore and the Microsoft 2023 rollout.

Plain data: `varsd.adapters.virtfw` reads them out of a varstore, the pure planner
in `varsd.firmware.secureboot` judges them, the engine and CLI report them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

MICROSOFT_OWNER = "77fa9abd-0359-4d32-bd60-28f4e78f784b"
"""Signature owner GUID Microsoft's certificates are enrolled under (edk2: gMicrosoftVendorGuid)."""

OVMF_ENROLL_OWNER = "a0baa8a3-041d-48a8-bc87-c36d121b5e3d"
"""Owner GUID of the PK/KEK distros enroll with OVMF's EnrollDefaultKeys (Debian, Fedora, RHEL)."""

EFI_GLOBAL_OWNER = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
"""Owner GUID of Debian's PK in its `OVMF_VARS*.ms.fd` (the EFI global variable GUID)."""

DISTRO_OWNERS = frozenset({OVMF_ENROLL_OWNER, MICROSOFT_OWNER, EFI_GLOBAL_OWNER})
"""Owners distro templates and virt-firmware enroll PK/KEK entries under; a PK or KEK
entry under another owner GUID was enrolled by someone else, who manages those keys."""

MS_KEK_2011 = "Microsoft Corporation KEK CA 2011"


class Ms2023State(StrEnum):
    """Where a varstore stands on Microsoft's 2023 certificates (`secureboot status`)."""

    OK = "ok"  # the 2023 KEK and db certificates are present
    UPDATE_AVAILABLE = "update-available"  # Microsoft-keyed, some 2023 certificates missing
    BLOCKED = "blocked"  # custom PK, unknown KEK owner, unreadable store, ...: varsd will not touch it
    NOT_APPLICABLE = "n/a"  # Secure Boot off, stateless, no varstore
    UPDATE_QUEUED = "update-queued"  # running: applied after it stops, before its next start


@dataclass(frozen=True)
class Ms2023Cert:
    """One of the certificates the rollout adds, and where it goes."""

    variable: str  # "KEK" or "db"
    subject: str  # its subject CN, how admins and Microsoft name it


MS_2023_CERTS: tuple[Ms2023Cert, ...] = (
    Ms2023Cert("KEK", "Microsoft Corporation KEK 2K CA 2023"),
    Ms2023Cert("db", "Windows UEFI CA 2023"),
    Ms2023Cert("db", "Microsoft UEFI CA 2023"),
    Ms2023Cert("db", "Microsoft Option ROM UEFI CA 2023"),
)


@dataclass(frozen=True)
class Certificate:
    """An X.509 certificate in a signature database (PK, KEK, db)."""

    subject: str  # CN when there is one, else the whole RFC 4514 subject
    owner: str  # the signature owner GUID it is enrolled under
    not_after: str  # ISO 8601 UTC
    sha256: str  # fingerprint of the DER encoding

    def as_dict(self) -> dict:
        return {"subject": self.subject, "owner": self.owner, "not_after": self.not_after, "sha256": self.sha256}


@dataclass(frozen=True)
class SecureBootVars:
    """The Secure Boot part of one varstore's variables.

    `SecureBoot` and `SetupMode` are volatile in edk2 (recomputed at every boot, never
    in the file): `setup_mode` is what the firmware will compute (no PK), and
    `secure_boot` is the stored variable only if a store happens to hold one.
    """

    pk: tuple[Certificate, ...] = ()
    kek: tuple[Certificate, ...] = ()
    db: tuple[Certificate, ...] = ()
    db_hashes: int = 0
    dbx_entries: int = 0
    secure_boot_enable: bool | None = None  # SecureBootEnable (NV; the setup menu's switch)
    custom_mode: bool | None = None
    secure_boot: bool | None = None

    @property
    def setup_mode(self) -> bool:
        return not self.pk

    @property
    def enforcing(self) -> bool:
        """What edk2 computes at boot for SecureBoot: a PK, not disabled, not in custom mode."""
        return bool(self.pk) and self.secure_boot_enable is not False and not self.custom_mode

    def has(self, variable: str, subject: str, sha256: str | None = None) -> bool:
        """Whether `variable` holds the certificate: by fingerprint when known, else by subject."""
        certs = self.kek if variable == "KEK" else self.db if variable == "db" else self.pk
        if sha256 is not None:
            return any(c.sha256 == sha256 for c in certs)
        return any(c.subject == subject for c in certs)


@dataclass(frozen=True)
class ShippedCert:
    """A 2023 certificate as the installed virt-firmware ships it (`der` None: it does not)."""

    cert: Ms2023Cert
    der: bytes | None
    sha256: str | None
    source: str | None  # where in virt-firmware it came from


@dataclass(frozen=True)
class Pcr7:
    """PCR7 (sha256) before and after a change, as virt-firmware's measurement code predicts it.

    Predicted up to the separator event: the boot loader's own authority event follows
    at boot and is the same before and after as long as the same db certificate verifies
    the same loader. `None` values with `why`: the prediction is not available.
    """

    before: str | None
    after: str | None
    why: str | None = None

    @property
    def changes(self) -> bool | None:
        if self.before is None or self.after is None:
            return None
        return self.before != self.after

    def as_dict(self) -> dict:
        return {"before": self.before, "after": self.after, "changes": self.changes, "unavailable": self.why}


@dataclass(frozen=True)
class Judgement:
    """One store's `ms2023` state and why, plus what an update would add."""

    state: Ms2023State
    why: str
    missing: tuple[Ms2023Cert, ...] = ()  # 2023 certificates the store lacks
    addable: tuple[ShippedCert, ...] = ()  # of those, what this virt-firmware can add
