"""The firmware archive: a content-addressed, read-only store of code images.

Why it exists: a package upgrade replaces or removes `/usr/share/OVMF/*` by rename,
and by the time a package hook runs the old file is gone. A domain whose varstore
does not fit the new build must keep booting the build it had, so varsd keeps a copy
of every code image it has seen *before* anything changes it (at start-up, when the
catalog changes, when a domain is provisioned or bound).

Rules:
- An image lives at `<archive_dir>/<sha256>.fd`: its name is the digest of its
  content, so storing is idempotent and two paths holding one build share one copy.
- Files are written once by `fsio.create_exclusive` (atomic, never overwriting) with
  mode 0444, and never modified. The directory is 0755 and `state_dir` gets search
  permission for everyone (0711): QEMU runs as the qemu user and opens an archived
  image by path, while the journal and locks beside it stay private (0600/0700).
- Verify before use: `verify` and `index` hash each file (cached by stat) and compare
  with its name. The stat key (with ctime, which nobody can set back) of each image found
  good is kept in `<state_dir>/archive-verified.json`, so a new process (every varsctl
  command) trusts what an earlier one verified exactly as a running daemon trusts its own
  in-memory verification: until the file's stat key changes. A file whose content
  does not match is *corrupt*: reported, never offered to the planner, and replaced
  only by bytes of the right digest (the corrupt file is moved to `corrupt/` for inspection, never deleted).
- Symlinks and anything but regular files in the archive are refused, not followed.
- `prune` removes only what the caller says nobody is bound to, pinned to or running,
  and only once the retention period has passed since it was last used.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from varsd.adapters import fsio
from varsd.adapters.filecache import ContentCache, stat_key, trusted_cache
from varsd.errors import VarsdError
from varsd.model.archive import _NAME, SUFFIX, ArchiveIndex, archive_path, is_archive_path, sha_of_archive_path

__all__ = ["Archive", "ArchiveError", "ArchiveIndex", "Entry", "Stored", "archive_path", "is_archive_path",
           "sha_of_archive_path"]

QUARANTINE = "corrupt"


class ArchiveError(VarsdError):
    """The archive could not store, read or prune an image (the message names the file)."""


@dataclass(frozen=True)
class Entry:
    """One archived image as verified now: `problem` is None when its digest matches its name."""

    sha256: str
    path: str
    size: int = 0
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class Stored:
    """Result of a store: the entry, whether a file was written, and a corrupt file it replaced."""

    entry: Entry
    created: bool
    replaced_corrupt: str | None = None  # where the corrupt file was moved


class Archive:
    """The archive directory; safe to share between threads and with other processes."""

    def __init__(self, directory: str, *, state_dir: str | None = None) -> None:
        self.directory = directory
        self.state_dir = state_dir
        self._verified: ContentCache[Entry] = ContentCache()  # sha -> entry, per stat key
        self._persisted: dict[str, list[int]] | None = None  # sha -> stat key, as verified by any process
        self._persist_lock = threading.Lock()

    def path_for(self, sha256: str) -> str:
        return archive_path(self.directory, sha256)

    # -- set-up ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directory (0755) and give `state_dir` search permission (0711).

        Modes are set explicitly: the daemon runs with umask 0077, and QEMU (the qemu
        user) must reach the files. Only search (x) is added to `state_dir`, never read.
        """
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
            st = os.lstat(self.directory)
            if not stat.S_ISDIR(st.st_mode):
                raise ArchiveError(f"{self.directory}: the firmware archive is not a directory")
            if stat.S_IMODE(st.st_mode) != 0o755:
                os.chmod(self.directory, 0o755)
            parents = []
            if self.state_dir:
                parents.append(self.state_dir)
            for parent in parents:
                mode = stat.S_IMODE(os.stat(parent).st_mode)
                if mode & 0o011 != 0o011:
                    os.chmod(parent, mode | 0o011)
        except OSError as exc:
            raise ArchiveError(
                f"{exc.filename or self.directory}: cannot prepare the firmware archive: {fsio.describe_oserror(exc)}"
            ) from None

    # -- storing ---------------------------------------------------------------------

    def store_file(self, source: str, *, expect_sha256: str | None = None) -> Stored:
        """Archive the image at `source` (symlinks followed: distro paths often are links).

        With `expect_sha256`, a file whose content no longer has that digest (replaced
        since the caller looked) is refused: the caller's facts are stale.
        """
        try:
            data = fsio.read_file(source, follow_symlinks=True)
        except fsio.ReadError as exc:
            raise ArchiveError(f"cannot archive {source}: {exc}") from None
        sha = hashlib.sha256(data).hexdigest()
        if expect_sha256 is not None and sha != expect_sha256:
            raise ArchiveError(
                f"cannot archive {source}: it changed since it was read (now {sha[:12]}, "
                f"expected {expect_sha256[:12]})"
            )
        return self.store_bytes(data, source=source, sha256=sha)

    def store_bytes(self, data: bytes, *, source: str, sha256: str | None = None) -> Stored:
        """Archive `data` (read from `source`, named in messages) under its digest."""
        sha = sha256 or hashlib.sha256(data).hexdigest()
        target = self.path_for(sha)
        existing = self.verify(sha)
        if existing.ok:
            return Stored(existing, created=False)
        moved = None
        if existing.problem is not None and _exists(target):
            moved = self._quarantine(sha)
        self.prepare()
        try:
            fsio.create_exclusive(target, data, mode=0o444)
        except fsio.TargetExists:
            # Another varsd actor stored it between our look and our link: judge what is there.
            again = self.verify(sha)
            if again.ok:
                return Stored(again, created=False, replaced_corrupt=moved)
            raise ArchiveError(f"cannot archive {source} as {target}: {again.problem}") from None
        except VarsdError as exc:
            raise ArchiveError(f"cannot archive {source}: {exc}") from None
        entry = self.verify(sha)
        if not entry.ok:
            raise ArchiveError(f"archived {source} as {target}, but reading it back failed: {entry.problem}")
        return Stored(entry, created=True, replaced_corrupt=moved)

    def _quarantine(self, sha: str) -> str:
        """Move a corrupt image aside (kept for inspection) so a good copy can take its name."""
        qdir = os.path.join(self.directory, QUARANTINE)
        dest = os.path.join(qdir, f"{sha}{SUFFIX}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}")
        try:
            os.makedirs(qdir, mode=0o700, exist_ok=True)
            os.rename(self.path_for(sha), dest)
        except OSError as exc:
            raise ArchiveError(
                f"{self.path_for(sha)}: corrupt archived image could not be moved aside: {fsio.describe_oserror(exc)}"
            ) from None
        self._verified.drop(sha)
        self._persist(sha, None)
        return dest

    # -- reading ---------------------------------------------------------------------

    def verify(self, sha256: str) -> Entry:
        """The entry for `sha256`, its content checked against its name (cached by stat)."""
        path = self.path_for(sha256)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return Entry(sha256, path, problem="not archived")
        except OSError as exc:
            return Entry(sha256, path, problem=f"cannot examine {path}: {fsio.describe_oserror(exc)}")
        if not stat.S_ISREG(st.st_mode):
            return Entry(sha256, path, problem=f"{path} is not a regular file")

        key = stat_key(st, ctime=True)

        def check() -> Entry:
            if self._persisted_key(sha256) == list(key):
                return Entry(sha256, path, st.st_size)
            try:
                data = fsio.read_file(path, follow_symlinks=False)
            except fsio.ReadError as exc:
                return Entry(sha256, path, st.st_size, problem=str(exc))
            actual = hashlib.sha256(data).hexdigest()
            problem = None if actual == sha256 else (
                f"archived image {path} is corrupt: its content has digest {actual[:12]}, not {sha256[:12]}"
            )
            self._persist(sha256, list(key) if problem is None else None)
            return Entry(sha256, path, len(data), problem=problem)

        return self._verified.get(sha256, key, check)

    # -- verification kept between processes -------------------------------------------

    def _persist_path(self) -> str | None:
        return os.path.join(self.state_dir, VERIFIED_NAME) if self.state_dir else None

    def _persisted_key(self, sha256: str) -> list[int] | None:
        with self._persist_lock:
            if self._persisted is None:
                self._persisted = _load_verified(self._persist_path())
            return self._persisted.get(sha256)

    def _persist(self, sha256: str, key: list[int] | None) -> None:
        """Note (or, with None, forget) a verification; best effort, like any cache."""
        path = self._persist_path()
        with self._persist_lock:
            if self._persisted is None:
                self._persisted = _load_verified(path)
            if self._persisted.get(sha256) == key:
                return
            if key is None:
                self._persisted.pop(sha256, None)
            else:
                self._persisted[sha256] = key
            if path is None or not os.path.isdir(os.path.dirname(path)):
                return
            _save_verified(path, self._persisted)

    def entries(self) -> list[Entry]:
        """Every `<sha256>.fd` in the archive, verified; a missing archive is empty."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ArchiveError(f"{self.directory}: cannot list the firmware archive: {fsio.describe_oserror(exc)}") \
                from None
        return [self.verify(m.group(1)) for m in map(_NAME.match, names) if m]

    def index(self) -> ArchiveIndex:
        """A verified snapshot for the planner."""
        entries = self.entries()
        return ArchiveIndex(
            directory=self.directory,
            verified=frozenset(e.sha256 for e in entries if e.ok),
            corrupt={e.sha256: e.problem for e in entries if e.problem is not None},
        )

    # -- pruning ---------------------------------------------------------------------

    def prune(
        self,
        in_use: Iterable[str],
        last_used: Mapping[str, datetime],
        now: datetime,
        retention: timedelta,
    ) -> list[str]:
        """Remove archived images nobody uses whose last use is older than `retention`.

        `in_use` must hold every digest a domain is bound to, pinned to or running, and
        every build the catalog lists. An image with no recorded use counts from its
        file's modification time (when it was archived). Returns the removed digests.
        """
        keep = set(in_use)
        removed = []
        for entry in self.entries():
            if entry.sha256 in keep:
                continue
            since = last_used.get(entry.sha256)
            if since is None:
                try:
                    since = datetime.fromtimestamp(os.lstat(entry.path).st_mtime, tz=now.tzinfo)
                except OSError:
                    continue
            if now - since < retention:
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise ArchiveError(f"{entry.path}: cannot prune: {fsio.describe_oserror(exc)}") from None
            self._verified.drop(entry.sha256)
            self._persist(entry.sha256, None)
            removed.append(entry.sha256)
        return removed


VERIFIED_NAME = "archive-verified.json"


def _load_verified(path: str | None) -> dict[str, list[int]]:
    """The verifications kept in the state dir: trusted only from a regular file of root's
    (or ours) that nobody else may write, as any state varsd reads back."""
    if path is None:
        return {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if not trusted_cache(st):
            return {}
        doc = json.loads(os.read(fd, 1 << 20))
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    if not isinstance(doc, dict):
        return {}
    return {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, list)
            and all(isinstance(x, int) for x in v)}


def _save_verified(path: str, verified: dict[str, list[int]]) -> None:
    """A cache: temp file + rename (never half-written), 0644 (digests of world-readable
    files); a read-only state dir (an admin's `status`) leaves it to the next writer."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            json.dump(verified, f, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _exists(path: str) -> bool:
    try:
        os.lstat(path)
    except OSError as exc:
        return exc.errno != errno.ENOENT
    return True
