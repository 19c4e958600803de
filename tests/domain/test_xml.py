"""Domain XML: every field parse_domain reads, metadata round trips, and what apply_edit may touch."""

from __future__ import annotations

from functools import partial

import pytest
from lxml import etree
from support.domains import QEMU_NS, domain_xml

from varsd.clock import parse_stamp
from varsd.domain.xml import (
    VARSD_NS,
    FirmwareEdit,
    apply_edit,
    firmware_signature,
    metadata_element,
    metadata_fragment,
    nvram_storage,
    outside_firmware,
    parse_domain,
    parse_metadata,
    parse_metadata_fragment,
    replace_loader_code,
    set_metadata,
)
from varsd.errors import DomainXMLError
from varsd.model.domain import DomainFirmware, VarsdMetadata

FULL = """\
<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>full</name>
  <uuid>0b7c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d</uuid>
  <metadata>
    <varsd:firmware xmlns:varsd="https://varsd.org/xmlns/firmware/1" manage="no">
      <varsd:build code="/usr/share/OVMF/OVMF_CODE_4M.fd" sha256="c0de"/>
      <varsd:varstore template="/usr/share/OVMF/OVMF_VARS_4M.fd" template-sha256="7e11" source="template"
                      created="2024-11-02T08:00:00Z"/>
      <varsd:pin sha256="917"/>
      <varsd:booted sha256="b007"/>
    </varsd:firmware>
  </metadata>
  <memory unit='KiB'>1048576</memory>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' secure='yes' type='pflash' stateless='no'>
      /usr/share/OVMF/OVMF_CODE_4M.secboot.fd
    </loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/full_VARS.fd</nvram>
  </os>
  <features>
    <acpi/>
    <smm state='on'/>
  </features>
  <devices/>
  <launchSecurity type='sev'>
    <policy>0x0003</policy>
  </launchSecurity>
  <qemu:commandline>
    <qemu:arg value='-bios'/>
    <qemu:arg value='/usr/share/ovmf/OVMF.fd'/>
  </qemu:commandline>
</domain>
"""

FULL_METADATA = VarsdMetadata(
    opt_out=True,
    build_code_path="/usr/share/OVMF/OVMF_CODE_4M.fd",
    build_code_sha256="c0de",
    template_path="/usr/share/OVMF/OVMF_VARS_4M.fd",
    template_sha256="7e11",
    varstore_source="template",
    provisioned_at=parse_stamp("2024-11-02T08:00:00Z"),
    pinned_sha256="917",
    booted_sha256="b007",
)


def test_parse_domain_reads_every_field() -> None:
    assert parse_domain(FULL) == DomainFirmware(
        name="full",
        uuid="0b7c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d",
        arch="x86_64",
        machine="pc-q35-7.2",
        domain_type="kvm",
        os_firmware="efi",
        loader_path="/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        loader_type="pflash",
        loader_readonly=True,
        loader_secure=True,
        loader_stateless=False,
        nvram_path="/var/lib/libvirt/qemu/nvram/full_VARS.fd",
        nvram_template="/usr/share/OVMF/OVMF_VARS_4M.fd",
        smm=True,
        acpi=True,
        launch_security="sev",
        cmdline_bios=None,  # QEMU ignores -bios when the <loader> is pflash
        cmdline_firmware=True,  # ... and a repair drops it
        metadata=FULL_METADATA,
    )


def test_parse_domain_minimal() -> None:
    fw = parse_domain("<domain><name>m</name></domain>")
    assert fw == DomainFirmware(name="m", uuid="", arch=None, machine=None)


_domain = partial(domain_xml, "d", domain_type="kvm", uuid="11111111-2222-4333-8444-555555555555", memory_kib=None)
QEMU = {"qemu": QEMU_NS}


