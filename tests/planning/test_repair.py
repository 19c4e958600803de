"""Golden repair cases: real-world domain XML through the planner (see conftest for the tier contract).

Each row names a case directory, the host files the case needs, and what the plan must
be. For every case the tests check the plan against the row, the rewritten XML against
`expected.xml`, that nothing outside the firmware elements changed, that planning again
on the result (with the new varstore created) asks for nothing more, and that libvirt
accepts the input and the result.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import libvirt
import pytest
from lxml import etree
from support.varstores import read_variables

from varsd.adapters import virtfw
from varsd.domain.classify import firmware_image_path
from varsd.domain.xml import outside_firmware, parse_domain
from varsd.engine.provision import inspect_json_varstore
from varsd.model.domain import DomainFirmware, FileFacts, FirmwareConfig, Status
from varsd.model.firmware import Catalog
from varsd.planning.repair import (
    CreateJsonVarstore,
    CreateVarstore,
    DomainFacts,
    Plan,
    Redefine,
    plan_repair,
    wants_secure_boot,
)

from .conftest import (
    CASES_DIR,
    CODE_2M,
    CODE_4M,
    CODE_4M_SECBOOT,
    NOW,
    NVRAM_DIR,
    REGEN,
    UNIFIED_2M,
    VARS_2M,
    VARS_4M,
    VARS_4M_MS,
    HostFS,
    Recipe,
    cat,
    copy_of,
    garbage,
    used_varstore,
    write_expected,
)

C, S = FirmwareConfig, Status
NV = NVRAM_DIR
CODE_4M_MS = "/usr/share/OVMF/OVMF_CODE_4M.ms.fd"
STALE_CODE = "/var/lib/libvirt/images/appliance-fw/OVMF_CODE_4M.fd"
CREATE_AND_REDEFINE = (CreateVarstore, Redefine)
NEWER_LIBVIRT = "uses syntax newer than this host's libvirt 9.0"


@dataclass(frozen=True)
class Case:
    name: str
    config: FirmwareConfig
    status: Status
    actions: tuple[type, ...] = ()
    catalog: str = "4m"  # see the `catalogs` fixture
    files: Mapping[str, Recipe] = field(default_factory=dict)  # XML path -> content on the fake host
    running: bool = False
    persistent: bool = True
    skip_libvirt: str | None = None  # why libvirt here cannot judge this XML
    check: Callable[[DomainFirmware, Plan], None] | None = None  # more about the result

    def __str__(self) -> str:
        return self.name


def _firmware(code: str, *, secure: bool, smm: bool = True, nvram: str | None = None, template: str | None = None):
    """A check: the rewritten XML boots `code` read-only, with these attributes."""

    def check(fw: DomainFirmware, plan: Plan) -> None:
        assert (fw.loader_path, fw.loader_type, fw.loader_readonly) == (code, "pflash", True)
        assert bool(fw.loader_secure) is secure and fw.smm is smm
        assert plan.build is not None and plan.build.secure_boot is secure
        if nvram is not None:
            assert fw.nvram_path == nvram
        if template is not None:
            assert fw.nvram_template == template

    return check


def _acpi_added(fw: DomainFirmware, plan: Plan) -> None:
    assert fw.acpi and "UEFI on x86 needs ACPI" in plan.detail and "next cold boot" in plan.detail
    assert all("needs ACPI" in a.reason for a in plan.actions if isinstance(a, Redefine))


def _bound(code: str):
    def check(fw: DomainFirmware, plan: Plan) -> None:
        assert fw.loader_path == code and fw.metadata.build_code_path == code

    return check


CASES: tuple[Case, ...] = (
    # virt-install / virt-manager
    Case("virt-install-efi-autoselect", C.AUTOSELECT, S.UNMANAGED),
    Case("virt-install-win11-secure-autoselect", C.AUTOSELECT, S.UNMANAGED),
    Case("virt-manager-split-existing", C.SPLIT, S.OK, (Redefine,),
         files={f"{NV}/bullseye_VARS.fd": used_varstore(VARS_4M)}, check=_bound(CODE_4M)),
    Case("virt-manager-split-unstarted", C.SPLIT, S.OK, CREATE_AND_REDEFINE,
         check=_firmware(CODE_4M, secure=False, smm=False, nvram=f"{NV}/fedora40_VARS.fd", template=VARS_4M)),
    Case("virt-install-libvirt92-resolved", C.SPLIT, S.OK, (Redefine,),
         files={f"{NV}/trixie_VARS.fd": used_varstore(VARS_4M)}, check=_bound(CODE_4M),
         skip_libvirt=NEWER_LIBVIRT + " (9.2+ keeps firmware='efi' beside resolved paths)"),
    # OpenStack Nova: Secure Boot with Microsoft keys, SMM
    Case("nova-secure-boot", C.SPLIT, S.OK, (Redefine,),
         files={f"{NV}/instance-0000002a_VARS.fd": used_varstore(VARS_4M_MS)}, check=_bound(CODE_4M_MS)),
    # -bios: no persistent variables; plain OVMF gets the plain build
    Case("bios-qemu-commandline", C.BIOS_ROM, S.OK, CREATE_AND_REDEFINE,
         check=_firmware(CODE_4M, secure=False, smm=False, nvram=f"{NV}/pgsql-01_VARS.fd")),
    Case("bios-loader-rom", C.BIOS_ROM, S.OK, CREATE_AND_REDEFINE,
         check=_firmware(CODE_4M, secure=False, smm=False, nvram=f"{NV}/legacy-uefi_VARS.fd")),
    # firmware handed over in <qemu:commandline>: moved into <loader>/<nvram>, other arguments kept
    Case("cmdline-bios-and-pflash", C.CODE_ONLY, S.OK, CREATE_AND_REDEFINE,  # issue 12 defect 1
         check=_firmware(CODE_4M, secure=False, smm=False, nvram=f"{NV}/bios-and-pflash_VARS.fd")),
    Case("cmdline-pflash-code-only", C.CODE_ONLY, S.OK, CREATE_AND_REDEFINE,
         check=_firmware(CODE_4M, secure=False, smm=False, nvram=f"{NV}/old-pflash_VARS.fd")),
    Case("cmdline-drive-pair", C.SPLIT, S.OK, (Redefine,),
         files={"/var/lib/libvirt/images/drive-pair_VARS.fd": used_varstore(VARS_4M)},
         check=_firmware(CODE_4M, secure=False, smm=False, nvram="/var/lib/libvirt/images/drive-pair_VARS.fd")),
    Case("cmdline-drive-unified", C.UNIFIED, S.OK, CREATE_AND_REDEFINE, catalog="2m",
         files={"/var/lib/libvirt/images/drive-unified-OVMF.fd": used_varstore(VARS_2M, tail=CODE_2M)},
         check=_firmware(CODE_2M, secure=False, smm=False, nvram=f"{NV}/drive-unified_VARS.fd")),
    Case("cmdline-blockdev-secure", C.SPLIT, S.OK, (Redefine,),
         files={"/var/lib/libvirt/images/blockdev-secure_VARS.fd": used_varstore(VARS_4M)},
         check=_firmware(CODE_4M_SECBOOT, secure=True, nvram="/var/lib/libvirt/images/blockdev-secure_VARS.fd")),
    Case("cmdline-not-understood", C.UNKNOWN, S.ERROR),
    # libvirt refuses UEFI pflash on x86 without ACPI: the repair adds <acpi/> and says so
    Case("bios-no-features", C.BIOS_ROM, S.OK, CREATE_AND_REDEFINE, check=_acpi_added),
    # one pflash
    Case("code-only-4m", C.CODE_ONLY, S.OK, CREATE_AND_REDEFINE, check=_firmware(CODE_4M, secure=False, smm=False)),
    Case("unified-private-2m", C.UNIFIED, S.OK, CREATE_AND_REDEFINE, catalog="2m",
         files={"/var/lib/libvirt/images/win10-OVMF.fd": used_varstore(VARS_2M, tail=CODE_2M)},
         check=_firmware(CODE_2M, secure=False, smm=False, nvram=f"{NV}/win10_VARS.fd", template=VARS_2M)),
    Case("unified-private-2m-no-pair", C.UNIFIED, S.NEEDS_MIGRATION,
         files={"/var/lib/libvirt/images/win10-OVMF.fd": used_varstore(VARS_2M, tail=CODE_2M)}),
    # a private OVMF.fd kept as <name>_VARS.fd, as some guides say: the split copy needs another name
    Case("unified-private-4m", C.UNIFIED, S.OK, CREATE_AND_REDEFINE,
         files={f"{NV}/vfio-gaming_VARS.fd": used_varstore(VARS_4M, tail=CODE_4M)},
         check=_firmware(CODE_4M, secure=False, smm=False, nvram=f"{NV}/vfio-gaming-varsd_VARS.fd")),
    # split
    Case("split-2m-with-pair", C.SPLIT, S.OK, (Redefine,), catalog="2m",
         files={f"{NV}/buster-ci_VARS.fd": used_varstore(VARS_2M)}, check=_bound(CODE_2M)),
    Case("split-2m-no-pair", C.SPLIT, S.NEEDS_MIGRATION, files={f"{NV}/buster-ci_VARS.fd": used_varstore(VARS_2M)}),
    Case("stale-private-code", C.SPLIT, S.OK, (Redefine,),
         files={STALE_CODE: copy_of(CODE_4M), f"{NV}/appliance_VARS.fd": used_varstore(VARS_4M)},
         check=_firmware(CODE_4M, secure=False, smm=False, nvram=f"{NV}/appliance_VARS.fd")),
    Case("code-path-gone", C.SPLIT, S.OK, (Redefine,), files={f"{NV}/imported-f39_VARS.fd": used_varstore(VARS_4M)},
         check=_firmware(CODE_4M, secure=False, smm=False, nvram=f"{NV}/imported-f39_VARS.fd", template=VARS_4M)),
    # SeaBIOS
    Case("seabios-default", C.NONE, S.UNMANAGED),
    Case("seabios-custom-rom", C.NONE, S.UNMANAGED),
    # confidential and stateless guests are never split
    Case("sev-unified", C.CONFIDENTIAL, S.UNMANAGED, files={f"{NV}/sev-guest_OVMF.fd": cat(VARS_4M, CODE_4M)}),
    Case("sev-snp-stateless", C.CONFIDENTIAL, S.UNMANAGED, skip_libvirt=NEWER_LIBVIRT + " (sev-snp: 10.5)"),
    Case("tdx", C.CONFIDENTIAL, S.UNMANAGED, skip_libvirt=NEWER_LIBVIRT + " (tdx: 11.2)"),
    Case("stateless", C.STATELESS, S.UNMANAGED),
    # libvirt 12.1+ <varstore>: variables in a JSON file (QEMU uefi-vars), the ROM loader is right
    Case("uefi-vars-json", C.HOST_VARSTORE, S.OK, skip_libvirt=NEWER_LIBVIRT + " (varstore: 12.1)",
         files={"/var/lib/libvirt/qemu/varstore/qemuvars-guest.json": Recipe(lambda: JSON_STORE)}),
    Case("opt-out", C.SPLIT, S.UNMANAGED,
         files={STALE_CODE: copy_of(CODE_4M), f"{NV}/appliance-frozen_VARS.fd": used_varstore(VARS_4M)}),
    Case("pinned", C.SPLIT, S.PINNED,
         files={"/var/lib/varsd/archive/b157d97b1f69.fd": copy_of(CODE_4M),
                f"{NV}/pinned-app_VARS.fd": used_varstore(VARS_4M)}),
    # Secure Boot: kept, never invented, never possible without q35
    Case("secboot-on-i440fx", C.SPLIT, S.ERROR, files={f"{NV}/sb-i440fx_VARS.fd": used_varstore(VARS_4M)}),
    Case("secboot-code-only-keeps-secure", C.CODE_ONLY, S.OK, CREATE_AND_REDEFINE,
         check=_firmware(CODE_4M_SECBOOT, secure=True, smm=True, template=VARS_4M)),
    Case("plain-code-keeps-plain", C.SPLIT, S.OK, (Redefine,),
         files={f"{NV}/plain-smm_VARS.fd": used_varstore(VARS_4M)}, check=_bound(CODE_4M)),
    # varstores that are broken or not private
    Case("varstore-garbage", C.SPLIT, S.ERROR, files={f"{NV}/broken-vars_VARS.fd": garbage()}),
    Case("shared-template-nvram", C.SPLIT, S.OK, CREATE_AND_REDEFINE,
         check=_firmware(CODE_4M, secure=False, smm=False, nvram=f"{NV}/shared-vars_VARS.fd", template=VARS_4M)),
    Case("shared-template-nvram-secure", C.SPLIT, S.OK, CREATE_AND_REDEFINE,
         check=_firmware(CODE_4M_MS, secure=True, nvram=f"{NV}/win11-shared_VARS.fd", template=VARS_4M_MS)),
    Case("nvram-is-unified-copy", C.SPLIT, S.OK, CREATE_AND_REDEFINE, catalog="2m",
         files={f"{NV}/howto-vm_VARS.fd": used_varstore(VARS_2M, tail=CODE_2M)},
         check=_firmware(CODE_2M, secure=False, smm=False, nvram=f"{NV}/howto-vm-varsd_VARS.fd")),
    Case("nvram-source-file", C.SPLIT, S.OK, (Redefine,),
         files={STALE_CODE: copy_of(CODE_4M), "/srv/vm/appliance2/appliance2_VARS.fd": used_varstore(VARS_4M)},
         check=_firmware(CODE_4M, secure=False, smm=False, nvram="/srv/vm/appliance2/appliance2_VARS.fd")),
    Case("nvram-network", C.SPLIT, S.UNMANAGED),
    # lifecycle
    Case("transient", C.CODE_ONLY, S.UNMANAGED, persistent=False),
    Case("running-code-only", C.CODE_ONLY, S.PENDING_COLD_BOOT, CREATE_AND_REDEFINE, running=True),
    Case("running-unified", C.UNIFIED, S.PENDING_COLD_BOOT, catalog="2m", running=True,
         files={"/var/lib/libvirt/images/win10-running-OVMF.fd": used_varstore(VARS_2M, tail=CODE_2M)}),
    Case("running-bound", C.SPLIT, S.OK, running=True, files={f"{NV}/db-02_VARS.fd": used_varstore(VARS_4M)}),
)


REWRITING = tuple(c for c in CASES if Redefine in c.actions)
CHECKABLE = tuple(c for c in CASES if not c.skip_libvirt)


def test_every_case_directory_is_in_the_table() -> None:
    assert sorted(p.name for p in CASES_DIR.iterdir() if p.is_dir()) == sorted(c.name for c in CASES)


# -- running the planner on a case ------------------------------------------------------


def _facts(hostfs: HostFS, xml: str, *, live: DomainFirmware | None, persistent: bool = True) -> DomainFacts:
    """What the engine would gather for `xml` on the fake host."""
    fw = parse_domain(xml)
    image_path = firmware_image_path(fw)
    return DomainFacts(
        xml=xml,
        firmware=fw,
        live=live,
        image=hostfs.inspect(image_path, digest=True) if image_path else None,
        nvram=hostfs.inspect(fw.nvram_path, digest=False) if fw.nvram_path else None,
        persistent=persistent,
        json_varstore=replace(inspect_json_varstore(hostfs.local(fw.host_varstore_path)), path=fw.host_varstore_path)
        if fw.host_varstore_path else None,
    )


@dataclass(frozen=True)
class Outcome:
    input_xml: str
    facts: DomainFacts
    plan: Plan

    @property
    def new_xml(self) -> str | None:
        xmls = [a.xml for a in self.plan.actions if isinstance(a, Redefine)]
        assert len(xmls) <= 1, "a plan redefines a domain at most once"
        return xmls[0] if xmls else None


def _run(case: Case, catalogs: dict[str, Catalog], hostfs: HostFS) -> Outcome:
    for path, recipe in case.files.items():
        hostfs.put(path, recipe)
    xml = (CASES_DIR / case.name / "input.xml").read_text()
    live = parse_domain(xml) if case.running else None
    facts = _facts(hostfs, xml, live=live, persistent=case.persistent)
    return Outcome(xml, facts, plan_repair(facts, catalogs[case.catalog], NVRAM_DIR, NOW))


@pytest.fixture(params=CASES, ids=str)
def outcome(request, catalogs, hostfs) -> tuple[Case, Outcome]:
    case = request.param
    return case, _run(case, catalogs, hostfs)


@pytest.fixture(params=REWRITING, ids=str)
def rewrite(request, catalogs, hostfs) -> tuple[Case, Outcome]:
    case = request.param
    return case, _run(case, catalogs, hostfs)


def test_plan(outcome) -> None:
    case, out = outcome
    plan = out.plan
    assert (plan.config, plan.status) == (case.config, case.status), plan.detail
    assert tuple(type(a) for a in plan.actions) == case.actions, plan.detail
    assert plan.detail
    if case.check is not None:
        assert out.new_xml is not None
        case.check(parse_domain(out.new_xml), plan)


def test_expected_xml(outcome) -> None:
    """The rewritten XML is the golden file; a plan without rewrite has no golden file."""
    case, out = outcome
    expected = CASES_DIR / case.name / "expected.xml"
    if REGEN:
        write_expected(expected, None if out.new_xml is None else out.new_xml + "\n")
    if out.new_xml is None:
        assert not expected.exists(), f"{expected} is stale: the plan no longer rewrites (VARSD_REGEN=1)"
    else:
        assert expected.exists(), f"{expected} missing: run with VARSD_REGEN=1 and review it"
        assert out.new_xml + "\n" == expected.read_text()


def test_everything_else_preserved(rewrite) -> None:
    case, out = rewrite
    assert out.new_xml is not None
    assert outside_firmware(out.new_xml) == outside_firmware(out.input_xml)
    old, new = parse_domain(out.input_xml), parse_domain(out.new_xml)
    assert (new.name, new.uuid, new.arch, new.machine, new.domain_type) == (
        old.name, old.uuid, old.arch, old.machine, old.domain_type)
    # other tools' metadata and comments survive byte for byte
    old_root = etree.fromstring(out.input_xml.encode())
    new_root = etree.fromstring(out.new_xml.encode())
    for el in old_root.iterfind("metadata/*"):
        if etree.QName(el).namespace != "https://varsd.org/xmlns/firmware/1":
            match = new_root.find(f"metadata/{el.tag}")
            assert match is not None and etree.tostring(match, with_tail=False) == etree.tostring(el, with_tail=False)
    assert [c.text for c in old_root.iter(etree.Comment)] == [c.text for c in new_root.iter(etree.Comment)]


def test_replanning_asks_for_nothing_more(outcome, catalogs, hostfs) -> None:
    """Idempotence: execute the plan on the fake host, plan again, get no actions."""
    case, out = outcome
    xml = out.input_xml
    for action in out.plan.actions:
        if isinstance(action, CreateVarstore):
            hostfs.create_varstore(action.path, action.source, action.length)
            created = hostfs.local(action.path)
            assert virtfw.read_layout(created) == action.layout
            # every variable of the source is in the new varstore
            assert read_variables(created) == read_variables(hostfs.local(action.source), action.length)
        else:
            xml = action.xml
    again = plan_repair(
        _facts(hostfs, xml, live=out.facts.live, persistent=case.persistent), catalogs[case.catalog], NVRAM_DIR, NOW
    )
    assert again.actions == (), again.detail
    if out.plan.actions:
        assert again.status in (Status.OK, Status.PENDING_COLD_BOOT), again.detail
        assert (again.code, again.varstore) == (out.plan.code, out.plan.varstore)
    else:
        assert again.status is out.plan.status


KEEPING_VARIABLES = tuple(
    c for c in CASES if c.status is Status.OK and any(r.guest_variables for r in c.files.values())
)


@pytest.mark.parametrize("case", KEEPING_VARIABLES, ids=str)
def test_variables_survive(case, catalogs, hostfs) -> None:
    """Where the guest had variables (BootOrder and a vendor variable), its planned varstore has them."""
    out = _run(case, catalogs, hostfs)
    assert out.plan.varstore is not None
    for action in out.plan.actions:
        if isinstance(action, CreateVarstore):
            hostfs.create_varstore(action.path, action.source, action.length)
    variables = read_variables(hostfs.local(out.plan.varstore))
    assert "8be4df61-93ca-11d2-aa0d-00e098032b8c:BootOrder" in variables
    assert variables["6f2a9c1e-1d3b-4c8e-9a47-2b5d8e0f1c3a:VarsdTest"].data == b"kept"


# -- libvirt's verdict ------------------------------------------------------------------------


def _case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def _golden(which: str) -> list[tuple[str, str]]:
    """(case, file) pairs libvirt can judge: every input, every expected file on disk."""
    return [(c.name, which) for c in CHECKABLE if (CASES_DIR / c.name / f"{which}.xml").exists()]


GOLDEN_FILES = _golden("input") + _golden("expected")


def _define(conn, xml: str, undefine_flags: int = 0) -> None:
    """Define with schema validation, then undefine; a refusal raises libvirtError with libvirt's reason."""
    dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        assert dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        dom.undefineFlags(undefine_flags)


