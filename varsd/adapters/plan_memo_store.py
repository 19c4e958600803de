"""The persisted plan memo: one row per domain in the state database (`plan_memo`).

A cache, not a record: a row says "for these inputs (its `key`) the plan was this"
(`varsd.engine.plan_memo` builds and checks both). Losing a row costs one recompute,
so rows are written without an fsync of their own (WAL, synchronous=NORMAL), and a
state database that cannot be written (a non-root admin, a read-only mount) only reads.
Its own table and connection beside the journal's, on the same file.
"""

from __future__ import annotations

from dataclasses import dataclass

from varsd.adapters.journal import StateDB
from varsd.errors import VarsdError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS plan_memo (
    uuid TEXT PRIMARY KEY,
    paths TEXT NOT NULL,
    key TEXT NOT NULL,
    row TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class StoredMemo:
    """One row as stored: the files its key covers (JSON list), the key, the row (JSON)."""

    paths: str
    key: str
    row: str


class PlanMemoStore(StateDB):
    SCHEMA = _SCHEMA

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        super().__init__(path, read_only=read_only)
        if not self.read_only:
            self._db.execute("PRAGMA synchronous=NORMAL")  # this connection writes only the cache

    @property
    def writable(self) -> bool:
        return not self.read_only

    def all(self) -> dict[str, StoredMemo]:
        """Every row, by domain UUID (one query: status reads them all at once)."""
        with self._sql("read"):
            rows = self._db.execute("SELECT uuid, paths, key, row FROM plan_memo").fetchall()
        return {uuid: StoredMemo(paths, key, row) for uuid, paths, key, row in rows}

    def put(self, uuid: str, memo: StoredMemo) -> None:
        """Replace the domain's row; a failure is the caller's to ignore (it is a cache)."""
        self._write("INSERT INTO plan_memo (uuid, paths, key, row) VALUES (?,?,?,?) ON CONFLICT(uuid) DO UPDATE "
                    "SET paths=excluded.paths, key=excluded.key, row=excluded.row",
                    (uuid, memo.paths, memo.key, memo.row))

    def drop(self, uuid: str) -> None:
        self._write("DELETE FROM plan_memo WHERE uuid=?", (uuid,))

    def _write(self, sql: str, args: tuple) -> None:
        if self.read_only:
            return
        try:
            with self._sql("write to"):
                self._db.execute(sql, args)
        except VarsdError:
            pass  # a full disk or a locked database: the next look recomputes, nothing is wrong
