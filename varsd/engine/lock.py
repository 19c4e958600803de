"""One actor at a time: advisory lock files shared by varsd and varsctl (one per domain,
`Config.domain_lock_path`, and one for the firmware archive, `Config.firmware_lock_path`).

A domain's lock is held only around its read-plan-act step, so two actors never act on
one domain at once, and neither acts on what it read before the other changed it.

Theory of operation (why waiting follows the holder, not a timer):

- The lock is `flock()` on a file, so it is released the moment its holder dies (kill -9
  included): a held lock always has a live holder.
- The holder writes what it is doing into the lock file (pid, actor, the step, when the
  step began) and a heartbeat, renewed every HEARTBEAT seconds by one thread per process
  for as long as the lock is held.
- A waiter waits while the holder is alive and progressing: its heartbeat is fresh and
  its step has not run for longer than any step can (STEP_LIMIT; a libvirt define that
  re-probes QEMU takes about 50 s). It gives up only on a holder that stopped beating
  (frozen, e.g. SIGSTOP) or hung in one step, and says which.
- `max_wait` bounds the wait for callers with other work (the daemon): LockBusy then
  means "busy, look again", which the daemon treats as a retry, not an error.

Times are CLOCK_BOOTTIME: one clock for every process on the host, which wall-clock
jumps (NTP, an admin's `date -s`) do not move (varsd.clock's monotonic() is per process).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from varsd.adapters import fsio
from varsd.errors import LockBusy, VarsdError

HEARTBEAT = 1.0  # seconds between a holder's heartbeats
STALE = 20.0  # a holder silent this long is frozen, not slow
STEP_LIMIT = 900.0  # no one step under the lock (a slow define included) takes longer
POLL = 0.05
_RECORD = 4096  # bytes of the holder record (JSON, space-padded)


def now() -> float:
    """Seconds on the host-wide boot clock (never jumps with the wall clock)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class Holder:
    """What the lock file says about its holder (all None when it says nothing yet)."""

    pid: int | None = None
    doing: str = ""
    since: float | None = None
    beat: float | None = None

    def describe(self, at: float) -> str:
        who = f"pid {self.pid}" if self.pid else "another varsd actor"
        step = f" ({self.doing}, for {at - self.since:.0f} s)" if self.doing and self.since else ""
        return who + step


def read_holder(fd: int) -> Holder:
    try:
        raw = os.pread(fd, _RECORD, 0)
        doc = json.loads(raw) if raw.strip() else {}
        if not isinstance(doc, dict):
            return Holder()
        return Holder(pid=int(doc.get("pid") or 0) or None, doing=str(doc.get("doing", "")),
                      since=float(doc["since"]) if "since" in doc else None,
                      beat=float(doc["beat"]) if "beat" in doc else None)
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return Holder()  # being rewritten, or written by something else: judged by time seen


class _Heart:
    """One thread per process renewing the heartbeat of every lock the process holds."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[str, float]] = {}  # fd -> (doing, since)
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, fd: int, doing: str) -> None:
        with self._mutex:
            self._held[fd] = (doing, now())
            _write(fd, doing, self._held[fd][1])
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="varsd-lock-heartbeat", daemon=True)
                self._thread.start()

    def remove(self, fd: int) -> None:
        with self._mutex:
            self._held.pop(fd, None)

    def _run(self) -> None:
        while True:
            time.sleep(HEARTBEAT)
            with self._mutex:
                if not self._held:
                    self._thread = None
                    return
                for fd, (doing, since) in self._held.items():
                    _write(fd, doing, since)


def _write(fd: int, doing: str, since: float) -> None:
    data = json.dumps({"pid": os.getpid(), "doing": doing[:200], "since": since, "beat": now()}).encode()
    try:
        os.pwrite(fd, data.ljust(_RECORD), 0)  # fixed width: never a stale tail after a shorter record
    except OSError:
        pass  # a full disk must not break the holder; waiters then judge by time seen


_heart = _Heart()


def _open(path: str) -> int:
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise fsio.state_dir_error(directory, exc, "lock directory") from None
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise VarsdError(f"{path}: the varsd lock file is not a plain file (a symlink, directory or device "
                             "is in its place); remove it, varsd recreates it") from None
        raise fsio.state_dir_error(directory, exc, "lock directory") from None


@contextlib.contextmanager
def host_lock(
    path: str,
    *,
    doing: str = "",
    max_wait: float | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the advisory lock `path` (created 0600) for the block (see the module rules).

    `doing` is what the holder records for waiters. `on_wait` is told, now and then, whom
    we wait for. LockBusy when the holder is frozen or hung, or after `max_wait` seconds.
    Every failure is a VarsdError naming the path: callers handle those per domain.
    """
    fd = _open(path)
    try:
        started = now()
        told = 0.0
        first_seen: tuple[Holder, float] | None = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as exc:
                raise VarsdError(f"{path}: cannot take the varsd lock: {fsio.describe_oserror(exc)}") from None
            t = now()
            holder = read_holder(fd)
            if first_seen is None or first_seen[0] != holder:
                first_seen = (holder, t)  # any change in the record is a sign of life
            beat = max(holder.beat or 0.0, first_seen[1])
            if t - beat > STALE:
                raise LockBusy(f"{path}: the holder, {holder.describe(t)}, has shown no sign of life for "
                               f"{t - beat:.0f} s (frozen?); check that process, then try again")
            if holder.since is not None and t - holder.since > STEP_LIMIT:
                raise LockBusy(f"{path}: the holder, {holder.describe(t)}, is stuck in one step for longer than "
                               f"{STEP_LIMIT:.0f} s; check libvirtd and that process, then try again")
            if max_wait is not None and t - started >= max_wait:
                raise LockBusy(f"{path}: busy: {holder.describe(t)} is acting on it")
            if on_wait is not None and t - told >= 10.0:
                told = t
                on_wait(f"waiting for {holder.describe(t)}")
            time.sleep(POLL)
        _heart.add(fd, doing)
        try:
            yield
        finally:
            _heart.remove(fd)
    finally:
        os.close(fd)  # releases the flock
