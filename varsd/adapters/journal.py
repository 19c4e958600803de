"""Host state in SQLite under state_dir: the journal of every domain XML change.

Every redefinition is written here *before* libvirt is asked, with the previous XML,
so any change varsd made can be undone (`varsctl undo ID`) even if varsd crashed
half-way. The file is created mode 0600: domain XML may hold secrets' references.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from varsd.errors import VarsdError

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
    outcome TEXT NOT NULL DEFAULT 'pending'
);
CREATE INDEX IF NOT EXISTS xml_changes_uuid ON xml_changes(uuid);
CREATE TABLE IF NOT EXISTS firmware_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    code_path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    event TEXT NOT NULL
);
"""


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


class Journal:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a journaled old XML survives a power cut
            self._db.executescript(_SCHEMA)
            self._lock = threading.Lock()  # one connection, several worker threads
        except (OSError, sqlite3.Error) as exc:
            raise VarsdError(f"{path}: cannot open the varsd journal: {exc}") from None

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

    def record(self, *, at: str, uuid: str, name: str, actor: str, reason: str, old_xml: str, new_xml: str) -> int:
        """Write the intent (old and new XML) before the change is made; returns its id."""
        with self._sql("write to"):
            cur = self._db.execute(
                "INSERT INTO xml_changes (at, uuid, name, actor, reason, old_xml, new_xml) VALUES (?,?,?,?,?,?,?)",
                (at, uuid, name, actor, reason, old_xml, new_xml),
            )
        return int(cur.lastrowid)

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
        q = "SELECT id, at, uuid, name, actor, reason, old_xml, new_xml, outcome FROM xml_changes"
        args: tuple = ()
        if uuid:
            q += " WHERE uuid=?"
            args = (uuid,)
        q += " ORDER BY id DESC LIMIT ?"
        with self._sql("read"):
            return [Change(*row) for row in self._db.execute(q, args + (limit,)).fetchall()]

    def change(self, change_id: int) -> Change | None:
        with self._sql("read"):
            row = self._db.execute(
                "SELECT id, at, uuid, name, actor, reason, old_xml, new_xml, outcome FROM xml_changes WHERE id=?",
                (change_id,),
            ).fetchone()
        return Change(*row) if row else None
