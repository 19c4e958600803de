"""Which domains use which varstore file, by file identity, host-wide.

Sharing is a fact about *all* domains, so one domain looked at alone (`varsctl status
NAME`) or before the domain it shares with (name order) must still see it: the index is
filled from every domain's persistent definition the first time it is needed, then kept
current as each domain is examined. Two `<nvram>` paths name one file when they are
equal after resolving symlinks, or when both exist with the same device and inode (a
hard link). Who keeps a shared file is decided by `varsd.planning.sharing` (pure); the
state of the *other* users (running, bound, opted out) is re-read from libvirt when a
match is found, because the index may be older than their last change.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass

from varsd.adapters.libvirt_api import Hypervisor
from varsd.domain.xml import parse_domain
from varsd.errors import VarsdError
from varsd.messages import about_domain
from varsd.model.domain import DomainFirmware
from varsd.planning.sharing import VarstoreUser

log = logging.getLogger("varsd.reconcile")


@dataclass(frozen=True)
class _Entry:
    user: VarstoreUser
    realpath: str
    inode: tuple[int, int] | None


def _plain(path: str) -> bool:
    """An absolute path that is its own normpath (cheaply: no '//', '/.' or trailing '/')."""
    return path.startswith("/") and "//" not in path and "/." not in path and not path.endswith("/")


def _identity(path: str, dirs: dict[str, str] | None = None) -> tuple[str, tuple[int, int] | None]:
    """(realpath, (dev, inode) or None). `dirs` caches realpath() of parent directories for
    one look at several names in one directory: a name that is no symlink resolves to its
    resolved directory plus itself, so only symlinks pay a full realpath()."""
    try:
        lst = os.lstat(path)
    except OSError:
        lst = None
    if (lst is not None and stat.S_ISLNK(lst.st_mode)) or dirs is None or not _plain(path):
        real = os.path.realpath(path)  # '..' after a symlink is not textual
    else:
        head, _, tail = path.rpartition("/")
        parent = dirs.get(head)
        if parent is None:
            parent = dirs[head] = os.path.realpath(head or "/")
        real = parent + tail if parent.endswith("/") else f"{parent}/{tail}"
    if lst is not None and not stat.S_ISLNK(lst.st_mode):
        return real, (lst.st_dev, lst.st_ino)
    try:
        st = os.stat(path)
    except OSError:
        return real, None
    return real, (st.st_dev, st.st_ino)


def _same(a: _Entry, b: _Entry) -> bool:
    return a.realpath == b.realpath or (a.inode is not None and a.inode == b.inode)


class VarstoreIndex:
    def __init__(self, hv: Hypervisor, own_path: Callable[[DomainFirmware], str],
                 is_managed: Callable[[DomainFirmware, bool], bool]) -> None:
        """`own_path(fw)` is libvirt's `<name>_VARS.fd` for a domain; `is_managed(fw, persistent)`
        whether varsd may change it (not opted out, excluded, transient)."""
        self.hv = hv
        self._own_path = own_path
        self._is_managed = is_managed
        self._entries: dict[str, _Entry] = {}
        # Inverse indexes, so one look is O(1) in the number of domains, not O(domains).
        self._by_real: dict[str, set[str]] = {}
        self._by_inode: dict[tuple[int, int], set[str]] = {}
        self._filled = False
        self._lock = threading.Lock()

    def _entry(self, fw: DomainFirmware, *, running: bool, persistent: bool = True) -> _Entry | None:
        path = fw.nvram_path
        if not path:
            return None
        real, inode = _identity(path)
        user = VarstoreUser(
            uuid=fw.uuid, name=fw.name, path=path, own=path == self._own_path(fw), link=os.path.islink(path),
            bound=fw.metadata.build_code_sha256 is not None, managed=self._is_managed(fw, persistent),
            running=running,
        )
        return _Entry(user, real, inode)

    def entry_of(self, fw: DomainFirmware, *, persistent: bool) -> tuple[VarstoreUser | None, str | None]:
        """The record `fw` would get (its `running` left False) and its file's realpath."""
        entry = self._entry(fw, running=False, persistent=persistent)
        return (entry.user, entry.realpath) if entry is not None else (None, None)

    def put_known(self, user: VarstoreUser, realpath: str, inode: tuple[int, int] | None) -> None:
        """Record a domain from what is known of it (a memo row whose key matched now)."""
        with self._lock:
            self._put(user.uuid, _Entry(user, realpath, inode))

    def register(self, fw: DomainFirmware, *, running: bool, persistent: bool) -> None:
        """Record what `fw` names now, without looking at the other users (yet)."""
        entry = self._entry(fw, running=running, persistent=persistent)
        with self._lock:
            if entry is None:
                self._drop(fw.uuid)
            else:
                self._put(fw.uuid, entry)

    def mark_filled(self) -> None:
        """The caller recorded every domain there is (status over all of them)."""
        with self._lock:
            self._filled = True

    def others(self, uuid: str) -> set[str]:
        """UUIDs of the other domains whose varstore is this domain's file (by identity)."""
        with self._lock:
            entry = self._entries.get(uuid)
            return self._matches(entry) - {uuid} if entry is not None else set()

    def _read(self, uuid: str) -> _Entry | None:
        """Another domain as libvirt has it now; None when it is gone or names no varstore."""
        ref = self.hv.lookup(uuid)
        fw = parse_domain(self.hv.persistent_xml(uuid) if ref.persistent else self.hv.live_xml(uuid))
        return self._entry(fw, running=ref.active, persistent=ref.persistent)

    def fill(self) -> None:
        """Every domain's varstore, once (later looks keep it current)."""
        with self._lock:
            if self._filled:
                return
        refs = self.hv.list_domains()  # libvirt gone: raises, and the next look fills it
        for ref in refs:
            try:
                entry = self._read(ref.uuid)
            except VarsdError as exc:  # one unreadable domain does not hide the others
                log.debug("varstore index: %s", about_domain(ref.name, exc, ref.uuid))
                continue
            with self._lock:
                if entry is not None and ref.uuid not in self._entries:
                    self._put(ref.uuid, entry)
        with self._lock:
            self._filled = True

    def note(self, fw: DomainFirmware, *, running: bool, persistent: bool) -> tuple[VarstoreUser | None,
                                                                                    list[VarstoreUser]]:
        """Record what `fw` names now; returns its user record and the other users of its file,
        re-read from libvirt."""
        self.fill()
        entry = self._entry(fw, running=running, persistent=persistent)
        with self._lock:
            if entry is None:
                self._drop(fw.uuid)
                return None, []
            self._put(fw.uuid, entry)
            candidates = sorted(self._matches(entry) - {fw.uuid})
        others: list[VarstoreUser] = []
        for uuid in candidates:
            try:
                fresh = self._read(uuid)
            except VarsdError:
                fresh = None  # gone meanwhile (or unreadable: it cannot be judged a sharer)
            with self._lock:
                if fresh is None:
                    self._drop(uuid)
                    continue
                self._put(uuid, fresh)
            if _same(fresh, entry):
                others.append(fresh.user)
        return entry.user, others

    def _put(self, uuid: str, entry: _Entry) -> None:
        self._drop(uuid)
        self._entries[uuid] = entry
        self._by_real.setdefault(entry.realpath, set()).add(uuid)
        if entry.inode is not None:
            self._by_inode.setdefault(entry.inode, set()).add(uuid)

    def _drop(self, uuid: str) -> _Entry | None:
        old = self._entries.pop(uuid, None)
        if old is not None:
            self._by_real.get(old.realpath, set()).discard(uuid)
            if old.inode is not None:
                self._by_inode.get(old.inode, set()).discard(uuid)
        return old

    def _matches(self, probe: _Entry) -> set[str]:
        found = set(self._by_real.get(probe.realpath, ()))
        if probe.inode is not None:
            found |= self._by_inode.get(probe.inode, set())
        return found

    def taken(self, paths: list[str], uuid: str) -> frozenset[str]:
        """Those of `paths` that another domain's varstore is (by identity)."""
        dirs: dict[str, str] = {}
        return frozenset(p for p in paths if self.user_of(p, uuid, dirs) is not None)

    def user_of(self, path: str, uuid: str, dirs: dict[str, str] | None = None) -> str | None:
        """The name of another domain whose varstore `path` is (by identity), if any."""
        real, inode = _identity(path, dirs)
        probe = _Entry(VarstoreUser(uuid="", name="", path=path), real, inode)
        with self._lock:
            others = sorted(self._matches(probe) - {uuid})
            return self._entries[others[0]].user.name if others else None

    def forget(self, uuid: str) -> str | None:
        with self._lock:
            entry = self._drop(uuid)
        return entry.user.path if entry is not None else None
