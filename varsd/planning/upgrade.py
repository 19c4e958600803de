"""Upgrade planning (pure): what a changed central firmware build means for one domain.

A managed split domain *tracks* central code: varsd's metadata binds it to
`build code=P sha256=S` and its loader is P. The package manager may replace P (an
upgrade), remove it, or leave a descriptor half-written for a moment; the varstore is
the guest's state and must keep fitting the code that boots it (domain brief, 2 and 3).
This module decides, from facts alone, what the domain's *persistent* definition
should say; the repair planner (`varsd.planning.repair`) turns that into a Plan.

Rules for a tracking domain (`decide_tracking`), first match wins:
1. The file at P still has digest S: nothing changed for this domain. If the catalog
   lists no build at P right now (a descriptor being rewritten, a bad file in /etc),
   or read another digest there (it is being reloaded), the domain is left exactly as
   it is: a transient glitch must never move it.
2. P is gone: hold it on its archived build (`incompatible`, needs-migration).
3. P cannot be read, or its new digest is not a build the catalog describes (a
   package mid-upgrade): wait. Nothing changes until the build's fit can be checked.
4. The catalog's build at P does not fit the varstore (`varsd.firmware.fit`: mapping,
   format, machine, Secure Boot, SMM, layout): hold (`incompatible`, needs-migration).
5. It fits and `upgrade_policy` is manual: hold (`policy`, pinned) until approved.
6. It fits: track it (rebind; metadata only). A running QEMU keeps the old build
   open, so the caller reports `pending-cold-boot` until the next cold boot.

Holding means: the loader points at the build's verified archived copy
(`<archive>/<sha256>.fd`; where none exists yet, it stays on a file that is the build);
the pin (`<varsd:pin sha256 by reason at>`) records who holds it and why, so each
release undoes only its own kind. The build held on is the one the domain is bound to,
else the one it runs: both worked with this varstore. With no verified copy, nothing
changes and the status says why (a corrupt copy is named as such and never used).

Rules for a pinned domain (`decide_pinned`):
- `admin`: held until `varsctl unpin`, whatever happens centrally.
- `policy`: released when the central build is the held or bound one again, or the
  policy is auto again and the build fits; becomes `incompatible` if it does not fit.
- `incompatible`: released when a fitting build is central again (under a manual
  policy a *new* fitting build becomes a `policy` hold instead).
Releasing points the loader back at the central path and binds the domain to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from varsd.firmware.fit import Needs, code_secure_boot, why_not
from varsd.model.archive import ArchiveIndex
from varsd.model.domain import DomainFirmware, FileFacts, PinKind, Status, VarsdMetadata
from varsd.model.firmware import Build, Catalog, MappingMode, UpgradePolicy, VarstoreLayout


@dataclass(frozen=True)
class UpgradeContext:
    """What upgrade planning needs besides the domain and catalog: policy and archive.

    `features` holds the descriptor features of builds the catalog no longer lists (by
    code digest, as recorded when they were archived): whether the build a domain is
    bound to was a Secure Boot build must not be judged from its replacement.
    """

    policy: UpgradePolicy = UpgradePolicy.AUTO
    archive: ArchiveIndex = ArchiveIndex(directory="/var/lib/varsd/archive")
    features: Mapping[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Track:
    """Follow `build` (the central build at the bound path); `note` says what changed."""

    build: Build
    note: str


@dataclass(frozen=True)
class Hold:
    """Keep the domain on one of `candidates` (digests, preferred first)."""

    kind: PinKind
    reason: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class Wait:
    """Change nothing; report `status` and `detail`."""

    status: Status
    detail: str


Decision = Track | Hold | Wait


def short(sha: str | None) -> str:
    return (sha or "?")[:12]


def hold_status(kind: PinKind) -> Status:
    return Status.NEEDS_MIGRATION if kind is PinKind.INCOMPATIBLE else Status.PINNED



def central_at(catalog: Catalog, path: str | None) -> Build | None:
    """The split build the catalog lists at `path` (what a tracking domain follows)."""
    build = catalog.by_code_path(path) if path else None
    return build if build is not None and build.mode is MappingMode.SPLIT else None


def tracks_central(fw: DomainFirmware, image: FileFacts | None) -> bool:
    """Whether the domain is bound to a build and boots the code at the bound path."""
    md = fw.metadata
    if not (md.build_code_sha256 and md.build_code_path) or md.pinned_sha256:
        return False
    paths = {fw.loader_path, image.realpath if image is not None else None}  # a dangling link too
    return md.build_code_path in paths


def had_secure_boot(fw: DomainFirmware, catalog: Catalog, ctx: UpgradeContext) -> bool | None:
    """Whether the domain's own build (the one it is held on, else bound to) is a Secure
    Boot build.

    The file at the bound path may already hold its replacement, so the digest decides:
    the catalog's builds with that digest, else what was recorded when it was archived,
    else the XML's `secure='yes'` (which varsd writes for Secure Boot builds).
    """
    for sha in (fw.metadata.pinned_sha256, fw.metadata.build_code_sha256):
        if not sha:
            continue
        builds = catalog.by_code_sha(sha)
        if builds:
            return code_secure_boot(builds)
        if sha in ctx.features:
            return "secure-boot" in ctx.features[sha]
    return bool(fw.loader_secure)


def _hold_candidates(md: VarsdMetadata, booted: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for s in (md.build_code_sha256, booted) if s))


def decide_tracking(
    fw: DomainFirmware,
    image: FileFacts | None,
    catalog: Catalog,
    layout: VarstoreLayout,
    secure: bool | None,
    policy: UpgradePolicy | str,
    booted: str | None = None,
) -> Decision | None:
    """The module's rules 1-6 for a domain `tracks_central`; None: normal planning goes on."""
    md = fw.metadata
    bound, path = md.build_code_sha256, md.build_code_path
    if not (bound and path):  # not tracking (see tracks_central): nothing for these rules
        return None
    central = central_at(catalog, path)
    if image is not None and image.exists and image.sha256 == bound:
        if central is None:
            return Wait(Status.OK, f"bound build {short(bound)} unchanged at {path} (no firmware descriptor "
                        "lists it at the moment; nothing is changed because of that)")
        if central.code_sha256 != bound:
            return Wait(Status.OK, f"bound build {short(bound)} unchanged at {path} (the firmware catalog, "
                        f"which read {short(central.code_sha256)} there, is being reloaded)")
        return None
    candidates = _hold_candidates(md, booted)
    if image is None or (not image.exists and image.error is None):
        return Hold(PinKind.INCOMPATIBLE, f"central code {path} was removed; kept on the archived build it was "
                    f"bound to until migrated: run 'varsctl migrate {fw.name}'", candidates)
    if not image.exists or image.error or image.sha256 is None:
        return Wait(Status.ERROR, f"central code {path} cannot be read ({image.error or 'no digest'}); "
                    "nothing changed")
    new = image.sha256
    if central is None or central.code_sha256 != new:
        return Wait(Status.ERROR, f"central code {path} changed to build {short(new)}, which no firmware "
                    "descriptor describes yet, so its fit cannot be checked; nothing changed. Run "
                    "'varsctl firmware sync' once the package upgrade is complete")
    why = why_not(central, Needs.of(fw, secure_boot=secure, layout=layout))
    if why is not None:
        return Hold(PinKind.INCOMPATIBLE, f"new central build does not fit: {why}; kept on the archived build "
                    f"{short(bound)} until migrated: run 'varsctl migrate {fw.name}'", candidates)
    if policy == UpgradePolicy.MANUAL:
        return Hold(PinKind.POLICY, f"new build {central.label} held back by upgrade_policy = \"manual\"; "
                    f"let it through with 'varsctl upgrade approve {fw.name}'", candidates)
    return Track(central, f"firmware upgrade: {path} build {short(bound)} -> {short(new)}")