@pytest.mark.parametrize(("name", "which"), GOLDEN_FILES)
def test_test_driver_accepts(name, which, test_driver) -> None:
    """Schema-validated define on test:///default (which silently drops <qemu:commandline>)."""
    _define(test_driver, (CASES_DIR / name / f"{which}.xml").read_text())


def test_cases_libvirt_cannot_judge() -> None:
    assert sorted(c.name for c in CASES if c.skip_libvirt) == [
        "sev-snp-stateless", "tdx", "uefi-vars-json", "virt-install-libvirt92-resolved"]


def _host_neutral(xml: str) -> str:
    """What the embedded QEMU driver checks against *this* host's capabilities, made host-neutral.

    type='kvm' -> 'qemu' (CI hosts may lack /dev/kvm), <tpm> dropped (needs swtpm), which
    leaves every firmware rule (ACPI for UEFI, SMM and q35 for secure='yes') to be checked.
    """
    xml = re.sub(r"<domain type='kvm'", "<domain type='qemu'", xml, count=1)
    root = etree.fromstring(xml.encode())
    for tpm in root.findall("devices/tpm"):
        tpm.getparent().remove(tpm)
    return etree.tostring(root, encoding="unicode")


@pytest.mark.parametrize(("name", "which"), [
    (n, w) for n, w in GOLDEN_FILES if _case(n).config is not C.CONFIDENTIAL  # SEV needs a host that has it
])
def test_qemu_driver_accepts(name, which, qemu_driver) -> None:
    xml = _host_neutral((CASES_DIR / name / f"{which}.xml").read_text())
    _define(qemu_driver, xml, libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)


