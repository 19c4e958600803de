"""The one clock: wall time as an aware UTC datetime, and a monotonic clock for intervals.

It is passed in (the daemon, the reconciler, the write path, firmware sync and migrate
take one), so a test fixes time instead of patching it (tests/support/clock.py). Time is a datetime inside;
`stamp` is the one text form, used only at the edges that store or show it (XML
metadata, the journal, JSON and tables).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Protocol

STAMP = "%Y-%m-%dT%H:%M:%SZ"


class Clock(Protocol):
    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM = SystemClock()


def stamp(t: datetime) -> str:
    """`t` as varsd stores and shows it: UTC, seconds, ISO 8601 with a Z."""
    return t.astimezone(UTC).strftime(STAMP)


_STAMP = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)Z")


def parse_stamp(text: str) -> datetime:
    """The datetime of a `stamp` (ValueError if `text` is not one). The form varsd writes is
    read without strptime (a tenth of its cost: every metadata time of every domain is one)."""
    m = _STAMP.fullmatch(text)
    if m is not None:
        return datetime(*map(int, m.groups()), tzinfo=UTC)
    return datetime.strptime(text, STAMP).replace(tzinfo=UTC)
