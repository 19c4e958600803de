"""Regression tests for edges found in review: each input once made the planner act
where it must not, or act wrongly."""

from __future__ import annotations

import shutil
from functools import partial

import pytest
from ovmf_files import DEBIAN12_OVMF  # Debian 12's files, release-aware
from ovmf_files import UNIFIED as UNIFIED_2M_IMAGE
from support.domains import QEMU_NS, domain_xml, split_os, varsd_metadata

from varsd.clock import parse_stamp
from varsd.config import ExtraFirmware
from varsd.domain.xml import parse_domain
from varsd.engine.inspect import FileInspector
from varsd.firmware.catalog import load_catalog
from varsd.model.domain import FileFacts, FirmwareConfig, Status
from varsd.planning.repair import CreateVarstore, DomainFacts, plan_repair

NOW = parse_stamp("2026-11-26T00:00:00Z")  # the clock's aware datetime; XML holds its stamp


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(["/usr/share/qemu/firmware"], [ExtraFirmware(f"{DEBIAN12_OVMF}/OVMF_CODE.fd",
                                                                    f"{DEBIAN12_OVMF}/OVMF_VARS.fd")])


def plan(xml: str, catalog, nvram_dir: str):
    fw = parse_domain(xml)
    ins = FileInspector()
    image_path = fw.cmdline_bios or fw.loader_path
    facts = DomainFacts(
        xml, fw,
        image=ins.inspect(image_path, digest=True) if image_path else None,
        nvram=ins.inspect(fw.nvram_path, digest=False) if fw.nvram_path else None,
    )
    return plan_repair(facts, catalog, nvram_dir, NOW)


# compact, as some tools write it; `tail=` holds what follows <devices>
domain = partial(domain_xml, "edge", domain_type="kvm", uuid="5e1c0000-0000-4000-8000-000000000001",
                 features="<acpi/>", pretty=False)


def test_snp_guest_through_qemu_commandline_is_confidential_and_untouched(catalog, tmp_path) -> None:
    """libvirt 9.0 has no <launchSecurity type='sev-snp'>: SNP guests pass QEMU objects."""
    xml = domain("", namespaces={"qemu": QEMU_NS}, tail=(
        "<qemu:commandline><qemu:arg value='-machine'/><qemu:arg value='confidential-guest-support=sev0'/>"
        "<qemu:arg value='-object'/><qemu:arg value='sev-snp-guest,id=sev0,cbitpos=51'/>"
        f"<qemu:arg value='-bios'/><qemu:arg value='{UNIFIED_2M_IMAGE}'/></qemu:commandline>"))
    p = plan(xml, catalog, str(tmp_path))
    assert (p.config, p.status, p.actions) == (FirmwareConfig.CONFIDENTIAL, Status.UNMANAGED, ())


def test_never_started_secure_domain_gets_the_enrolled_template_its_xml_names(catalog, tmp_path) -> None:
    """The Debian wiki recipe: secboot code + OVMF_VARS_4M.ms.fd. Copying the unenrolled
    template instead would boot the guest in setup mode without Microsoft's keys."""
    xml = domain(
        "<loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.secboot.fd</loader>"
        f"<nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>{tmp_path}/edge_VARS.fd</nvram>",
        features="<acpi/><smm state='on'/>",
    )
    p = plan(xml, catalog, str(tmp_path))
    (create,) = [a for a in p.actions if isinstance(a, CreateVarstore)]
    assert create.source == "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"


def test_seabios_image_in_a_directory_named_edk2_stays_seabios(catalog, tmp_path) -> None:
    image = tmp_path / "edk2-vs-seabios" / "bios-256k.bin"
    image.parent.mkdir()
    shutil.copyfile("/usr/share/seabios/bios-256k.bin", image)
    p = plan(domain(f"<loader type='rom'>{image}</loader>", machine="pc-i440fx-7.2"), catalog, str(tmp_path))
    assert (p.config, p.status, p.actions) == (FirmwareConfig.NONE, Status.UNMANAGED, ())


def test_a_pin_on_a_unified_domain_never_repoints_its_loader(catalog, tmp_path) -> None:
    image = tmp_path / "unified.fd"
    shutil.copyfile(UNIFIED_2M_IMAGE, image)
    xml = domain(f"<loader readonly='no' type='pflash'>{image}</loader>", tail=(
        "<metadata><varsd:firmware xmlns:varsd='https://varsd.org/xmlns/firmware/1'>"
        "<varsd:pin sha256='" + "ab" * 32 + "' by='admin'/></varsd:firmware></metadata>"))
    p = plan(xml, catalog, str(tmp_path))
    assert (p.config, p.status, p.actions) == (FirmwareConfig.UNIFIED, Status.ERROR, ())