# -- single rules the table does not show well ---------------------------------------------------------


def test_unified_running_then_stopped(catalogs, hostfs) -> None:
    """A running unified guest is deferred; the same guest shut off is split."""
    case = _case("running-unified")
    running = _run(case, catalogs, hostfs).plan
    assert running.status is Status.PENDING_COLD_BOOT and not running.actions
    stopped = _run(replace(case, running=False, files={}), catalogs, hostfs).plan
    assert stopped.status is Status.OK and [type(a) for a in stopped.actions] == [CreateVarstore, Redefine]


def test_shared_varstore_copy_waits_for_shutdown(catalogs, hostfs) -> None:
    case = _case("shared-template-nvram")
    plan = _run(replace(case, running=True), catalogs, hostfs).plan
    assert plan.status is Status.PENDING_COLD_BOOT and not plan.actions


def test_shared_varstore_copy_takes_exactly_the_varstore(catalogs, hostfs) -> None:
    case = _case("shared-template-nvram")
    create = _run(case, catalogs, hostfs).plan.actions[0]
    assert create == CreateVarstore(f"{NV}/shared-vars_VARS.fd", VARS_4M, create.layout, length=540672)


def test_bios_rom_keeps_an_existing_fitting_varstore(catalogs, hostfs) -> None:
    """<loader> without type is -bios; a fitting varstore its <nvram> names is kept, not replaced."""
    xml = (CASES_DIR / "bios-loader-rom" / "input.xml").read_text().replace(
        "<loader type='rom'>/usr/share/ovmf/OVMF.fd</loader>",
        f"<loader readonly='yes'>{UNIFIED_2M}</loader>\n    <nvram>{NV}/legacy-uefi_VARS.fd</nvram>",
    )
    hostfs.put(f"{NV}/legacy-uefi_VARS.fd", used_varstore(VARS_4M))
    plan = plan_repair(_facts(hostfs, xml, live=None), catalogs["4m"], NV, NOW)
    assert (plan.config, plan.status) == (C.BIOS_ROM, S.OK)
    assert [type(a) for a in plan.actions] == [Redefine] and plan.varstore == f"{NV}/legacy-uefi_VARS.fd"


