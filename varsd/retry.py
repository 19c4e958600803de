"""One retry policy: what to do after a failure, and how long to wait (pure).

`decide(exc, attempt=..., alive=...)` maps an error to one of three answers, next to
the libvirt error classifier (`varsd.adapters.libvirt_api.hypervisor_error`, which
marks a `HypervisorError` retryable or not):

- `RECONNECT`: the link to libvirtd is gone (a retryable libvirt error and a dead
  connection): reconnect with the `reconnect` backoff, then re-read everything;
- `RETRY`: worth trying this domain (or this action) again later: a retryable
  libvirt error on a live connection (a hung QEMU's state-change lock), a busy lock
  (`LockBusy`), a transient OS error (EAGAIN, EBUSY, EINTR, ETIMEDOUT), or a failed
  archive store (the file changed under us); the delay grows per attempt;
- `FAIL`: trying again cannot help until something changes (bad XML, a refused define,
  a missing domain, permission denied): report it and wait for the next event or pass.

Every delay and cap is in `RetrySettings`, one table of data. The daemon's reconnect
and per-domain backoff and the reconciler's archive retry read it; a lock wait (issue
12) plugs in as `Purpose.LOCK`.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from varsd.errors import HypervisorError, LockBusy


class Action(StrEnum):
    RECONNECT = "reconnect"
    RETRY = "retry"
    FAIL = "fail"


class Purpose(StrEnum):
    """What is retried; each has its own row in `RetrySettings`."""

    RECONNECT = "reconnect"
    DOMAIN = "domain"
    ARCHIVE = "archive"
    LOCK = "lock"


@dataclass(frozen=True)
class Backoff:
    """Delays first, first*factor, ... capped at cap (seconds)."""

    first: float = 0.5
    factor: float = 2.0
    cap: float = 30.0

    def delay(self, attempt: int) -> float:
        """The delay before retry number `attempt` (0 = the first retry)."""
        return min(self.cap, self.first * self.factor ** max(0, attempt))

    def delays(self) -> Iterator[float]:
        attempt = 0
        while True:
            yield self.delay(attempt)
            attempt += 1

    def scaled(self, by: float) -> Backoff:
        return Backoff(self.first * by, self.factor, self.cap * by)


@dataclass(frozen=True)
class RetrySettings:
    """Every retry delay varsd uses (seconds)."""

    reconnect: Backoff = Backoff(0.5, 2.0, 30.0)  # libvirtd gone: reconnect, then re-read everything
    domain: Backoff = Backoff(2.0, 2.0, 120.0)  # one domain's libvirt trouble (a hung QEMU's lock)
    archive: Backoff = Backoff(60.0, 1.0, 60.0)  # archiving a build failed (it changed under us)
    lock: Backoff = Backoff(0.05, 2.0, 1.0)  # another varsd actor holds a lock
    transient_errno: frozenset[int] = field(
        default=frozenset({errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT}))

    @classmethod
    def for_reconnect(cls, backoff: Backoff) -> RetrySettings:
        """Settings whose reconnect backoff is `backoff` and per-domain one four times it (tests
        shrink both at once)."""
        return cls(reconnect=backoff, domain=backoff.scaled(4))

    def backoff(self, purpose: Purpose) -> Backoff:
        return getattr(self, purpose.value)


SETTINGS = RetrySettings()


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float = 0.0


def decide(
    exc: BaseException, *, attempt: int = 0, alive: bool = True, purpose: Purpose = Purpose.DOMAIN,
    settings: RetrySettings = SETTINGS,
) -> Decision:
    """What to do after `exc` on retry number `attempt` (module rules)."""
    if isinstance(exc, HypervisorError):
        if not exc.retryable:
            return Decision(Action.FAIL)
        if not alive:
            return Decision(Action.RECONNECT, settings.reconnect.delay(attempt))
        return Decision(Action.RETRY, settings.backoff(purpose).delay(attempt))
    if isinstance(exc, LockBusy):
        return Decision(Action.RETRY, settings.backoff(purpose).delay(attempt))
    if isinstance(exc, OSError) and exc.errno in settings.transient_errno:
        return Decision(Action.RETRY, settings.backoff(purpose).delay(attempt))
    if purpose is Purpose.ARCHIVE:
        return Decision(Action.RETRY, settings.archive.delay(attempt))
    return Decision(Action.FAIL)
