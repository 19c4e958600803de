"""varsd as a process against the real libvirtd: it repairs what is defined while it
runs, survives libvirtd going away (converging what was defined meanwhile), and a
SIGTERM in the middle of a burst leaves nothing half-written.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import ovmf_files
import pytest
from lxml import etree
from support.domains import guest_xml

from varsd.adapters.libvirt_api import Hypervisor
from varsd.errors import HypervisorError

from .guests import CODE_4M, NVRAM_DIR, VARS_4M, open_files, qemu_pid, wait_for_serial

OVMF_2M_UNIFIED = ovmf_files.UNIFIED  # Debian 12's, release-aware
LIBVIRT_QEMU_CONF_DIR = "/etc/libvirt/qemu"


class Daemon:
    """A varsd process with its sd_notify socket, so the test sees READY=1 like systemd would."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.config = tmp_path / "varsd.toml"
        self.config.write_text(f'state_dir = "{tmp_path / "state"}"\nreconcile_interval = 3600\n')
        self.log = tmp_path / "varsd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_path = str(tmp_path / "notify.sock")

    def start(self) -> None:
        if os.path.exists(self.notify_path):
            os.unlink(self.notify_path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.notify_path)
        self.sock.settimeout(0.5)
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "varsd.daemon.main", "--config", str(self.config), "--log-level", "debug"],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),
            env=env,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"varsd died:\n{self.log.read_text()}"
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in msg.split("\n"):
                return
        raise AssertionError(f"varsd never sent READY=1:\n{self.log.read_text()}")

    def stop(self, timeout: float = 10) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.sock.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    d.kill()


def rom_os() -> str:
    return f"<loader type='rom'>{OVMF_2M_UNIFIED}</loader>"


def repaired(hv: Hypervisor, uuid: str) -> bool:
    try:
        return "<nvram" in hv.persistent_xml(uuid)
    except HypervisorError:
        return False


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s: {what}")


def test_bios_domain_defined_while_varsd_runs_is_repaired_and_boots(hv, guest_factory, daemon) -> None:
    daemon.start()
    daemon.wait_ready()
    g = guest_factory.define("live", rom_os(), machine="pc")
    wait_until(lambda: repaired(hv, g.uuid), 10, "varsd repairs the new domain without any varsctl call")
    varstore = f"{NVRAM_DIR}/{g.name}_VARS.fd"
    st = os.stat(varstore)
    assert (st.st_mode & 0o777) == 0o600
    assert Path(varstore).read_bytes() == Path(VARS_4M).read_bytes()
    hv.start(g.uuid)
    try:
        wait_for_serial(g.serial_log, r"BdsDxe: (loading|starting) Boot", timeout=120)
        files = open_files(qemu_pid(g.name))
        assert CODE_4M in files and varstore in files
        # The start event is recorded: live metadata names the build QEMU has open.
        wait_until(lambda: hv.get_metadata(g.uuid, ns_uri="https://varsd.org/xmlns/boot/1", live=True), 10,
                   "boot record")
    finally:
        hv.destroy(g.uuid)
    assert daemon.stop() == 0


def _libvirtd_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


# Under systemd (the Debian bed: tests/distro) libvirtd is socket-activated: stopping the
# process alone would let the next connection start it again, so the units are stopped.
# There pgrep sees only the bed's own processes (its PID namespace), never the host's.
_UNDER_SYSTEMD = os.path.isdir("/run/systemd/system")
_LIBVIRTD_UNITS = ("libvirtd.socket", "libvirtd-ro.socket", "libvirtd-admin.socket", "libvirtd.service")


def _stop_libvirtd() -> None:
    if _UNDER_SYSTEMD:
        subprocess.run(["systemctl", "stop", *_LIBVIRTD_UNITS], check=True)
    for pid in _libvirtd_pids():
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not _libvirtd_pids(), 30, "libvirtd exits")


def _start_libvirtd() -> None:
    if _UNDER_SYSTEMD:
        subprocess.run(["systemctl", "start", *_LIBVIRTD_UNITS], check=True)
    else:
        subprocess.run(["libvirtd", "-d"], check=True)
    wait_until(
        lambda: subprocess.run(["virsh", "-c", "qemu:///system", "uri"], capture_output=True).returncode == 0,
        30,
        "libvirtd answers",
    )


def test_varsd_survives_libvirtd_restart_and_converges(hv, guest_factory, daemon, tmp_path) -> None:
    daemon.start()
    daemon.wait_ready()
    # A domain libvirtd learns about while it is down: its config file appears meanwhile,
    # so no DEFINED event will ever be sent. Only the full pass on reconnect finds it.
    offline_name = guest_factory.name("offline")
    offline_uuid = str(uuidlib.uuid4())
    offline_xml = guest_xml(offline_name, rom_os(), machine="pc", serial_log=str(tmp_path / "offline.log"))
    root = etree.fromstring(offline_xml)
    etree.SubElement(root, "uuid").text = offline_uuid
    etree.SubElement(root, "description").text = "varsd-test owner=offline-define"
    conf = Path(LIBVIRT_QEMU_CONF_DIR) / f"{offline_name}.xml"
    try:
        _stop_libvirtd()
        conf.write_text(etree.tostring(root, encoding="unicode"))
        time.sleep(3)  # varsd retries with backoff meanwhile; it must neither exit nor spin
        assert daemon.proc is not None and daemon.proc.poll() is None, "varsd exited while libvirtd was away"
        _start_libvirtd()
        hv.close()
        hv.open()
        wait_until(lambda: repaired(hv, offline_uuid), 60, "domain defined while libvirtd was down is repaired")
        after = guest_factory.define("after", rom_os(), machine="pc")
        wait_until(lambda: repaired(hv, after.uuid), 15, "domain defined after the restart is repaired")
        assert daemon.proc.poll() is None
        log = daemon.log.read_text()
        assert "reconnecting" in log or "not reachable" in log
    finally:
        if not _libvirtd_pids():
            _start_libvirtd()
        hv.close()
        hv.open()
        try:
            hv.undefine(offline_uuid, remove_nvram=True)
        except HypervisorError:
            conf.unlink(missing_ok=True)
    assert daemon.stop() == 0


def test_sigterm_during_a_burst_leaves_nothing_half_written(hv, guest_factory, daemon) -> None:
    daemon.start()
    daemon.wait_ready()
    guests = [guest_factory.define(f"burst{i:02d}", rom_os(), machine="pc") for i in range(30)]
    wait_until(lambda: any(repaired(hv, g.uuid) for g in guests), 15, "the burst starts converging")
    t0 = time.monotonic()
    assert daemon.stop(timeout=10) == 0
    assert time.monotonic() - t0 < 10
    template = Path(VARS_4M).read_bytes()
    assert not [p for p in os.listdir(NVRAM_DIR) if ".varsd-tmp." in p], "temp files left behind"
    for g in guests:
        vs = Path(NVRAM_DIR) / f"{g.name}_VARS.fd"
        if vs.exists():
            assert vs.read_bytes() == template, f"{vs} is half-written"
    # The next start converges the rest.
    daemon.start()
    daemon.wait_ready()
    wait_until(lambda: all(repaired(hv, g.uuid) for g in guests), 60, "the rest converges after restart")
    for g in guests:
        assert (Path(NVRAM_DIR) / f"{g.name}_VARS.fd").read_bytes() == template
    assert daemon.stop() == 0
