"""host_lock: an advisory flock shared across processes (varsd and varsctl)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from varsd.engine import lock
from varsd.engine.lock import host_lock
from varsd.errors import LockBusy, StateDirError, VarsdError

HOLDER = textwrap.dedent(
    """
    import sys, time
    from varsd.engine.lock import host_lock
    with host_lock(sys.argv[1], max_wait=5):
        print("held", flush=True)
        sys.stdin.readline()  # hold until the test says go
    print("released", flush=True)
    time.sleep(float(sys.argv[2]))
    """
)

TRY = textwrap.dedent(
    """
    import sys
    from varsd.engine.lock import host_lock
    from varsd.errors import LockBusy
    try:
        with host_lock(sys.argv[1], max_wait=float(sys.argv[2])):
            print("acquired")
    except LockBusy as exc:
        print("busy:", exc)
    """
)


def _holder(path: str, linger: float = 0.0) -> subprocess.Popen:
    """Another process holding the lock until its stdin gets a line."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, path, str(linger)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()


def test_second_holder_in_another_process_times_out(tmp_path):
    path = str(tmp_path / "state" / "locks" / "x.lock")
    proc = _holder(path)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockBusy) as info:
            with host_lock(path, max_wait=0.3):
                pytest.fail("acquired a lock another process holds")
        waited = time.monotonic() - t0
        assert 0.3 <= waited < 3
        assert str(info.value).startswith(f"{path}: busy: pid {proc.pid}")
        assert isinstance(info.value, VarsdError)
    finally:
        _release(proc)
        proc.wait(10)


def test_we_block_the_other_process_too(tmp_path):
    path = str(tmp_path / "x.lock")
    with host_lock(path, max_wait=1):
        out = subprocess.run([sys.executable, "-c", TRY, path, "0.3"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"busy: {path}: busy: pid {os.getpid()}")
    out = subprocess.run([sys.executable, "-c", TRY, path, "0.3"], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "acquired"


def test_waiter_gets_the_lock_once_the_holder_releases(tmp_path):
    path = str(tmp_path / "x.lock")
    proc = _holder(path, linger=5.0)  # keeps running after releasing: release is not process exit
    try:
        _release(proc)
        assert proc.stdout.readline().strip() == "released"
        with host_lock(path, max_wait=2):
            assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)


def test_lock_dies_with_its_process(tmp_path):
    path = str(tmp_path / "x.lock")
    proc = _holder(path, linger=0)
    proc.kill()  # no clean exit: the kernel drops the flock with the file descriptor
    proc.wait(10)
    with host_lock(path, max_wait=2):
        pass


def test_released_on_exit_and_on_exception(tmp_path):
    path = str(tmp_path / "x.lock")
    with host_lock(path, max_wait=1):
        pass
    with pytest.raises(RuntimeError):
        with host_lock(path, max_wait=1):
            raise RuntimeError("boom")
    out = subprocess.run([sys.executable, "-c", TRY, path, "0.3"], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "acquired"


def test_second_holder_in_the_same_process_also_waits(tmp_path):
    """flock is per open file: two actors (threads) of one process exclude each other too."""
    path = str(tmp_path / "x.lock")
    with host_lock(path, max_wait=1):
        with pytest.raises(LockBusy):
            with host_lock(path, max_wait=0.1):
                pass


def test_lock_file_and_directory_are_private(tmp_path):
    path = tmp_path / "state" / "locks" / "x.lock"
    with host_lock(str(path), max_wait=1):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert path.exists()  # the file stays: removing it would let two actors lock two different inodes


def test_symlinked_lock_file_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    link = tmp_path / "x.lock"
    link.symlink_to(target)
    with pytest.raises(VarsdError, match=f"^{link}: "):
        with host_lock(str(link), max_wait=1):
            pass
    assert not target.exists()


def test_unwritable_lock_dir_is_a_varsd_error_naming_the_path(mount_tmpfs):
    """Callers catch VarsdError per domain; a raw OSError would abort a whole pass."""
    ro = mount_tmpfs("size=64k,ro")
    path = os.path.join(ro, "locks", "x.lock")
    with pytest.raises(VarsdError, match=f"lock directory: {os.path.dirname(path)} is on a read-only file system"):
        with host_lock(path, max_wait=1):
            pass


def test_a_file_where_the_lock_directory_belongs_says_what_to_do(tmp_path):
    """#12 defect 12: not "cannot open the varsd lock: File exists"."""
    (tmp_path / "locks").write_text("")
    with pytest.raises(StateDirError) as info:
        with host_lock(str(tmp_path / "locks" / "x.lock")):
            pass
    msg = str(info.value)
    assert f"{tmp_path}/locks is not a directory (a file is in the way); move it away" in msg
    assert "Errno" not in msg and "File exists" not in msg


SLOW_HOLDER = textwrap.dedent(
    """
    import sys, time
    from varsd.engine.lock import host_lock
    with host_lock(sys.argv[1], doing="defining domain 'slow'"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))  # a slow libvirt define
    """
)


def test_waiting_follows_a_slow_but_live_holder(tmp_path, monkeypatch):
    """#12 defect 14: a holder that keeps beating is waited for, however long its step
    takes (here far past STALE); the waiter is told whom it waits for."""
    monkeypatch.setattr(lock, "STALE", 1.5)
    path = str(tmp_path / "x.lock")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_HOLDER, path, "4"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        told: list[str] = []
        t0 = time.monotonic()
        with host_lock(path, on_wait=told.append):
            waited = time.monotonic() - t0
        assert waited > 3, "did not wait for the holder"
        assert told and f"pid {proc.pid} (defining domain 'slow', for" in told[0]
    finally:
        proc.wait(30)


def test_a_frozen_holder_is_given_up_on_with_its_pid_and_step(tmp_path, monkeypatch):
    """SIGSTOP stops the heartbeat: that, not a timer, ends the wait."""
    import signal

    monkeypatch.setattr(lock, "STALE", 1.5)
    path = str(tmp_path / "x.lock")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_HOLDER, path, "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        os.kill(proc.pid, signal.SIGSTOP)
        with pytest.raises(LockBusy, match=rf"pid {proc.pid} \(defining domain 'slow'.*no sign of life"):
            with host_lock(path):
                pass
    finally:
        proc.kill()
        proc.wait(10)