def test_code_only_with_unreadable_image_is_left_alone(catalogs, hostfs) -> None:
    """It might be a unified image full of variables on storage that is not mounted."""
    xml = (CASES_DIR / "unified-private-2m" / "input.xml").read_text()
    plan = plan_repair(_facts(hostfs, xml, live=None), catalogs["2m"], NV, NOW)
    assert (plan.config, plan.status, plan.actions) == (C.CODE_ONLY, S.ERROR, ())


def test_excluded_domain_is_unmanaged(catalogs, hostfs) -> None:
    xml = (CASES_DIR / "code-only-4m" / "input.xml").read_text()
    facts = replace(_facts(hostfs, xml, live=None), excluded=True)
    assert plan_repair(facts, catalogs["4m"], NV, NOW).status is Status.UNMANAGED


def test_pin_on_another_build_is_an_error(catalogs, hostfs) -> None:
    """Neither the loader file, the central path nor the archive holds the pinned build."""
    case = _case("pinned")
    plain = catalogs["4m"].by_code_path(CODE_4M).code_sha256
    secboot = catalogs["4m"].by_code_path(CODE_4M_SECBOOT).code_sha256
    for path, recipe in case.files.items():
        hostfs.put(path, recipe)
    xml = (CASES_DIR / case.name / "input.xml").read_text().replace(f'<varsd:pin sha256="{plain}"/>',
                                                                    f'<varsd:pin sha256="{secboot}"/>')
    plan = plan_repair(_facts(hostfs, xml, live=None), catalogs["4m"], NV, NOW)
    assert (plan.status, plan.actions) == (Status.ERROR, ()), plan.detail


