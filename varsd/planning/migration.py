"""Migration planning (pure): may this domain's variables move to another build, and where.

Why: code hard-codes where its varstore lives, so a domain whose varstore has the
2 MiB layout cannot boot 4 MiB code (and on x86 fails *silently*). `varsctl migrate`
moves every variable into a fresh copy of a fitting build's template; the shell that
does it is `varsd.engine.migration`. This module decides, from facts alone:

- `plan_migration(facts, catalog, ...)`: from the domain's XML, run state and what its
  varstore holds (`MigrationFacts`, gathered by the shell) it chooses the target build
  and checks everything that can be checked without touching a file: shut off,
  managed, a file-backed private varstore, a build that fits the domain
  (`varsd.firmware.fit`: machine, Secure Boot kept as it is, the SMM it needs). It
  returns a `MigrationPlan` (target, template, the new XML) or raises `MigrationRefused`.
- Default target: the build the domain tracks (its metadata's central code path) if
  it fits, else the first catalog build that matches the domain's needs: Secure Boot
  or not (its code, else its XML), enrolled keys or not (PK, KEK and db set in its
  varstore). `--to` names a build by descriptor path or file name, code path or code
  file name, or a code sha256 prefix; it may not switch Secure Boot either, except
  when the domain's code is unknown and only its XML's `secure='yes'` spoke for it.
- A private unified image (`unified`) is migrated into a *new* private varstore.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from varsd.domain.classify import classify
from varsd.domain.xml import FirmwareEdit, apply_edit, nvram_storage
from varsd.errors import VarsdError
from varsd.firmware.fit import Misfit, Needs, misfits
from varsd.firmware.selection import explain, first_fit
from varsd.model.domain import DomainFirmware, FileFacts, FirmwareConfig, PinKind, VarsdMetadata
from varsd.model.firmware import Build, Catalog, VarstoreLayout
from varsd.model.journal import MIGRATION_REASON
from varsd.model.varstore import EfiVariable
from varsd.planning.repair import is_private_varstore, new_varstore_path, wants_secure_boot

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
EFI_IMAGE_SECURITY_DATABASE = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"
KEY_VARIABLES = (f"{EFI_GLOBAL}:PK", f"{EFI_GLOBAL}:KEK", f"{EFI_IMAGE_SECURITY_DATABASE}:db")
"""A varstore with all three set has enrolled keys (Secure Boot in user mode)."""

MIN_SHA_PREFIX = 6
"""Shortest code digest prefix `--to` accepts: shorter ones match by accident."""


_HEX = re.compile(r"^[0-9a-fA-F]+$")


class MigrationRefused(VarsdError):
    """The migration was not started: the domain or the target is not fit for it. Nothing changed."""


class NothingToMigrate(MigrationRefused):
    """The domain already uses the target build with a varstore of its layout."""


@dataclass(frozen=True)
class VarstoreFacts:
    """What the shell read from the file holding the domain's variables.

    For a unified image `path` is the image and `layout.size` the length of its
    leading varstore; `size` is always the whole file's size.
    """

    path: str
    size: int
    layout: VarstoreLayout | None = None
    variables: int = 0
    enrolled_keys: bool = False
    symlink: bool = False
    error: str | None = None  # unreadable, not a varstore, ...


@dataclass(frozen=True)
class MigrationFacts:
    """Everything `plan_migration` may look at, gathered by the shell."""

    xml: str  # persistent definition
    firmware: DomainFirmware  # parsed from `xml`
    state: str  # libvirt run state ("shut off", "running", "paused", ...)
    active: bool
    persistent: bool = True
    excluded: bool = False
    image: FileFacts | None = None  # the loader image
    source: VarstoreFacts | None = None  # None: the XML names a varstore file that does not exist


@dataclass(frozen=True)
class MigrationPlan:
    """What `migrate_domain` will do for one domain."""

    name: str
    uuid: str
    config: FirmwareConfig
    source: str  # file holding the variables now
    source_layout: VarstoreLayout
    target: Build
    template: str  # the target template the variables go into
    target_layout: VarstoreLayout
    varstore: str  # the new store's path: `source` itself for a split domain
    in_place: bool  # True: `source` is replaced; False: `varstore` is created (unified source)
    new_xml: str
    reason: str

    def describe(self) -> str:
        where = f"{self.varstore} (in place)" if self.in_place else f"new varstore {self.varstore}"
        return (
            f"domain '{self.name}': variables of {self.source} ({self.source_layout.describe()}) -> "
            f"{where} from {self.template} ({self.target_layout.describe()}); code {self.target.label} "
            f"({self.target.origin})"
        )


def enrolled_keys(variables: Mapping[str, EfiVariable]) -> bool:
    """True when PK, KEK and db are all set: the guest's Secure Boot has keys enrolled."""
    return all(key in variables and variables[key].data for key in KEY_VARIABLES)



