"""Debian 12 -> 13 on real paths (issue 7 item 1), in a Debian 13 bed of its own.

The host-tier test (tests/integration/test_debian13_upgrade.py) upgrades a private
`dpkg --root`, and its "central 4 MiB code" is the host's Debian 12 build. Here nothing is
redirected: Debian 12's `ovmf` (2022.11-6+deb12u2) is installed over the bed's with a real
`dpkg -i`, into /usr/share/OVMF, and varsd runs from this checkout with its DEFAULT
configuration (no config file: /var/lib/varsd, /usr/share/qemu/firmware, discovery in
/usr/share/OVMF...). Two guests from before 2023, each with a boot entry: plain 2 MiB
`OVMF_CODE.fd` and Secure Boot `OVMF_CODE.ms.fd` with Microsoft's keys. Then a real
`dpkg -i` of Debian 13's `ovmf` deletes their code: both still start (held on the
archived build, `needs-migration`), `varsctl migrate` keeps their boot entries and
PK/KEK/db/dbx, and both boot Debian 13's central 4 MiB code (QEMU's open files, by digest).

The bed is this module's own (a fresh overlay of the cached tree), so the downgrade and
upgrade never reach another test.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Iterator

import pytest
import testbed
from debian_debs import ovmf_debs
from integration.test_migrate import EFI_GLOBAL, IMAGE_SECURITY_DB, NO_S3, SECURE_FEATURES, _load_option
from support.domains import guest_xml, split_os
from support.varstores import read_variables

from varsd.adapters import virtfw

from .conftest import REPO
from .guests import NVRAM_DIR, BedGuest, remove, varsctl, wait_booted

OVMF = "/usr/share/OVMF"
STATE = "/var/lib/varsd"  # the default state_dir: archived builds live there
SOURCE_VARSCTL = f"env PYTHONPATH={testbed.SOURCE} PYTHONDONTWRITEBYTECODE=1 python3 -m varsd.cli.varsctl"
KEYS = (f"{EFI_GLOBAL}:PK", f"{EFI_GLOBAL}:KEK", f"{IMAGE_SECURITY_DB}:db", f"{IMAGE_SECURITY_DB}:dbx")
ENTRY = (f"{EFI_GLOBAL}:Boot0007", f"{EFI_GLOBAL}:BootOrder")


@pytest.fixture(scope="module")
def bed() -> Iterator[testbed.Bed]:
    with testbed.Bed(testbed.TRIXIE, repo=REPO) as upgrade_bed:
        assert not upgrade_bed.path("/etc/varsd/varsd.toml").exists()  # the default configuration
        yield upgrade_bed


def _dpkg_i(bed: testbed.Bed, deb) -> None:
    shutil.copyfile(deb, bed.share / deb.name)
    bed.run("dpkg", "-i", f"{testbed.SHARE}/{deb.name}", env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300)


def _sha(bed: testbed.Bed, path: str) -> str:
    return bed.run("sha256sum", path).stdout.split()[0]


def _open_files(bed: testbed.Bed, name: str) -> dict[str, str]:
    """Firmware files the domain's QEMU holds open: path as opened -> digest of the open file."""
    out = bed.sh(f"pid=$(cat /run/libvirt/qemu/{name}.pid); for fd in /proc/$pid/fd/*; do "
                 "l=$(readlink $fd) || continue; case \"$l\" in *.fd|*.fd\\ \\(deleted\\)) "
                 "echo \"$l|$(sha256sum < $fd | cut -d' ' -f1)\";; esac; done").stdout
    held = (line.rsplit("|", 1) for line in out.splitlines() if line)
    return {path.removesuffix(" (deleted)"): sha for path, sha in held}


def _varstore(bed: testbed.Bed, name: str, template: str) -> str:
    """A guest's own varstore from before the upgrade: the template plus a boot entry, 0600, qemu's."""
    path = f"{NVRAM_DIR}/{name}_VARS.fd"
    bed.path(path).write_bytes(virtfw.with_variables(str(bed.path(template)), [
        virtfw.EfiVariable("Boot0007", EFI_GLOBAL, 7, _load_option("installer", r"\EFI\debian\shimx64.efi")),
        virtfw.EfiVariable("BootOrder", EFI_GLOBAL, 7, b"\x07\x00"),
    ]))
    bed.run("chown", "libvirt-qemu:libvirt-qemu", path)
    bed.run("chmod", "0600", path)
    return path


def _old_guest(bed: testbed.Bed, label: str, code: str, template: str, *, secure: bool) -> BedGuest:
    """A guest made years ago: split on Debian 12's 2 MiB build, its own varstore with a boot entry."""
    name = f"varsd-test-{secrets.token_hex(3)}-{label}"
    serial = f"{testbed.SHARE}/{name}.serial.log"
    os_inner = split_os(f"{OVMF}/{code}", _varstore(bed, name, f"{OVMF}/{template}"), template=f"{OVMF}/{template}",
                        secure=secure)
    xml = guest_xml(name, os_inner, serial_log=serial, **({"features": SECURE_FEATURES} if secure else {}))
    if secure:  # Debian 12's 2 MiB Secure Boot build hangs while QEMU offers S3
        xml = xml.replace("</features>", "</features>" + NO_S3, 1)
    (bed.share / f"{name}.xml").write_text(xml)
    bed.run("virsh", "-q", "define", f"{testbed.SHARE}/{name}.xml")
    return BedGuest(name, serial, bed.share / f"{name}.serial.log")