def decide_pinned(
    fw: DomainFirmware,
    catalog: Catalog,
    layout: VarstoreLayout | None,
    secure: bool | None,
    policy: UpgradePolicy | str,
) -> Track | Hold:
    """Whether a pinned domain stays held (and by whom) or is released to the central build."""
    md = fw.metadata
    kind = md.pin_kind
    pin = md.pinned_sha256
    if kind is None or not pin:
        raise ValueError(f"decide_pinned: domain '{fw.name}' holds no pin")
    keep = Hold(kind, md.pin_reason or _default_reason(kind, fw.name), (pin,))
    if kind is PinKind.ADMIN:
        return keep
    if kind is PinKind.INCOMPATIBLE and layout is not None:
        # The very build it is held on, listed again at another path (e.g. the old pair
        # added as extra_firmware): follow it there rather than keep the archived copy.
        for same in catalog.by_code_sha(pin):
            if same.mode is MappingMode.SPLIT and same.code_path != md.build_code_path \
                    and why_not(same, Needs.of(fw, secure_boot=secure, layout=layout)) is None:
                return Track(same, f"the held build {short(pin)} is listed again at {same.code_path}; hold released")
    central = central_at(catalog, md.build_code_path)
    if central is None and kind is PinKind.POLICY and layout is not None:
        # The held-back build's central file is gone (e.g. Debian 13 dropping the 2 MiB
        # images): approving can no longer help, only a migration can.
        return Hold(PinKind.INCOMPATIBLE, f"central code {md.build_code_path} was removed; kept on the archived "
                    f"build {short(pin)} until migrated: run 'varsctl migrate {fw.name}'", (pin,))
    if central is None or layout is None:
        return keep  # nothing known to release to: stay on the build that works
    why = why_not(central, Needs.of(fw, secure_boot=secure, layout=layout))
    if why is not None:
        if kind is PinKind.POLICY:
            return Hold(PinKind.INCOMPATIBLE, f"new central build does not fit: {why}; kept on the archived "
                        f"build {short(pin)} until migrated: run 'varsctl migrate {fw.name}'", (pin,))
        return keep
    if central.code_sha256 in (pin, md.build_code_sha256):
        return Track(central, f"central build {central.label} is the held build again; hold released")
    if policy != UpgradePolicy.MANUAL:
        what = "upgrade_policy is auto" if kind is PinKind.POLICY else "a fitting central build is back"
        return Track(central, f"{what}: bound to {central.label}, hold released")
    # Manual policy and a new fitting build: held back by policy (the reason names the build).
    return Hold(PinKind.POLICY, f"new build {central.label} held back by upgrade_policy = \"manual\"; "
                f"let it through with 'varsctl upgrade approve {fw.name}'", (pin,))


