"""libvirt >= 9.2 behaviour, on the real libvirt 12.9 + QEMU 11.1 of the Debian 13 bed.

varsd runs here from this checkout (bound at /srv/varsd) on Debian 13's own python3
packages: python3-libvirt, python3-lxml, python3-apscheduler and python3-virt-firmware
24.11, not the newest from PyPI.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import testbed

from .conftest import REPO
from .guests import define, inactive_xml, remove, status, varsctl, wait_booted

CASES = REPO / "tests" / "planning" / "cases"
CONFIG = f"{testbed.SHARE}/libvirt12.toml"
SOURCE_VARSCTL = (f"env PYTHONPATH={testbed.SOURCE} PYTHONDONTWRITEBYTECODE=1 "
                  f"python3 -m varsd.cli.varsctl --config {CONFIG}")


@pytest.fixture(scope="module")
def bed(debian13: testbed.Bed) -> Iterator[testbed.Bed]:
    # only this module's domains; the journal in the shared directory
    (debian13.share / "libvirt12.toml").write_text(
        f'state_dir = "{testbed.SHARE}/libvirt12-state"\nexclude = ["[!v]*", "v[!a]*", "va[!r]*"]\n')
    yield debian13


def _os_element(xml: str) -> str:
    m = re.search(r"<os\b.*?</os>", xml, re.S)
    assert m, xml
    return m.group(0)


def test_varsd_uses_debian13s_own_python_packages(bed: testbed.Bed) -> None:
    r = bed.run("dpkg-query", "-W", "-f=${Package} ${Version}\n", "python3-virt-firmware", "python3-libvirt",
                "python3-lxml", "python3-apscheduler", "libvirt-daemon", "qemu-system-x86", "ovmf")
    versions = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    print("\n[distro] Debian 13 bed: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    assert versions["python3-virt-firmware"].startswith("24.11")
    assert versions["libvirt-daemon"].startswith("12.") and "qemu-system-x86" in versions
    where = bed.run("env", f"PYTHONPATH={testbed.SOURCE}", "python3", "-c",
                    "import virt.firmware, libvirt, varsd.adapters.virtfw; print(virt.firmware.__file__)").stdout
    assert where.startswith("/usr/lib/python3/dist-packages/virt/"), where


def test_golden_cases_are_valid_for_libvirt_12_9s_schema(bed: testbed.Bed) -> None:
    """Every planner case (what varsd reads and what it writes) against 12.9's domain.rng."""
    files = sorted(p.relative_to(CASES) for p in CASES.glob("*/*.xml"))
    assert len(files) > 40
    r = bed.sh(f"cd {testbed.SOURCE}/tests/planning/cases && for f in */*.xml; do "
               "virt-xml-validate \"$f\" domain >/dev/null 2>&1 || echo \"INVALID $f\"; done")
    assert "INVALID" not in r.stdout, r.stdout


def test_golden_expected_xml_is_accepted_by_libvirt_12_9s_qemu_driver(bed: testbed.Bed) -> None:
    """What varsd writes defines on 12.9 (schema *and* the QEMU driver's checks); the cases
    are KVM hosts' XML and the bed has no /dev/kvm, so they are defined as type='qemu'."""
    refused = []
    for expected in sorted(CASES.glob("*/expected.xml")):
        xml = re.sub(r"<domain type=['\"]kvm['\"]", "<domain type='qemu'", expected.read_text(), count=1)
        name = re.search(r"<name>([^<]+)</name>", xml).group(1)
        (bed.share / "case.xml").write_text(xml)
        r = bed.run("virsh", "-q", "define", "--validate", f"{testbed.SHARE}/case.xml", check=False)
        if r.returncode != 0:
            refused.append(f"{expected.parent.name}: {r.stderr.strip()}")
            continue
        bed.run("virsh", "-q", "undefine", "--keep-nvram", name)
    assert not refused, "\n".join(refused)


