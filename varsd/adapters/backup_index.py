"""The backup index in the state database: which varstore content was backed up when.

One row per backup (domain UUID, name, time, digest, reason); the bytes are in the
content-addressed store (`varsd.engine.backups`), one file per digest. Beside it:
what varsd last saw of each varstore (for stat-only passes), every offline write
varsd made to a varstore, and varstore events it noticed (a `--reset-nvram`).
"""

from __future__ import annotations

from datetime import datetime

from varsd.adapters.journal import StateDB, column_text, column_time
from varsd.model.backup import BackupRecord, SeenVarstore, VarstoreEvent, VarstoreWrite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS backups (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL,
    name TEXT NOT NULL,
    taken TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    reason TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS backups_uuid ON backups(uuid, id);
CREATE INDEX IF NOT EXISTS backups_sha ON backups(sha256);
CREATE TABLE IF NOT EXISTS varstore_seen (
    uuid TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    stat_key TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS varstore_writes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    uuid TEXT NOT NULL,
    name TEXT NOT NULL,
    op TEXT NOT NULL,
    path TEXT NOT NULL,
    before_sha256 TEXT,
    after_sha256 TEXT NOT NULL,
    backup_id INTEGER,
    outcome TEXT NOT NULL DEFAULT 'pending'
);
CREATE TABLE IF NOT EXISTS varstore_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    uuid TEXT NOT NULL,
    name TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL,
    backup_id INTEGER
);
"""

_COLS = "id, uuid, name, taken, sha256, size, reason, source"


def _record(row: tuple) -> BackupRecord:
    i, uuid, name, taken, *rest = row
    return BackupRecord(i, uuid, name, column_time(taken), *rest)


def _seen(row: tuple) -> SeenVarstore:
    return SeenVarstore(*row[:4], column_time(row[4]))


class BackupIndex(StateDB):
    SCHEMA = _SCHEMA

    # -- backups -----------------------------------------------------------------------

    def add(self, *, uuid: str, name: str, taken: datetime, sha256: str, size: int, reason: str,
            source: str) -> BackupRecord:
        with self._sql("write to"):
            cur = self._db.execute(
                "INSERT INTO backups (uuid, name, taken, sha256, size, reason, source) VALUES (?,?,?,?,?,?,?)",
                (uuid, name, column_text(taken), sha256, size, reason, source),
            )
        return BackupRecord(int(cur.lastrowid), uuid, name, column_time(column_text(taken)), sha256, size, reason,
                            source)

    def get(self, backup_id: int) -> BackupRecord | None:
        with self._sql("read"):
            row = self._db.execute(f"SELECT {_COLS} FROM backups WHERE id=?", (backup_id,)).fetchone()
        return _record(row) if row else None

    def records(self, uuid: str | None = None) -> list[BackupRecord]:
        """Oldest first."""
        q, args = f"SELECT {_COLS} FROM backups", ()
        if uuid is not None:
            q, args = q + " WHERE uuid=?", (uuid,)
        with self._sql("read"):
            return [_record(r) for r in self._db.execute(q + " ORDER BY id", args).fetchall()]

    def by_name(self, name: str) -> list[BackupRecord]:
        """Every backup taken under this domain name (any UUID), oldest first."""
        with self._sql("read"):
            rows = self._db.execute(f"SELECT {_COLS} FROM backups WHERE name=? ORDER BY id", (name,)).fetchall()
        return [_record(r) for r in rows]

    def latest(self, uuid: str) -> BackupRecord | None:
        with self._sql("read"):
            row = self._db.execute(f"SELECT {_COLS} FROM backups WHERE uuid=? ORDER BY id DESC LIMIT 1",
                                   (uuid,)).fetchone()
        return _record(row) if row else None

    def latest_all(self) -> dict[str, BackupRecord]:
        """Each domain's newest backup, by UUID (one query for a whole pass)."""
        q = f"SELECT {_COLS} FROM backups WHERE id IN (SELECT MAX(id) FROM backups GROUP BY uuid)"
        with self._sql("read"):
            return {r[1]: _record(r) for r in self._db.execute(q).fetchall()}

    def has_digest(self, uuid: str, sha256: str) -> bool:
        with self._sql("read"):
            return self._db.execute("SELECT 1 FROM backups WHERE uuid=? AND sha256=? LIMIT 1",
                                    (uuid, sha256)).fetchone() is not None

    def digest_pairs(self) -> set[tuple[str, str]]:
        """(uuid, sha256) of every backup: `has_digest` for a whole pass in one query."""
        with self._sql("read"):
            return {(u, h) for u, h in self._db.execute("SELECT DISTINCT uuid, sha256 FROM backups").fetchall()}

    def remove(self, ids: list[int]) -> None:
        with self._sql("write to"):
            self._db.executemany("DELETE FROM backups WHERE id=?", [(i,) for i in ids])

    def digests(self) -> set[str]:
        """Every digest some backup still refers to (the rest of the store can go)."""
        with self._sql("read"):
            return {r[0] for r in self._db.execute("SELECT DISTINCT sha256 FROM backups").fetchall()}

    # -- what varsd last saw of each varstore ---------------------------------------

    def seen(self, uuid: str) -> SeenVarstore | None:
        with self._sql("read"):
            row = self._db.execute("SELECT uuid, path, stat_key, sha256, at FROM varstore_seen WHERE uuid=?",
                                   (uuid,)).fetchone()
        return _seen(row) if row else None

    def seen_all(self) -> dict[str, SeenVarstore]:
        with self._sql("read"):
            rows = self._db.execute("SELECT uuid, path, stat_key, sha256, at FROM varstore_seen").fetchall()
        return {r[0]: _seen(r) for r in rows}

    def note_seen(self, seen: SeenVarstore) -> None:
        with self._sql("write to"):
            self._db.execute(
                "INSERT INTO varstore_seen (uuid, path, stat_key, sha256, at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(uuid) DO UPDATE SET path=excluded.path, stat_key=excluded.stat_key, "
                "sha256=excluded.sha256, at=excluded.at",
                (seen.uuid, seen.path, seen.stat_key, seen.sha256, column_text(seen.at)),
            )

    # -- varsd's own writes ---------------------------------------------------------

    def record_write(self, *, at: datetime, uuid: str, name: str, op: str, path: str, before_sha256: str | None,
                     after_sha256: str, backup_id: int | None) -> int:
        """The intent, before the file is replaced; settled afterwards."""
        with self._sql("write to"):
            cur = self._db.execute(
                "INSERT INTO varstore_writes (at, uuid, name, op, path, before_sha256, after_sha256, backup_id) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (column_text(at), uuid, name, op, path, before_sha256, after_sha256, backup_id),
            )
        return int(cur.lastrowid)

    def settle_write(self, write_id: int, outcome: str) -> None:
        with self._sql("write to"):
            self._db.execute("UPDATE varstore_writes SET outcome=? WHERE id=?", (outcome, write_id))

    def writes(self, uuid: str | None = None, limit: int = 100) -> list[VarstoreWrite]:
        q = ("SELECT id, at, uuid, name, op, path, before_sha256, after_sha256, backup_id, outcome "
             "FROM varstore_writes")
        args: tuple = ()
        if uuid is not None:
            q, args = q + " WHERE uuid=?", (uuid,)
        with self._sql("read"):
            rows = self._db.execute(q + " ORDER BY id DESC LIMIT ?", args + (limit,)).fetchall()
        return [VarstoreWrite(r[0], column_time(r[1]), *r[2:]) for r in rows]

    # -- events ---------------------------------------------------------------------

    def record_event(self, *, at: datetime, uuid: str, name: str, event: str, detail: str,
                     backup_id: int | None) -> VarstoreEvent:
        with self._sql("write to"):
            cur = self._db.execute(
                "INSERT INTO varstore_events (at, uuid, name, event, detail, backup_id) VALUES (?,?,?,?,?,?)",
                (column_text(at), uuid, name, event, detail, backup_id),
            )
        return VarstoreEvent(int(cur.lastrowid), column_time(column_text(at)), uuid, name, event, detail, backup_id)

    def events(self, uuid: str | None = None, limit: int = 100) -> list[VarstoreEvent]:
        q, args = "SELECT id, at, uuid, name, event, detail, backup_id FROM varstore_events", ()
        if uuid is not None:
            q, args = q + " WHERE uuid=?", (uuid,)
        with self._sql("read"):
            rows = self._db.execute(q + " ORDER BY id DESC LIMIT ?", args + (limit,)).fetchall()
        return [VarstoreEvent(r[0], column_time(r[1]), *r[2:]) for r in rows]