def resolve_build(catalog: Catalog, spec: str) -> list[Build]:
    """Catalog builds named by `spec` (see module doc), in catalog order; may be empty.

    Paths match descriptor paths and code paths exactly; plain names match descriptor
    file names (with or without `.json`) and code file names; hex strings of at
    least MIN_SHA_PREFIX digits match code digests by prefix.
    """
    spec = spec.strip()
    if not spec:
        return []
    if "/" in spec:
        path = os.path.normpath(spec)
        return [b for b in catalog.builds if path in (os.path.normpath(b.origin), os.path.normpath(b.code_path))]
    by_name = [
        b for b in catalog.builds
        if spec in (os.path.basename(b.origin), os.path.basename(b.origin).removesuffix(".json"),
                    os.path.basename(b.code_path))
    ]
    if by_name:
        return by_name
    if len(spec) >= MIN_SHA_PREFIX and _HEX.match(spec):
        prefix = spec.lower()
        return [b for b in catalog.builds if b.code_sha256.startswith(prefix)]
    return []


def _pin_problem(md: VarsdMetadata, name: str) -> str | None:
    """Why a pin forbids migrating; None when there is none or it is varsd's `incompatible` pin.

    The `incompatible` pin is varsd keeping the domain on its archived build because the
    central one no longer fits the varstore: exactly what a migration resolves, so the
    migration lifts it. An admin's pin says "keep this domain on this build", and a
    policy pin holds a new build back until it is approved: neither is overruled here.
    """
    kind = md.pin_kind
    if kind is None or kind is PinKind.INCOMPATIBLE:
        return None
    pin = (md.pinned_sha256 or "")[:12]
    if kind is PinKind.POLICY:
        return (f"held on build {pin} by upgrade_policy = \"manual\"; 'varsctl upgrade approve {name}' "
                "first, or migrate after approval")
    return f"pinned to build {pin} by an admin; 'varsctl unpin {name}' first"


@dataclass(frozen=True)
class _Wants:
    """What the target must keep of the domain's firmware."""

    secure: bool | None  # Secure Boot build or not; None: the code serves both (AAVMF)
    keys: bool  # the varstore has PK, KEK and db
    known: bool  # `secure` comes from the domain's code (a catalog build), not just its XML


def _wants(facts: MigrationFacts, catalog: Catalog) -> _Wants:
    fw, image = facts.firmware, facts.image
    secure = wants_secure_boot(fw, image, catalog)
    shas = {image.sha256, image.trailing_sha256} - {None} if image is not None else set()
    paths = {fw.loader_path, image.realpath if image is not None else None} - {None}
    known = any(catalog.by_code_sha(s) for s in shas) or any(b.code_path in paths for b in catalog.builds)
    return _Wants(secure=secure, keys=bool(facts.source and facts.source.enrolled_keys), known=known)


def _needs(fw: DomainFirmware, wants: _Wants, *, explicit: bool = False, keys: bool = False) -> Needs:
    """What a target must give the domain: its machine, and its Secure Boot kind (unless an
    admin's explicit `--to` chose for a domain whose code is unknown); with `keys`, a
    Secure Boot domain's enrolled-or-not as well. No layout: migrating changes it."""
    secure = None if explicit and not wants.known else wants.secure
    return Needs.of(fw, secure_boot=secure, enrolled_keys=wants.keys if keys and wants.secure else None)


_ADVICE = {
    Misfit.SECURE_BOOT: "; migrating would change what the guest trusts. Choose a build of the same kind, or change "
                        "Secure Boot by hand",
}


