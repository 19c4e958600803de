"""varsd's dpkg trigger, installed with the real dpkg: firmware file changes run the sync.

A package built from `packaging/debian/varsd.triggers` + `varsd.postinst` is installed
with its `VARSCTL` pointing at a stand-in that records each call (arguments and
`VARSD_CONFIG`) and exits with a status the test chooses. Tiny packages shipping a
file under a watched path are then installed, reinstalled and purged. Every package
is purged again at the end, whatever happens.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from debtools import DEBIAN_DIR, build_deb, dpkg, purge, status, trigger_package

HOOK_PKG = "varsd-trigger-test"
FW_PKG = "varsd-test-firmware"
OTHER_PKG = "varsd-test-unrelated"
WATCHED = ("/usr/share/OVMF", "/usr/share/qemu/firmware", "/usr/share/AAVMF", "/usr/share/edk2")
MARKER = "varsd-test-marker"


@dataclass
class Hook:
    """The installed trigger package and its recording stand-in for varsctl."""

    calls_file: Path
    rc_file: Path
    config: str
    workdir: Path

    def calls(self) -> list[str]:
        return self.calls_file.read_text().splitlines() if self.calls_file.exists() else []

    def exit_with(self, rc: int) -> None:
        self.rc_file.write_text(str(rc))


@pytest.fixture
def hook(tmp_path) -> Iterator[Hook]:
    purge(FW_PKG, OTHER_PKG, HOOK_PKG)  # leftovers of a crashed run
    calls, rc = tmp_path / "calls", tmp_path / "rc"
    fake = tmp_path / "varsctl"
    fake.write_text(
        "#!/bin/sh\n"
        f"printf '%s|%s\\n' \"$*\" \"${{VARSD_CONFIG:-}}\" >> {calls}\n"
        f"exit $(cat {rc} 2>/dev/null || echo 0)\n"
    )
    fake.chmod(0o755)
    config = str(tmp_path / "varsd.toml")
    deb = trigger_package(tmp_path, HOOK_PKG, varsctl=str(fake), config=config)
    try:
        r = dpkg("-i", str(deb))
        assert r.returncode == 0, r.stdout + r.stderr
        yield Hook(calls, rc, config, tmp_path)
    finally:
        purge(FW_PKG, OTHER_PKG, HOOK_PKG)
    for path in WATCHED:  # dpkg removed what it created; nothing of ours is left
        assert not Path(path, MARKER).exists()


def _firmware_deb(hook: Hook, paths: tuple[str, ...] = ("/usr/share/OVMF",), version: str = "1.0") -> Path:
    return build_deb(hook.workdir, FW_PKG, version=version,
                     files={f"{p}/{MARKER}": f"{p} {version}\n".encode() for p in paths})


def _install(deb: Path) -> subprocess.CompletedProcess[str]:
    r = dpkg("-i", str(deb))
    assert r.returncode == 0, f"dpkg -i {deb.name} failed:\n{r.stdout}\n{r.stderr}"
    return r


def test_installing_varsd_runs_one_sync_with_the_baked_in_config(hook: Hook) -> None:
    assert status(HOOK_PKG) == "install ok installed"
    assert hook.calls() == [f"firmware sync|{hook.config}"]


def test_install_reinstall_upgrade_and_purge_of_firmware_each_run_the_sync(hook: Hook) -> None:
    first = _firmware_deb(hook)
    r = _install(first)
    assert len(hook.calls()) == 2
    assert "varsd: firmware sync done (triggered by: /usr/share/OVMF)" in r.stdout + r.stderr
    assert Path("/usr/share/OVMF", MARKER).read_text() == "/usr/share/OVMF 1.0\n"
    _install(first)  # reinstall: the same files unpacked again
    assert len(hook.calls()) == 3
    _install(_firmware_deb(hook, version="2.0"))  # upgrade
    assert len(hook.calls()) == 4
    assert Path("/usr/share/OVMF", MARKER).read_text() == "/usr/share/OVMF 2.0\n"
    r = dpkg("--purge", FW_PKG)  # removal changes the watched directory too
    assert r.returncode == 0, r.stderr
    assert len(hook.calls()) == 5 and not Path("/usr/share/OVMF", MARKER).exists()
    assert set(hook.calls()) == {f"firmware sync|{hook.config}"}
    # dpkg processed the trigger: nothing is left pending on the hook package
    assert status(HOOK_PKG) == "install ok installed"


@pytest.mark.parametrize("path", WATCHED)
def test_every_watched_path_triggers(hook: Hook, path: str) -> None:
    r = _install(_firmware_deb(hook, (path,)))
    assert len(hook.calls()) == 2
    assert f"firmware sync done (triggered by: {path})" in r.stdout + r.stderr


def test_one_dpkg_run_touching_several_paths_syncs_once(hook: Hook) -> None:
    _install(_firmware_deb(hook, WATCHED))
    assert len(hook.calls()) == 2


def test_files_elsewhere_do_not_trigger(hook: Hook) -> None:
    deb = build_deb(hook.workdir, OTHER_PKG, files={f"/usr/share/doc/{OTHER_PKG}/{MARKER}": b"x\n",
                                                    "/usr/share/OVMF-not/x": b"x\n"})
    _install(deb)
    assert len(hook.calls()) == 1  # only varsd's own configure


def test_a_failing_sync_never_fails_the_installation(hook: Hook) -> None:
    hook.exit_with(3)
    r = _install(_firmware_deb(hook))
    assert "'varsctl firmware sync' exited with status 3 (triggered by: /usr/share/OVMF)" in r.stdout + r.stderr
    assert len(hook.calls()) == 2
    assert status(FW_PKG) == "install ok installed" and status(HOOK_PKG) == "install ok installed"


def test_a_missing_varsctl_never_fails_the_installation(hook: Hook) -> None:
    (hook.workdir / "varsctl").unlink()
    r = _install(_firmware_deb(hook))
    assert "'varsctl firmware sync' skipped" in r.stdout + r.stderr
    assert status(FW_PKG) == "install ok installed" and status(HOOK_PKG) == "install ok installed"
    assert hook.calls() == [f"firmware sync|{hook.config}"]


def test_a_broken_defaults_file_is_ignored(tmp_path) -> None:
    """The postinst reads /etc/default/varsd only if it parses; run it directly, under dash."""
    script = (DEBIAN_DIR / "varsd.postinst").read_text()
    calls = tmp_path / "calls"
    fake = tmp_path / "varsctl"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n")
    fake.chmod(0o755)
    broken = tmp_path / "default-broken"
    broken.write_text("VARSCTL=/nonexistent\nif then fi (\n")
    good = tmp_path / "default-good"
    good.write_text(f"VARSCTL={fake}\n")
    for defaults, expect_calls in ((broken, 0), (good, 1)):
        body = script.replace("/etc/default/varsd", str(defaults)).replace("VARSCTL=/usr/bin/varsctl",
                                                                              "VARSCTL=/nonexistent/varsctl")
        r = subprocess.run(["dash", "-c", body, "postinst", "triggered", "/usr/share/OVMF"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        got = calls.read_text().splitlines() if calls.exists() else []
        assert len(got) == expect_calls, (defaults.name, r.stderr)