def test_pinned_loader_that_lost_its_build_goes_back_to_the_central_copy(catalogs, hostfs) -> None:
    """The loader file no longer is the pinned build, but the central path is: repointed there."""
    case = _case("pinned")
    files = dict(case.files) | {"/var/lib/varsd/archive/b157d97b1f69.fd": copy_of(CODE_4M_SECBOOT)}
    plan = _run(replace(case, files=files), catalogs, hostfs).plan
    assert plan.status is Status.PINNED and [type(a) for a in plan.actions] == [Redefine]
    assert parse_domain(plan.actions[0].xml).loader_path == CODE_4M


def test_unsafe_domain_names_use_the_uuid(catalogs, hostfs) -> None:
    xml = (CASES_DIR / "code-only-4m" / "input.xml").read_text().replace("<name>kiosk</name>", "<name>../kiosk</name>")
    plan = plan_repair(_facts(hostfs, xml, live=None), catalogs["4m"], NV, NOW)
    assert plan.varstore == f"{NV}/f6a7b8c9-6666-4d0e-9f1a-3b4c5d6e7f80_VARS.fd"


def _file(path: str, sha: str | None = None, realpath: str | None = None) -> FileFacts:
    return FileFacts(path=path, exists=sha is not None, size=3653632 if sha else 0, sha256=sha,
                     realpath=realpath or (path if sha else None))


