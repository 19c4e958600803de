"""Typed records of varstore backups and of varsd's writes to varstores.

Plain data: `varsd.adapters.backup_index` stores them, `varsd.engine.backups` makes
them, the retention planner and `varsctl backup` read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from varsd.clock import stamp


class BackupRunning(StrEnum):
    """How a scheduled backup copies a running guest's varstore (`backup_running`; README "Backups")."""

    COHERENT = "coherent"  # read until two reads agree and parse; else retry at the next pass
    SUSPEND = "suspend"  # pause the guest for the one read, then resume it
    SKIP = "skip"  # leave running guests to the copy taken when they stop


@dataclass(frozen=True)
class BackupKeep:
    """Retention: the newest `last` versions per domain, plus the newest of each of the
    last `daily` days and `weekly` weeks. Backups of undefined domains are kept for the
    same period (the longer of the two), then pruned."""

    last: int = 10
    daily: int = 14
    weekly: int = 8

    @property
    def period_days(self) -> int:
        return max(self.daily, 7 * self.weekly)


class BackupReason(StrEnum):
    """Why a backup was taken (`reason` in `varsctl backup list`)."""

    SCHEDULE = "schedule"  # the backup_schedule pass
    STOP = "stop"  # the guest stopped with a changed varstore
    OFFLINE = "offline"  # a shut-off guest's varstore changed while varsd was not watching (seen at connect)
    MANUAL = "manual"  # varsctl backup create
    BEFORE_WRITE = "before-write"  # prefix: "before-write:<op>" before any varsd write (restore, reset, migrate, ...)
    UNDEFINE = "undefine"  # last look at a domain being undefined


def before_write(op: str) -> str:
    """The reason of the backup taken before an offline write `op` (e.g. 'before-write:restore')."""
    return f"{BackupReason.BEFORE_WRITE}:{op}"


@dataclass(frozen=True)
class BackupRecord:
    """One row of the backup index: a varstore's content at a time, by digest.

    The bytes live once per digest in the content-addressed store; many records (many
    domains, many times) share one file. `taken` is an aware datetime."""

    id: int
    uuid: str
    name: str
    taken: datetime
    sha256: str
    size: int
    reason: str
    source: str  # the varstore path it was copied from

    def as_dict(self, *, defined: bool | None = None) -> dict:
        d = {"id": self.id, "domain": self.name, "uuid": self.uuid, "taken": stamp(self.taken), "sha256": self.sha256,
             "size": self.size, "reason": self.reason, "source": self.source}
        if defined is not None:
            d["undefined"] = not defined
        return d


@dataclass(frozen=True)
class SeenVarstore:
    """What varsd last knew of a domain's varstore file: identity and content digest.

    A pass whose stat of the file gives the same key knows the content without reading
    it; a changed inode it did not make itself means someone replaced the file (e.g.
    `virsh start --reset-nvram`)."""

    uuid: str
    path: str
    stat_key: str  # "dev:ino:size:mtime_ns:ctime_ns"
    sha256: str
    at: datetime


@dataclass(frozen=True)
class VarstoreWrite:
    """One offline write varsd made to a varstore (journal of varstore changes)."""

    id: int
    at: datetime
    uuid: str
    name: str
    op: str
    path: str
    before_sha256: str | None  # None: there was no file
    after_sha256: str
    backup_id: int | None
    outcome: str  # 'pending', 'applied', 'refused: ...', 'failed: ...'


@dataclass(frozen=True)
class VarstoreEvent:
    """Something varsd noticed happen to a varstore that it did not do itself."""

    id: int
    at: datetime
    uuid: str
    name: str
    event: str  # 'reset-to-template', 'replaced', 'missing'
    detail: str
    backup_id: int | None  # the backup that holds the variables from before