def _check_target(build: Build, fw: DomainFirmware, wants: _Wants, *, explicit: bool = False) -> str | None:
    """Why `build` cannot be this domain's target (`varsd.firmware.fit`); None when it can.

    Secure Boot must stay as it is. Only when the domain's code is unknown (so the
    XML's `secure='yes'`, which may also mean an SMM-protected plain build, was all
    there was to go by) may an admin's explicit `--to` choose the other kind.
    """
    found = misfits(build, _needs(fw, wants, explicit=explicit))
    if not found:
        return None
    return f"{found[0].sentence} (from {build.origin}){_ADVICE.get(found[0].kind, '')}"


def _default_target(facts: MigrationFacts, catalog: Catalog, wants: _Wants) -> Build:
    fw = facts.firmware
    tracked = fw.metadata.build_code_path
    if tracked:
        for b in catalog.builds:
            if b.code_path == tracked and _check_target(b, fw, wants) is None:
                return b
    # The target template's own variables are not carried over (only the domain's are),
    # so enrolled-or-not decides the <nvram template> for a later reset, nothing else:
    # prefer the matching kind, but any build of the right Secure Boot kind will do.
    build = first_fit(catalog, _needs(fw, wants, keys=True)) or first_fit(catalog, _needs(fw, wants))
    if build is None:
        raise MigrationRefused(
            f"domain '{fw.name}': no catalog build to migrate to: {explain(catalog, _needs(fw, wants))}"
        )
    return build


def _named_target(spec: str, facts: MigrationFacts, catalog: Catalog, wants: _Wants) -> Build:
    fw = facts.firmware
    matches = resolve_build(catalog, spec)
    if not matches:
        known = "; ".join(f"{os.path.basename(b.origin)} ({b.label})" for b in catalog.builds) or "none"
        raise MigrationRefused(f"--to {spec}: no catalog build has that descriptor, code path or digest. "
                               f"Builds: {known}")
    if len({b.code_sha256 for b in matches}) > 1:
        listed = "; ".join(f"{b.origin} ({b.label})" for b in matches)
        raise MigrationRefused(f"--to {spec}: ambiguous, it names different builds: {listed}")
    # One code image may come with several templates (Debian: enrolled and not): take the
    # one that fits the domain best, else the first that passes the checks, else say why not.
    fitting = first_fit(Catalog(builds=tuple(matches)), _needs(fw, wants, keys=True))
    if fitting is not None and _check_target(fitting, fw, wants, explicit=True) is None:
        return fitting
    for b in matches:
        if _check_target(b, fw, wants, explicit=True) is None:
            return b
    problem = _check_target(matches[0], fw, wants, explicit=True)
    raise MigrationRefused(f"domain '{fw.name}': cannot migrate to --to {spec}: {problem}")


def _refuse(fw: DomainFirmware, why: str) -> MigrationRefused:
    return MigrationRefused(f"domain '{fw.name}': {why}; nothing was changed")