@pytest.mark.parametrize(("nvram", "path", "storage"), [
    ("", None, None),
    ("<nvram>/n/d_VARS.fd</nvram>", "/n/d_VARS.fd", "file"),
    ("<nvram type='file'><source file='/n/d_VARS.fd'/></nvram>", "/n/d_VARS.fd", "file"),
    ("<nvram type='block'><source dev='/dev/vg0/d-vars'/></nvram>", "/dev/vg0/d-vars", "block"),
    ("<nvram type='network'><source protocol='iscsi' name='iqn.2013-07.com.example:t/0'>"
     "<host name='example.com' port='6000'/></source></nvram>", None, "network"),
])
def test_nvram_forms(nvram: str, path: str | None, storage: str | None) -> None:
    xml = _domain(f"<loader readonly='yes' type='pflash'>/c.fd</loader>{nvram}")
    assert parse_domain(xml).nvram_path == path
    assert nvram_storage(xml) == storage


@pytest.mark.parametrize(("args", "bios"), [
    (["-bios", "/usr/share/ovmf/OVMF.fd"], "/usr/share/ovmf/OVMF.fd"),
    (["-global", "x=1", "-bios=/x/OVMF.fd"], "/x/OVMF.fd"),
    (["-bios"], None),  # no argument: QEMU would refuse; nothing to manage
    (["-smbios", "type=0,uefi=on"], None),
])
def test_cmdline_bios(args: list[str], bios: str | None) -> None:
    cmd = "".join(f"<qemu:arg value='{a}'/>" for a in args)
    xml = _domain(tail=f"<qemu:commandline>{cmd}</qemu:commandline>", namespaces=QEMU)
    assert parse_domain(xml).cmdline_bios == bios


@pytest.mark.parametrize(("features", "smm"), [
    (None, False),
    ("<acpi/>", False),
    ("<smm state='on'/>", True),
    ("<smm state='off'/>", False),
    ("<smm/>", True),
])
def test_smm(features: str | None, smm: bool) -> None:
    assert parse_domain(_domain(features=features)).smm is smm


def test_launch_security_without_type() -> None:
    assert parse_domain(_domain(tail="<launchSecurity/>")).launch_security == "unknown"


@pytest.mark.parametrize(("xml", "message"), [
    ("<domain><name>x</name>", "malformed XML"),
    ("<network><name>x</name></network>", "root element is <network>"),
    ("<domain><uuid>u</uuid></domain>", "has no <name>"),
])
def test_parse_errors(xml: str, message: str) -> None:
    with pytest.raises(DomainXMLError, match=message):
        parse_domain(xml)


# -- metadata ----------------------------------------------------------------------------


@pytest.mark.parametrize("md", [VarsdMetadata(), VarsdMetadata(opt_out=True), FULL_METADATA,
                                VarsdMetadata(build_code_path="/c.fd", build_code_sha256="c0de")])
def test_metadata_round_trip(md: VarsdMetadata) -> None:
    assert parse_metadata(metadata_element(md)) == md
    assert parse_metadata_fragment(metadata_fragment(md)) == md
    assert parse_domain(set_metadata(_domain(), md)).metadata == md


def test_metadata_fragment_as_libvirt_returns_it() -> None:
    """getMetadata hands back our element without the namespace prefix."""
    fragment = '<firmware manage="no"><build code="/c.fd" sha256="c0de"/></firmware>'
    assert parse_metadata_fragment(fragment) == VarsdMetadata(
        opt_out=True, build_code_path="/c.fd", build_code_sha256="c0de")
    assert parse_metadata_fragment(None) == VarsdMetadata()


def test_opt_out_syntax_from_the_docs() -> None:
    xml = _domain(tail='<metadata><varsd:firmware xmlns:varsd="https://varsd.org/xmlns/firmware/1" '
                       'manage="no"/></metadata>')
    assert parse_domain(xml).metadata.opt_out
    assert not parse_domain(xml.replace('manage="no"', 'manage="yes"')).metadata.opt_out


OTHER_APPS = """\
  <title>Build server</title>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
    <varsd:firmware xmlns:varsd="https://varsd.org/xmlns/firmware/1" future="1">
      <varsd:build code="/old.fd" sha256="01d"/>
      <varsd:policy upgrade="manual"/>
      <varsd:window days="sat,sun"/>
    </varsd:firmware>
  </metadata>
"""


