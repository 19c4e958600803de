"""Shared fixtures: the qemu user's ids and real tmpfs mounts (tests run as root)."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def qemu_owner() -> tuple[int, int]:
    """(uid, gid) of libvirt-qemu if the host has it, else ids no real user has."""
    try:
        pw = pwd.getpwnam("libvirt-qemu")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 12345, 12345


@pytest.fixture
def mount_tmpfs(tmp_path) -> Iterator[Callable[[str], str]]:
    """Mount a tmpfs with the given options (e.g. "size=64k" or "size=1m,ro"); return its path.

    Mounting happens in the test body, so a host where it fails makes the test
    fail, never skip. Everything mounted is unmounted at teardown.
    """
    mounted: list[str] = []

    def mount(options: str) -> str:
        target = str(tmp_path / f"mnt{len(mounted)}")
        os.mkdir(target)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", target], capture_output=True, text=True)
        assert r.returncode == 0, f"mount -t tmpfs -o {options} failed (tests need root): {r.stderr.strip()}"
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", target], check=True)
