"""A coalescing per-domain work queue: events are hints, the worker re-reads.

Rules:
- `put(key)` while the key is queued does nothing (a burst of 50 events for one
  domain is one reconcile);
- `put(key)` while the key is being worked on marks it dirty: it is queued again
  when `done(key)` is called, so no change that happened mid-reconcile is missed;
- keys come out in first-queued order; `get()` blocks until one is ready or the
  queue is closed (returns None).
Retries are scheduled with `put_later(key, delay)`, which uses the same rules.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class WorkQueue:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._ready: OrderedDict[str, None] = OrderedDict()
        self._active: set[str] = set()
        self._dirty: set[str] = set()
        self._later: list[tuple[float, str]] = []
        self._closed = False
        self.puts = 0  # events offered, for the coalescing tests and metrics

    def put(self, key: str) -> None:
        with self._cond:
            self.puts += 1
            if key in self._active:
                self._dirty.add(key)
            elif key not in self._ready:
                self._ready[key] = None
                self._cond.notify()

    def put_later(self, key: str, delay: float) -> None:
        with self._cond:
            heapq.heappush(self._later, (self._clock() + delay, key))
            self._cond.notify()

    def get(self, timeout: float | None = None) -> str | None:
        """Next key to work on, marked active; None when closed or timed out."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return None
                self._promote()
                if self._ready:
                    key, _ = self._ready.popitem(last=False)
                    self._active.add(key)
                    return key
                wait = None if deadline is None else deadline - self._clock()
                if self._later:
                    until = self._later[0][0] - self._clock()
                    wait = until if wait is None else min(wait, until)
                if wait is not None and wait <= 0:
                    if deadline is not None and self._clock() >= deadline:
                        return None
                    continue
                self._cond.wait(wait)

    def _promote(self) -> None:
        now = self._clock()
        while self._later and self._later[0][0] <= now:
            _, key = heapq.heappop(self._later)
            if key in self._active:
                self._dirty.add(key)
            else:
                self._ready.setdefault(key, None)

    def done(self, key: str) -> None:
        with self._cond:
            self._active.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._ready.setdefault(key, None)
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def idle(self) -> bool:
        """Nothing queued, scheduled, dirty or in progress."""
        with self._cond:
            return not (self._ready or self._later or self._dirty or self._active)

    def pending(self) -> int:
        with self._cond:
            return len(self._ready) + len(self._later) + len(self._dirty)
