"""The coalescing work queue: rules from its module docstring, as a table and a race."""

from __future__ import annotations

import threading

import pytest

from varsd.daemon.workqueue import WorkQueue


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        # burst for one key coalesces
        (["put a", "put a", "put a"], ["a"]),
        # order is first-queued
        (["put b", "put a", "put b"], ["b", "a"]),
        # put while active marks dirty: requeued on done
        (["put a", "get", "put a", "put a", "done a"], ["a", "a"]),
        # done without a mid-flight put: nothing more
        (["put a", "get", "done a"], ["a"]),
    ],
)
def test_queue_rules(script: list[str], expected: list[str]) -> None:
    q = WorkQueue()
    got: list[str] = []
    for step in script:
        op, _, key = step.partition(" ")
        if op == "put":
            q.put(key)
        elif op == "get":
            got.append(q.get(timeout=0))
        elif op == "done":
            q.done(key)
    while (k := q.get(timeout=0)) is not None:
        got.append(k)
        q.done(k)
    assert got == expected


def test_put_later_waits_for_its_time() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.put_later("x", 5.0)
    assert q.get(timeout=0) is None
    clock.now = 5.0
    assert q.get(timeout=0) == "x"


def test_close_wakes_a_blocked_worker() -> None:
    q = WorkQueue()
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(q.get()))
    t.start()
    q.close()
    t.join(2)
    assert out == [None]


def test_concurrent_puts_never_lose_or_duplicate_work() -> None:
    """Four producers hammer 50 keys while one worker drains: each key is seen, none twice at once."""
    q = WorkQueue()
    active: set[str] = set()
    seen: set[str] = set()
    overlap: list[str] = []

    def worker() -> None:
        while (k := q.get()) is not None:
            if k in active:
                overlap.append(k)
            active.add(k)
            seen.add(k)
            active.discard(k)
            q.done(k)

    w = threading.Thread(target=worker)
    w.start()
    producers = [
        threading.Thread(target=lambda: [q.put(f"k{i % 50}") for i in range(2000)]) for _ in range(4)
    ]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    while q.pending():
        pass
    q.close()
    w.join(5)
    assert seen == {f"k{i}" for i in range(50)}
    assert overlap == []
    assert q.puts == 8000
