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
import errno
import grp
import os
import re
import sqlite3
import stat
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from varsd.adapters import fsio
from varsd.clock import parse_stamp, stamp
from varsd.errors import StateDirError, VarsdError
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

# Secure Boot certificate rollout (varsd.engine.secureboot): updates waiting for a
# running guest to stop; canaries whose boot confirms a rollout. (The varstore writes
# themselves are journaled by varsd.engine.offline_write in `varstore_writes`.)
_SECUREBOOT_SCHEMA = """
CREATE TABLE IF NOT EXISTS secureboot_queue (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    queued_at TEXT NOT NULL,
    actor TEXT NOT NULL,
    tpm_ack INTEGER NOT NULL,
    canary INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS secureboot_canaries (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    at TEXT NOT NULL,
    written_sha256 TEXT
);
"""

FIRMWARE_EVENTS = ("appeared", "changed", "removed")


@dataclass(frozen=True)
class DomainRecord:
    """varsd's host-side record of a domain it changed; closed when it is undefined."""

    uuid: str
    name: str
    opened_at: datetime
    closed_at: datetime | None
    varstore: str | None


@dataclass(frozen=True)
class Change:
    id: int
    at: datetime
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
    at: datetime
    code_path: str
    sha256: str
    event: str


@dataclass(frozen=True)
class ArchivedBuild:
    """What is known about an archived image beyond its bytes."""

    sha256: str
    code_path: str  # where it was first seen
    size: int
    first_seen: datetime
    last_used: datetime
    layout: VarstoreLayout | None = None  # of the build's template, when a catalog build listed it
    features: frozenset[str] = frozenset()


@dataclass(frozen=True)
class QueuedUpdate:
    """A certificate update waiting for a running guest to stop."""

    uuid: str
    name: str
    queued_at: datetime
    actor: str
    tpm_ack: bool
    canary: bool


@dataclass(frozen=True)
class Canary:
    """A guest updated first; the rest waits until it has booted (its store then differs from `written_sha256`)."""

    uuid: str
    name: str
    at: datetime
    written_sha256: str | None


def column_text(t: datetime) -> str:
    """A time as the database column holds it (the one text form, clock.stamp)."""
    return stamp(t)


def column_time(text: str) -> datetime:
    """A time column: varsd's stamp (an older row in another ISO 8601 form: read as such)."""
    try:
        return parse_stamp(text)
    except ValueError:
        t = datetime.fromisoformat(text)
        return t if t.tzinfo else t.replace(tzinfo=UTC)


def _layout_text(layout: VarstoreLayout | None) -> str | None:
    return None if layout is None else f"{layout.size}:{layout.start}:{layout.end}"


def _layout_of(text: str | None) -> VarstoreLayout | None:
    try:
        size, start, end = (int(x) for x in (text or "").split(":"))
    except ValueError:
        return None
    return VarstoreLayout(size, start, end)