def _default_reason(kind: PinKind, name: str) -> str:
    if kind is PinKind.ADMIN:
        return f"pinned by an admin; 'varsctl unpin {name}' releases it"
    if kind is PinKind.POLICY:
        return f"held back by upgrade_policy = \"manual\"; 'varsctl upgrade approve {name}' releases it"
    return f"central build does not fit the varstore; run 'varsctl migrate {name}'"


@dataclass(frozen=True)
class HoldPlace:
    """Where a held domain's loader must point: `code_path` holds the build `sha256`."""

    sha256: str
    code_path: str


def place_hold(
    candidates: tuple[str, ...],
    image: FileFacts | None,
    fw: DomainFirmware,
    catalog: Catalog,
    archive: ArchiveIndex,
) -> HoldPlace | str:
    """The first candidate a loader can point at, or why none can (verify-before-use).

    The verified archived copy first (by digest: no package upgrade can change it); then
    the current loader file when it already is the build; then the central path when
    the catalog lists the build there (no copy archived yet). A corrupt copy is never
    offered.
    """
    problems = []
    for sha in candidates:
        # The archived copy first: it is addressed by digest, so no package operation
        # can change what it boots (a hold left on the central path would map a new
        # build at a cold boot between the package's rename and varsd's next look).
        if sha in archive.verified:
            return HoldPlace(sha, archive.path_for(sha))
        if image is not None and image.exists and image.sha256 == sha and fw.loader_path:
            return HoldPlace(sha, fw.loader_path)
        central = central_at(catalog, fw.metadata.build_code_path)
        if central is not None and central.code_sha256 == sha:
            return HoldPlace(sha, central.code_path)
        if sha in archive.corrupt:
            problems.append(f"{archive.corrupt[sha]} (not used)")
        else:
            problems.append(f"build {short(sha)} is not in the firmware archive {archive.directory}")
    if not problems:
        return "the domain's build is not known (no binding, no boot record)"
    return "; ".join(problems)


def held_metadata(md: VarsdMetadata, hold: Hold, sha: str, now: datetime, name: str) -> VarsdMetadata:
    """The metadata of a domain held on `sha`; unchanged when it already says so (a pin an
    older varsd wrote without `by`/`reason` is not rewritten for that alone), and
    `pinned_at` changes only with the hold itself."""
    same = (md.pinned_sha256, md.pin_kind) == (sha, hold.kind)
    if same and hold.reason == (md.pin_reason or _default_reason(hold.kind, name)):
        return md
    return replace(
        md, pinned_sha256=sha, pin_by=hold.kind.value, pin_reason=hold.reason,
        pinned_at=md.pinned_at if same and md.pinned_at else now,
    )


def released_metadata(md: VarsdMetadata, build: Build) -> VarsdMetadata:
    """Hold lifted: bound to the central build the loader now names."""
    return replace(md.without_pin(), build_code_path=build.code_path, build_code_sha256=build.code_sha256)


def admin_pin(md: VarsdMetadata, sha: str, reason: str | None, now: datetime, name: str) -> VarsdMetadata:
    """What `varsctl pin` writes: an admin hold on `sha` (the planner then places the loader)."""
    return replace(md, pinned_sha256=sha, pin_by=PinKind.ADMIN.value,
                   pin_reason=reason or _default_reason(PinKind.ADMIN, name), pinned_at=now)
