"""Whether varsd's QEMU hook is in force: the judgement over the installer's record, and
the probe over real files and real processes (this test's own, and a gone one)."""

from __future__ import annotations

import os
import subprocess

import pytest

from varsd.engine.qemu_hook import DaemonStamp, HookState, judge, parse_pending, probe, process_started

SYSTEM = "qemu:///system"


def alive(table: dict[int, int]):
    return table.get


@pytest.mark.parametrize(("uri", "runnable", "pending", "procs", "state"), [
    ("test:///default", False, [], {}, HookState.NOT_CHECKED),
    ("qemu+ssh://other/system", True, [DaemonStamp("libvirtd", 7, 1)], {7: 1}, HookState.NOT_CHECKED),
    (SYSTEM, False, [], {}, HookState.MISSING),
    (SYSTEM, True, [], {}, HookState.ACTIVE),
    # the daemon the installer saw still runs: not loaded yet
    (SYSTEM, True, [DaemonStamp("libvirtd", 7, 100)], {7: 100}, HookState.PENDING_RESTART),
    # restarted (same pid reused by another process: other start time), or gone
    (SYSTEM, True, [DaemonStamp("libvirtd", 7, 100)], {7: 250}, HookState.ACTIVE),
    (SYSTEM, True, [DaemonStamp("libvirtd", 7, 100)], {}, HookState.ACTIVE),
    # one of two daemons restarted, the other not
    (SYSTEM, True, [DaemonStamp("libvirtd", 7, 100), DaemonStamp("virtqemud", 9, 5)], {9: 5},
     HookState.PENDING_RESTART),
])
def test_judge(uri, runnable, pending, procs, state) -> None:
    report = judge(uri, runnable, pending, alive(procs))
    assert report.state is state
    assert report.attention is (state in (HookState.PENDING_RESTART, HookState.MISSING))


def test_pending_names_the_daemon_and_the_command() -> None:
    report = judge(SYSTEM, True, [DaemonStamp("virtqemud", 9, 5)], alive({9: 5}))
    assert "virtqemud (pid 9)" in report.detail and "systemctl restart virtqemud" in report.detail
    assert report.as_dict() == {"state": "pending-restart", "detail": report.detail}


def test_parse_pending_ignores_what_is_not_a_record() -> None:
    text = "libvirtd 812 4410\ngarbage\nvirtqemud x 1\nvirtqemud 90 17 extra\n\nvirtqemud 91 18\n"
    assert parse_pending(text) == [DaemonStamp("libvirtd", 812, 4410), DaemonStamp("virtqemud", 91, 18)]


def test_process_started_reads_proc_even_with_a_paren_in_the_name(tmp_path) -> None:
    link = tmp_path / "odd) name"
    link.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(link), "30"])
    try:
        started = process_started(proc.pid)
        with open(f"/proc/{proc.pid}/stat") as f:
            assert started == int(f.read().split(") ")[-1].split()[19])
        assert started >= process_started(os.getpid())
    finally:
        proc.kill()
        proc.wait()
    assert process_started(proc.pid) is None  # reaped: no such process


def test_probe_on_real_files(tmp_path) -> None:
    hook = tmp_path / "varsd"
    pending = tmp_path / "pending"
    assert probe(SYSTEM, hook=str(hook), pending=str(pending)).state is HookState.MISSING
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o644)
    assert probe(SYSTEM, hook=str(hook), pending=str(pending)).state is HookState.MISSING  # not executable
    hook.chmod(0o755)
    assert probe(SYSTEM, hook=str(hook), pending=str(pending)).state is HookState.ACTIVE  # no record
    me = os.getpid()
    pending.write_text(f"libvirtd {me} {process_started(me)}\n")  # "installed while this process ran"
    report = probe(SYSTEM, hook=str(hook), pending=str(pending))
    assert report.state is HookState.PENDING_RESTART and f"pid {me}" in report.detail
    pending.write_text(f"libvirtd {me} {process_started(me) + 1}\n")  # a process of that pid started since
    assert probe(SYSTEM, hook=str(hook), pending=str(pending)).state is HookState.ACTIVE