_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def _disk_full(directory: str) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def _connect_read_only(path: str) -> sqlite3.Connection:
    """A read-only connection: `mode=ro` (sees a live writer's WAL through its -shm file, even
    one this reader may only read), else `immutable=1` where SQLite cannot make the -shm file
    (a read-only mount, or an admin who may read the database but not write its directory,
    while no varsd has it open). Never immutable over a WAL it could not read: that would
    show the journal as it was before the WAL's changes."""
    quoted = urllib.parse.quote(path)
    db = sqlite3.connect(f"file:{quoted}?mode=ro", uri=True, timeout=30, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.Error:
        db.close()  # nothing left open on the file system (it may be unmounted next)
        if _size(path + "-wal"):
            raise
    db = sqlite3.connect(f"file:{quoted}?mode=ro&immutable=1", uri=True, timeout=30, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        db.close()
        raise
    return db


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _share(path: str, readers: str) -> None:
    """Let group `readers` read the database: the file 0640 in that group, and SQLite's -wal
    and -shm files too (SQLite creates them with the database file's mode and owner, so this
    holds for later ones). "root", or a group that does not exist: 0600, root only. The state
    directory gets search permission. Where it cannot be changed (not root), it stays as is."""
    try:
        gid = 0 if readers == "root" else grp.getgrnam(readers).gr_gid
    except KeyError:
        gid = 0
    mode = 0o600 if gid == 0 else 0o640
    try:
        state = os.path.dirname(path)
        if gid and not os.stat(state).st_mode & 0o001:
            os.chmod(state, stat.S_IMODE(os.stat(state).st_mode) | 0o011)
        for name in (path, path + "-wal", path + "-shm"):
            try:
                st = os.lstat(name)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # StateDB refuses a link in the database's place; SQLite the others
            # by path, never by an fd: closing one would drop this process's SQLite locks
            if st.st_gid != gid:
                os.chown(name, -1, gid, follow_symlinks=False)
            if stat.S_IMODE(st.st_mode) != mode:
                os.chmod(name, mode)
    except OSError:
        pass


_CREATE_TABLE = re.compile(r"(CREATE TABLE IF NOT EXISTS (\w+) \(.*?\);)", re.S)


class StateDB:
    """One connection to the state database (0600, WAL, synchronous=FULL), shared by worker
    threads. One file holds the journal and the backup index (`varsd.adapters.backup_index`);
    each opens its own connection through here.

    Reading commands open it `read_only` (never creating or writing anything; a missing
    database reads as empty, and tables an older varsd did not create read as empty). A state
    dir that cannot be written (read-only mount, wrong owner) still serves them, and a writing
    open falls back to reading too: every write then raises StateDirError saying why."""

    SCHEMA = ""

    def __init__(self, path: str, *, read_only: bool = False, readers: str | None = None) -> None:
        """`readers`: the group that may read the database (Config.admin_group; see `_share`);
        None leaves its permissions as they are."""
        self.path = path
        self.read_only = False
        self._lock = threading.RLock()  # one connection, several worker threads; `batch` nests
        state = os.path.dirname(path)
        if read_only:
            if os.path.lexists(state) and not os.path.isdir(state):
                raise fsio.state_dir_error(state, OSError(errno.ENOTDIR, "not a directory"), "state directory")
            self._why_read_only = StateDirError(f"{path}: the varsd journal was opened read-only")
            self._open_read_only()
            return
        try:
            os.makedirs(state, mode=0o711 if readers else 0o700, exist_ok=True)
            # Create it 0600 first, but never open and close an *existing* database file here:
            # closing any fd of a file drops every POSIX lock this process holds on it, and a
            # process with another connection open (journal and backup index) would lose the
            # locks SQLite's WAL mode relies on; another process closing then deletes the WAL
            # under it and its writes vanish.
            if not os.path.lexists(path):
                try:
                    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
                except FileExistsError:
                    pass
            if os.path.islink(path) or os.path.isdir(path):
                raise OSError(errno.ELOOP, "not a plain file", path)
            # An existing file is not opened here (see above), so ask whether it could be written.
            if os.statvfs(state).f_flag & os.ST_RDONLY:
                raise OSError(errno.EROFS, "read-only file system", state)
            if not (os.access(path, os.W_OK) and os.access(state, os.W_OK)):
                raise OSError(errno.EACCES, "permission denied", path)
            if readers:
                _share(path, readers)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR):
                raise StateDirError(f"{path}: the varsd journal is not a plain file (a symbolic link or "
                                    "directory is in its place); move it away, varsd starts a new one") from None
            if exc.errno not in _READ_ONLY_ERRNOS or not os.path.isdir(state):
                raise fsio.state_dir_error(state, exc, "state directory") from None
            self._why_read_only = fsio.state_dir_error(state, exc, "state directory")
            self._open_read_only()
            return
        db = None
        try:
            db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a journaled old XML survives a power cut
            db.executescript(self.SCHEMA)
            self._db = db
        except sqlite3.Error as exc:
            if db is not None:
                db.close()  # no file left open on the state dir's file system
            if _disk_full(state):  # SQLite says "disk I/O error" when it cannot grow its -wal/-shm files
                raise fsio.state_dir_error(state, OSError(errno.ENOSPC, "full"), "state directory") from None
            raise StateDirError(f"{path}: cannot open the varsd journal ({exc}); if it is damaged, move it "
                                "away (varsd starts a new one)") from None

    def _open_read_only(self) -> None:
        self.read_only = True
        try:
            if os.path.isfile(self.path):
                self._db = _connect_read_only(self.path)
                have = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                # Tables an older varsd (or one that never backed anything up) did not create
                # read as empty: temporary tables, only where the file has none (a temp table
                # would shadow the real one).
                for stmt, table in _CREATE_TABLE.findall(self.SCHEMA):
                    if table not in have:
                        self._db.execute(stmt.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))
            else:  # nothing journaled yet: an empty database to read
                self._db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
                self._db.executescript(self.SCHEMA)
        except sqlite3.Error as exc:
            raise StateDirError(f"{self.path}: cannot read the varsd journal ({exc}); if it is damaged, move it "
                                "away (varsd starts a new one)") from None

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _sql(self, what: str) -> Iterator[None]:
        """Serialise use of the one connection; sqlite3 errors (disk full, I/O error,
        locked too long) become VarsdError naming the file, which callers handle."""
        with self._lock:
            if self.read_only and what != "read":
                raise self._why_read_only
            try:
                yield
            except sqlite3.Error as exc:
                raise VarsdError(f"{self.path}: cannot {what} the varsd journal: {exc}") from None

    @contextlib.contextmanager
    def batch(self, what: str = "write to") -> Iterator[None]:
        """Many writes in one transaction (one fsync, not one per row), all or none."""
        with self._sql(what):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


