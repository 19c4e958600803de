"""Repair planning: what is wrong with one domain's firmware and what to do (pure).

Contract: `plan_repair(facts, catalog, nvram_dir, now)` looks only at its arguments
(parsed XML, file facts the engine read, the catalog, the clock's aware datetime passed in) and
returns a `Plan`: the configuration class, the status to report, a sentence for the
admin and the actions that bring the domain to the normal case: two pflash, the
central code of a catalog build read-only + a private varstore with that build's
layout. It never performs I/O; the engine executes the actions. Planning again on
the result of a plan's actions yields no actions.

Rules, in order (early returns):
- opted out, excluded, transient, SeaBIOS, confidential, stateless, autoselect, or a
  varstore on a block device or network storage: left alone, reported `unmanaged`;
- a `<varstore>` JSON store (libvirt 12.1+, QEMU's uefi-vars device) with its ROM loader:
  its own class, never rewritten into pflash, reported `ok` with the JSON file;
- pinned (varsd metadata `<pin sha256 by>`) to a build other than the one the domain is
  bound to: that build must fit the domain (SMM, Secure Boot, layout), as `varsctl pin
  --build` checks; otherwise `error`, untouched (a hand edit, or XML from another host);
- pinned: held on that build (`varsd.planning.upgrade`
  decides whether the hold stays; an admin's always does). The loader is the pinned
  build's file: kept when it is, else the central path or the verified archived copy;
  reported `pinned` (`needs-migration` for an `incompatible` hold); no usable copy:
  `error`, untouched;
- Secure Boot or not is what the domain's *code* is (its digest, else its path, in the
  catalog); the XML's `secure='yes'` decides only when the code is unknown. Swapping
  one for the other changes what the guest trusts, so no rule ever does;
- bios-rom and code-only: nothing persistent to keep; a new varstore from the template
  of the build that matches what the domain booted (a Secure Boot guest gets an
  *unenrolled* template, as it never had keys), and the XML rewritten. A varstore the
  XML already names and that fits a build is kept instead. A single writable pflash
  whose image cannot be read may be a unified image full of variables: `error`;
- unified: the image's leading varstore region *is* the varstore: copied out byte for
  byte and paired with a build of the same layout, so no variable is lost; no such
  build -> `needs-migration`, unchanged. A running guest may still write its image, so
  the split waits until it is shut off;
- split, bound to a build and booting the bound path, whose file changed or went away:
  `varsd.planning.upgrade` rules (rebind, hold on the archived build, or wait);
- split: compliant when the loader is a catalog build's code (by path, or a symlink to
  it) and the varstore has that build's layout; a stale private code copy or an
  unknown/missing code path is repointed to the central code of a build whose layout
  fits; nothing fits -> `needs-migration`. A varstore that is not a varstore -> `error`;
- a split varstore that is not private (a catalog template or code image, any file in
  a catalog build's directory, or a file larger than its varstore) is copied, every
  variable kept, to a new private file and `<nvram>` repointed; while the domain runs
  this waits, as the guest may still write the shared file;
- a Secure Boot build needs SMM, which needs a q35 machine: otherwise `error`, and the
  XML is not touched;
- a varstore outside `nvram_dir` is never provisioned there (no file, no `template=`,
  which is what makes libvirt create it); it gets a warning in the detail.
A running domain whose persistent firmware differs from what it booted (the code
path, the varstore, or the digest of the code its QEMU process opened, from the boot
record in its live XML) is reported `pending-cold-boot`: changes apply at its next
cold boot.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime

from varsd.domain.classify import classify, firmware_image_path
from varsd.domain.xml import FirmwareEdit, apply_edit, nvram_storage, parse_domain, replace_loader_code, set_metadata
from varsd.firmware.fit import Needs, code_secure_boot, machine_has_smm, misfits, uefi_needs_acpi, why_not
from varsd.firmware.selection import explain_no_build, select_build
from varsd.model.domain import DomainFirmware, FileFacts, FirmwareConfig, Status, VarsdMetadata
from varsd.model.firmware import Build, Catalog, MappingMode, VarstoreLayout
from varsd.planning import upgrade
from varsd.planning.sharing import Sharing
from varsd.planning.upgrade import Hold, Track, UpgradeContext, Wait


@dataclass(frozen=True)
class DomainFacts:
    """Everything the planner may look at for one domain, gathered by the engine."""

    xml: str  # persistent definition
    firmware: DomainFirmware  # parsed from `xml`
    live: DomainFirmware | None = None  # parsed live XML when the domain runs
    image: FileFacts | None = None  # the loader / -bios image
    nvram: FileFacts | None = None  # the varstore named by <nvram>
    excluded: bool = False
    persistent: bool = True
    # Other domains whose <nvram> resolves to the same file (varsd.planning.sharing): two
    # guests writing one varstore corrupt each other's variables.
    sharing: Sharing | None = None
    # Varstore paths other domains name: a new varstore never goes there.
    other_varstores: frozenset[str] = frozenset()

    @property
    def running(self) -> bool:
        return self.live is not None


@dataclass(frozen=True)
class CreateVarstore:
    """Create `path` from the first `length` bytes of `source` (whole file if None)."""

    path: str
    source: str
    layout: VarstoreLayout
    length: int | None = None


@dataclass(frozen=True)
class Redefine:
    """Replace the persistent definition with `xml` (journaled with the old XML)."""

    xml: str
    reason: str


Action = CreateVarstore | Redefine


@dataclass(frozen=True)
class Plan:
    config: FirmwareConfig
    status: Status
    detail: str
    actions: tuple[Action, ...] = ()
    build: Build | None = None
    code: str | None = None  # firmware image the next cold boot maps
    varstore: str | None = None
    code_sha256: str | None = None  # its digest, when known (else the build's)

    @property
    def next_boot_sha256(self) -> str | None:
        """Digest of the code the next cold boot maps, when the plan knows it."""
        return self.code_sha256 or (self.build.code_sha256 if self.build is not None else None)


DEFAULT_UPGRADES = UpgradeContext()

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_+.-]+$")


def varstore_path(nvram_dir: str, name: str, uuid: str) -> str:
    """libvirt's own naming (`<name>_VARS.fd`) so `virsh undefine --nvram` works.

    Domain names are not trusted as path components: names with anything but
    [A-Za-z0-9_+.-], or starting with a dot, use the UUID instead.
    """
    stem = name if _SAFE_NAME.match(name) and not name.startswith(".") else uuid
    return os.path.join(nvram_dir, f"{stem}_VARS.fd")


def new_varstore_path(nvram_dir: str, fw: DomainFirmware, taken: set[str | None] | frozenset[str]) -> str:
    """`varstore_path`, or a sibling name when that path is taken: the very file being
    replaced, or a file another domain uses (a renamed domain's `<old>_VARS.fd`).

    (Guides tell people to keep a private OVMF.fd as `<name>_VARS.fd`; provisioning
    never overwrites, so the copy needs a name of its own.)
    """
    for path in varstore_names(nvram_dir, fw):
        if path not in taken:
            return path
    raise AssertionError("unreachable: varstore_names never ends")


def varstore_names(nvram_dir: str, fw: DomainFirmware) -> Iterator[str]:
    """The names a new varstore of `fw` may get, in order: `<name>_VARS.fd`, then
    `<name>-varsd_VARS.fd`, `<name>-varsd2_VARS.fd`, ..."""
    path = varstore_path(nvram_dir, fw.name, fw.uuid)
    yield path
    stem = path.removesuffix("_VARS.fd")
    yield f"{stem}-varsd_VARS.fd"
    n = 2
    while True:
        yield f"{stem}-varsd{n}_VARS.fd"
        n += 1


def _shared(facts: DomainFacts) -> bool:
    """Whether another domain keeps (or also uses, with no keeper) this domain's varstore file."""
    return facts.sharing is not None and not facts.sharing.keeps


def wants_secure_boot(fw: DomainFirmware, image: FileFacts | None, catalog: Catalog) -> bool | None:
    """Keep the firmware features the domain had: its code decides, its XML only for unknown code.

    The code is known by its digest, or else by its path (the file may have been
    replaced by an upgrade the catalog has not seen yet). A plain build with
    `secure='yes'` (SMM-protected flash, which libvirt allows) stays a plain build.
    None: the code serves both kinds (AAVMF, `fit.code_secure_boot`), its varstore decides.
    """
    if image is not None:
        for sha in (image.sha256, image.trailing_sha256):
            builds = catalog.by_code_sha(sha) if sha else []
            if builds:
                return code_secure_boot(builds)
    paths = {firmware_image_path(fw), image.realpath if image is not None else None} - {None}
    builds = [b for b in catalog.builds if b.code_path in paths]
    if builds:
        return code_secure_boot(builds)
    return bool(fw.loader_secure)


def _same_kind(build: Build, secure: bool | None) -> bool:
    """Whether `build` is of the Secure Boot kind wanted (None: either, see wants_secure_boot)."""
    return secure is None or build.secure_boot == secure


def _unmanaged(config: FirmwareConfig, why: str, fw: DomainFirmware) -> Plan:
    return Plan(config, Status.UNMANAGED, why, code=firmware_image_path(fw), varstore=fw.nvram_path)


def _smm_problem(build: Build, fw: DomainFirmware) -> str | None:
    """Whether the machine can give the build the SMM it needs (`varsd.firmware.fit`); the
    other fit checks were made where the build was chosen."""
    why = why_not(build, Needs(machine=fw.machine, smm_allowed=machine_has_smm(fw.machine), mode=None))
    return f"{why}; change the machine type or the firmware by hand" if why else None


def _bind(md: VarsdMetadata, build: Build, **extra: object) -> VarsdMetadata:
    return replace(md, build_code_path=build.code_path, build_code_sha256=build.code_sha256, **extra)


def _provenance(
    md: VarsdMetadata, build: Build, source: str, now: datetime, *, catalog: Catalog | None = None,
    template: str | None = None,
) -> VarsdMetadata:
    """Bind to `build` and record where a varstore we create comes from (`template`, when
    not the build's own: e.g. the enrolled template the XML asked for)."""
    path = template or build.template_path
    sha = build.template_sha256
    if template and template != build.template_path and catalog is not None:
        sha = next((b.template_sha256 for b in catalog.builds if b.template_path == template), None)
    return _bind(md, build, template_path=path, template_sha256=sha, varstore_source=source, provisioned_at=now)


def _finish(facts: DomainFacts, plan: Plan) -> Plan:
    """Turn an applied-or-clean plan into `pending-cold-boot` when a running guest differs.

    A package upgrade replaces the code file by rename while QEMU keeps the old one open,
    and a guest reboot keeps the same QEMU process: the boot record's digest, not the
    path, says what the guest runs.
    """
    live = facts.live
    if live is None or plan.status is not Status.OK:
        return plan
    booted, next_sha = live.booted_sha256, plan.next_boot_sha256
    if booted and next_sha and booted != next_sha:
        return replace(plan, status=Status.PENDING_COLD_BOOT, detail=(
            f"{plan.detail}; running build {upgrade.short(booted)}, build {upgrade.short(next_sha)} "
            "applies at next cold boot"))
    if (live.loader_path, live.nvram_path) != (plan.code, plan.varstore):
        return replace(plan, status=Status.PENDING_COLD_BOOT, detail=plan.detail + "; applies at next cold boot")
    return plan


def plan_repair(
    facts: DomainFacts, catalog: Catalog, nvram_dir: str, now: datetime, upgrades: UpgradeContext = DEFAULT_UPGRADES
) -> Plan:
    """The plan for one domain (module rules); never raises for a domain's configuration.

    `upgrades` carries the upgrade policy and the verified archive (default: auto, empty).
    """
    fw = facts.firmware
    image = facts.image
    config = classify(fw, image, catalog)
    if not facts.persistent:
        return _unmanaged(config, "transient domain: no persistent definition to repair", fw)
    if fw.metadata.opt_out:
        return _unmanaged(config, fw.metadata.opt_out_reason, fw)
    if facts.excluded:
        return _unmanaged(config, "excluded by the 'exclude' setting", fw)
    if config is FirmwareConfig.NONE:
        image_path = firmware_image_path(fw)
        if image_path:
            return _unmanaged(config, f"firmware image {image_path} is not OVMF (SeaBIOS or a custom build): "
                              "nothing to manage", fw)
        return _unmanaged(config, "no UEFI firmware (SeaBIOS): nothing to manage", fw)
    if config is FirmwareConfig.CONFIDENTIAL:
        return _unmanaged(
            config,
            f"confidential guest (launchSecurity {fw.launch_security}): measured firmware is never split",
            fw,
        )
    if config is FirmwareConfig.HOST_VARSTORE:
        return _plan_host_varstore(fw)
    if config is FirmwareConfig.STATELESS:
        return _unmanaged(config, "stateless firmware: no varstore by design", fw)
    if config is FirmwareConfig.UNKNOWN:
        return Plan(config, Status.ERROR, f"firmware in <qemu:commandline> not understood: {fw.cmdline_problem}; "
                    "left untouched. Move the firmware into <loader>/<nvram> by hand, or opt the domain out",
                    code=firmware_image_path(fw), varstore=fw.nvram_path)
    if config is FirmwareConfig.AUTOSELECT:
        return _unmanaged(config, "firmware='efi' autoselection is left to libvirt", fw)
    storage = nvram_storage(facts.xml)
    if storage not in (None, "file"):
        return _unmanaged(config, f"varstore on {storage} storage (<nvram type='{storage}'>): not a local file", fw)
    if fw.metadata.pinned_sha256:
        if config is not FirmwareConfig.SPLIT:
            # A hold is a code path for a split domain; on anything else (a hand edit, an
            # old XML restored) repointing the loader could abandon the guest's variables.
            return Plan(config, Status.ERROR, f"holds a pin (build {fw.metadata.pinned_sha256[:12]}) but is "
                        f"{config.value}, not split; left untouched: remove the pin ('varsctl unpin') or fix "
                        "the XML by hand", code=firmware_image_path(fw), varstore=fw.nvram_path)
        return _plan_pinned(facts, config, catalog, upgrades, now)
    if not fw.arch or not fw.machine:
        return Plan(config, Status.ERROR, "domain XML has no <os><type arch machine>", code=fw.loader_path)
    secure = wants_secure_boot(fw, image, catalog)
    if config is FirmwareConfig.CODE_ONLY and (image is None or not image.exists or image.error):
        why = image.error if image is not None and image.error else "it does not exist"
        return Plan(config, Status.ERROR, f"firmware image {fw.loader_path} cannot be read ({why}): it may be a "
                    "unified image holding the guest's variables; left untouched", code=fw.loader_path)
    if config in (FirmwareConfig.BIOS_ROM, FirmwareConfig.CODE_ONLY):
        plan = _plan_new_varstore(facts, config, catalog, nvram_dir, now, secure)
    elif config is FirmwareConfig.UNIFIED:
        plan = _plan_unified(facts, catalog, nvram_dir, now, secure)
    else:
        plan = _plan_split(facts, catalog, nvram_dir, now, secure, upgrades)
    plan = _finish(facts, _explain_acpi(fw, plan))
    return _outside_warning(plan, nvram_dir) if config is FirmwareConfig.SPLIT else plan


def _plan_host_varstore(fw: DomainFirmware) -> Plan:
    """libvirt 12.1+ `<varstore>`: the ROM loader is right and stays; nothing is rewritten."""
    where = fw.host_varstore_path or "the path libvirt assigns at define time"
    source = f", made from {fw.host_varstore_template}" if fw.host_varstore_template else ""
    return Plan(FirmwareConfig.HOST_VARSTORE, Status.OK,
                f"variables in the JSON varstore {where} (QEMU uefi-vars device{source}); firmware {fw.loader_path} "
                "kept as defined", code=fw.loader_path, varstore=fw.host_varstore_path)


ACPI_NOTE = "adds <acpi/>: UEFI on x86 needs ACPI (the guest sees ACPI tables from its next cold boot)"


def _explain_acpi(fw: DomainFirmware, plan: Plan) -> Plan:
    """Say so when a rewrite adds ACPI: it changes what the guest sees, not only its firmware."""
    if fw.acpi or not any(isinstance(a, Redefine) and parse_domain(a.xml).acpi for a in plan.actions):
        return plan
    actions = tuple(replace(a, reason=f"{a.reason}; {ACPI_NOTE}") if isinstance(a, Redefine) else a
                    for a in plan.actions)
    return replace(plan, detail=f"{plan.detail}; {ACPI_NOTE}", actions=actions)


def _plan_pinned(facts: DomainFacts, config: FirmwareConfig, catalog: Catalog, ctx: UpgradeContext,
                 now: datetime) -> Plan:
    fw = facts.firmware
    layout = facts.nvram.varstore_layout if facts.nvram is not None and facts.nvram.exists else None
    problem = _pin_misfit(facts, catalog, layout)
    if problem:
        pin = upgrade.short(fw.metadata.pinned_sha256 or "")
        return Plan(config, Status.ERROR, f"pinned to build {pin} (varsd metadata), but {problem}; left "
                    f"untouched: 'varsctl unpin {fw.name}', or 'varsctl pin {fw.name} --build SHA' with a build "
                    "that fits", code=firmware_image_path(fw), varstore=fw.nvram_path)
    decision = upgrade.decide_pinned(fw, catalog, layout, upgrade.had_secure_boot(fw, catalog, ctx), ctx.policy)
    if isinstance(decision, Track):
        build = decision.build
        md = upgrade.released_metadata(fw.metadata, build)
        xml = replace_loader_code(facts.xml, build.code_path, md)
        return _finish(facts, Plan(config, Status.OK, decision.note, actions=(Redefine(xml, decision.note),),
                                   build=build, code=build.code_path, varstore=fw.nvram_path))
    return _plan_hold(facts, config, decision, catalog, ctx, now)


def _pin_misfit(facts: DomainFacts, catalog: Catalog, layout: VarstoreLayout | None) -> str | None:
    """Why the build a pin in the metadata names cannot boot this domain (None: it fits, or
    the catalog does not know it). The pin may come from a hand edit or another host's XML,
    so it gets the fit check (`varsd.firmware.fit`) `varsctl pin --build` makes; a hold
    changes only the loader path, so the domain's SMM and Secure Boot stay what they are."""
    fw = facts.firmware
    sha = fw.metadata.pinned_sha256 or ""
    if sha == fw.metadata.build_code_sha256:
        return None  # held on the build it is bound to (booted with this varstore): varsd's own holds
    builds = catalog.by_code_sha(sha)
    if not builds:
        return None
    needs = replace(Needs.of(fw, secure_boot=wants_secure_boot(fw, facts.image, catalog), layout=layout),
                    smm_allowed=fw.smm and machine_has_smm(fw.machine))
    found = [misfits(b, needs) for b in builds]
    if any(not m for m in found):
        return None
    return "; ".join(p.sentence for p in found[0])


def _plan_hold(facts: DomainFacts, config: FirmwareConfig, hold: Hold, catalog: Catalog, ctx: UpgradeContext,
               now: datetime) -> Plan:
    """Keep the domain on a build it booted with this varstore: only the loader path and the
    pin change, so the varstore, its template and the Secure Boot/SMM attributes stay."""
    fw, image = facts.firmware, facts.image
    status = upgrade.hold_status(hold.kind)
    place = upgrade.place_hold(hold.candidates, image, fw, catalog, ctx.archive)
    if isinstance(place, str):
        if fw.metadata.pinned_sha256:
            return Plan(config, Status.ERROR, f"held on build {upgrade.short(fw.metadata.pinned_sha256)} "
                        f"({hold.reason}), but {firmware_image_path(fw)} is not that build and {place}; left "
                        "untouched: re-pin or unpin with varsctl", code=firmware_image_path(fw), varstore=fw.nvram_path)
        return Plan(config, Status.NEEDS_MIGRATION if status is Status.NEEDS_MIGRATION else Status.ERROR,
                    f"{hold.reason}; but it cannot be held on its build: {place}; left unchanged",
                    code=fw.loader_path, varstore=fw.nvram_path)
    md = upgrade.held_metadata(fw.metadata, hold, place.sha256, now, fw.name)
    detail = f"{hold.reason} (held on build {upgrade.short(place.sha256)}: {place.code_path})"
    live = facts.live
    if live is not None and live.booted_sha256 and live.booted_sha256 != place.sha256:
        detail += f"; running build {upgrade.short(live.booted_sha256)} until its next cold boot"
    actions: tuple[Action, ...] = ()
    if place.code_path != fw.loader_path or md != fw.metadata:
        what = f"held on build {upgrade.short(place.sha256)} ({hold.kind.value})"
        actions = (Redefine(replace_loader_code(facts.xml, place.code_path, md), what),)
    return Plan(config, status, detail, actions=actions, code=place.code_path, varstore=fw.nvram_path,
                code_sha256=place.sha256)


def _template_layouts(catalog: Catalog, template: str) -> set[VarstoreLayout | None]:
    return {b.layout for b in catalog.builds if b.template_path == template}


def _template_for(catalog: Catalog, fw: DomainFirmware, build: Build) -> str | None:
    """The `<nvram template>` a rewrite writes: the XML's own if it is a catalog template of
    `build`'s layout (e.g. the enrolled one of a Secure Boot pair), else the build's.

    The template is what libvirt copies when the varstore is missing or reset
    (`virsh start --reset-nvram`), so it must fit the code; a template the catalog does
    not know cannot be checked, so a rewrite replaces it.
    """
    current = fw.nvram_template
    if current is not None and build.layout in _template_layouts(catalog, current):
        return current
    return build.template_path


def _template_wrong(catalog: Catalog, fw: DomainFirmware, build: Build) -> bool:
    """True when the XML names a catalog template of another layout: a reason to rewrite.

    An unknown template is never a reason by itself (it may be an admin's own, fitting one).
    """
    layouts = _template_layouts(catalog, fw.nvram_template) if fw.nvram_template else set()
    return bool(layouts) and build.layout not in layouts


def _rewrite(facts: DomainFacts, catalog: Catalog, build: Build, nvram: str, md: VarsdMetadata) -> str:
    return apply_edit(
        facts.xml,
        FirmwareEdit(
            code_path=build.code_path,
            nvram_path=nvram,
            template_path=_template_for(catalog, facts.firmware, build),
            secure=build.requires_smm,
            smm=build.requires_smm or facts.firmware.smm,
            metadata=md,
            acpi=uefi_needs_acpi(facts.firmware.arch),
        ),
    )


def in_nvram_dir(nvram_dir: str, path: str) -> bool:
    """Whether `path` is a file directly in the configured nvram directory."""
    return os.path.normpath(os.path.dirname(path)) == os.path.normpath(nvram_dir)


def _outside_warning(plan: Plan, nvram_dir: str) -> Plan:
    """An existing varstore outside nvram_dir works, but deserves a word in status."""
    if plan.status is Status.OK and plan.varstore and not in_nvram_dir(nvram_dir, plan.varstore):
        return replace(plan, detail=f"{plan.detail}; warning: varstore {plan.varstore} is outside nvram_dir "
                       f"{nvram_dir} (move it there, or set nvram_dir)")
    return plan


def is_private_varstore(catalog: Catalog, nvram_dir: str, nvram: FileFacts) -> bool:
    """False for a file other domains or the firmware package own, or that is more than a varstore."""
    paths = {p for p in (nvram.path, nvram.realpath) if p}
    shared = {p for b in catalog.builds for p in (b.code_path, b.template_path, b.derived_from) if p}
    if paths & shared:
        return False
    home = os.path.normpath(nvram_dir)
    package_dirs = {os.path.dirname(p) for p in shared} - {home}
    if any(os.path.dirname(p) in package_dirs for p in paths):
        return False
    layout = nvram.varstore_layout
    return layout is None or nvram.size == layout.size


def _plan_new_varstore(
    facts: DomainFacts, config: FirmwareConfig, catalog: Catalog, nvram_dir: str, now: datetime, secure: bool | None
) -> Plan:
    fw, nvram = facts.firmware, facts.nvram
    query = dict(arch=fw.arch, machine=fw.machine, secure_boot=secure, smm_allowed=machine_has_smm(fw.machine))
    # A varstore the XML already names (left from before the domain lost its pflash) is kept.
    kept = None
    if nvram is not None and nvram.exists and nvram.varstore_layout and not _shared(facts) \
            and is_private_varstore(catalog, nvram_dir, nvram):
        kept = select_build(catalog, **query, layout=nvram.varstore_layout)
    if kept is not None and nvram is not None and not _smm_problem(kept, fw):
        md = _bind(fw.metadata, kept)
        return Plan(
            config, Status.OK,
            f"{config.value} -> split: central code {kept.code_path} + its existing varstore {nvram.path}",
            actions=(Redefine(_rewrite(facts, catalog, kept, nvram.path, md),
                              f"{config.value} -> split ({kept.label}), existing varstore kept"),),
            build=kept, code=kept.code_path, varstore=nvram.path,
        )
    query["enrolled_keys"] = False if secure else None
    if secure is None:
        # Code that serves both kinds (AAVMF): a guest without a varstore had no Secure Boot
        # state to keep, so it gets the plain build's template, not one with keys enrolled.
        query["secure_boot"] = False
    build = select_build(catalog, **query)
    if build is None:
        return Plan(config, Status.ERROR, explain_no_build(catalog, **query), code=firmware_image_path(fw))
    problem = _smm_problem(build, fw)
    if problem:
        return Plan(config, Status.ERROR, problem, code=firmware_image_path(fw))
    if build.template_path is None or build.layout is None:
        return Plan(config, Status.ERROR, f"build {build.label} has no varstore template", code=firmware_image_path(fw))
    taken = {firmware_image_path(fw)} | ({nvram.path} if nvram is not None and nvram.exists else set())
    target = new_varstore_path(nvram_dir, fw, taken | facts.other_varstores)
    md = _provenance(fw.metadata, build, "template", now)
    return Plan(
        config,
        Status.OK,
        f"{config.value} -> split: central code {build.code_path} + new private varstore from {build.template_path}",
        actions=(
            CreateVarstore(target, build.template_path, build.layout),
            Redefine(_rewrite(facts, catalog, build, target, md), f"{config.value} -> split ({build.label})"),
        ),
        build=build,
        code=build.code_path,
        varstore=target,
    )


def _plan_unified(facts: DomainFacts, catalog: Catalog, nvram_dir: str, now: datetime, secure: bool | None) -> Plan:
    fw, image = facts.firmware, facts.image
    if image is None or image.varstore_layout is None or not fw.loader_path:  # classify() says unified: never
        return Plan(FirmwareConfig.UNIFIED, Status.ERROR, "unified image without a readable varstore",
                    code=fw.loader_path)
    layout = image.varstore_layout
    build = _exact_build(catalog, image.trailing_sha256, layout, secure) or select_build(
        catalog, arch=fw.arch, machine=fw.machine, secure_boot=secure, layout=layout,
            smm_allowed=machine_has_smm(fw.machine),
    )
    if build is None:
        return Plan(
            FirmwareConfig.UNIFIED,
            Status.NEEDS_MIGRATION,
            f"private unified image {fw.loader_path}: no catalog build has its varstore layout "
            f"({layout.describe()}); left unchanged. Add a matching build or run 'varsctl migrate'",
            code=fw.loader_path,
        )
    problem = _smm_problem(build, fw)
    if problem:
        return Plan(FirmwareConfig.UNIFIED, Status.ERROR, problem, code=fw.loader_path)
    if facts.running:
        return Plan(
            FirmwareConfig.UNIFIED,
            Status.PENDING_COLD_BOOT,
            f"private unified image {fw.loader_path} will be split once the domain is shut off "
            "(the running guest may still write variables into it)",
            build=build,
            code=fw.loader_path,
        )
    target = new_varstore_path(nvram_dir, fw, {fw.loader_path, image.realpath} | facts.other_varstores)
    md = _provenance(fw.metadata, build, f"unified:{fw.loader_path}", now)
    return Plan(
        FirmwareConfig.UNIFIED,
        Status.OK,
        f"unified image split: its variables moved to a private varstore, code from {build.code_path}",
        actions=(
            CreateVarstore(target, fw.loader_path, layout, length=layout.size),
            Redefine(_rewrite(facts, catalog, build, target, md), f"unified -> split ({build.label}), variables kept"),
        ),
        build=build,
        code=build.code_path,
        varstore=target,
    )


def _exact_build(
    catalog: Catalog, sha: str | None, layout: VarstoreLayout | None, secure: bool | None
) -> Build | None:
    """A split build whose code is byte-identical to `sha` and whose layout fits."""
    if not sha:
        return None
    for b in catalog.by_code_sha(sha):
        if b.mode is MappingMode.SPLIT and b.layout is not None and layout in (None, b.layout) \
                and _same_kind(b, secure):
            return b
    return None


def _central(catalog: Catalog, fw: DomainFirmware, image: FileFacts | None) -> Build | None:
    """The split build whose code the loader names, directly or through a symlink."""
    for path in (fw.loader_path, image.realpath if image is not None and image.exists else None):
        build = upgrade.central_at(catalog, path)
        if build is not None:
            return build
    return None


def _plan_split(
    facts: DomainFacts, catalog: Catalog, nvram_dir: str, now: datetime, secure: bool | None, ctx: UpgradeContext
) -> Plan:
    fw, image, nvram = facts.firmware, facts.image, facts.nvram
    config = FirmwareConfig.SPLIT
    if not fw.loader_path:  # classify() says split: never
        return Plan(config, Status.ERROR, "split firmware without a loader path", varstore=fw.nvram_path)
    central = _central(catalog, fw, image)

    if nvram is None or not nvram.exists:
        return _plan_missing_varstore(facts, catalog, nvram_dir, now, secure, central)

    layout = nvram.varstore_layout or _blank_layout(catalog, central, image, nvram)
    if nvram.unreadable:
        return Plan(config, Status.ERROR, f"varstore {nvram.path} cannot be read by this user, so whether it "
                    "fits is unknown; run as root to see", code=fw.loader_path, varstore=nvram.path)
    if layout is None:
        return Plan(config, Status.ERROR, f"varstore {nvram.path} is not an edk2 varstore"
                    f"{': ' + nvram.error if nvram.error else ''}; left untouched",
                    code=fw.loader_path, varstore=nvram.path)

    note = None
    if upgrade.tracks_central(fw, image):
        # What the domain had decides, never its replacement (wants_secure_boot would ask the new file).
        secure = upgrade.had_secure_boot(fw, catalog, ctx)
        booted = facts.live.booted_sha256 if facts.live is not None else None
        decision = upgrade.decide_tracking(fw, image, catalog, layout, secure, ctx.policy, booted)
        if isinstance(decision, Wait):
            return Plan(config, decision.status, decision.detail, code=fw.loader_path, varstore=nvram.path,
                        code_sha256=image.sha256 if image is not None else None)
        if isinstance(decision, Hold):
            return _plan_hold(facts, config, decision, catalog, ctx, now)
        if isinstance(decision, Track):
            central, note = decision.build, decision.note

    if central is not None and central.layout == layout and _same_kind(central, secure):
        build = central
        reason = None
    else:
        build = _exact_build(catalog, image.sha256 if image else None, layout, secure) or select_build(
            catalog, arch=fw.arch, machine=fw.machine, secure_boot=secure, layout=layout,
            smm_allowed=machine_has_smm(fw.machine),
        )
        if central is not None and build is None:
            return Plan(config, Status.NEEDS_MIGRATION,
                        f"central code {fw.loader_path} does not fit varstore {nvram.path} "
                        f"({layout.describe()} vs {central.layout.describe() if central.layout else 'none'}); "
                        "run 'varsctl migrate'", code=fw.loader_path, varstore=nvram.path)
        if build is None:
            missing = "" if image is None or image.exists else " (the file is gone)"
            return Plan(config, Status.NEEDS_MIGRATION,
                        f"code {fw.loader_path}{missing} is not central and no catalog build fits varstore "
                        f"{nvram.path} ({layout.describe()}); left unchanged, run 'varsctl migrate'",
                        code=fw.loader_path, varstore=nvram.path)
        reason = f"code {fw.loader_path} -> central {build.label}"

    problem = _smm_problem(build, fw)
    if problem:
        return Plan(config, Status.ERROR, problem, code=fw.loader_path, varstore=nvram.path)

    if _shared(facts) or not is_private_varstore(catalog, nvram_dir, nvram):
        return _plan_shared_varstore(facts, catalog, nvram_dir, now, build, nvram, layout)

    md = _bind(fw.metadata, build)
    needs_attrs = (
        (build.requires_smm and not fw.smm)
        or (build.requires_smm and not fw.loader_secure)
        or fw.loader_readonly is not True
        or _template_wrong(catalog, fw, build)
    )
    if reason is None and fw.cmdline_firmware:
        reason = "firmware moved from <qemu:commandline> into <loader>/<nvram>"
    elif reason is None and needs_attrs:
        reason = "Secure Boot/SMM/read-only/template attributes completed"
    if reason is not None:
        new_xml = _rewrite(facts, catalog, build, nvram.path, md)
        code = build.code_path
    elif md != fw.metadata:
        new_xml, reason = set_metadata(facts.xml, md), note or f"bound to build {build.label}"
        code = fw.loader_path
    else:
        return Plan(config, Status.OK, f"central code {build.code_path}, private varstore", build=build,
                    code=fw.loader_path, varstore=nvram.path)
    return Plan(config, Status.OK, reason, actions=(Redefine(new_xml, reason),), build=build,
                code=code, varstore=nvram.path)


def _blank_layout(catalog: Catalog, central: Build | None, image: FileFacts | None,
                  nvram: FileFacts) -> VarstoreLayout | None:
    """The layout a still-blank varstore will have: that of the domain's own code's build whose
    template is blank flash of the same size (a never-booted AAVMF guest; the code formats the
    varstore at its first boot). None when the domain's code ships no blank template."""
    if not nvram.blank:
        return None
    candidates = [central] if central is not None else []
    if image is not None and image.sha256:
        candidates += catalog.by_code_sha(image.sha256)
    for b in candidates:
        if b.template_blank and b.layout is not None and b.layout.size == nvram.size:
            return b.layout
    return None


def _why_not_private(facts: DomainFacts, nvram: FileFacts, layout: VarstoreLayout) -> str:
    """What is wrong with a varstore that is not the domain's own, in the right words: only
    a file another domain uses is "shared"; one with data past its varstore is oversized."""
    if _shared(facts):
        return f"varstore {nvram.path} is shared"
    if nvram.size > layout.size and nvram.varstore_layout is not None:
        return (f"varstore {nvram.path} is oversized: {nvram.size} bytes, {nvram.size - layout.size} more than "
                f"its {layout.size}-byte varstore")
    return f"varstore {nvram.path} is a firmware package's file, not the domain's own"


def _plan_shared_varstore(
    facts: DomainFacts, catalog: Catalog, nvram_dir: str, now: datetime, build: Build, nvram: FileFacts,
    layout: VarstoreLayout,
) -> Plan:
    """Give the domain its own copy of the varstore it shares, every variable kept."""
    fw, sharing = facts.firmware, facts.sharing
    users = f" (used by domain(s) {', '.join(repr(n) for n in sharing.others)} too)" if sharing else ""
    if facts.running:
        return Plan(FirmwareConfig.SPLIT, Status.PENDING_COLD_BOOT,
                    f"{_why_not_private(facts, nvram, layout)}{users}; its variables will be copied to a private "
                    "varstore once the domain is shut off "
                    "(the running guest may still write variables into it)",
                    build=build, code=fw.loader_path, varstore=nvram.path)
    if sharing is not None and sharing.running:
        return Plan(FirmwareConfig.SPLIT, Status.PENDING_COLD_BOOT,
                    f"varstore {nvram.path} is not private{users}; it will be copied once "
                    f"{', '.join(repr(n) for n in sharing.running)} is shut off (a running guest may be writing it)",
                    build=build, code=fw.loader_path, varstore=nvram.path)
    target = new_varstore_path(nvram_dir, fw, {nvram.path, nvram.realpath} | facts.other_varstores)
    md = _provenance(fw.metadata, build, f"copy:{nvram.path}", now)
    owner = f" (domain '{sharing.keeper}' keeps it)" if sharing and sharing.keeper else users
    reason = f"{_why_not_private(facts, nvram, layout)}{owner}: copied to private {target} ({build.label})"
    return Plan(
        FirmwareConfig.SPLIT, Status.OK, reason,
        actions=(
            CreateVarstore(target, nvram.path, layout, length=layout.size),
            Redefine(_rewrite(facts, catalog, build, target, md), reason),
        ),
        build=build, code=build.code_path, varstore=target,
    )


def _plan_missing_varstore(
    facts: DomainFacts, catalog: Catalog, nvram_dir: str, now: datetime, secure: bool | None, central: Build | None
) -> Plan:
    """No varstore yet (a domain never started): create it, so we record where it came from."""
    fw, image = facts.firmware, facts.image
    config = FirmwareConfig.SPLIT
    build = central or _exact_build(catalog, image.sha256 if image else None, None, secure) or select_build(
        catalog, arch=fw.arch, machine=fw.machine, secure_boot=secure, smm_allowed=machine_has_smm(fw.machine),
        code_size=image.size if image and image.exists else None,
    )
    if build is None or build.layout is None or build.template_path is None:
        return Plan(config, Status.ERROR, f"code {fw.loader_path} belongs to no catalog build; cannot "
                    "choose a varstore template", code=fw.loader_path, varstore=fw.nvram_path)
    problem = _smm_problem(build, fw)
    if problem:
        return Plan(config, Status.ERROR, problem, code=fw.loader_path, varstore=fw.nvram_path)
    target = fw.nvram_path or new_varstore_path(nvram_dir, fw, facts.other_varstores)
    if fw.nvram_path and (_shared(facts) or not is_private_varstore(
            catalog, nvram_dir, FileFacts(path=fw.nvram_path, exists=False))):
        target = new_varstore_path(nvram_dir, fw, facts.other_varstores | {fw.nvram_path})
    elif not in_nvram_dir(nvram_dir, target):
        # e.g. <nvram>/etc/NAME_VARS.fd</nvram>: libvirt would create it there at first start.
        # varsd neither provisions it nor adds template= (which is what makes libvirt create it).
        return Plan(config, Status.OK, f"warning: varstore {target} does not exist yet and is outside nvram_dir "
                    f"{nvram_dir}; varsd does not provision a varstore there (libvirt may create it at first "
                    f"start). Point <nvram> into {nvram_dir}, or set nvram_dir", build=build,
                    code=fw.loader_path, varstore=target)
    actions: tuple[Action, ...] = ()
    md = _bind(fw.metadata, build)
    if in_nvram_dir(nvram_dir, target):
        # The template the XML names when it fits (the Debian wiki's enrolled
        # OVMF_VARS_4M.ms.fd beside secboot code): the same file libvirt would copy.
        template = _template_for(catalog, fw, build) or build.template_path
        md = _provenance(fw.metadata, build, "template", now, catalog=catalog, template=template)
        actions = (CreateVarstore(target, template, build.layout),)
    new_xml = _rewrite(facts, catalog, build, target, md)
    code = fw.loader_path
    if parse_domain(new_xml) != fw:
        actions += (Redefine(new_xml, f"varstore provisioned ({build.label})"),)
        code = build.code_path
    detail = f"new varstore from {_template_for(catalog, fw, build)}" if actions else (
        f"varstore {target} will be created from {build.template_path} by libvirt at first start")
    return Plan(config, Status.OK, detail, actions=actions, build=build, code=code, varstore=target)
