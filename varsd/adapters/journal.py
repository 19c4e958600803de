"""Host state in SQLite under state_dir: the journal of every domain XML change.

Every redefinition is written here *before* libvirt is asked, with the previous XML,
so any change varsd made can be undone (`varsctl undo ID`) even if varsd crashed
half-way. The file is created mode 0600: domain XML may hold secrets' references.

Two more tables serve firmware upgrades: `firmware_history` (each code image path
varsd watches: when it appeared, changed to another digest, or was removed), and
`archived_builds` (what varsd knows about each archived image: the varstore layout
and features of the build it came from, and when a domain or the catalog last used
it, for retention). `domain_failures` keeps each domain's last failed attempt (what,
when, why, how many times in a row) so `varsctl status` can tell the truth about it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from varsd.errors import VarsdError
from varsd.model.domain import AttemptFailure
from varsd.model.firmware import VarstoreLayout
from varsd.model.journal import MIGRATION_REASON, ChangeKind

_SCHEMA = """
CREATE TABLE IF NOT EXISTS xml_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    uuid TEXT NOT NULL,
    name TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    old_xml TEXT NOT NULL,
    new_xml TEXT NOT NULL,
    outcome TEXT NOT NULL DEFAULT 'pending',
    kind TEXT NOT NULL DEFAULT 'edit'
);
CREATE INDEX IF NOT EXISTS xml_changes_uuid ON xml_changes(uuid);
CREATE TABLE IF NOT EXISTS firmware_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    code_path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    event TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS archived_builds (
    sha256 TEXT PRIMARY KEY,
    code_path TEXT NOT NULL,
    size INTEGER NOT NULL,
    first_seen TEXT NOT NULL,
    last_used TEXT NOT NULL,
    layout TEXT,
    features TEXT
);
CREATE TABLE IF NOT EXISTS domain_failures (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    first_at TEXT NOT NULL,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    error TEXT NOT NULL,
    count INTEGER NOT NULL,
    definition_sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS domain_records (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    opened_at TEXT NOT NULL,
    closed_at TEXT,
    varstore TEXT
);
"""

FIRMWARE_EVENTS = ("appeared", "changed", "removed")


@dataclass(frozen=True)
class DomainRecord:
    """varsd's host-side record of a domain it changed; closed when it is undefined."""

    uuid: str
    name: str
    opened_at: str
    closed_at: str | None
    varstore: str | None


@dataclass(frozen=True)
class Change:
    id: int
    at: str
    uuid: str
    name: str
    actor: str
    reason: str
    old_xml: str
    new_xml: str
    outcome: str
    kind: ChangeKind = ChangeKind.EDIT


@dataclass(frozen=True)
class FirmwareEvent:
    """One change of a watched code image path (`event` is one of FIRMWARE_EVENTS)."""

    id: int
    at: str
    code_path: str
    sha256: str
    event: str


@dataclass(frozen=True)
class ArchivedBuild:
    """What is known about an archived image beyond its bytes."""

    sha256: str
    code_path: str  # where it was first seen
    size: int
    first_seen: str
    last_used: str
    layout: VarstoreLayout | None = None  # of the build's template, when a catalog build listed it
    features: frozenset[str] = frozenset()


def _layout_text(layout: VarstoreLayout | None) -> str | None:
    return None if layout is None else f"{layout.size}:{layout.start}:{layout.end}"


def _layout_of(text: str | None) -> VarstoreLayout | None:
    try:
        size, start, end = (int(x) for x in (text or "").split(":"))
    except ValueError:
        return None
    return VarstoreLayout(size, start, end)


def _change(row: tuple) -> Change:
    return Change(*row[:-1], kind=ChangeKind(row[-1]))


class Journal:
    def __init__(self, path: str, *, read_only: bool = False) -> None:
        """Open (creating it if need be) the journal; `read_only` opens an existing one
        read-only and never creates anything (for status, journal and firmware list/history,
        so an admin who may read the file need not be able to write it); a missing
        journal then reads as empty."""
        self.path = path
        if read_only:
            self._open_read_only(path)
            return
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a journaled old XML survives a power cut
            self._db.executescript(_SCHEMA)
            if not self._has_kind():
                self._add_kind()
            self._kind_column = True
            self._lock = threading.Lock()  # one connection, several worker threads
        except (OSError, sqlite3.Error) as exc:
            raise VarsdError(f"{path}: cannot open the varsd journal: {exc}") from None

    def _has_kind(self) -> bool:
        return any(row[1] == "kind" for row in self._db.execute("PRAGMA table_info(xml_changes)"))

    def _add_kind(self) -> None:
        """A journal from before entries had a kind: add it, classifying old entries by the
        reason migrations were journaled with."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if not self._has_kind():
                self._db.execute("ALTER TABLE xml_changes ADD COLUMN kind TEXT NOT NULL DEFAULT 'edit'")
                self._db.execute("UPDATE xml_changes SET kind=? WHERE substr(reason, 1, ?) = ?",
                                 (ChangeKind.MIGRATION.value, len(MIGRATION_REASON), MIGRATION_REASON))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _kind_sql(self) -> str:
        """The kind column; for an old journal opened read-only (not upgraded), the same
        classification `_add_kind` makes."""
        if self._kind_column:
            return "kind"
        return (f"CASE WHEN substr(reason, 1, {len(MIGRATION_REASON)}) = '{MIGRATION_REASON}' "
                f"THEN '{ChangeKind.MIGRATION.value}' ELSE '{ChangeKind.EDIT.value}' END")

    def _open_read_only(self, path: str) -> None:
        try:
            if os.path.exists(path):
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, isolation_level=None,
                                           check_same_thread=False)
                self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            else:
                self._db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
                self._db.executescript(_SCHEMA)
            self._kind_column = self._has_kind()
            self._lock = threading.Lock()
        except sqlite3.Error as exc:
            raise VarsdError(f"{path}: cannot open the varsd journal read-only: {exc}") from None

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _sql(self, what: str) -> Iterator[None]:
        """Serialise use of the one connection; sqlite3 errors (disk full, I/O error,
        locked too long) become VarsdError naming the file, which callers handle."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise VarsdError(f"{self.path}: cannot {what} the varsd journal: {exc}") from None

    def record(self, *, at: str, uuid: str, name: str, actor: str, reason: str, old_xml: str, new_xml: str,
               kind: ChangeKind = ChangeKind.EDIT) -> int:
        """Write the intent (old and new XML) before the change is made; returns its id.

        The first change to a domain also opens its record (see `close_record`)."""
        with self._sql("write to"):
            self._db.execute(
                "INSERT INTO domain_records (uuid, name, opened_at) VALUES (?,?,?) "
                "ON CONFLICT(uuid) DO UPDATE SET name=excluded.name, closed_at=NULL",
                (uuid, name, at),
            )
            cur = self._db.execute(
                "INSERT INTO xml_changes (at, uuid, name, actor, reason, old_xml, new_xml, kind) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (at, uuid, name, actor, reason, old_xml, new_xml, kind.value),
            )
        return int(cur.lastrowid)

    def close_record(self, uuid: str, at: str, varstore: str | None = None) -> DomainRecord | None:
        """The domain was undefined: close varsd's record of it, noting the varstore that
        stays on disk (varsd never deletes one). None when varsd never changed it."""
        with self._sql("write to"):
            self._db.execute(
                "UPDATE domain_records SET closed_at=?, varstore=COALESCE(?, varstore) "
                "WHERE uuid=? AND closed_at IS NULL",
                (at, varstore, uuid),
            )
        return self.domain_record(uuid)

    def domain_record(self, uuid: str) -> DomainRecord | None:
        with self._sql("read"):
            row = self._db.execute(
                "SELECT uuid, name, opened_at, closed_at, varstore FROM domain_records WHERE uuid=?", (uuid,)
            ).fetchone()
        return DomainRecord(*row) if row else None

    def settle(self, change_id: int, outcome: str, *, stored_xml: str | None = None) -> None:
        """Mark how a change ended; `stored_xml` is the definition as libvirt stored it
        (normalised), so a later undo can tell whether anything changed since.

        Not fsynced: the record with the old XML already is, and a lost outcome after a
        power cut only leaves the entry 'pending'."""
        with self._sql("write to"):
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                if stored_xml is None:
                    self._db.execute("UPDATE xml_changes SET outcome=? WHERE id=?", (outcome, change_id))
                else:
                    self._db.execute(
                        "UPDATE xml_changes SET outcome=?, new_xml=? WHERE id=?", (outcome, stored_xml, change_id)
                    )
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def changes(self, uuid: str | None = None, limit: int = 100) -> list[Change]:
        q = f"SELECT id, at, uuid, name, actor, reason, old_xml, new_xml, outcome, {self._kind_sql()} FROM xml_changes"
        args: tuple = ()
        if uuid:
            q += " WHERE uuid=?"
            args = (uuid,)
        q += " ORDER BY id DESC LIMIT ?"
        with self._sql("read"):
            return [_change(row) for row in self._db.execute(q, args + (limit,)).fetchall()]

    def change(self, change_id: int) -> Change | None:
        with self._sql("read"):
            row = self._db.execute(
                f"SELECT id, at, uuid, name, actor, reason, old_xml, new_xml, outcome, {self._kind_sql()} "
                "FROM xml_changes WHERE id=?",
                (change_id,),
            ).fetchone()
        return _change(row) if row else None

    # -- firmware history ------------------------------------------------------------

    def firmware_state(self) -> dict[str, str]:
        """Each watched code path's current digest (its latest event, unless `removed`)."""
        q = ("SELECT code_path, sha256, event FROM firmware_history WHERE id IN "
             "(SELECT MAX(id) FROM firmware_history GROUP BY code_path)")
        with self._sql("read"):
            rows = self._db.execute(q).fetchall()
        return {path: sha for path, sha, event in rows if event != "removed"}

    def record_firmware(self, at: str, events: list[tuple[str, str, str]]) -> None:
        """Record (code_path, sha256, event) changes in one transaction."""
        bad = [e for _, _, e in events if e not in FIRMWARE_EVENTS]
        if bad:
            raise ValueError(f"unknown firmware event(s) {bad}")
        with self._sql("write to"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO firmware_history (at, code_path, sha256, event) VALUES (?,?,?,?)",
                    [(at, path, sha, event) for path, sha, event in events],
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def firmware_history(self, limit: int = 100) -> list[FirmwareEvent]:
        with self._sql("read"):
            rows = self._db.execute(
                "SELECT id, at, code_path, sha256, event FROM firmware_history ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [FirmwareEvent(*row) for row in rows]

    # -- archived builds -------------------------------------------------------------

    def note_archived(
        self, *, sha256: str, code_path: str, size: int, at: str,
        layout: VarstoreLayout | None = None, features: frozenset[str] = frozenset(),
    ) -> None:
        """Remember an archived image; layout and features are filled in once known."""
        with self._sql("write to"):
            self._db.execute(
                "INSERT INTO archived_builds (sha256, code_path, size, first_seen, last_used, layout, features) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT(sha256) DO UPDATE SET "
                "layout=COALESCE(archived_builds.layout, excluded.layout), "
                "features=COALESCE(archived_builds.features, excluded.features)",
                (sha256, code_path, size, at, at, _layout_text(layout),
                 " ".join(sorted(features)) if layout is not None else None),
            )

    def touch_archived(self, shas: set[str] | frozenset[str], at: str) -> None:
        """Mark these digests used now (retention counts from the last use)."""
        with self._sql("write to"):
            self._db.executemany("UPDATE archived_builds SET last_used=? WHERE sha256=?", [(at, s) for s in shas])

    def archived_builds(self) -> dict[str, ArchivedBuild]:
        with self._sql("read"):
            rows = self._db.execute(
                "SELECT sha256, code_path, size, first_seen, last_used, layout, features FROM archived_builds"
            ).fetchall()
        return {
            sha: ArchivedBuild(sha, path, size, first, last, _layout_of(layout),
                               frozenset((features or "").split()))
            for sha, path, size, first, last, layout, features in rows
        }

    def forget_archived(self, shas: list[str]) -> None:
        with self._sql("write to"):
            self._db.executemany("DELETE FROM archived_builds WHERE sha256=?", [(s,) for s in shas])

    # -- failed attempts ---------------------------------------------------------------

    def note_failure(self, *, uuid: str, name: str, at: str, action: str, error: str,
                     definition_sha256: str) -> AttemptFailure:
        """Record a failed attempt; the count goes on while the definition is the same."""
        with self._sql("write to"):
            self._db.execute(
                "INSERT INTO domain_failures (uuid, name, first_at, at, action, error, count, definition_sha256) "
                "VALUES (?,?,?,?,?,?,1,?) ON CONFLICT(uuid) DO UPDATE SET "
                "count=CASE WHEN domain_failures.definition_sha256=excluded.definition_sha256 "
                "THEN domain_failures.count+1 ELSE 1 END, "
                "first_at=CASE WHEN domain_failures.definition_sha256=excluded.definition_sha256 "
                "THEN domain_failures.first_at ELSE excluded.first_at END, "
                "name=excluded.name, at=excluded.at, action=excluded.action, error=excluded.error, "
                "definition_sha256=excluded.definition_sha256",
                (uuid, name, at, at, action, error, definition_sha256),
            )
        failure = self.failure(uuid)
        assert failure is not None
        return failure

    def failure(self, uuid: str) -> AttemptFailure | None:
        with self._sql("read"):
            row = self._db.execute(
                "SELECT uuid, name, first_at, at, action, error, count, definition_sha256 FROM domain_failures "
                "WHERE uuid=?", (uuid,)).fetchone()
        return AttemptFailure(*row) if row else None

    def failed_uuids(self) -> set[str]:
        with self._sql("read"):
            return {row[0] for row in self._db.execute("SELECT uuid FROM domain_failures").fetchall()}

    def clear_failure(self, uuid: str) -> AttemptFailure | None:
        """Forget a domain's failure (an attempt succeeded); returns what was cleared."""
        failure = self.failure(uuid)
        if failure is not None:
            with self._sql("write to"):
                self._db.execute("DELETE FROM domain_failures WHERE uuid=?", (uuid,))
        return failure