@pytest.mark.parametrize(("why", "secure_attr", "image", "expected"), [
    ("plain code with secure='yes' stays plain", True, "plain", False),
    ("Secure Boot code without secure='yes' stays Secure Boot", None, "secboot", True),
    ("unknown code: the XML decides", True, "unknown", True),
    ("unknown code, no attribute: plain", None, "unknown", False),
    ("central path whose file changed since the catalog was read", None, "upgraded-secboot", True),
])
def test_secure_boot_follows_the_code(why, secure_attr, image, expected, catalogs) -> None:
    cat4 = catalogs["4m"]
    plain, secboot = cat4.by_code_path(CODE_4M), cat4.by_code_path(CODE_4M_SECBOOT)
    images = {
        "plain": (CODE_4M, _file(CODE_4M, plain.code_sha256)),
        "secboot": ("/var/lib/libvirt/images/copy.fd", _file("/var/lib/libvirt/images/copy.fd", secboot.code_sha256)),
        "unknown": ("/opt/fw/CODE.fd", _file("/opt/fw/CODE.fd")),
        "upgraded-secboot": (CODE_4M_SECBOOT, _file(CODE_4M_SECBOOT, "0" * 64)),
    }
    path, facts = images[image]
    fw = DomainFirmware(name="d", uuid="u", arch="x86_64", machine="pc-q35-7.2", loader_path=path,
                        loader_type="pflash", loader_secure=secure_attr)
    assert wants_secure_boot(fw, facts, cat4) is expected


