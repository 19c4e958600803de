"""The real package under a real systemd (257, PID 1 of the Debian 13 bed).

`apt install ./varsd_*.deb` into the bed, then what an admin relies on: the unit is
enabled and reaches `active` only once varsd said READY; a `-bios` domain defined with
virsh is repaired by the service and boots; reload, the watchdog (fed, and a hung
daemon killed and restarted), a clean stop within TimeoutStopSec; the hardening holds
for everything varsd does (provisioning, chown to the qemu user, archive, reading
QEMU's /proc/<pid>/fd, journal); `systemd-analyze security` exposure <= 2.5; and remove
and purge leave every varstore and the archive in place.

The tests of this module run in file order on one installation (module fixture); the
last one removes and purges the package.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import testbed

from .conftest import install_deb
from .guests import BedGuest, define, inactive_xml, remove, status, varsctl, wait_booted, wait_for

EXPOSURE_LIMIT = 2.5
BOOT_NS = "https://varsd.org/xmlns/boot/1"
LIBVIRT_UNITS = ("libvirtd.socket", "libvirtd-ro.socket", "libvirtd-admin.socket", "libvirtd.service")
CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"


def show(bed: testbed.Bed, *props: str, unit: str = "varsd") -> dict[str, str]:
    out = bed.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(bed: testbed.Bed, since: str | None = None) -> str:
    args = ["journalctl", "-u", "varsd", "--no-pager", "-o", "cat"]
    if since:
        args += ["--since", since]
    return bed.run(*args).stdout


def bed_now(bed: testbed.Bed) -> str:
    return bed.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()


APT_OUTPUT: dict[str, str] = {}  # the installation's output, for the test of what it said
PENDING = "/run/varsd-qemu-hook.pending"


@pytest.fixture(scope="module")
def installed(debian13: testbed.Bed, deb_file: Path) -> Iterator[testbed.Bed]:
    # Installed where libvirtd already runs, as on most hosts (started afresh without any QEMU
    # hook, and a client connection held open so its idle timeout cannot end it meanwhile).
    debian13.run("systemctl", "restart", "libvirtd")
    debian13.sh("systemd-run --unit=varsd-test-client --collect virsh -q event --loop --all >/dev/null")
    try:
        APT_OUTPUT["install"] = install_deb(debian13, deb_file)
    finally:
        debian13.run("systemctl", "stop", "varsd-test-client", check=False)
    try:
        yield debian13
    finally:
        debian13.run("apt-get", "purge", "-y", "-q", "varsd", check=False, env={"DEBIAN_FRONTEND": "noninteractive"})


@pytest.fixture(scope="module")
def bios_guest(installed: testbed.Bed) -> Iterator[BedGuest]:
    guest = define(installed, "bios", f"<loader type='rom'>{CODE}</loader>")
    yield guest
    remove(installed, guest)


def test_install_says_libvirtd_must_restart_before_the_hook_is_in_force(installed: testbed.Bed) -> None:
    """libvirt looks for QEMU hooks only when it starts: the package says so and does not restart
    libvirtd itself; `varsctl status` reports the hook as pending until libvirtd restarted."""
    bed = installed
    said = APT_OUTPUT["install"]
    pid = bed.run("cat", "/run/libvirtd.pid").stdout.strip()
    assert f"libvirtd (pid {pid}) loads QEMU hooks only when it starts: run 'systemctl restart libvirtd'" in said, said
    assert bed.run("cat", PENDING).stdout.split()[:2] == ["libvirtd", pid]
    r = varsctl(bed, "status", "--json")
    hook = json.loads(r.stdout)["host"]["qemu_hook"]
    assert (r.returncode, hook["state"]) == (1, "pending-restart"), r.stdout
    assert "systemctl restart libvirtd" in hook["detail"]
    table = varsctl(bed, "status").stdout
    assert "qemu hook pending-restart: libvirtd (pid" in table, table
    bed.run("systemctl", "restart", "libvirtd")
    r = varsctl(bed, "status", "--json")
    assert json.loads(r.stdout)["host"]["qemu_hook"]["state"] == "active", r.stdout
    print(f"\n[distro] after install: hook pending-restart (libvirtd pid {pid}); after restart: active")


def test_installed_enabled_and_active_only_after_ready(installed: testbed.Bed) -> None:
    bed = installed
    assert bed.run("systemctl", "is-enabled", "varsd", check=False).stdout.strip() == "enabled"  # debhelper
    bed.run("systemctl", "disable", "--now", "varsd")
    # Without libvirt varsd cannot finish its first pass, so it must not say READY: the unit
    # stays `activating` (showing why in its status) until libvirt is back. (Masked for the
    # moment: the unit's Wants=libvirtd.service would otherwise start it right away.)
    bed.run("systemctl", "stop", *LIBVIRT_UNITS)
    bed.run("systemctl", "mask", "--runtime", *LIBVIRT_UNITS)
    try:
        bed.run("systemctl", "enable", "--now", "--no-block", "varsd")
        time.sleep(8)
        state = show(bed, "ActiveState", "SubState", "StatusText")
        assert (state["ActiveState"], state["SubState"]) == ("activating", "start"), state
        assert "waiting for libvirt" in state["StatusText"], state
    finally:
        bed.run("systemctl", "unmask", "--runtime", *LIBVIRT_UNITS)
        bed.run("systemctl", "start", "libvirtd.socket", "libvirtd-ro.socket", "libvirtd-admin.socket")
    wait_for(lambda: show(bed, "ActiveState")["ActiveState"] == "active", 60, "varsd active after libvirt returned")
    state = show(bed, "StatusText", "Type", "NotifyAccess")
    assert state["Type"] == "notify" and state["StatusText"].startswith("watching qemu:///system"), state
    assert "first full reconcile done" in journal(bed)


def test_bios_domain_defined_with_virsh_is_repaired_and_boots(installed: testbed.Bed, bios_guest: BedGuest) -> None:
    bed, guest = installed, bios_guest
    wait_for(lambda: status(bed, guest.name)["config"] == "split", 60, f"{guest.name} repaired by the service")
    xml = inactive_xml(bed, guest)
    assert re.search(rf"<loader[^>]*type='pflash'[^>]*>{re.escape(CODE)}</loader>", xml), xml
    assert f">{guest.varstore}</nvram>" in xml and "type='rom'" not in xml, xml
    # provisioning + chown under ProtectSystem=strict, CapabilityBoundingSet, UMask=0077
    st = bed.run("stat", "-c", "%U:%G %a %s", guest.varstore).stdout.split()
    assert st[:2] == ["libvirt-qemu:libvirt-qemu", "600"], st
    assert bed.run("cmp", guest.varstore, VARS, check=False).returncode == 0  # a fresh copy of the template
    bed.run("virsh", "-q", "start", guest.name)
    line = wait_booted(guest)
    assert "BdsDxe" in line
    # the boot record: varsd read QEMU's /proc/<pid>/fd (CAP_SYS_PTRACE, ProtectProc=invisible)
    code_sha = bed.run("sha256sum", CODE).stdout.split()[0]
    record = wait_for(lambda: bed.run("virsh", "metadata", guest.name, BOOT_NS, "--live", check=False).stdout,
                      60, "boot record in the live metadata")
    assert code_sha in record, record
    # the archive (StateDirectory=varsd, 0711) holds the build, read-only
    assert bed.run("stat", "-c", "%a", f"/var/lib/varsd/archive/{code_sha}.fd").stdout.strip() == "444"
    log = journal(bed)
    assert f"domain '{guest.name}': bios-rom -> split" in log and f"domain '{guest.name}' booted code" in log, log
    assert status(bed, guest.name)["status"] == "ok"
    assert not re.search(r"Permission denied|Read-only file system|Operation not permitted", log), log


def test_reload_rereads_config_in_the_same_process(installed: testbed.Bed) -> None:
    bed = installed
    pid = show(bed, "MainPID")["MainPID"]
    since = bed_now(bed)
    bed.run("systemctl", "reload", "varsd")
    wait_for(lambda: "configuration and firmware catalog reloaded" in journal(bed, since), 30, "reload logged")
    assert show(bed, "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}


def test_watchdog_is_fed_and_a_hung_daemon_is_restarted(installed: testbed.Bed) -> None:
    """With WatchdogSec shortened to 5 s (a runtime drop-in, removed afterwards)."""
    bed = installed
    dropin = "/run/systemd/system/varsd.service.d/varsd-test-watchdog.conf"
    bed.sh(f"mkdir -p {dropin.rsplit('/', 1)[0]} && printf '[Service]\\nWatchdogSec=5s\\nRestartSec=1s\\n' > {dropin}"
           " && systemctl daemon-reload && systemctl restart varsd")
    try:
        assert show(bed, "WatchdogUSec")["WatchdogUSec"] == "5s"
        before = show(bed, "MainPID", "NRestarts")
        time.sleep(16)  # three watchdog periods: a daemon that stopped pinging would be dead by now
        fed = show(bed, "MainPID", "NRestarts", "ActiveState", "WatchdogTimestampMonotonic")
        assert fed["MainPID"] == before["MainPID"] and fed["NRestarts"] == before["NRestarts"], (before, fed)
        assert fed["ActiveState"] == "active"
        print(f"\n[distro] watchdog fed; last ping at monotonic {fed['WatchdogTimestampMonotonic']} us")
        bed.run("kill", "-STOP", before["MainPID"])  # hung: alive, but no more WATCHDOG=1
        restarted = wait_for(lambda: (s := show(bed, "MainPID", "NRestarts", "ActiveState"))["NRestarts"]
                             != before["NRestarts"] and s["ActiveState"] == "active" and s, 60, "watchdog restart")
        assert restarted["MainPID"] != before["MainPID"]
        log = journal(bed)
        assert "Watchdog timeout" in bed.run("journalctl", "-u", "varsd", "--no-pager").stdout, log
        print(f"[distro] hung varsd {before['MainPID']} killed by the watchdog, restarted as {restarted['MainPID']}")
    finally:
        bed.sh(f"rm -f {dropin} && systemctl daemon-reload && systemctl restart varsd")


def test_stop_is_clean_and_within_timeout_stop_sec(installed: testbed.Bed, bios_guest: BedGuest) -> None:
    bed = installed
    assert bed.run("virsh", "domstate", bios_guest.name).stdout.strip() == "running"  # work to be done at stop
    limit_s = {"30s": 30, "1min": 60}.get(show(bed, "TimeoutStopUSec")["TimeoutStopUSec"])
    assert limit_s, show(bed, "TimeoutStopUSec")
    since = bed_now(bed)
    t0 = time.monotonic()
    bed.run("systemctl", "stop", "varsd", timeout=limit_s + 30)
    took = time.monotonic() - t0
    state = show(bed, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    print(f"\n[distro] systemctl stop varsd: {took:.2f} s (TimeoutStopSec {limit_s} s)")
    assert took < limit_s
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}, state
    assert "INFO varsd: stopped" in journal(bed, since).splitlines()  # its own orderly exit, not a kill
    bed.run("systemctl", "start", "varsd")


def test_the_packages_libvirt_hook_makes_a_start_wait_for_a_write_in_hand(installed: testbed.Bed) -> None:
    """The QEMU hook the package installs (/usr/libexec/varsd/qemu-hook, linked from
    /etc/libvirt/hooks/qemu.d/varsd) runs under libvirt 12.9: a `virsh start` waits, bounded,
    while a varstore write is in hand for the domain, then gives up and says so (the
    contract of varsd/engine/offline_write.py, held here by hand: flock + `wait=3`)."""
    bed = installed
    hook = "/etc/libvirt/hooks/qemu.d/varsd"
    assert bed.run("readlink", hook).stdout.strip() == "/usr/libexec/varsd/qemu-hook"
    # libvirt looks for hook scripts when it starts; the package added qemu.d after that
    bed.run("systemctl", "restart", "libvirtd")
    guest = define(bed, "hook", f"<loader readonly='yes' type='pflash'>{CODE}</loader><nvram template='{VARS}'/>")
    uuid = "none"
    try:
        uuid = bed.run("virsh", "domuuid", guest.name).stdout.strip()
        write = f"/run/varsd/offline/{uuid}.write"
        bed.sh(f"mkdir -p /run/varsd/offline && printf 'wait=3\nop=test\n' > {write}")
        holder = f"flock -x {write} sleep 20"
        bed.sh(f"systemd-run --unit=varsd-test-holder --collect {holder} >/dev/null && sleep 0.5")
        since = bed_now(bed)
        t0 = time.monotonic()
        bed.run("virsh", "-q", "start", guest.name)
        waited = time.monotonic() - t0
        print(f"\n[distro] libvirt 12.9 ran varsd's hook: the start waited {waited:.1f} s for the write in hand")
        assert waited >= 3, waited
        assert bed.run("test", "-e", f"/run/varsd/offline/{uuid}.gaveup", check=False).returncode == 0
        said = bed.run("journalctl", "-t", "varsd-hook", "--since", since, "--no-pager", "-o", "cat").stdout
        assert f"start of domain {uuid} waited 3s" in said, said
    finally:
        bed.run("systemctl", "stop", "varsd-test-holder", check=False)
        bed.run("rm", "-f", f"/run/varsd/offline/{uuid}.write", f"/run/varsd/offline/{uuid}.gaveup",
                f"/run/varsd/offline/{uuid}.commit", check=False)
        remove(bed, guest)


def test_security_exposure(installed: testbed.Bed) -> None:
    out = installed.run("systemd-analyze", "security", "--no-pager", "varsd.service").stdout
    m = re.search(r"Overall exposure level for varsd\.service: (\d+\.\d+)", out)
    assert m, out
    exposure = float(m.group(1))
    print(f"\n[distro] systemd-analyze security varsd (systemd 257, Debian 13): exposure {exposure}")
    assert exposure <= EXPOSURE_LIMIT, out


def _digests(bed: testbed.Bed, pattern: str) -> dict[str, str]:
    out = bed.sh(f"sha256sum {pattern} 2>/dev/null || true").stdout
    return {path: digest for digest, path in (line.split() for line in out.splitlines())}


def test_remove_and_purge_keep_varstores_and_archive(installed: testbed.Bed, bios_guest: BedGuest) -> None:
    bed = installed
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    bed.run("virsh", "-q", "destroy", bios_guest.name)  # a shut-off domain: its varstore must stay as it is
    kept = {**_digests(bed, "/var/lib/libvirt/qemu/nvram/*"), **_digests(bed, "/var/lib/varsd/archive/*")}
    assert bios_guest.varstore in kept and any("/archive/" in p for p in kept), kept
    bed.run("apt-get", "remove", "-y", "-q", "varsd", env=env)
    assert bed.run("systemctl", "is-active", "varsd", check=False).stdout.strip() == "inactive"
    after_remove = {**_digests(bed, "/var/lib/libvirt/qemu/nvram/*"), **_digests(bed, "/var/lib/varsd/archive/*")}
    assert after_remove == kept
    r = bed.run("apt-get", "purge", "-y", "-q", "varsd", env=env)
    assert "its state is kept: /var/lib/varsd" in r.stdout + r.stderr, r.stdout + r.stderr
    after_purge = {**_digests(bed, "/var/lib/libvirt/qemu/nvram/*"), **_digests(bed, "/var/lib/varsd/archive/*")}
    assert after_purge == kept
    assert bed.run("test", "-e", "/var/lib/varsd/state.sqlite3", check=False).returncode == 0  # the journal too
    assert bed.run("test", "-e", "/etc/varsd/varsd.toml", check=False).returncode != 0  # the conffile is gone
