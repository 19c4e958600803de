"""A clock for tests: wall time fixed, monotonic time running."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from varsd.clock import parse_stamp


@dataclass(frozen=True)
class FixedClock:
    """A clock that always says `at` (a datetime, or its `stamp`); its monotonic time does
    run, so intervals (retry delays, recheck periods) behave as they do in production."""

    at: datetime | str

    def now(self) -> datetime:
        return self.at if isinstance(self.at, datetime) else parse_stamp(self.at)

    def monotonic(self) -> float:
        return time.monotonic()