def test_set_metadata_keeps_other_apps_and_what_a_newer_varsd_wrote() -> None:
    xml = _domain().replace("  <os>", OTHER_APPS + "  <os>")
    md = VarsdMetadata(build_code_path="/new.fd", build_code_sha256="2ew")
    new = set_metadata(xml, md)
    assert parse_domain(new).metadata == md
    assert outside_firmware(new) == outside_firmware(xml)
    ours = etree.fromstring(new.encode()).find(f"metadata/{{{VARSD_NS}}}firmware")
    assert ours.get("future") == "1" and ours.find(f"{{{VARSD_NS}}}policy").get("upgrade") == "manual"
    assert ours.find(f"{{{VARSD_NS}}}window") is not None
    assert "libosinfo:os id=\"http://debian.org/debian/12\"" in new


def test_set_metadata_creates_metadata_after_title_indented() -> None:
    xml = _domain().replace("  <os>", "  <title>t</title>\n  <os>")
    new = set_metadata(xml, VarsdMetadata(build_code_path="/c.fd"))
    assert "  <title>t</title>\n  <metadata>\n    <varsd:firmware" in new
    assert '\n      <varsd:build code="/c.fd"/>\n    </varsd:firmware>\n  </metadata>\n  <os>' in new


# -- apply_edit -----------------------------------------------------------------------------

EDIT = FirmwareEdit(
    code_path="/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
    nvram_path="/var/lib/libvirt/qemu/nvram/d_VARS.fd",
    template_path="/usr/share/OVMF/OVMF_VARS_4M.fd",
    secure=True,
    smm=True,
    metadata=VarsdMetadata(build_code_path="/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"),
)


def _firmware_after(xml: str, edit: FirmwareEdit = EDIT) -> tuple[DomainFirmware, str]:
    new = apply_edit(xml, edit)
    assert outside_firmware(new) == outside_firmware(xml)
    return parse_domain(new), new


def test_apply_edit_from_nothing_adds_features_and_smm() -> None:
    fw, new = _firmware_after(_domain())
    assert (fw.loader_path, fw.loader_type, fw.loader_readonly, fw.loader_secure) == (
        EDIT.code_path, "pflash", True, True)
    assert (fw.nvram_path, fw.nvram_template, fw.smm) == (EDIT.nvram_path, EDIT.template_path, True)
    assert "<loader readonly='yes' secure='yes' type='pflash'>" in new
    assert "  <features>\n    <smm state='on'/>\n  </features>\n" in new


def test_apply_edit_turns_smm_on_and_keeps_other_features() -> None:
    xml = _domain(features="\n    <acpi/>\n    <smm state='off'/>\n  ")
    fw, new = _firmware_after(xml)
    assert fw.smm and "<acpi/>" in new


def test_apply_edit_plain_build_drops_secure_and_leaves_smm_alone() -> None:
    xml = _domain("<loader readonly='yes' secure='yes' type='pflash'>/old.fd</loader>",
                  features="<smm state='on'/>")
    fw, _ = _firmware_after(xml, FirmwareEdit("/c.fd", "/n/v.fd", None, secure=False, smm=False,
                                              metadata=VarsdMetadata()))
    assert fw.loader_secure is None and fw.smm and fw.nvram_template is None


def test_apply_edit_replaces_autoselection_and_newer_attributes() -> None:
    """libvirt 9.0 refuses firmware='efi' beside loader attributes; 9.2+ formats are raw here."""
    xml = _domain("<firmware><feature enabled='no' name='secure-boot'/></firmware>"
                  "<loader readonly='yes' type='pflash' format='raw' stateless='no'>/c.fd</loader>"
                  "<nvram template='/t.fd' format='raw'>/n/v.fd</nvram>").replace("<os>", "<os firmware='efi'>")
    fw, new = _firmware_after(xml)
    assert fw.os_firmware is None and "<firmware>" not in new and "format=" not in new
    assert fw.loader_stateless is None


