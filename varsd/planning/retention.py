"""Which backups retention keeps and which it prunes, and why. Pure.

Per domain (by UUID), with `backup_keep = {last, daily, weekly}`:
- the newest `last` backups are kept;
- for each of the last `daily` days (UTC) the newest backup of that day is kept;
- for each of the last `weekly` ISO weeks the newest backup of that week is kept;
- the newest backup of a domain is always kept while the domain is defined.
A domain that is no longer defined keeps its backups under the same rules for the
retention period (the longer of `daily` days and `weekly` weeks) counted from its
newest backup, so `varsctl backup restore --from` still works for that long; after
that all of them are pruned. Unreferenced store files go with the last row naming them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from varsd.model.backup import BackupKeep, BackupRecord


@dataclass(frozen=True)
class Prune:
    record: BackupRecord
    why: str


@dataclass(frozen=True)
class RetentionPlan:
    keep: tuple[BackupRecord, ...]
    prune: tuple[Prune, ...]


def _taken(record: BackupRecord) -> datetime:
    """The record's time (an ISO 8601 stamp) as naive UTC."""
    return record.taken.astimezone(UTC).replace(tzinfo=None)


def plan_retention(records: Iterable[BackupRecord], keep: BackupKeep, now: datetime,
                   defined: set[str]) -> RetentionPlan:
    """`now` is naive UTC or aware; `defined` holds the UUIDs libvirt still defines."""
    now = now.astimezone(UTC).replace(tzinfo=None) if now.tzinfo else now
    by_uuid: dict[str, list[BackupRecord]] = defaultdict(list)
    for r in records:
        by_uuid[r.uuid].append(r)
    kept: list[BackupRecord] = []
    pruned: list[Prune] = []
    period = timedelta(days=keep.period_days)
    for uuid, rs in by_uuid.items():
        rs.sort(key=lambda r: (r.taken, r.id), reverse=True)  # newest first
        if uuid not in defined and now - _taken(rs[0]) > period:
            pruned += [Prune(r, f"domain undefined and its newest backup is older than {keep.period_days} days")
                       for r in rs]
            continue
        wanted: set[int] = {r.id for r in rs[: keep.last]}
        if uuid in defined:
            wanted.add(rs[0].id)
        days: set = set()
        weeks: set = set()
        today, this_week = now.date(), now.isocalendar()[:2]
        for r in rs:
            t = _taken(r)
            if keep.daily and (today - t.date()).days < keep.daily and t.date() not in days:
                days.add(t.date())
                wanted.add(r.id)
            week = t.isocalendar()[:2]
            weeks_ago = (now - t).days // 7 if week != this_week else 0
            if keep.weekly and weeks_ago < keep.weekly and week not in weeks:
                weeks.add(week)
                wanted.add(r.id)
        for r in rs:
            if r.id in wanted:
                kept.append(r)
            else:
                pruned.append(Prune(r, f"beyond the newest {keep.last}, and not the newest of its day "
                                       f"(last {keep.daily} days) or week (last {keep.weekly} weeks)"))
    return RetentionPlan(tuple(sorted(kept, key=lambda r: r.id)), tuple(sorted(pruned, key=lambda p: p.record.id)))
