"""A real firmware upgrade in the Debian 13 bed, through the installed varsd package.

With varsd installed (its daemon running under systemd) and a guest running, Debian 13's
`ovmf` 2025.02 is upgraded to unstable's (2026.08, where `ovmf` is a metapackage over
`ovmf-generic`, `ovmf-amdsev`, `ovmf-inteltdx`; the .debs were fetched for unstable
explicitly when the bed's tree was built). The package's own dpkg file trigger runs
`varsctl firmware sync`; then the running guest is `pending-cold-boot` and still executes
the old build (the deleted inode QEMU holds), the shut-off domain's varstore is
byte-identical, and the next cold boot maps the new code. The Microsoft-keyed template
becomes 2023-ready: Debian 13's `OVMF_VARS_4M.ms.fd` holds the 2011 CAs only
(`update-available`), unstable's already has the 2023 KEK and db CAs (`ok`: new guests
need no update).

This module boots its own bed (a fresh overlay of the cached tree), so the upgrade never
reaches another test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import testbed

from .conftest import install_deb
from .guests import define, remove, status, varsctl, wait_booted, wait_for

CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
VARS_MS = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
UNSTABLE_DEBS = "/var/cache/varsd-bed/debs/unstable"


@pytest.fixture(scope="module")
def bed(deb_file: Path) -> Iterator[testbed.Bed]:
    with testbed.Bed(testbed.TRIXIE) as upgrade_bed:
        install_deb(upgrade_bed, deb_file)
        yield upgrade_bed


def _sha(bed: testbed.Bed, path: str) -> str:
    return bed.run("sha256sum", path).stdout.split()[0]


def _open_code(bed: testbed.Bed, name: str) -> tuple[str, str]:
    """(link target, sha256) of the firmware code file the domain's QEMU holds open."""
    out = bed.sh(f"pid=$(cat /run/libvirt/qemu/{name}.pid); for fd in /proc/$pid/fd/*; do "
                 "l=$(readlink $fd) || continue; case \"$l\" in *_VARS.fd*) ;; *.fd|*.fd\\ \\(deleted\\)) "
                 "echo \"$l|$(sha256sum < $fd | cut -d' ' -f1)\";; esac; done").stdout.split("\n")
    held = [line.split("|") for line in out if line]
    assert len(held) == 1, f"{name}: QEMU holds {held}"
    return held[0][0], held[0][1]


def _template_ms2023(bed: testbed.Bed) -> str:
    """The `ms2023` state varsctl gives the Microsoft-keyed 4 MiB template."""
    doc = json.loads(varsctl(bed, "secureboot", "status", "--json").stdout)
    return {t["varstore"]: t["ms2023"] for t in doc["templates"]}[VARS_MS]


def _version(bed: testbed.Bed, pkg: str) -> str:
    return bed.run("dpkg-query", "-W", "-f=${Version}", pkg).stdout


def test_ovmf_upgrade_to_unstable_through_the_packages_trigger(bed: testbed.Bed) -> None:
    running = define(bed, "running", f"<loader type='rom'>{CODE}</loader>")
    idle = define(bed, "idle", f"<loader type='rom'>{CODE}</loader>")
    try:
        for guest in (running, idle):  # the daemon repairs what virsh defined
            wait_for(lambda g=guest: status(bed, g.name)["config"] == "split", 60, f"{guest.name} repaired")
            bed.run("virsh", "-q", "start", guest.name)
            wait_booted(guest)
        bed.run("virsh", "-q", "destroy", idle.name)  # shut off, with a varstore OVMF wrote
        old_code = _sha(bed, CODE)
        idle_varstore = _sha(bed, idle.varstore)
        old_pid = bed.run("cat", f"/run/libvirt/qemu/{running.name}.pid").stdout.strip()
        assert _open_code(bed, running.name) == (CODE, old_code)
        before = _version(bed, "ovmf")
        assert before.startswith("2025.02"), before
        assert _template_ms2023(bed) == "update-available"  # 2025.02-8+deb13u1: the 2011 CAs only

        debs = bed.sh(f"ls {UNSTABLE_DEBS}/*.deb").stdout.split()
        r = bed.run("apt-get", "install", "-y", "-q", *debs, env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
        out = r.stdout + r.stderr
        after = _version(bed, "ovmf")
        print(f"\n[distro] ovmf {before} -> {after} ({', '.join(Path(d).name for d in debs)})")
        assert after.startswith("2026.") and _version(bed, "ovmf-generic") == after, out
        assert "Processing triggers for varsd" in out, out
        assert "varsd: firmware sync done (triggered by: /usr/share" in out, out
        new_code = _sha(bed, CODE)
        assert new_code != old_code, "unstable's OVMF_CODE_4M.fd should be another build"
        assert _template_ms2023(bed) == "ok"  # unstable's template carries the 2023 CAs already

        # the running guest: still the old build (QEMU's deleted inode), new code at its next cold boot
        assert bed.run("cat", f"/run/libvirt/qemu/{running.name}.pid").stdout.strip() == old_pid
        assert _open_code(bed, running.name) == (f"{CODE} (deleted)", old_code)
        entry = status(bed, running.name)
        assert entry["status"] == "pending-cold-boot", entry
        # the shut-off domain: varstore untouched, bound to the new build
        assert _sha(bed, idle.varstore) == idle_varstore
        assert status(bed, idle.name)["status"] == "ok"

        bed.run("virsh", "-q", "destroy", running.name)
        bed.run("virsh", "-q", "start", running.name)
        wait_for(lambda: _open_code(bed, running.name) == (CODE, new_code), 30, "cold boot maps the new code")
        wait_for(lambda: status(bed, running.name)["status"] == "ok", 60, f"{running.name} ok after its cold boot")
        bed.run("virsh", "-q", "start", idle.name)
        assert _open_code(bed, idle.name) == (CODE, new_code)
    finally:
        remove(bed, running)
        remove(bed, idle)