def plan_migration(
    facts: MigrationFacts, catalog: Catalog, *, to: str | None, nvram_dir: str, now: datetime
) -> MigrationPlan:
    """The migration of one domain (module rules), or MigrationRefused saying why not."""
    fw = facts.firmware
    if not facts.persistent:
        raise _refuse(fw, "transient domain: no persistent definition to migrate")
    if facts.active:
        raise _refuse(
            fw,
            f"is {facts.state}; migrate only shut-off domains (a running guest may write its varstore "
            f"at any moment). Shut it down, then run 'varsctl migrate {fw.name}'",
        )
    if fw.metadata.opt_out:
        raise _refuse(fw, "opted out of varsd (metadata manage='no')")
    if facts.excluded:
        raise _refuse(fw, "excluded by the 'exclude' setting")
    config = classify(fw, facts.image, catalog)
    if config is FirmwareConfig.CONFIDENTIAL:
        raise _refuse(fw, f"confidential guest (launchSecurity {fw.launch_security}): its measured firmware "
                      "is never split or migrated")
    if config in (FirmwareConfig.NONE, FirmwareConfig.STATELESS, FirmwareConfig.AUTOSELECT):
        raise _refuse(fw, f"firmware configuration '{config.value}' has no varstore varsd manages")
    if config in (FirmwareConfig.BIOS_ROM, FirmwareConfig.CODE_ONLY):
        raise _refuse(fw, f"'{config.value}' firmware has no variables to migrate; 'varsctl reconcile' gives "
                      "it a varstore")
    storage = nvram_storage(facts.xml)
    if storage not in (None, "file"):
        raise _refuse(fw, f"varstore on {storage} storage (<nvram type='{storage}'>) is not a local file")
    pin_problem = _pin_problem(fw.metadata, fw.name)
    if pin_problem:
        raise _refuse(fw, pin_problem)
    if not fw.arch or not fw.machine:
        raise _refuse(fw, "domain XML has no <os><type arch machine>")

    source = facts.source
    if source is None:
        # Nothing to do is exit 0 (README), not a refusal.
        raise NothingToMigrate(f"domain '{fw.name}': varstore {fw.nvram_path} does not exist yet (never "
                               "started?): nothing to migrate; 'varsctl reconcile' or libvirt creates it")
    if source.symlink:
        raise _refuse(fw, f"varstore {source.path} is a symbolic link; varsd does not rewrite through links")
    if source.layout is None:
        raise _refuse(fw, f"{source.path} is not a usable edk2 varstore"
                      f"{': ' + source.error if source.error else ''}")
    unified = config is FirmwareConfig.UNIFIED
    as_file = FileFacts(path=source.path, exists=True, size=source.size, varstore_layout=source.layout)
    if not unified and not is_private_varstore(catalog, nvram_dir, as_file):
        raise _refuse(fw, f"varstore {source.path} is not private to the domain (a firmware package's file, "
                      "or more than a varstore); 'varsctl reconcile' gives the domain its own copy first")

    wants = _wants(facts, catalog)
    target = _named_target(to, facts, catalog, wants) if to else _default_target(facts, catalog, wants)
    problem = _check_target(target, fw, wants, explicit=bool(to))
    if problem:
        raise _refuse(fw, problem)
    if target.template_path is None or target.layout is None:
        raise _refuse(fw, f"build {target.label} has no varstore template")
    if not unified and fw.loader_path == target.code_path and source.layout == target.layout:
        raise NothingToMigrate(
            f"domain '{fw.name}': already uses {target.label} with a varstore of its layout; nothing to migrate"
        )

    varstore = new_varstore_path(nvram_dir, fw, {fw.loader_path}) if unified else source.path
    md = replace(
        fw.metadata,
        build_code_path=target.code_path,
        build_code_sha256=target.code_sha256,
        template_path=target.template_path,
        template_sha256=target.template_sha256,
        varstore_source=f"migrated:{source.path}",
        provisioned_at=now,
    )
    if md.pinned_sha256:  # varsd's own `incompatible` pin: the migration resolves it
        md = md.without_pin()
    new_xml = apply_edit(
        facts.xml,
        FirmwareEdit(
            code_path=target.code_path,
            nvram_path=varstore,
            template_path=target.template_path,
            secure=target.requires_smm,
            smm=target.requires_smm or fw.smm,
            metadata=md,
        ),
    )
    return MigrationPlan(
        name=fw.name,
        uuid=fw.uuid,
        config=config,
        source=source.path,
        source_layout=source.layout,
        target=target,
        template=target.template_path,
        target_layout=target.layout,
        varstore=varstore,
        in_place=not unified,
        new_xml=new_xml,
        reason=f"{MIGRATION_REASON} ({source.layout.size} -> {target.layout.size} bytes) to {target.label}",
    )


def compare_variables(old: Mapping[str, EfiVariable], new: Mapping[str, EfiVariable]) -> str | None:
    """None when `new` holds exactly `old`'s variables with equal attributes and data; else what differs."""
    missing = sorted(k for k in old if k not in new)
    changed = sorted(k for k in old if k in new and (new[k].attr, new[k].data) != (old[k].attr, old[k].data))
    extra = sorted(k for k in new if k not in old)
    parts = []
    for what, keys in (("missing", missing), ("changed", changed), ("unexpected", extra)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            parts.append(f"{what}: {shown}")
    return "; ".join(parts) or None
