"""`varsd.retry`: one table of errors -> reconnect / retry later / fail, and the delays."""

from __future__ import annotations

import errno

import pytest

from varsd.adapters.libvirt_api import NoSuchDomain
from varsd.errors import ConfigError, HypervisorError, LockBusy
from varsd.firmware.archive import ArchiveError
from varsd.retry import SETTINGS, Action, Backoff, Purpose, RetrySettings, decide


@pytest.mark.parametrize(("exc", "alive", "purpose", "action", "delay"), [
    (HypervisorError("gone", retryable=True), False, Purpose.DOMAIN, Action.RECONNECT, 0.5),
    (HypervisorError("state change lock", retryable=True), True, Purpose.DOMAIN, Action.RETRY, 2.0),
    (HypervisorError("refused define", retryable=False), True, Purpose.DOMAIN, Action.FAIL, 0.0),
    (NoSuchDomain("no domain"), False, Purpose.DOMAIN, Action.FAIL, 0.0),
    (LockBusy("held"), True, Purpose.LOCK, Action.RETRY, 0.05),
    (OSError(errno.EAGAIN, "again"), True, Purpose.DOMAIN, Action.RETRY, 2.0),
    (OSError(errno.EACCES, "denied"), True, Purpose.DOMAIN, Action.FAIL, 0.0),
    (ArchiveError("changed since read"), True, Purpose.ARCHIVE, Action.RETRY, 60.0),
    (ConfigError("bad"), True, Purpose.DOMAIN, Action.FAIL, 0.0),
])
def test_decide(exc, alive, purpose, action, delay) -> None:
    d = decide(exc, alive=alive, purpose=purpose)
    assert (d.action, d.delay) == (action, delay)


def test_delays_grow_to_their_cap() -> None:
    assert [SETTINGS.domain.delay(n) for n in range(8)] == [2, 4, 8, 16, 32, 64, 120, 120]
    assert [d for _, d in zip(range(4), Backoff(0.5, 2, 3).delays(), strict=False)] == [0.5, 1, 2, 3]
    small = RetrySettings.for_reconnect(Backoff(0.05, 2.0, 0.2))
    assert (small.reconnect.delay(9), small.domain.delay(0), small.domain.delay(9)) == (0.2, 0.2, 0.8)
    assert decide(HypervisorError("x", retryable=True), attempt=1, settings=small).delay == 0.4