def test_symlink_to_central_code_is_central(catalogs, hostfs) -> None:
    """Debian's OVMF_CODE_4M.snakeoil.fd links to the secboot build: nothing to repoint, nothing pending."""
    snakeoil = "/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd"
    xml = (CASES_DIR / "nova-secure-boot" / "input.xml").read_text().replace(CODE_4M_MS, snakeoil)
    hostfs.put(f"{NV}/instance-0000002a_VARS.fd", used_varstore(VARS_4M_MS))
    fw = parse_domain(xml)
    plan = plan_repair(_facts(hostfs, xml, live=fw), catalogs["4m"], NV, NOW)
    assert plan.status is Status.OK and plan.build.code_path == CODE_4M_SECBOOT
    assert [type(a) for a in plan.actions] == [Redefine] and parse_domain(plan.actions[0].xml).loader_path == snakeoil
    assert plan.code == snakeoil


def test_template_of_another_layout_is_corrected(catalogs, hostfs) -> None:
    """A 2 MiB template beside 4 MiB code would break `virsh start --reset-nvram`."""
    xml = (CASES_DIR / "virt-manager-split-existing" / "input.xml").read_text().replace(
        "<nvram>", f"<nvram template='{VARS_2M}'>")
    hostfs.put(f"{NV}/bullseye_VARS.fd", used_varstore(VARS_4M))
    plan = plan_repair(_facts(hostfs, xml, live=None), catalogs["2m"], NV, NOW)
    assert plan.status is Status.OK and len(plan.actions) == 1
    fw = parse_domain(plan.actions[0].xml)
    assert (fw.loader_path, fw.nvram_template) == (CODE_4M, VARS_4M)


