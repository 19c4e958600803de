"""Retention (`backup_keep`): last N, daily and weekly, undefined domains for the period."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from varsd.clock import stamp
from varsd.model.backup import BackupKeep, BackupRecord
from varsd.planning.retention import plan_retention

NOW = datetime(2026, 12, 1, 12, 0, 0)
U1, U2 = "00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002"


def _records(uuid: str, ages: list[timedelta], start: int = 1) -> list[BackupRecord]:
    return [BackupRecord(start + i, uuid, "g", (NOW - age).replace(tzinfo=UTC), f"{i:064x}", 1, "stop", "/v")
            for i, age in enumerate(ages)]


def _kept(plan) -> set[int]:
    return {r.id for r in plan.keep}


def test_last_n_are_kept_and_older_ones_of_the_same_day_pruned():
    rs = _records(U1, [timedelta(minutes=m) for m in (50, 40, 30, 20, 10)])
    plan = plan_retention(rs, BackupKeep(last=2, daily=0, weekly=0), NOW, {U1})
    assert _kept(plan) == {4, 5}
    assert all("beyond the newest 2" in p.why for p in plan.prune)


def test_one_per_day_and_one_per_week_survive():
    hourly_for_30_days = [timedelta(hours=h) for h in range(30 * 24, 0, -6)]
    rs = _records(U1, hourly_for_30_days)
    plan = plan_retention(rs, BackupKeep(last=1, daily=7, weekly=4), NOW, {U1})
    kept = [r for r in plan.keep]
    days = {stamp(r.taken)[:10] for r in kept}
    assert len(kept) < len(rs)
    # each of the last 7 days has its newest backup kept
    for d in range(7):
        day = (NOW - timedelta(days=d)).strftime("%Y-%m-%d")
        newest = max((r for r in rs if stamp(r.taken).startswith(day)), key=lambda r: r.taken, default=None)
        if newest is not None:
            assert newest.id in _kept(plan)
    assert len(days) <= 7 + 4 + 1
    assert max(r.id for r in rs) in _kept(plan)


def test_undefined_domains_keep_backups_for_the_period_then_lose_them():
    keep = BackupKeep(last=3, daily=14, weekly=2)  # period: 14 days
    recent = _records(U1, [timedelta(days=3), timedelta(days=2)])
    old = _records(U2, [timedelta(days=20), timedelta(days=15)], start=10)
    plan = plan_retention(recent + old, keep, NOW, defined=set())
    assert _kept(plan) == {1, 2}
    assert {p.record.id for p in plan.prune} == {10, 11}
    assert all("undefined" in p.why for p in plan.prune)


def test_the_newest_backup_of_a_defined_domain_is_never_pruned():
    rs = _records(U1, [timedelta(days=400)])
    plan = plan_retention(rs, BackupKeep(last=1, daily=0, weekly=0), NOW, {U1})
    assert _kept(plan) == {1}


def test_pruning_is_idempotent():
    rs = _records(U1, [timedelta(hours=h) for h in range(100, 0, -1)])
    keep = BackupKeep(last=5, daily=3, weekly=2)
    first = plan_retention(rs, keep, NOW, {U1})
    second = plan_retention(list(first.keep), keep, NOW, {U1})
    assert second.prune == ()