def _statuses(bed: testbed.Bed, names: list[str]) -> dict[str, dict]:
    r = varsctl(bed, "status", "--json", *names, program=SOURCE_VARSCTL)
    return {d["name"]: d for d in json.loads(r.stdout)["domains"]}


def _boot(bed: testbed.Bed, guests: list[BedGuest], *, silent: set[str] = frozenset()) -> dict[str, dict[str, str]]:
    """Start every guest, each reaching its boot manager (or, for Debian 12's silent 2 MiB Secure
    Boot build, still running after 20 s); QEMU's open firmware files of each, then shut off."""
    for g in guests:
        g.serial_host.unlink(missing_ok=True)
        bed.run("virsh", "-q", "start", g.name)
    try:
        opened = {}
        for g in guests:
            if g.name in silent:
                time.sleep(20)
                assert "running" in bed.run("virsh", "domstate", g.name).stdout, f"{g.name} stopped"
            else:
                wait_booted(g, timeout=300)
            opened[g.name] = _open_files(bed, g.name)
        return opened
    finally:
        for g in guests:
            bed.run("virsh", "-q", "destroy", g.name, check=False)


def test_2mib_guests_survive_the_debian13_upgrade_on_real_paths(bed: testbed.Bed) -> None:
    debs = ovmf_debs()
    _dpkg_i(bed, debs["12"])  # Debian 12's ovmf over the bed's (a downgrade, as a Debian 12 host has it)
    assert bed.run("dpkg-query", "-W", "-f=${Version}", "ovmf").stdout == "2022.11-6+deb12u2"
    debian12_code = set(bed.sh(f"sha256sum {OVMF}/*.fd | cut -d' ' -f1").stdout.split())

    guests = [_old_guest(bed, "plain2m", "OVMF_CODE.fd", "OVMF_VARS.fd", secure=False),
              _old_guest(bed, "sb2m", "OVMF_CODE.ms.fd", "OVMF_VARS.ms.fd", secure=True)]
    plain, sb = guests
    try:
        names = [g.name for g in guests]

        # Debian 12, default configuration: both are known builds (discovered), bound and archived.
        r = varsctl(bed, "reconcile", "--json", *names, program=SOURCE_VARSCTL)
        assert r.returncode == 0, r.stdout + r.stderr
        before = _statuses(bed, names)
        assert {n: (d["status"], d["config"]) for n, d in before.items()} == dict.fromkeys(names, ("ok", "split"))
        archived = {n: f"{STATE}/archive/{d['build']}.fd" for n, d in before.items()}
        assert all(bed.path(p).exists() for p in archived.values()), archived

        # The upgrade: a real dpkg -i of Debian 13's ovmf removes the 2 MiB files from /usr/share/OVMF.
        _dpkg_i(bed, debs["13"])
        assert not bed.path(f"{OVMF}/OVMF_CODE.fd").exists() and not bed.path(f"{OVMF}/OVMF_CODE.secboot.fd").exists()
        sync = varsctl(bed, "firmware", "sync", program=SOURCE_VARSCTL)  # what the package hook runs
        assert sync.returncode == 1, sync.stdout + sync.stderr  # attention: domains need migration
        held = _statuses(bed, names)
        for n, d in held.items():
            assert d["status"] == "needs-migration" and "varsctl migrate" in d["detail"], d
            assert d["code"] == archived[n], d["detail"]
        opened = _boot(bed, guests, silent={sb.name})
        for g in guests:
            assert archived[g.name] in opened[g.name] and g.varstore in opened[g.name], opened[g.name]

        old = {g.name: read_variables(str(bed.path(g.varstore))) for g in guests}
        assert all(k in old[sb.name] for k in KEYS + ENTRY) and all(k in old[plain.name] for k in ENTRY)
        m = varsctl(bed, "migrate", "--all", program=SOURCE_VARSCTL)  # the bed holds only these two
        assert m.returncode == 0, m.stdout + m.stderr
        for g in guests:
            new = read_variables(str(bed.path(g.varstore)))
            for key in (KEYS if g is sb else ()) + ENTRY:
                assert new[key] == old[g.name][key], f"{g.name}: {key} changed in the migration"
            assert virtfw.read_layout(str(bed.path(g.varstore))).size == 540672

        after = _statuses(bed, names)
        assert {n: d["status"] for n, d in after.items()} == dict.fromkeys(names, "ok"), after
        opened = _boot(bed, guests)  # Debian 13's 4 MiB builds print their boot manager lines, SB too
        for g in guests:
            code = bed.run("readlink", "-f", after[g.name]["code"]).stdout.strip()  # .ms.fd is a symlink
            assert code.startswith(f"{OVMF}/OVMF_CODE_4M") and code in opened[g.name], (code, opened[g.name])
            assert opened[g.name][code] == _sha(bed, code) and opened[g.name][code] not in debian12_code
            assert g.varstore in opened[g.name]
    finally:
        for g in guests:
            remove(bed, g)