def test_apply_edit_keeps_nvram_source_form() -> None:
    xml = _domain("<loader readonly='yes' type='pflash'>/c.fd</loader>"
                  "<nvram type='file'><source file='/srv/v.fd'/></nvram>")
    fw, new = _firmware_after(xml, EDIT)
    assert fw.nvram_path == EDIT.nvram_path and "<nvram type='file'" in new


def test_apply_edit_refuses_network_nvram() -> None:
    xml = _domain("<loader readonly='yes' type='pflash'>/c.fd</loader><nvram type='network'>"
                  "<source protocol='nbd' name='v'><host name='h'/></source></nvram>")
    with pytest.raises(DomainXMLError, match="network"):
        apply_edit(xml, EDIT)


def test_apply_edit_drops_only_the_bios_arguments() -> None:
    keep = _domain(tail="<qemu:commandline>\n    <qemu:arg value='-bios'/>\n    <qemu:arg value='/x/OVMF.fd'/>\n"
                        "    <qemu:arg value='-global'/>\n    <qemu:arg value='ICH9-LPC.disable_s3=1'/>\n"
                        "  </qemu:commandline>", namespaces=QEMU)
    fw, new = _firmware_after(keep)
    assert fw.cmdline_bios is None
    assert "  <qemu:commandline>\n    <qemu:arg value='-global'/>\n    <qemu:arg value='ICH9-LPC" in new
    only = _domain(tail="<qemu:commandline><qemu:arg value='-bios=/x/OVMF.fd'/></qemu:commandline>", namespaces=QEMU)
    _, new = _firmware_after(only)
    assert "commandline" not in new
    assert new.startswith("<domain type='kvm' xmlns:qemu=")  # libvirt's attribute order


def test_apply_edit_needs_os() -> None:
    with pytest.raises(DomainXMLError, match="no <os>"):
        apply_edit("<domain><name>x</name></domain>", EDIT)


def test_apply_edit_on_compact_xml() -> None:
    xml = ("<domain type='qemu'><name>c</name><os><type arch='x86_64' machine='q35'>hvm</type>"
           "<loader type='rom'>/usr/share/ovmf/OVMF.fd</loader></os><devices/></domain>")
    fw, new = _firmware_after(xml)
    assert fw.loader_path == EDIT.code_path and "\n" not in new


def test_serialisation_quotes_like_libvirt() -> None:
    """Attribute values with both quote characters survive the switch to single quotes."""
    xml = _domain(tail="<devices2 note=\"it's &quot;quoted&quot; &amp; &lt;odd&gt;\"/>")
    new = set_metadata(xml, VarsdMetadata())
    assert "note='it&apos;s \"quoted\" &amp; &lt;odd&gt;'" in new
    assert etree.fromstring(new.encode()).find("devices2").get("note") == "it's \"quoted\" & <odd>"


def test_comments_survive() -> None:
    xml = _domain("<!-- loader chosen by hand -->").replace("<devices/>", "<devices><!-- none --></devices>")
    _, new = _firmware_after(xml)
    assert "<!-- loader chosen by hand -->" in new and "<!-- none -->" in new


# -- helpers -------------------------------------------------------------------------------------


def test_outside_firmware_ignores_layout_but_not_content() -> None:
    xml = _domain()
    assert outside_firmware(xml) == outside_firmware(xml.replace("\n  ", "\n\t"))
    assert outside_firmware(xml) != outside_firmware(xml.replace("<devices/>", "<devices><watchdog model='itco'/>"
                                                                               "</devices>"))


def test_replace_loader_code_and_signature() -> None:
    xml = _domain("<loader readonly='yes' type='pflash'>/old.fd</loader><nvram>/n/v.fd</nvram>")
    new = replace_loader_code(xml, "/archive/c0de.fd")
    assert firmware_signature(new) == ("/archive/c0de.fd", "pflash", True, None, "/n/v.fd", False, False, False)
    with pytest.raises(DomainXMLError):
        replace_loader_code(_domain(), "/x.fd")