@pytest.mark.parametrize("path", ["/srv/vms/fedora40/VARS.fd", "/etc/fedora40_VARS.fd"])
def test_missing_varstore_outside_nvram_dir_is_never_provisioned(catalogs, hostfs, path) -> None:
    """#12 defect 15: no file, no template= (what makes libvirt create it there), a warning."""
    xml = (CASES_DIR / "virt-manager-split-unstarted" / "input.xml").read_text().replace(
        f"{NV}/fedora40_VARS.fd", path)
    plan = plan_repair(_facts(hostfs, xml, live=None), catalogs["4m"], NV, NOW)
    assert (plan.status, plan.actions) == (Status.OK, ())
    assert plan.detail.startswith(f"warning: varstore {path} does not exist yet and is outside nvram_dir")


def test_a_json_varstore_domain_is_reported_with_its_file_and_never_rewritten(catalogs, hostfs) -> None:
    """libvirt 12.1+ <varstore> + ROM loader: as bios-rom it would be 'repaired' into pflash,
    and every variable in the JSON store would be left behind."""
    case = next(c for c in CASES if c.name == "uefi-vars-json")
    out = _run(case, catalogs, hostfs)
    assert out.new_xml is None and not out.plan.actions
    assert out.plan.varstore == "/var/lib/libvirt/qemu/varstore/qemuvars-guest.json"
    assert out.plan.code == "/usr/share/edk2/ovmf/OVMF.qemuvars.fd"
    assert "QEMU uefi-vars device" in out.plan.detail and "OVMF.qemuvars.json" in out.plan.detail
    fw = parse_domain((CASES_DIR / case.name / "input.xml").read_text())
    assert fw.host_varstore and fw.host_varstore_template == "/usr/share/edk2/ovmf/OVMF.qemuvars.json"


JSON_STORE = (b'{"version": 2, "variables": [{"name": "BootOrder", "guid": "8be4df61-93ca-11d2-aa0d-00e098032b8c", '
              b'"attr": 7, "data": "0100"}]}')
JSON_PATH = "/var/lib/libvirt/qemu/varstore/qemuvars-guest.json"
JSON_TEMPLATE = "/usr/share/edk2/ovmf/OVMF.qemuvars.json"


@pytest.mark.parametrize("content", [None, b""], ids=["missing", "empty"])
def test_a_missing_or_empty_json_varstore_is_provisioned_from_its_template_first(catalogs, hostfs, content) -> None:
    """QEMU would start the guest with no variables at all (no Secure Boot keys)."""
    if content is not None:
        hostfs.put(JSON_PATH, Recipe(lambda: content))
    xml = (CASES_DIR / "uefi-vars-json" / "input.xml").read_text()
    plan = plan_repair(_facts(hostfs, xml, live=None), catalogs["4m"], NV, NOW)
    assert plan.actions == (CreateJsonVarstore(JSON_PATH, JSON_TEMPLATE),)
    assert (plan.config, plan.status, plan.varstore) == (C.HOST_VARSTORE, S.OK, JSON_PATH)
    what = "does not exist" if content is None else "is empty"
    assert plan.detail.startswith(f"JSON varstore {JSON_PATH} {what}: provisioned from {JSON_TEMPLATE}")
    assert not any(isinstance(a, Redefine) for a in plan.actions)  # the XML is never rewritten


@pytest.mark.parametrize(("running", "template", "content", "says"), [
    (True, True, None, "while the guest runs: QEMU started it with no variables"),
    (False, False, None, "names no template"),
    (False, True, b"{\"version\": 1}",
     f"{JSON_PATH}: not a QEMU JSON varstore (version 1, expected 2); left untouched"),
], ids=["running", "no-template", "invalid"])
def test_a_json_varstore_varsd_cannot_provision_is_an_error_saying_why(catalogs, hostfs, running, template, content,
                                                                      says) -> None:
    if content is not None:
        hostfs.put(JSON_PATH, Recipe(lambda: content))
    xml = (CASES_DIR / "uefi-vars-json" / "input.xml").read_text()
    if not template:
        xml = xml.replace(f"template='{JSON_TEMPLATE}' ", "")
    facts = _facts(hostfs, xml, live=parse_domain(xml) if running else None)
    plan = plan_repair(facts, catalogs["4m"], NV, NOW)
    assert (plan.status, plan.actions, plan.varstore) == (S.ERROR, (), JSON_PATH)
    assert says in plan.detail