@pytest.mark.parametrize("content", ["seabios", "random"])
def test_writable_pflash_holding_no_ovmf_is_left_alone(catalog, tmp_path, content) -> None:
    """#12 defect 2: SeaBIOS or random bytes as the only writable pflash is not code-only
    OVMF; repointing it to OVMF_CODE_4M.fd would change the guest's firmware family."""
    image = tmp_path / "flash.bin"
    if content == "seabios":
        shutil.copyfile("/usr/share/seabios/bios-256k.bin", image)
    else:
        image.write_bytes(bytes(range(256)) * 1024)
    p = plan(domain(f"<loader readonly='no' type='pflash'>{image}</loader>", machine="pc-i440fx-7.2"),
             catalog, str(tmp_path))
    assert (p.config, p.status, p.actions) == (FirmwareConfig.NONE, Status.UNMANAGED, ())
    assert f"{image} is not OVMF" in p.detail


def test_oversized_varstore_is_called_oversized_not_shared(catalog, tmp_path) -> None:
    """#12 defect 16: the template plus 100000 junk bytes, used by nobody else."""
    nvram = tmp_path / "edge_VARS.fd"
    nvram.write_bytes(open("/usr/share/OVMF/OVMF_VARS_4M.fd", "rb").read() + b"\x00" * 100000)
    p = plan(domain("<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
                    f"<nvram>{nvram}</nvram>"), catalog, str(tmp_path))
    assert "oversized" in p.detail and "640672 bytes, 100000 more" in p.detail
    assert "shared" not in p.detail


def test_manage_maybe_is_reported_as_written(catalog, tmp_path) -> None:
    """#12 defect 16: an unknown manage= value opts out (safe) and is named, not called 'no'."""
    xml = domain(f"<loader type='rom'>{UNIFIED_2M_IMAGE}</loader>", tail=(
        "<metadata><varsd:firmware xmlns:varsd='https://varsd.org/xmlns/firmware/1' manage='maybe'/></metadata>"))
    p = plan(xml, catalog, str(tmp_path))
    assert (p.status, p.actions) == (Status.UNMANAGED, ())
    assert "manage='maybe' is neither 'yes' nor 'no'" in p.detail and "manage='no')" not in p.detail


@pytest.mark.parametrize("machine", ["pc-q35-7.2", "pc-i440fx-7.2"])
def test_a_pin_in_the_metadata_is_checked_for_fit(catalog, tmp_path, machine) -> None:
    """#12 defect 6: a plain non-SMM domain pinned (hand edit, XML from another host) to the
    Secure Boot build is not planned onto SMM-requiring code."""
    from varsd.adapters import fsio

    nvram = tmp_path / "edge_VARS.fd"
    shutil.copyfile("/usr/share/OVMF/OVMF_VARS_4M.fd", nvram)
    plain = fsio.sha256_file("/usr/share/OVMF/OVMF_CODE_4M.fd")
    secure = fsio.sha256_file("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
    xml = domain("<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
                 f"<nvram>{nvram}</nvram>", machine=machine, metadata=varsd_metadata(
                     f"><varsd:build code='/usr/share/OVMF/OVMF_CODE_4M.fd' sha256='{plain}'/>"
                     f"<varsd:pin sha256='{secure}' by='admin'/>"))
    p = plan(xml, catalog, str(tmp_path))
    assert (p.status, p.actions) == (Status.ERROR, ()), p.detail
    assert "needs SMM" in p.detail and "varsctl unpin edge" in p.detail


def test_a_varstore_this_user_may_not_read_is_unknown_not_wrong(catalog, tmp_path) -> None:
    """A non-root admin's status: the qemu user's 0600 varstore is not called 'not a varstore'."""
    store = f"{tmp_path}/edge_VARS.fd"
    xml = domain(split_os("/usr/share/OVMF/OVMF_CODE_4M.fd", store))
    fw = parse_domain(xml)
    facts = DomainFacts(xml, fw, image=FileInspector().inspect(fw.loader_path, digest=True),
                        nvram=FileFacts(store, exists=True, size=540672, unreadable=True,
                                        error="this user may not read it"))
    p = plan_repair(facts, catalog, str(tmp_path), NOW)
    assert (p.config, p.status, p.actions) == (FirmwareConfig.SPLIT, Status.ERROR, ())
    assert p.detail == (f"varstore {store} cannot be read by this user, so whether it fits is unknown; "
                        "run as root to see")
