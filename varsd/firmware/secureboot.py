"""Where a varstore stands on Microsoft's 2023 Secure Boot certificates, and what to add.

Pure (no I/O; in `firmware` so that the derived-templates code beside the catalog and
the engine both use this one judgement): decisions over a store's parsed keys (`SecureBootVars`), whether its code is a
Secure Boot build, and what the installed virt-firmware ships. The engine reads the
files; `varsctl secureboot` reports and acts.

The rules, in order (the first that applies decides):
- no varstore, stateless firmware or a code build without Secure Boot: `n/a`;
- a store that cannot be read: `blocked` (nothing is written to what cannot be parsed);
- no PK (setup mode), SecureBootEnable off: `n/a` (Secure Boot is not enforcing);
- CustomMode on, a PK or KEK entry under an owner GUID no distro template uses:
  `blocked`: someone else manages these keys, and varsd does not second-guess them;
- no Microsoft KEK at all: `blocked` (not a Microsoft-keyed store: adding Microsoft's
  keys would widen what the guest trusts);
- all four 2023 certificates present: `ok`; else `update-available` (or
  `update-queued` when an update waits for the guest to stop).
"""

from __future__ import annotations

from collections.abc import Sequence

from varsd.model.secureboot import (
    DISTRO_OWNERS,
    MICROSOFT_OWNER,
    MS_2023_CERTS,
    MS_KEK_2011,
    Judgement,
    Ms2023State,
    SecureBootVars,
    ShippedCert,
)


def _present(sb: SecureBootVars, shipped: ShippedCert) -> bool:
    # By fingerprint where virt-firmware ships the certificate, by subject where it does not
    # (24.11 has no Option ROM CA: a store that has it is still recognised).
    return sb.has(shipped.cert.variable, shipped.cert.subject, shipped.sha256)


def missing_certs(sb: SecureBootVars, shipped: Sequence[ShippedCert]) -> tuple[ShippedCert, ...]:
    """The 2023 certificates `sb` lacks, each with virt-firmware's copy (or None)."""
    by_subject = {s.cert.subject: s for s in shipped}
    want = [by_subject.get(c.subject, ShippedCert(c, None, None, None)) for c in MS_2023_CERTS]
    return tuple(s for s in want if not _present(sb, s))


def judge(
    sb: SecureBootVars | None,
    *,
    secure_code: bool,
    shipped: Sequence[ShippedCert],
    varstore: str | None,
    stateless: bool = False,
    error: str | None = None,
    queued: bool = False,
) -> Judgement:
    """The `ms2023` state of one store (a domain's varstore or a template)."""
    na = Ms2023State.NOT_APPLICABLE
    if stateless:
        return Judgement(na, "stateless firmware: no varstore")
    if not varstore:
        return Judgement(na, "no varstore (not UEFI, or not provisioned yet)")
    if not secure_code:
        return Judgement(na, "Secure Boot off: the code is not a Secure Boot build")
    if error is not None or sb is None:
        return Judgement(Ms2023State.BLOCKED, f"varstore unreadable: {error or 'not parsed'}")
    if sb.setup_mode:
        return Judgement(na, "Secure Boot off: no PK enrolled (setup mode)")
    if sb.secure_boot_enable is False:
        return Judgement(na, "Secure Boot off: SecureBootEnable is 0 (disabled in the firmware setup)")
    if sb.custom_mode:
        return Judgement(Ms2023State.BLOCKED, "CustomMode is on: the keys are being managed by hand")
    pk = sb.pk[0]
    if any(c.owner not in DISTRO_OWNERS for c in sb.pk):
        return Judgement(Ms2023State.BLOCKED, f"custom PK '{pk.subject}' (owner {pk.owner}): its owner manages "
                                              "KEK and db; varsd does not change keys it did not enroll")
    pk_certs = {c.sha256 for c in sb.pk}
    strangers = [c for c in sb.kek if c.owner not in DISTRO_OWNERS and c.sha256 not in pk_certs]
    if strangers:
        c = strangers[0]
        return Judgement(Ms2023State.BLOCKED, f"unknown KEK owner {c.owner} ('{c.subject}'): someone else "
                                              "manages these keys")
    if not any(c.owner == MICROSOFT_OWNER for c in sb.kek):
        return Judgement(Ms2023State.BLOCKED, "not Microsoft-keyed (no Microsoft KEK): varsd does not add "
                                              "Microsoft's keys to a store that never trusted them")
    missing = missing_certs(sb, shipped)
    if not missing:
        return Judgement(Ms2023State.OK, "Microsoft 2023 KEK and db certificates present")
    addable = tuple(s for s in missing if s.der is not None)
    names = ", ".join(f"{s.cert.variable} '{s.cert.subject}'" for s in missing)
    why = f"missing {names}"
    if not any(c.subject == MS_KEK_2011 for c in sb.kek):
        why += " (the Microsoft KEK present is not the 2011 one)"
    unshipped = [s for s in missing if s.der is None]
    if unshipped:
        why += "; the installed virt-firmware does not ship " + ", ".join(f"'{s.cert.subject}'" for s in unshipped)
        if not addable:
            return Judgement(Ms2023State.UPDATE_AVAILABLE, why + ", so varsd cannot add it here", missing, ())
    if queued:
        return Judgement(Ms2023State.UPDATE_QUEUED, "update queued: applied after the guest stops, before its "
                                                    f"next start ({why})", missing, addable)
    return Judgement(Ms2023State.UPDATE_AVAILABLE, why, missing, addable)
