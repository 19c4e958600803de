"""`varsctl status` tells the truth about a repair that failed (issue 7 item 4), on the real
libvirtd: a symlink sits where the new varstore would go. Before any attempt status says
why the repair cannot be made; after a failed `reconcile` it shows the failure (table and
JSON `last_error`) with how often it happened; once the link is gone, a reconcile succeeds,
the failure is cleared and the guest boots.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ovmf_files
from support.domains import guest_xml, with_cmdline

from varsd.adapters.libvirt_api import Hypervisor

from .guests import CODE_4M, NVRAM_DIR, open_paths, qemu_pid, varsctl, wait_for_serial

OVMF_2M_UNIFIED = ovmf_files.UNIFIED  # Debian 12's, release-aware


def _status(config: Path, name: str) -> tuple[int, dict, str]:
    js = varsctl(config, "status", "--json", name)
    table = varsctl(config, "status", name)
    (entry,) = json.loads(js.stdout)["domains"]
    assert js.returncode == table.returncode
    return js.returncode, entry, table.stdout


def test_status_shows_a_failed_repair_until_it_succeeds(hv: Hypervisor, guest_factory, config, tmp_path) -> None:
    name = guest_factory.name("link")
    link = guest_factory.track(f"{NVRAM_DIR}/{name}_VARS.fd")
    os.symlink(tmp_path / "elsewhere_VARS.fd", link)
    g = guest_factory.define(name, xml=with_cmdline(guest_xml(name, "", serial_log="{serial_log}"),
                                                    ["-bios", OVMF_2M_UNIFIED]))

    rc, entry, table = _status(config, g.name)
    assert (rc, entry["status"], entry["last_error"]) == (1, "error", None)
    assert entry["detail"].startswith("cannot be repaired:") and "symbolic link" in entry["detail"]
    assert "the daemon does" not in table and "symbolic link" in table

    for _ in range(2):
        r = varsctl(config, "reconcile", g.name)
        assert r.returncode == 1, r.stdout + r.stderr
    rc, entry, table = _status(config, g.name)
    assert (rc, entry["status"]) == (1, "error")
    last = entry["last_error"]
    assert last["count"] == 2 and last["action"].startswith(f"create varstore {link}")
    assert "symbolic link" in last["error"] and last["at"] >= last["first_at"]
    assert "last attempt failed at" in table and "2 attempts since" in table and "symbolic link" in table
    assert link.is_symlink(), "the link was never followed or replaced"

    link.unlink()
    r = varsctl(config, "reconcile", g.name)
    assert r.returncode == 0, r.stdout + r.stderr
    rc, entry, table = _status(config, g.name)
    assert (rc, entry["status"], entry["last_error"]) == (0, "ok", None)
    assert "last attempt failed" not in table

    hv.start(g.uuid)
    try:
        wait_for_serial(g.serial_log, r"BdsDxe: (loading|starting) Boot", timeout=240)
        files = open_paths(qemu_pid(g.name))
        assert CODE_4M in files and str(link) in files, sorted(files)
    finally:
        hv.destroy(g.uuid)


def test_status_says_the_qemu_hook_is_in_force(guest_factory, config) -> None:
    """On the local system daemon `status` judges varsd's QEMU hook: scripts/host-setup (and the
    Debian 13 bed's tier) put it in place before libvirtd started, so it is in force."""
    name = guest_factory.name("hook")
    g = guest_factory.define(name, xml=guest_xml(name, "", serial_log="{serial_log}"))
    js = varsctl(config, "status", "--json", g.name)
    hook = json.loads(js.stdout)["host"]["qemu_hook"]
    assert hook == {"state": "active", "detail": "/etc/libvirt/hooks/qemu.d/varsd is in force"}, js.stdout
    assert "qemu hook" not in varsctl(config, "status", g.name).stdout  # the table speaks only of trouble
