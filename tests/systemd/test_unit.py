"""systemd/varsd.service: systemd itself accepts it without a warning, and it is hardened.

`systemd-analyze` comes with the `systemd` package that scripts/host-setup installs; a
host without it fails these tests rather than skipping them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from varsd.config import Config

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "varsd.service"
# What the daemon may need: chown new varstores to the qemu user and write them into
# directories it does not own; read /proc/<qemu pid>/fd of the guests it inspects.
ALLOWED_CAPS = {"CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"}


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze not found: run scripts/host-setup (it installs the 'systemd' package)"
    return path


def _varsd_executable() -> str:
    path = os.path.join(sys.prefix, "bin", "varsd")
    assert os.access(path, os.X_OK), f"{path}: the venv has no varsd entry point (pip install -e .)"
    return path


def _parse(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value assigned (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return _parse(UNIT.read_text())


def _verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "varsd.service"
    path.write_text(text)
    return subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", str(path)],
        capture_output=True, text=True, timeout=120,
    )


def _with_exec_start(text: str, exe: str) -> str:
    lines = [f"ExecStart={exe}" if ln.startswith("ExecStart=") else ln for ln in text.splitlines()]
    assert sum(ln.startswith("ExecStart=") for ln in lines) == 1
    return "\n".join(lines) + "\n"


def test_systemd_analyze_verify_is_clean(tmp_path):
    r = _verify(tmp_path, _with_exec_start(UNIT.read_text(), _varsd_executable()))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_verify_would_catch_a_mistake(tmp_path):
    """The clean result above means something: a misspelt key and a missing binary are reported."""
    text = _with_exec_start(UNIT.read_text(), _varsd_executable()).replace("ProtectSystem=", "ProtectSystm=")
    r = _verify(tmp_path, text)
    assert "ProtectSystm" in r.stderr
    r = _verify(tmp_path, _with_exec_start(UNIT.read_text(), str(tmp_path / "no-such-varsd")))
    assert r.returncode != 0 and "no-such-varsd" in r.stderr


def _one(unit, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= missing"
    return values[-1]


def test_service_type_and_restart(unit):
    assert _one(unit, "Service", "Type") == "notify"  # READY=1 after the first full pass
    assert _one(unit, "Service", "NotifyAccess") == "main"
    assert _one(unit, "Service", "Restart") == "on-failure"
    assert _one(unit, "Service", "WatchdogSec")  # the daemon pings WATCHDOG=1
    assert _one(unit, "Service", "ExecStart") == "/usr/bin/varsd"
    assert _one(unit, "Install", "WantedBy") == "multi-user.target"
    assert "libvirtd.service" in _one(unit, "Unit", "After").split()


@pytest.mark.parametrize(
    "key, value",
    [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("UMask", "0077"),
        ("StateDirectoryMode", "0711"),  # search only: QEMU opens archived builds by path
    ],
)
def test_hardening(unit, key, value):
    assert _one(unit, "Service", key) == value


def test_writable_paths_are_the_nvram_dir_and_the_state_dir(unit):
    defaults = Config()
    writable = " ".join(unit["Service"]["ReadWritePaths"]).split()
    assert defaults.nvram_dir in writable
    assert os.path.join("/var/lib", _one(unit, "Service", "StateDirectory")) == defaults.state_dir
    assert set(writable) == {defaults.nvram_dir}  # nothing else on a strict read-only system


def test_capabilities_are_limited(unit):
    caps = set(" ".join(unit["Service"]["CapabilityBoundingSet"]).split())
    assert caps, "an empty CapabilityBoundingSet= would leave every capability"
    assert not any(c.startswith("~") for c in caps), "a deny-list is not a limit"
    assert caps <= ALLOWED_CAPS, caps - ALLOWED_CAPS
    assert "CAP_CHOWN" in caps  # new varstores belong to the qemu user
    assert "CAP_SYS_ADMIN" not in caps
    assert unit["Service"]["AmbientCapabilities"] == [""]


def test_address_families_allow_libvirt_and_notify(unit):
    families = set(_one(unit, "Service", "RestrictAddressFamilies").split())
    assert "AF_UNIX" in families  # libvirt's socket and $NOTIFY_SOCKET
    assert "AF_NETLINK" not in families and "AF_PACKET" not in families
