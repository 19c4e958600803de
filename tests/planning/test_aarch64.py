"""aarch64 (AAVMF) guests follow x86's rules, with Debian's real qemu-efi-aarch64 files:
classified, repaired into central code + a private 64 MiB varstore, kept, never crossed
with x86 firmware (and never given x86's ACPI or SMM requirements)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import libvirt
import pytest
from aavmf_files import (
    CODE,
    CODE_MS,
    DEBIAN12,
    ENROLLED,
    FLASH,
    LAYOUT,
    PLAIN,
    PLAIN_CODE,
    QEMU_EFI,
    SECURE,
    VARS,
    VARS_MS,
    blank_flash,
)
from ovmf_files import CODE_4M
from support.domains import QEMU_NS, commandline, domain_xml

from varsd.adapters import virtfw
from varsd.domain.xml import parse_domain
from varsd.firmware.catalog import load_catalog
from varsd.firmware.fit import Misfit, Needs, misfits
from varsd.model.domain import FirmwareConfig, Status
from varsd.planning.repair import CreateVarstore, Redefine

from .test_repair_edges import plan  # the planner on real files, as the engine inspects them


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(["/usr/share/qemu/firmware"])


CPU = "<cpu mode='custom' match='exact'><model fallback='allow'>cortex-a57</model></cpu>"


def domain(os_inner: str = "", *, cmdline: tuple[str, ...] = (), arch: str = "aarch64",
           machine: str = "virt-7.2") -> str:
    return domain_xml("arm", os_inner, domain_type="qemu", uuid="a4c40000-0000-4000-8000-000000000064",
                      namespaces={"qemu": QEMU_NS} if cmdline else None, memory_kib=524288, arch=arch,
                      machine=machine, extra=CPU, tail=commandline(list(cmdline)) if cmdline else "")


def test_debian_aavmf_catalog(catalog) -> None:
    """Debian's aarch64 descriptors are builds with the 64 MiB layout. Debian 12: the blank
    AAVMF_VARS.fd gets the layout its code formats (learned from AAVMF_VARS.ms.fd, the same
    code's formatted template), one code image serves both builds, and the 50- descriptor names
    a code file the package does not ship (a problem, not a build). Debian 13: three builds,
    Secure Boot code of its own, every template formatted."""
    arm = {b.origin: b for b in catalog.builds if b.targets[0].architecture == "aarch64"}
    plain, enrolled = arm[PLAIN], arm[ENROLLED]
    assert (plain.code_path, plain.template_path, plain.layout) == (PLAIN_CODE, VARS, LAYOUT)
    assert (enrolled.code_path, enrolled.template_path, enrolled.layout, enrolled.template_blank) == (
        CODE_MS, VARS_MS, LAYOUT, False)
    assert plain.code_size == FLASH and not plain.secure_boot
    assert enrolled.secure_boot and enrolled.enrolled_keys and not enrolled.requires_smm
    problems = [p for p in catalog.problems if "aarch64" in p.source]
    if DEBIAN12:
        assert sorted(arm) == [ENROLLED, PLAIN] and plain.template_blank
        assert plain.code_sha256 == enrolled.code_sha256
        assert [p.source for p in problems] == [SECURE]
        assert "AAVMF_CODE.secboot.fd does not exist" in problems[0].message
    else:
        assert sorted(arm) == [ENROLLED, SECURE, PLAIN] and not plain.template_blank and problems == []
        assert plain.code_sha256 != enrolled.code_sha256 == arm[SECURE].code_sha256


def test_padded_varstore_layout_is_the_whole_flash_bank(tmp_path) -> None:
    """The 768 KiB NvData volume plus zero padding is one 64 MiB varstore (QEMU's virt machine
    refuses a smaller flash file); junk after the volume keeps it an oversized file; blank flash
    is no varstore yet."""
    assert virtfw.read_layout(VARS_MS) == LAYOUT
    data = Path(VARS_MS).read_bytes()
    assert virtfw.layout_of_bytes(data[:LAYOUT.end + 0xB0000] + b"\x01" * (FLASH - LAYOUT.end - 0xB0000),
                                  "junk").size == 0xC0000
    blank = blank_flash(tmp_path / "blank.fd")
    assert virtfw.is_blank_flash(Path(blank).read_bytes())
    assert virtfw.is_blank_flash(Path(VARS).read_bytes()) is DEBIAN12
    with pytest.raises(Exception, match="not an edk2 varstore"):
        virtfw.read_layout(blank)


def test_architecture_is_a_typed_misfit_both_ways(catalog) -> None:
    """An x86 domain never gets AAVMF, an aarch64 one never OVMF, whatever else fits."""
    x86 = parse_domain(domain(arch="x86_64", machine="pc-q35-7.2"))
    arm = parse_domain(domain())
    for b in catalog.builds:
        is_arm = b.targets[0].architecture == "aarch64"
        mine, other = (arm, x86) if is_arm else (x86, arm)
        assert Misfit.ARCHITECTURE in [p.kind for p in misfits(b, Needs.of(other, secure_boot=None))], b.origin
        assert Misfit.ARCHITECTURE not in [p.kind for p in misfits(b, Needs.of(mine, secure_boot=None))]
    # also when the machine is not known
    ovmf = next(b for b in catalog.builds if b.code_path == CODE_4M)
    assert [p.kind for p in misfits(ovmf, Needs(arch="aarch64", mode=None))] == [Misfit.ARCHITECTURE]


def _repaired(p, nvram_dir: str) -> tuple[CreateVarstore, str]:
    assert p.status is Status.OK, p.detail
    create, redefine = p.actions
    assert isinstance(create, CreateVarstore) and isinstance(redefine, Redefine)
    assert os.path.dirname(create.path) == nvram_dir
    assert (create.source, create.layout) == (VARS, LAYOUT)
    fw = parse_domain(redefine.xml)
    assert (fw.loader_path, fw.loader_type, fw.loader_readonly, fw.nvram_path) == (
        PLAIN_CODE, "pflash", True, create.path)
    assert not fw.loader_secure and not fw.smm and not fw.acpi  # x86's rules only: libvirt's too
    assert not fw.cmdline_firmware and fw.metadata.build_code_sha256
    return create, redefine.xml


@pytest.mark.parametrize(("name", "xml", "config"), [
    ("-bios QEMU_EFI.fd", domain(cmdline=("-bios", QEMU_EFI)), FirmwareConfig.BIOS_ROM),
    ("<loader type='rom'>", domain(f"<loader type='rom'>{QEMU_EFI}</loader>"), FirmwareConfig.BIOS_ROM),
    ("code-only pflash", domain(cmdline=("-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={CODE}")),
     FirmwareConfig.CODE_ONLY),
])
def test_wrong_ways_become_central_aavmf_plus_private_varstore(name, xml, config, catalog, tmp_path) -> None:
    """Repaired like x86's: the plain build (no Secure Boot was there before), its template
    (blank on Debian 12) copied whole; the same plan applied and the copy in place, the next plan changes nothing."""
    p = plan(xml, catalog, str(tmp_path))
    assert p.config is config, p.detail
    create, new_xml = _repaired(p, str(tmp_path))
    shutil.copyfile(create.source, create.path)
    again = plan(new_xml, catalog, str(tmp_path))
    assert (again.config, again.status, again.actions) == (FirmwareConfig.SPLIT, Status.OK, ()), again.detail
    # and once the firmware formatted it at first boot (what AAVMF_VARS.ms.fd's layout is), still
    Path(create.path).write_bytes(virtfw.with_variables(VARS_MS, []))
    booted = plan(new_xml, catalog, str(tmp_path))
    assert (booted.status, booted.actions) == (Status.OK, ()), booted.detail


def test_enrolled_guest_stays_on_its_build(catalog, tmp_path) -> None:
    """What libvirt's firmware='efi' picks on Debian 12 (40-: AAVMF_CODE.ms.fd + AAVMF_VARS.ms.fd)
    is split and fine as it is; it is bound, never moved to the plain build or given secure='yes'."""
    nvram = tmp_path / "arm_VARS.fd"
    shutil.copyfile(VARS_MS, nvram)
    xml = domain(f"<loader readonly='yes' type='pflash'>{CODE_MS}</loader>"
                 f"<nvram template='{VARS_MS}'>{nvram}</nvram>")
    p = plan(xml, catalog, str(tmp_path))
    assert (p.config, p.status) == (FirmwareConfig.SPLIT, Status.OK), p.detail
    assert p.build is not None and p.build.origin == ENROLLED
    for action in p.actions:
        fw = parse_domain(action.xml)
        assert (fw.loader_path, fw.nvram_path, fw.loader_secure) == (CODE_MS, str(nvram), None)
    again = plan(p.actions[0].xml, catalog, str(tmp_path)) if p.actions else p
    assert (again.status, again.actions) == (Status.OK, ())


def test_a_varstore_of_the_wrong_size_is_not_taken_for_aavmf(catalog, tmp_path) -> None:
    """A 768 KiB varstore (the volume without its padding) does not fit AAVMF code: QEMU would
    refuse the file, and varsd says so instead of binding it."""
    nvram = tmp_path / "arm_VARS.fd"
    nvram.write_bytes(Path(VARS_MS).read_bytes()[:0xC0000])
    p = plan(domain(f"<loader readonly='yes' type='pflash'>{CODE}</loader><nvram>{nvram}</nvram>"), catalog,
             str(tmp_path))
    assert p.status is Status.NEEDS_MIGRATION and "varsctl migrate" in p.detail, p.detail
    assert not any(isinstance(a, CreateVarstore) for a in p.actions)


@pytest.mark.parametrize("which", ["-bios QEMU_EFI.fd", "code-only pflash"])
def test_qemu_driver_accepts_the_repair(which, catalog, tmp_path, qemu_driver) -> None:
    """libvirt's real QEMU driver (embedded, this host's qemu-system-aarch64) accepts the output."""
    xml = {"-bios QEMU_EFI.fd": domain(cmdline=("-bios", QEMU_EFI)),
           "code-only pflash": domain(cmdline=("-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={CODE}"))}
    _create, new_xml = _repaired(plan(xml[which], catalog, str(tmp_path)), str(tmp_path))
    dom = qemu_driver.defineXMLFlags(new_xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        assert parse_domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).loader_path == PLAIN_CODE
    finally:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)


def test_an_aavmf_upgrade_is_tracked_and_a_misfit_one_held(catalog, tmp_path) -> None:
    """Firmware upgrades reach AAVMF guests like x86 ones: a new build of the same layout is
    followed; one whose varstore layout differs holds the guest on its archived build."""
    from dataclasses import replace

    from varsd.model.domain import FileFacts
    from varsd.model.firmware import Catalog, VarstoreLayout
    from varsd.planning.upgrade import Hold, PinKind, Track, decide_tracking

    _create, xml = _repaired(plan(domain(cmdline=("-bios", QEMU_EFI)), catalog, str(tmp_path)), str(tmp_path))
    fw = parse_domain(xml)
    new = "b" * 64
    image = FileFacts(path=PLAIN_CODE, exists=True, size=FLASH, sha256=new, realpath=PLAIN_CODE)

    def upgraded(layout: VarstoreLayout) -> Catalog:
        return replace(catalog, builds=tuple(replace(b, code_sha256=new, layout=layout)
                                             if b.code_path == PLAIN_CODE else b for b in catalog.builds))

    same = decide_tracking(fw, image, upgraded(LAYOUT), LAYOUT, None, "auto")
    assert isinstance(same, Track) and same.build.code_sha256 == new and same.build.origin == PLAIN
    other = decide_tracking(fw, image, upgraded(replace(LAYOUT, size=0xC0000)), LAYOUT, None, "auto")
    assert isinstance(other, Hold) and other.kind is PinKind.INCOMPATIBLE
    assert fw.metadata.build_code_sha256 in other.candidates and "varstore" in other.reason


def test_an_x86_varstore_with_zeros_after_it_is_not_padded(tmp_path) -> None:
    """Only a 64 MiB virt bank is a padded varstore: OVMF_VARS_4M.fd plus zeros to 1 MiB keeps
    its 540672-byte layout (and is called oversized, as before aarch64 came)."""
    from ovmf_files import LAYOUT_4M, VARS_4M

    f = tmp_path / "x86_VARS.fd"
    f.write_bytes(Path(VARS_4M).read_bytes().ljust(1 << 20, b"\0"))
    assert virtfw.read_layout(str(f)) == LAYOUT_4M == virtfw.layout_of_bytes(f.read_bytes(), "x86")
