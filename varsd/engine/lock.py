"""One actor at a time: advisory lock files shared by varsd and varsctl (one per domain,
`Config.domain_lock_path`, and one for the firmware archive, `Config.firmware_lock_path`).

A domain's lock is held only around its read-plan-act step, so `varsctl` never waits
long for a running daemon and vice versa, and two actors never act on one domain at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

from varsd.errors import LockBusy, VarsdError


@contextlib.contextmanager
def host_lock(path: str, timeout: float = 60.0) -> Iterator[None]:
    """Hold the advisory lock `path` (created 0600) for the block; LockBusy after `timeout`.

    Every failure is a VarsdError naming the path: callers handle those per domain,
    a raw OSError would abort a whole pass.
    """
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise VarsdError(f"{path}: cannot open the varsd lock: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(
                        f"{path}: another varsd actor holds the lock; gave up after {timeout:g}s"
                    ) from None
                time.sleep(0.02)
            except OSError as exc:
                raise VarsdError(f"{path}: cannot take the varsd lock: {exc.strerror}") from None
        yield
    finally:
        os.close(fd)