def test_pin_attributes_round_trip_and_without_pin() -> None:
    from dataclasses import replace

    from varsd.model.domain import PinKind

    md = replace(FULL_METADATA, pin_by="incompatible", pin_reason="layout changed; run 'varsctl migrate x'",
                 pinned_at=parse_stamp("2025-06-01T12:00:00Z"))
    back = parse_domain(set_metadata(_domain(), md)).metadata
    assert back == md and back.pin_kind is PinKind.INCOMPATIBLE
    assert back.without_pin().pinned_sha256 is None and back.without_pin().pin_by is None
    assert replace(md, pin_by=None).pin_kind is PinKind.ADMIN  # a pin an older varsd wrote
    assert replace(md, pin_by="someone-new").pin_kind is PinKind.ADMIN  # unknown: never overruled
    assert VarsdMetadata().pin_kind is None


def test_boot_record_in_live_xml_is_read() -> None:
    boot = '<boot xmlns="https://varsd.org/xmlns/boot/1" code="/c.fd" sha256="b007" at="t" source="qemu-fd"/>'
    live = _domain(tail=f"<metadata>{boot}</metadata>")
    assert parse_domain(live).booted_sha256 == "b007"
    assert parse_domain(_domain()).booted_sha256 is None


def test_replace_loader_code_with_metadata_changes_nothing_else() -> None:
    xml = _domain("<loader readonly='yes' secure='yes' type='pflash'>/old.fd</loader>"
                  "<nvram template='/t.fd'>/n/v.fd</nvram>", features="<smm state='on'/>")
    md = VarsdMetadata(build_code_path="/old.fd", build_code_sha256="a", pinned_sha256="a", pin_by="admin")
    new = replace_loader_code(xml, "/archive/a.fd", md)
    fw = parse_domain(new)
    assert (fw.loader_path, fw.metadata) == ("/archive/a.fd", md)
    assert (fw.loader_secure, fw.smm, fw.nvram_path, fw.nvram_template) == (True, True, "/n/v.fd", "/t.fd")
    assert outside_firmware(new) == outside_firmware(xml)


# -- explicit formats (libvirt >= 9.2) -------------------------------------------------------

from varsd.domain.xml import FormatSupport, firmware_formats, with_raw_formats  # noqa: E402

_SPLIT = ("<domain type='kvm'><name>f</name><os><type arch='x86_64' machine='q35'>hvm</type>"
          "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
          "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/f_VARS.fd</nvram>"
          "</os></domain>")


def test_firmware_formats_follow_libvirts_versions():
    assert firmware_formats(9_000_000) == FormatSupport(False, False)  # Debian 12: the schema refuses them
    assert firmware_formats(9_002_000) == FormatSupport(True, False)
    assert firmware_formats(10_010_000) == FormatSupport(True, True)
    assert firmware_formats(12_009_000) == FormatSupport(True, True)  # Debian 13 backports


def test_raw_formats_are_written_where_libvirt_has_them():
    assert with_raw_formats(_SPLIT, firmware_formats(9_000_000)) == _SPLIT
    out = with_raw_formats(_SPLIT, firmware_formats(12_009_000))
    assert "<loader readonly='yes' type='pflash' format='raw'>" in out
    assert "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd' templateFormat='raw' format='raw'>" in out
    assert with_raw_formats(out, firmware_formats(12_009_000)) == out  # idempotent
    mid = with_raw_formats(_SPLIT, firmware_formats(9_002_000))
    assert "templateFormat" not in mid and mid.count("format='raw'") == 2


def test_an_existing_format_and_non_file_varstores_are_left_alone():
    qcow2 = _SPLIT.replace("type='pflash'>", "type='pflash' format='qcow2'>").replace(
        "<nvram template", "<nvram format='qcow2' template")
    out = with_raw_formats(qcow2, firmware_formats(12_009_000))
    assert "format='raw'" not in out.replace("templateFormat='raw'", "")
    network = ("<domain><name>n</name><os><loader readonly='yes' type='pflash'>/c.fd</loader>"
               "<nvram type='network'><source protocol='iscsi' name='x'/></nvram></os></domain>")
    out = with_raw_formats(network, firmware_formats(12_009_000))
    assert "<nvram type='network'>" in out and out.count("format=") == 1
