"""Repair planning: what is wrong with one domain's firmware and what to do (pure).

Contract: `plan_repair(facts, catalog, nvram_dir, now)` looks only at its arguments
(parsed XML, file facts the engine read, the catalog, the clock value passed in) and
returns a `Plan`: the configuration class, the status to report, a sentence for the
admin and the actions that bring the domain to the normal case: two pflash, the
central code of a catalog build read-only + a private varstore with that build's
layout. It never performs I/O; the engine executes the actions.

Rules, in order (early returns):
- opted out, excluded, transient, SeaBIOS, confidential, stateless, autoselect: left
  alone, reported `unmanaged`;
- bios-rom and code-only: nothing persistent to keep; a new varstore from the template
  of the build that matches what the domain booted (Secure Boot or not; a Secure Boot
  guest gets an *unenrolled* template, as it never had keys), and the XML rewritten;
- unified: the image's leading varstore region *is* the varstore: copied out byte for
  byte and paired with a build of the same layout, so no variable is lost; no such
  build -> `needs-migration`, unchanged. A running guest may still write its image, so
  the split waits until it is shut off;
- split: compliant when the loader is a catalog build's code and the varstore has that
  build's layout; a stale private code copy or unknown/missing code path is repointed to
  the central code of a build whose layout fits; nothing fits -> `needs-migration`;
- a Secure Boot build needs SMM, which needs a q35 machine: otherwise `error`, and the
  XML is not touched.
A running domain whose persistent firmware differs from what it booted is reported
`pending-cold-boot`: changes apply at its next cold boot.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

from varsd.domain.classify import classify, firmware_image_path
from varsd.domain.xml import FirmwareEdit, apply_edit, set_metadata
from varsd.firmware.selection import explain_no_build, select_build
from varsd.model.domain import DomainFirmware, FileFacts, FirmwareConfig, Status, VarsdMetadata
from varsd.model.firmware import Build, Catalog, MappingMode, VarstoreLayout


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


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_+.-]+$")


def varstore_path(nvram_dir: str, name: str, uuid: str) -> str:
    """libvirt's own naming (`<name>_VARS.fd`) so `virsh undefine --nvram` works.

    Domain names are not trusted as path components: names with anything but
    [A-Za-z0-9_+.-], or starting with a dot, use the UUID instead.
    """
    stem = name if _SAFE_NAME.match(name) and not name.startswith(".") else uuid
    return os.path.join(nvram_dir, f"{stem}_VARS.fd")


def _q35(machine: str | None) -> bool:
    return bool(machine) and (machine == "q35" or "q35" in machine)


def wants_secure_boot(fw: DomainFirmware, image: FileFacts | None, catalog: Catalog) -> bool:
    """Keep the firmware features the domain had: Secure Boot iff its XML or its code said so."""
    if fw.loader_secure:
        return True
    if image is not None:
        for sha in (image.sha256, image.trailing_sha256):
            if sha and any(b.secure_boot for b in catalog.by_code_sha(sha)):
                return True
    return False


def _unmanaged(config: FirmwareConfig, why: str, fw: DomainFirmware) -> Plan:
    return Plan(config, Status.UNMANAGED, why, code=firmware_image_path(fw), varstore=fw.nvram_path)


def _smm_problem(build: Build, fw: DomainFirmware) -> str | None:
    if build.requires_smm and not _q35(fw.machine):
        return (
            f"build {build.label} needs SMM for Secure Boot, which machine type "
            f"'{fw.machine}' cannot provide (q35 only); change the machine type or the firmware by hand"
        )
    return None


def _bind(md: VarsdMetadata, build: Build, **extra: str | None) -> VarsdMetadata:
    return replace(md, build_code_path=build.code_path, build_code_sha256=build.code_sha256, **extra)


def _finish(facts: DomainFacts, plan: Plan) -> Plan:
    """Turn an applied-or-clean plan into `pending-cold-boot` when a running guest differs."""
    live = facts.live
    if live is None or plan.status is not Status.OK:
        return plan
    if (live.loader_path, live.nvram_path) != (plan.code, plan.varstore):
        return replace(plan, status=Status.PENDING_COLD_BOOT, detail=plan.detail + "; applies at next cold boot")
    return plan


def plan_repair(facts: DomainFacts, catalog: Catalog, nvram_dir: str, now: str) -> Plan:
    fw = facts.firmware
    image = facts.image
    config = classify(fw, image, catalog)
    if not facts.persistent:
        return _unmanaged(config, "transient domain: no persistent definition to repair", fw)
    if fw.metadata.opt_out:
        return _unmanaged(config, "opted out (varsd metadata manage='no')", fw)
    if facts.excluded:
        return _unmanaged(config, "excluded by the 'exclude' setting", fw)
    if config is FirmwareConfig.NONE:
        return _unmanaged(config, "no UEFI firmware (SeaBIOS): nothing to manage", fw)
    if config is FirmwareConfig.CONFIDENTIAL:
        return _unmanaged(
            config,
            f"confidential guest (launchSecurity {fw.launch_security}): measured firmware is never split",
            fw,
        )
    if config is FirmwareConfig.STATELESS:
        return _unmanaged(config, "stateless firmware: no varstore by design", fw)
    if config is FirmwareConfig.AUTOSELECT:
        return _unmanaged(config, "firmware='efi' autoselection is left to libvirt", fw)
    if not fw.arch or not fw.machine:
        return Plan(config, Status.ERROR, "domain XML has no <os><type arch machine>", code=fw.loader_path)
    secure = wants_secure_boot(fw, image, catalog)
    if config in (FirmwareConfig.BIOS_ROM, FirmwareConfig.CODE_ONLY):
        return _finish(facts, _plan_new_varstore(facts, config, catalog, nvram_dir, now, secure))
    if config is FirmwareConfig.UNIFIED:
        return _finish(facts, _plan_unified(facts, catalog, nvram_dir, now, secure))
    return _finish(facts, _plan_split(facts, catalog, nvram_dir, now, secure))


def _rewrite(facts: DomainFacts, build: Build, nvram: str, md: VarsdMetadata) -> str:
    return apply_edit(
        facts.xml,
        FirmwareEdit(
            code_path=build.code_path,
            nvram_path=nvram,
            template_path=build.template_path,
            secure=build.secure_boot,
            smm=build.requires_smm or facts.firmware.smm,
            metadata=md,
        ),
    )


def _plan_new_varstore(
    facts: DomainFacts, config: FirmwareConfig, catalog: Catalog, nvram_dir: str, now: str, secure: bool
) -> Plan:
    fw = facts.firmware
    query = dict(arch=fw.arch, machine=fw.machine, secure_boot=secure, enrolled_keys=False if secure else None)
    build = select_build(catalog, **query)
    if build is None:
        return Plan(config, Status.ERROR, explain_no_build(catalog, **query), code=firmware_image_path(fw))
    problem = _smm_problem(build, fw)
    if problem:
        return Plan(config, Status.ERROR, problem, code=firmware_image_path(fw))
    target = varstore_path(nvram_dir, fw.name, fw.uuid)
    md = _bind(
        fw.metadata, build, template_path=build.template_path, template_sha256=build.template_sha256,
        varstore_source="template", provisioned_at=now,
    )
    assert build.template_path and build.layout
    return Plan(
        config,
        Status.OK,
        f"{config.value} repaired: central code {build.code_path} + new private varstore from {build.template_path}",
        actions=(
            CreateVarstore(target, build.template_path, build.layout),
            Redefine(_rewrite(facts, build, target, md), f"{config.value} -> split ({build.label})"),
        ),
        build=build,
        code=build.code_path,
        varstore=target,
    )


def _plan_unified(facts: DomainFacts, catalog: Catalog, nvram_dir: str, now: str, secure: bool) -> Plan:
    fw, image = facts.firmware, facts.image
    assert image is not None and image.varstore_layout is not None and fw.loader_path
    layout = image.varstore_layout
    build = _exact_build(catalog, image.trailing_sha256, layout, secure) or select_build(
        catalog, arch=fw.arch, machine=fw.machine, secure_boot=secure, layout=layout
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
    target = varstore_path(nvram_dir, fw.name, fw.uuid)
    md = _bind(
        fw.metadata, build, template_path=build.template_path, template_sha256=build.template_sha256,
        varstore_source=f"unified:{fw.loader_path}", provisioned_at=now,
    )
    return Plan(
        FirmwareConfig.UNIFIED,
        Status.OK,
        f"unified image split: its variables moved to a private varstore, code from {build.code_path}",
        actions=(
            CreateVarstore(target, fw.loader_path, layout, length=layout.size),
            Redefine(_rewrite(facts, build, target, md), f"unified -> split ({build.label}), variables kept"),
        ),
        build=build,
        code=build.code_path,
        varstore=target,
    )


def _exact_build(catalog: Catalog, sha: str | None, layout: VarstoreLayout | None, secure: bool) -> Build | None:
    """A split build whose code is byte-identical to `sha` and whose layout fits."""
    if not sha:
        return None
    for b in catalog.by_code_sha(sha):
        if b.mode is MappingMode.SPLIT and layout in (None, b.layout) and b.secure_boot == secure:
            return b
    return None


def _plan_split(facts: DomainFacts, catalog: Catalog, nvram_dir: str, now: str, secure: bool) -> Plan:
    fw, image, nvram = facts.firmware, facts.image, facts.nvram
    config = FirmwareConfig.SPLIT
    assert fw.loader_path
    central = catalog.by_code_path(fw.loader_path)
    central = central if central is not None and central.mode is MappingMode.SPLIT else None

    if nvram is None or not nvram.exists:
        # No varstore yet (new domain): create it from the template of the build its code
        # belongs to, so we record where it came from; libvirt would do the same at start.
        build = central or _exact_build(catalog, image.sha256 if image else None, None, secure) or select_build(
            catalog, arch=fw.arch, machine=fw.machine, secure_boot=secure,
            code_size=image.size if image and image.exists else None,
        )
        if build is None or build.layout is None:
            return Plan(config, Status.ERROR, f"code {fw.loader_path} belongs to no catalog build; cannot "
                        "choose a varstore template", code=fw.loader_path)
        problem = _smm_problem(build, fw)
        if problem:
            return Plan(config, Status.ERROR, problem, code=fw.loader_path)
        target = fw.nvram_path or varstore_path(nvram_dir, fw.name, fw.uuid)
        actions: tuple[Action, ...] = ()
        md = _bind(fw.metadata, build)
        if os.path.dirname(target) == nvram_dir.rstrip("/"):
            md = replace(md, template_path=build.template_path, template_sha256=build.template_sha256,
                         varstore_source="template", provisioned_at=now)
            actions = (CreateVarstore(target, build.template_path or "", build.layout),)
        new_xml = _rewrite(facts, build, target, md)
        actions += (Redefine(new_xml, f"varstore provisioned ({build.label})"),)
        return Plan(config, Status.OK, f"new varstore from {build.template_path}", actions=actions,
                    build=build, code=build.code_path, varstore=target)

    layout = nvram.varstore_layout
    if layout is None:
        return Plan(config, Status.ERROR, f"varstore {nvram.path} is not an edk2 varstore"
                    f"{': ' + nvram.error if nvram.error else ''}; left untouched",
                    code=fw.loader_path, varstore=nvram.path)

    if central is not None and central.layout == layout and central.secure_boot == secure:
        build = central
        reason = None
    else:
        build = _exact_build(catalog, image.sha256 if image else None, layout, secure) or select_build(
            catalog, arch=fw.arch, machine=fw.machine, secure_boot=secure, layout=layout
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
    md = _bind(fw.metadata, build)
    needs_attrs = (build.requires_smm and not fw.smm) or (build.secure_boot and not fw.loader_secure) or (
        fw.loader_readonly is not True
    )
    if reason is None and needs_attrs:
        reason = "Secure Boot/SMM/read-only attributes completed"
    if reason is not None:
        new_xml = _rewrite(facts, build, nvram.path, md)
    elif md != fw.metadata:
        new_xml, reason = set_metadata(facts.xml, md), f"bound to build {build.label}"
    else:
        return Plan(config, Status.OK, f"central code {build.code_path}, private varstore", build=build,
                    code=build.code_path, varstore=nvram.path)
    return Plan(config, Status.OK, reason, actions=(Redefine(new_xml, reason),), build=build,
                code=build.code_path, varstore=nvram.path)