def test_efi_autoselection_frozen_by_libvirt_is_bound_and_never_fought(bed: testbed.Bed) -> None:
    """libvirt >= 9.2 resolves <os firmware='efi'> at define time (12.9 picks the Secure Boot +
    Microsoft keys build) and writes paths, <firmware> features, format and templateFormat into
    the XML. varsd classifies that as split, provisions the varstore from the template libvirt
    chose, binds the domain to libvirt's code, and changes none of libvirt's choices."""
    guest = define(bed, "efi", "", os_firmware="efi")
    try:
        before = inactive_xml(bed, guest)
        os_before = _os_element(before)
        assert "firmware='efi'" in os_before and "name='secure-boot'" in os_before, os_before
        assert "templateFormat='raw'" in os_before and "format='raw'" in os_before, os_before
        code = re.search(r"<loader[^>]*>([^<]+)</loader>", os_before).group(1)
        template = re.search(r"<nvram[^>]*template='([^']+)'", os_before).group(1)
        entry = status(bed, guest.name, program=SOURCE_VARSCTL)
        assert entry["config"] == "split", entry

        r = varsctl(bed, "reconcile", "--json", guest.name, program=SOURCE_VARSCTL)
        assert r.returncode == 0, r.stdout + r.stderr
        after = inactive_xml(bed, guest)
        assert _os_element(after) == os_before  # libvirt's choice, untouched
        assert re.search(rf"<varsd:build code=[\"']{re.escape(code)}[\"'] sha256=[\"'][0-9a-f]{{64}}", after), after
        assert bed.run("cmp", guest.varstore, template, check=False).returncode == 0  # from libvirt's template
        assert status(bed, guest.name, program=SOURCE_VARSCTL)["status"] == "ok"

        journal = json.loads(varsctl(bed, "journal", "--json", guest.name, program=SOURCE_VARSCTL).stdout)
        r = varsctl(bed, "reconcile", guest.name, program=SOURCE_VARSCTL)  # idempotent
        assert r.returncode == 0 and inactive_xml(bed, guest) == after
        assert json.loads(varsctl(bed, "journal", "--json", guest.name, program=SOURCE_VARSCTL).stdout) == journal

        bed.run("virsh", "-q", "start", guest.name)
        assert "BdsDxe" in wait_booted(guest)
        assert bed.run("cmp", guest.varstore, template, check=False).returncode != 0  # OVMF wrote its varstore
    finally:
        remove(bed, guest)


def test_explicit_split_xml_gets_libvirts_firmware_description_and_stays_bound(bed: testbed.Bed) -> None:
    """12.9 also describes explicit paths it finds in a descriptor (firmware='efi', features
    enabled='no', format='raw') when varsd's repair is defined: the repaired domain keeps that,
    and a second reconcile does not fight it (no redefinition, no journal entry)."""
    guest = define(bed, "rom", "<loader type='rom'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>")
    try:
        r = varsctl(bed, "reconcile", guest.name, program=SOURCE_VARSCTL)
        assert r.returncode == 0, r.stdout + r.stderr
        repaired = inactive_xml(bed, guest)
        os_el = _os_element(repaired)
        assert "type='pflash'" in os_el and f"{guest.varstore}</nvram>" in os_el, os_el
        assert "firmware='efi'" in os_el and "format='raw'" in os_el, os_el  # libvirt's own additions
        journal = varsctl(bed, "journal", "--json", guest.name, program=SOURCE_VARSCTL).stdout
        assert varsctl(bed, "reconcile", guest.name, program=SOURCE_VARSCTL).returncode == 0
        assert inactive_xml(bed, guest) == repaired
        assert varsctl(bed, "journal", "--json", guest.name, program=SOURCE_VARSCTL).stdout == journal
        bed.run("virsh", "-q", "start", guest.name)
        assert "BdsDxe" in wait_booted(guest)
    finally:
        remove(bed, guest)


