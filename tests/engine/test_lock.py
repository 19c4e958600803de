"""host_lock: an advisory flock shared across processes (varsd and varsctl)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from varsd.engine.lock import host_lock
from varsd.errors import LockBusy, VarsdError

HOLDER = textwrap.dedent(
    """
    import sys, time
    from varsd.engine.lock import host_lock
    with host_lock(sys.argv[1], timeout=5):
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
        with host_lock(sys.argv[1], timeout=float(sys.argv[2])):
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
            with host_lock(path, timeout=0.3):
                pytest.fail("acquired a lock another process holds")
        waited = time.monotonic() - t0
        assert 0.3 <= waited < 3
        assert str(info.value).startswith(f"{path}: another varsd actor")
        assert isinstance(info.value, VarsdError)
    finally:
        _release(proc)
        proc.wait(10)


def test_we_block_the_other_process_too(tmp_path):
    path = str(tmp_path / "x.lock")
    with host_lock(path, timeout=1):
        out = subprocess.run([sys.executable, "-c", TRY, path, "0.3"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"busy: {path}: another varsd actor")
    out = subprocess.run([sys.executable, "-c", TRY, path, "0.3"], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "acquired"


def test_waiter_gets_the_lock_once_the_holder_releases(tmp_path):
    path = str(tmp_path / "x.lock")
    proc = _holder(path, linger=5.0)  # keeps running after releasing: release is not process exit
    try:
        _release(proc)
        assert proc.stdout.readline().strip() == "released"
        with host_lock(path, timeout=2):
            assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)


def test_lock_dies_with_its_process(tmp_path):
    path = str(tmp_path / "x.lock")
    proc = _holder(path, linger=0)
    proc.kill()  # no clean exit: the kernel drops the flock with the file descriptor
    proc.wait(10)
    with host_lock(path, timeout=2):
        pass


def test_released_on_exit_and_on_exception(tmp_path):
    path = str(tmp_path / "x.lock")
    with host_lock(path, timeout=1):
        pass
    with pytest.raises(RuntimeError):
        with host_lock(path, timeout=1):
            raise RuntimeError("boom")
    out = subprocess.run([sys.executable, "-c", TRY, path, "0.3"], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "acquired"


def test_second_holder_in_the_same_process_also_waits(tmp_path):
    """flock is per open file: two actors (threads) of one process exclude each other too."""
    path = str(tmp_path / "x.lock")
    with host_lock(path, timeout=1):
        with pytest.raises(LockBusy):
            with host_lock(path, timeout=0.1):
                pass


def test_lock_file_and_directory_are_private(tmp_path):
    path = tmp_path / "state" / "locks" / "x.lock"
    with host_lock(str(path), timeout=1):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert path.exists()  # the file stays: removing it would let two actors lock two different inodes


def test_symlinked_lock_file_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    link = tmp_path / "x.lock"
    link.symlink_to(target)
    with pytest.raises(VarsdError, match=f"^{link}: "):
        with host_lock(str(link), timeout=1):
            pass
    assert not target.exists()


def test_unwritable_lock_dir_is_a_varsd_error_naming_the_path(mount_tmpfs):
    """Callers catch VarsdError per domain; a raw OSError would abort a whole pass."""
    ro = mount_tmpfs("size=64k,ro")
    path = os.path.join(ro, "locks", "x.lock")
    with pytest.raises(VarsdError, match=f"^{path}: "):
        with host_lock(path, timeout=1):
            pass


def test_timeout_message_shows_sub_second_timeouts(tmp_path):
    path = str(tmp_path / "x.lock")
    with host_lock(path, timeout=1):
        with pytest.raises(LockBusy, match=r"gave up after 0\.2s$"):
            with host_lock(path, timeout=0.2):
                pass
