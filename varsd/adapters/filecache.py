"""The one content cache: what was computed from a file, kept while the file is unchanged.

A file's *stat key* (device, inode, size, mtime) changes whenever its content normally
does: a package upgrade replaces a file by rename (new inode), a guest's varstore is
rewritten in place (new mtime). Digests, varstore layouts and verified template bytes
are therefore computed once per stat key. One entry per name: a varstore rewritten at
every boot replaces its entry instead of accumulating versions.

Used by the file inspector (facts per image and varstore), the catalog loader (digests
and template layouts), provisioning (verified template bytes), the archive (verified
images) and the Secure Boot key reader (each store's digest).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

StatKey = tuple[int, ...]


def stat_key(st: os.stat_result, *, ctime: bool = False) -> StatKey:
    """What identifies a file's content cheaply; with `ctime`, also a content restored
    under an old mtime (`touch -d`), for files whose integrity is checked (the archive)."""
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return key + (st.st_ctime_ns,) if ctime else key


def stat_key_of(path: str) -> StatKey | None:
    """`stat_key` of `path` (symlinks followed), None when it cannot be stat()ed."""
    try:
        return stat_key(os.stat(path))
    except OSError:
        return None


def file_key(path: str) -> list:
    """For caches kept between processes (the plan memo, the catalog): what identifies a
    file's content and metadata. stat (ctime covers chmod, chown and a restore under an
    old mtime) and, for a symlink, the link itself; JSON-able."""
    try:
        lst = os.lstat(path)
    except OSError as exc:
        return ["absent", exc.errno]
    except ValueError:  # a NUL in the name (a hostile descriptor): no such file
        return ["absent", "invalid name"]
    key: list = []
    if stat.S_ISLNK(lst.st_mode):
        key = ["link", lst.st_dev, lst.st_ino, lst.st_ctime_ns]
        try:
            st = os.stat(path)
        except OSError as exc:
            return key + ["dangling", exc.errno]
    else:
        st = lst
    return key + [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode]


class ContentCache(Generic[V]):
    """name -> (stat key, value); thread-safe; `limit` bounds the number of names."""

    def __init__(self, limit: int | None = None) -> None:
        self._entries: dict[Hashable, tuple[Hashable, V]] = {}
        self._lock = threading.Lock()
        self._limit = limit

    def get(self, name: Hashable, key: Hashable, compute: Callable[[], V]) -> V:
        """The value for `name` at `key`, computed (outside the lock) when not cached.
        A compute that raises caches nothing."""
        with self._lock:
            hit = self._entries.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = compute()
        with self._lock:
            if self._limit is not None and name not in self._entries and len(self._entries) >= self._limit:
                self._entries.clear()
            self._entries[name] = (key, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[V]:
        """What is cached now (e.g. to keep what some name still refers to)."""
        with self._lock:
            return [v for _, v in self._entries.values()]

    def drop(self, name: Hashable) -> None:
        with self._lock:
            self._entries.pop(name, None)


def trusted_cache(st: os.stat_result) -> bool:
    """May a cache file kept between processes be believed? Only a regular file of root's
    (or ours) that nobody else may write: what it says is taken instead of reading files."""
    return stat.S_ISREG(st.st_mode) and st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022