def _change(row: tuple) -> Change:
    return Change(row[0], column_time(row[1]), *row[2:-1], kind=ChangeKind(row[-1]))


class Journal(StateDB):
    """The journal of XML changes (plus firmware history, archived builds, domain records and
    the Secure Boot update queue), on the shared state database."""

    SCHEMA = _SCHEMA + _SECUREBOOT_SCHEMA

    def __init__(self, path: str, *, read_only: bool = False, readers: str | None = None) -> None:
        """Open (creating it if need be) the journal; `read_only`, `readers`: see StateDB."""
        super().__init__(path, read_only=read_only, readers=readers)
        try:
            if self.read_only:
                self._kind_column = self._has_kind()
            else:
                if not self._has_kind():
                    self._add_kind()
                self._kind_column = True
        except sqlite3.Error as exc:
            raise StateDirError(f"{path}: cannot open the varsd journal ({exc}); if it is damaged, move it "
                                "away (varsd starts a new one)") from None

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

    def record(self, *, at: datetime, uuid: str, name: str, actor: str, reason: str, old_xml: str, new_xml: str,
               kind: ChangeKind = ChangeKind.EDIT) -> int:
        """Write the intent (old and new XML) before the change is made; returns its id.

        The first change to a domain also opens its record (see `close_record`)."""
        with self._sql("write to"):
            self._db.execute(
                "INSERT INTO domain_records (uuid, name, opened_at) VALUES (?,?,?) "
                "ON CONFLICT(uuid) DO UPDATE SET name=excluded.name, closed_at=NULL",
                (uuid, name, column_text(at)),
            )
            cur = self._db.execute(
                "INSERT INTO xml_changes (at, uuid, name, actor, reason, old_xml, new_xml, kind) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (column_text(at), uuid, name, actor, reason, old_xml, new_xml, kind.value),
            )
        return int(cur.lastrowid)

    def record_many(self, intents: list[dict]) -> list[int]:
        """`record` for many changes in one transaction (one fsync): all intents are on disk
        before libvirt sees any of them, or none is. Each dict has `record`'s arguments."""
        with self.batch():
            return [self.record(**intent) for intent in intents]

    def close_record(self, uuid: str, at: datetime, varstore: str | None = None) -> DomainRecord | None:
        """The domain was undefined: close varsd's record of it, noting the varstore that
        stays on disk (varsd never deletes one). None when varsd never changed it."""
        with self._sql("write to"):
            self._db.execute(
                "UPDATE domain_records SET closed_at=?, varstore=COALESCE(?, varstore) "
                "WHERE uuid=? AND closed_at IS NULL",
                (column_text(at), varstore, uuid),
            )
        return self.domain_record(uuid)

    def domain_record(self, uuid: str) -> DomainRecord | None:
        with self._sql("read"):
            row = self._db.execute(
                "SELECT uuid, name, opened_at, closed_at, varstore FROM domain_records WHERE uuid=?", (uuid,)
            ).fetchone()
        if row is None:
            return None
        uuid, name, opened, closed, varstore = row
        return DomainRecord(uuid, name, column_time(opened), column_time(closed) if closed else None, varstore)

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

    def settle_many(self, outcomes: list[tuple[int, str, str | None]]) -> None:
        """`settle` for many (change id, outcome, stored XML or None) in one transaction."""
        with self._sql("write to"):
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany("UPDATE xml_changes SET outcome=?, new_xml=COALESCE(?, new_xml) WHERE id=?",
                                         [(outcome, stored, change_id) for change_id, outcome, stored in outcomes])
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
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

    def pending(self, uuid: str) -> list[Change]:
        """Entries of `uuid` whose define never reported back (the actor died mid-define)."""
        q = (f"SELECT id, at, uuid, name, actor, reason, old_xml, new_xml, outcome, {self._kind_sql()} "
             "FROM xml_changes WHERE uuid=? AND outcome='pending' ORDER BY id")
        with self._sql("read"):
            return [_change(row) for row in self._db.execute(q, (uuid,)).fetchall()]

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

    def record_firmware(self, at: datetime, events: list[tuple[str, str, str]]) -> None:
        """Record (code_path, sha256, event) changes in one transaction."""
        bad = [e for _, _, e in events if e not in FIRMWARE_EVENTS]
        if bad:
            raise ValueError(f"unknown firmware event(s) {bad}")
        with self._sql("write to"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO firmware_history (at, code_path, sha256, event) VALUES (?,?,?,?)",
                    [(column_text(at), path, sha, event) for path, sha, event in events],
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
        return [FirmwareEvent(i, column_time(at), path, sha, event) for i, at, path, sha, event in rows]

    # -- archived builds -------------------------------------------------------------

    def note_archived(
        self, *, sha256: str, code_path: str, size: int, at: datetime,
        layout: VarstoreLayout | None = None, features: frozenset[str] = frozenset(),
    ) -> None:
        """Remember an archived image; layout and features are filled in once known."""
        with self._sql("write to"):
            self._db.execute(
                "INSERT INTO archived_builds (sha256, code_path, size, first_seen, last_used, layout, features) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT(sha256) DO UPDATE SET "
                "layout=COALESCE(archived_builds.layout, excluded.layout), "
                "features=COALESCE(archived_builds.features, excluded.features)",
                (sha256, code_path, size, column_text(at), column_text(at), _layout_text(layout),
                 " ".join(sorted(features)) if layout is not None else None),
            )

    def touch_archived(self, shas: set[str] | frozenset[str], at: datetime) -> None:
        """Mark these digests used now (retention counts from the last use)."""
        with self._sql("write to"):
            self._db.executemany("UPDATE archived_builds SET last_used=? WHERE sha256=?",
                                 [(column_text(at), s) for s in shas])

    def archived_builds(self) -> dict[str, ArchivedBuild]:
        with self._sql("read"):
            rows = self._db.execute(
                "SELECT sha256, code_path, size, first_seen, last_used, layout, features FROM archived_builds"
            ).fetchall()
        return {
            sha: ArchivedBuild(sha, path, size, column_time(first), column_time(last), _layout_of(layout),
                               frozenset((features or "").split()))
            for sha, path, size, first, last, layout, features in rows
        }

    def forget_archived(self, shas: list[str]) -> None:
        with self._sql("write to"):
            self._db.executemany("DELETE FROM archived_builds WHERE sha256=?", [(s,) for s in shas])

    # -- the Secure Boot rollout ----------------------------------------------------

    def queue_secureboot(self, *, uuid: str, name: str, at: datetime, actor: str, tpm_ack: bool, canary: bool) -> None:
        with self._sql("write to"):
            self._db.execute(
                "INSERT INTO secureboot_queue (uuid, name, queued_at, actor, tpm_ack, canary) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(uuid) DO UPDATE SET name=excluded.name, tpm_ack=excluded.tpm_ack, "
                "canary=MAX(canary, excluded.canary)", (uuid, name, column_text(at), actor, int(tpm_ack), int(canary)),
            )

    def secureboot_queue(self) -> dict[str, QueuedUpdate]:
        with self._sql("read"):
            rows = self._db.execute(
                "SELECT uuid, name, queued_at, actor, tpm_ack, canary FROM secureboot_queue").fetchall()
        return {r[0]: QueuedUpdate(r[0], r[1], column_time(r[2]), r[3], bool(r[4]), bool(r[5])) for r in rows}

    def unqueue_secureboot(self, uuid: str) -> None:
        with self._sql("write to"):
            self._db.execute("DELETE FROM secureboot_queue WHERE uuid=?", (uuid,))

    def note_canary(self, *, uuid: str, name: str, at: datetime, written_sha256: str | None) -> None:
        with self._sql("write to"):
            self._db.execute(
                "INSERT INTO secureboot_canaries (uuid, name, at, written_sha256) VALUES (?,?,?,?) "
                "ON CONFLICT(uuid) DO UPDATE SET at=excluded.at, "
                "written_sha256=COALESCE(excluded.written_sha256, written_sha256)",
                (uuid, name, column_text(at), written_sha256),
            )

    def canaries(self) -> list[Canary]:
        with self._sql("read"):
            rows = self._db.execute("SELECT uuid, name, at, written_sha256 FROM secureboot_canaries").fetchall()
        return [Canary(u, n, column_time(at), w) for u, n, at, w in rows]

    def forget_canaries(self) -> None:
        with self._sql("write to"):
            self._db.execute("DELETE FROM secureboot_canaries")

    # -- failed attempts ---------------------------------------------------------------

    def note_failure(self, *, uuid: str, name: str, at: datetime, action: str, error: str,
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
                (uuid, name, column_text(at), column_text(at), action, error, definition_sha256),
            )
        failure = self.failure(uuid)
        if failure is None:  # written above in this connection: only a damaged database does this
            raise StateDirError(f"{self.path}: a failure just recorded for {uuid} cannot be read back")
        return failure

    def failure(self, uuid: str) -> AttemptFailure | None:
        with self._sql("read"):
            row = self._db.execute(
                "SELECT uuid, name, first_at, at, action, error, count, definition_sha256 FROM domain_failures "
                "WHERE uuid=?", (uuid,)).fetchone()
        if row is None:
            return None
        uuid, name, first_at, at, action, error, count, definition_sha256 = row
        return AttemptFailure(uuid, name, column_time(first_at), column_time(at), action, error, count,
                              definition_sha256)

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
