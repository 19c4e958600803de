"""The bed module itself: its cache is reused only when complete, and a bed never outlives its owner."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testbed

from .conftest import REPO


def test_cache_is_complete_only_with_todays_recipe(tmp_path: Path) -> None:
    tree = testbed.Tree(testbed.TRIXIE, mirror="http://mirror.invalid/debian", cache=tmp_path)
    assert not tree.complete()  # nothing there
    (tree.root / "usr/bin").mkdir(parents=True)
    assert not tree.complete()  # a tree without its marker: a build that did not finish
    tree.marker.write_text(testbed.TRIXIE.recipe(tree.mirror))
    assert tree.complete()
    other = testbed.Tree(testbed.Release(**{**testbed.TRIXIE.__dict__, "packages": ("systemd",)}),
                         mirror=tree.mirror, cache=tmp_path)
    assert not other.complete()  # another package list: rebuilt, never reused
    tree.marker.write_text(tree.marker.read_text()[:-5])
    assert not tree.complete()


def test_the_sessions_tree_is_reused(debian13: testbed.Bed) -> None:
    assert debian13.tree.complete()
    assert debian13.tree.ensure() == 0.0  # no second debootstrap while complete
    os_release = debian13.run("cat", "/etc/os-release").stdout
    assert 'VERSION_ID="13"' in os_release
    versions = debian13.run("virsh", "version").stdout
    assert "libvirt 12." in versions and "QEMU 11." in versions, versions
    assert debian13.run("systemctl", "is-active", "libvirtd", "virtlogd.socket").stdout.split() == ["active"] * 2


def _gone(pids: list[int], run_dir: Path, name: str) -> None:
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or testbed._start_time(pid) is None, f"pid {pid} survived"
    assert not run_dir.exists(), f"{run_dir} left behind"
    with open("/proc/self/mounts") as f:
        assert str(run_dir) not in f.read()
    assert not Path("/run/systemd/nspawn/propagate", name).exists()


def test_a_failing_body_still_stops_the_bed(debian13: testbed.Bed) -> None:
    bed = testbed.Bed(testbed.TRIXIE)
    with pytest.raises(RuntimeError, match="a test failed"), bed:
        pids = [bed.nspawn_pid, bed.init_pid]
        assert bed.run("systemctl", "is-system-running", check=False).stdout.strip() in ("running", "degraded")
        raise RuntimeError("a test failed")
    print(f"\n[distro] second bed: booted in {bed.boot_seconds:.1f} s, stopped in {bed.stop_seconds:.1f} s")
    _gone(pids, bed.run_dir, bed.name)
    assert debian13.run("true").returncode == 0  # the session's bed was left alone


def test_a_bed_whose_owner_was_killed_is_reaped(tmp_path: Path) -> None:
    """A script starts a bed and is SIGKILLed (no cleanup at all); the next start reaps its bed."""
    info = tmp_path / "info"
    script = (f"import sys, time; sys.path.insert(0, {str(REPO / 'tests')!r}); import testbed\n"
              f"bed = testbed.Bed(testbed.TRIXIE); bed.start()\n"
              f"open({str(info)!r}, 'w').write(f'{{bed.nspawn_pid}} {{bed.init_pid}} {{bed.run_dir}} {{bed.name}}')\n"
              "time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not info.exists() or not info.read_text():
            assert owner.poll() is None and time.monotonic() < deadline, "the owner's bed did not start"
            time.sleep(0.2)
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
    nspawn, init, run_dir, name = info.read_text().split()
    assert testbed._start_time(int(init)) is not None  # orphaned, still running
    testbed.reap_stale(testbed.TRIXIE)
    _gone([int(nspawn), int(init)], Path(run_dir), name)


def _host_setup_packages() -> list[str]:
    text = (REPO / "scripts" / "host-setup").read_text()
    block = re.search(r"^PACKAGES=\((.*?)^\)", text, re.S | re.M)
    assert block, "scripts/host-setup has no PACKAGES=( ... ) list"
    lines = (ln.split("#", 1)[0] for ln in block.group(1).splitlines())
    return [p for ln in lines for p in ln.split()]


def test_every_package_host_setup_installs_exists_in_debian13(debian13: testbed.Bed) -> None:
    """scripts/host-setup must work on a Debian 13 host: each package it installs is in trixie
    (or trixie-updates/backports), checked against the Debian 13 bed's own apt lists."""
    packages = _host_setup_packages()
    assert len(packages) > 10, packages
    known: set[str] = set()
    for lst in debian13.path("/var/lib/apt/lists").glob("*_Packages"):
        known |= set(re.findall(r"^Package: (\S+)$", lst.read_text(errors="replace"), re.M))
    assert "libvirt-daemon-system" in known, "the bed's apt lists are missing"
    missing = [p for p in packages if p not in known]
    assert not missing, f"scripts/host-setup installs packages Debian 13 does not have: {missing}"