def test_json_varstore_domain_is_its_own_class_and_never_rewritten(bed: testbed.Bed) -> None:
    """libvirt 12.1+ <varstore> with a ROM loader (QEMU 11.1 has uefi-vars-x64; Debian ships no
    qemuvars OVMF build, so this is defined, classified and reconciled, not booted).

    The JSON file libvirt assigned does not exist yet: QEMU would start the guest with no
    variables, so varsd provisions it from its template first (here the Secure Boot template
    as Debian 13's virt-firmware 24.11 writes it as JSON), and `status` says so until then."""
    template = "/var/lib/varsd-test/OVMF_VARS_4M.ms.qemuvars.json"
    bed.sh(f"mkdir -p /var/lib/varsd-test && virt-fw-vars --input /usr/share/OVMF/OVMF_VARS_4M.ms.fd "
           f"--output-json {template} >/dev/null")
    guest = define(bed, "json-vars", "<loader type='rom'>/usr/share/OVMF/OVMF.qemuvars.fd</loader>"
                   f"<varstore template='{template}'/>")
    try:
        before = inactive_xml(bed, guest)
        path = f"/var/lib/libvirt/qemu/varstore/{guest.name}.json"
        assert f"path='{path}'" in before, _os_element(before)  # libvirt assigned it at define
        assert "uefi-vars-x64" in bed.run("qemu-system-x86_64", "-device", "help").stdout
        assert not bed.path(path).exists()
        entry = status(bed, guest.name, program=SOURCE_VARSCTL)
        assert (entry["config"], entry["status"], entry["varstore"]) == ("uefi-vars", "error", path), entry
        assert f"JSON varstore {path} does not exist: provisioned from {template}" in entry["detail"], entry
        r = varsctl(bed, "reconcile", guest.name, program=SOURCE_VARSCTL)
        assert r.returncode == 0, r.stdout + r.stderr
        assert bed.path(path).read_bytes() == bed.path(template).read_bytes()
        mode_owner = bed.run("stat", "-c", "%a %U", path).stdout.split()
        assert mode_owner == ["600", "libvirt-qemu"], mode_owner
        entry = status(bed, guest.name, program=SOURCE_VARSCTL)
        assert (entry["config"], entry["status"], entry["varstore"]) == ("uefi-vars", "ok", path), entry
        assert inactive_xml(bed, guest) == before  # never rewritten into pflash

        # An empty file is a store without variables too; one with content is never touched.
        bed.run("truncate", "-s", "0", path)
        assert status(bed, guest.name, program=SOURCE_VARSCTL)["status"] == "error"
        assert varsctl(bed, "reconcile", guest.name, program=SOURCE_VARSCTL).returncode == 0
        assert bed.path(path).read_bytes() == bed.path(template).read_bytes()
        again = varsctl(bed, "reconcile", "--json", guest.name, program=SOURCE_VARSCTL)
        assert again.returncode == 0 and json.loads(again.stdout)["domains"][0]["changes"] == [], again.stdout
        assert inactive_xml(bed, guest) == before
    finally:
        remove(bed, guest)
        bed.run("rm", "-f", f"/var/lib/libvirt/qemu/varstore/{guest.name}.json")


def test_a_json_varstore_template_that_is_not_one_is_an_error_naming_it(bed: testbed.Bed) -> None:
    """Pointing <varstore template> at a pflash template (the likely mix-up) provisions nothing."""
    template = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
    guest = define(bed, "json-bad", "<loader type='rom'>/usr/share/OVMF/OVMF.qemuvars.fd</loader>"
                   f"<varstore template='{template}'/>")
    try:
        path = f"/var/lib/libvirt/qemu/varstore/{guest.name}.json"
        entry = status(bed, guest.name, program=SOURCE_VARSCTL)
        assert entry["status"] == "error" and f"{template}: not a QEMU JSON varstore" in entry["detail"], entry
        r = varsctl(bed, "reconcile", guest.name, program=SOURCE_VARSCTL)
        assert r.returncode == 1 and f"{template}: not a QEMU JSON varstore" in r.stdout + r.stderr, r.stdout
        assert not bed.path(path).exists()
    finally:
        remove(bed, guest)
