"""The one clock: wall time as an aware UTC datetime, and a monotonic clock for intervals.

It is passed in (the daemon, the reconciler, the write path, firmware sync and migrate
take one), so a test fixes time instead of patching it. Time is a datetime inside;
`stamp` is the one text form, used only at the edges that store or show it (XML
metadata, the journal, JSON and tables).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class FixedClock:
    """A clock that always says `at` (a datetime, or its `stamp`); its monotonic time does
    run, so intervals (retry delays, recheck periods) behave as they do in production."""

    at: datetime | str

    def now(self) -> datetime:
        return self.at if isinstance(self.at, datetime) else parse_stamp(self.at)

    def monotonic(self) -> float:
        return time.monotonic()


def stamp(t: datetime) -> str:
    """`t` as varsd stores and shows it: UTC, seconds, ISO 8601 with a Z."""
    return t.astimezone(UTC).strftime(STAMP)


def parse_stamp(text: str) -> datetime:
    """The datetime of a `stamp` (ValueError if `text` is not one)."""
    return datetime.strptime(text, STAMP).replace(tzinfo=UTC)
