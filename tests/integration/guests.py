"""Helpers for tier-3 tests: host-side observation of TCG guests (their XML comes from
tests/support/domains.py).

What a test can see from the host is what varsd's claims are about: which files
the QEMU process has open (and which inodes), what OVMF prints on the serial
port, and whether the varstore file was written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import ovmf_files

QEMU_RUN_DIR = "/run/libvirt/qemu"
NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"
OVMF_DIR = "/usr/share/OVMF"
CODE_4M = f"{OVMF_DIR}/OVMF_CODE_4M.fd"
VARS_4M = f"{OVMF_DIR}/OVMF_VARS_4M.fd"
CODE_2M, VARS_2M = ovmf_files.CODE_2M, ovmf_files.VARS_2M  # Debian 12's, release-aware (tests/ovmf_files.py)

# CSI sequences including OVMF's private-mode ones such as ESC[=3h, plus lone ESC c etc.
_ANSI = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]|\x1b[@-Z\\-_]")


def qemu_pid(name: str) -> int:
    """PID of the running domain's QEMU, from libvirt's pid file."""
    return int(Path(QEMU_RUN_DIR, f"{name}.pid").read_text().strip())


def open_files(pid: int) -> dict[str, os.stat_result]:
    """What the process has open: link target -> stat of the open file itself.

    The stat is of /proc/PID/fd/N (follows to the open file, not the path), so
    `st_ino` tells which build QEMU is running even after the path was replaced.
    Non-file fds (sockets, pipes, anon inodes) are included under their link text.
    """
    result: dict[str, os.stat_result] = {}
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        link = os.path.join(fd_dir, fd)
        try:
            result[os.readlink(link)] = os.stat(link)
        except FileNotFoundError:
            continue  # closed while we looked
    return result


def open_firmware_files(pid: int) -> dict[str, os.stat_result]:
    """The subset of open_files() that are firmware images or varstores (*.fd)."""
    return {path: st for path, st in open_files(pid).items() if path.endswith(".fd") or ".fd (deleted)" in path}


def clean_serial(raw: bytes) -> str:
    """Serial output as plain text lines: ANSI escapes and carriage returns removed."""
    return _ANSI.sub("", raw.decode("utf-8", "replace")).replace("\r", "")


def wait_for_serial(path: str, pattern: str, timeout: float = 60) -> str:
    """Poll the serial log until regex `pattern` matches; return the matching line.

    On timeout, the AssertionError carries the log's tail: that is the only way
    to see what the firmware did instead.
    """
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    text = ""
    while True:
        try:
            text = clean_serial(Path(path).read_bytes())
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            if regex.search(line):
                return line
        if time.monotonic() >= deadline:
            tail = "\n".join(text.splitlines()[-25:]) or "(empty or missing)"
            raise AssertionError(f"no line matching {pattern!r} in {path} after {timeout:.0f}s; log tail:\n{tail}")
        time.sleep(0.2)


def wait_for_varstore_write(path: str, before_bytes: bytes, timeout: float = 60) -> bytes:
    """Poll until the file's content differs from `before_bytes`; return the new content."""
    deadline = time.monotonic() + timeout
    while True:
        now = Path(path).read_bytes()
        if now != before_bytes:
            return now
        if time.monotonic() >= deadline:
            raise AssertionError(f"varstore {path} still unchanged after {timeout:.0f}s ({len(now)} bytes)")
        time.sleep(0.2)


def varsctl(config: str | os.PathLike[str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run varsctl as an admin would, with this test's configuration."""
    return subprocess.run([sys.executable, "-m", "varsd.cli.varsctl", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=300)


def open_paths(pid: int) -> dict[str, os.stat_result]:
    """open_files() keyed by the path each file was opened as: a file a package upgrade
    replaced since (the shared host's /usr/share/OVMF may be) shows as 'PATH (deleted)'."""
    return {path.removesuffix(" (deleted)"): st for path, st in open_files(pid).items()}
