"""The catalog, kept between processes while every file it was read from is unchanged.

Loading the catalog reads every descriptor, hashes every code image and parses every
varstore in the firmware directories (discovery reads each file there: 64 MiB AAVMF
images too). A varsctl command pays that at every start, before it looks at any domain.
So `load_configured` keeps the result in `<state_dir>/catalog-cache.pickle` under a key
that is a digest of:
- varsd's version and the configuration that shapes the catalog (descriptor dirs,
  extra pairs, search dirs, Secure Boot templates);
- `filecache.file_key` (stat, and lstat of a symlink) of every descriptor dir and search
  dir (and its subdirectories, which discovery reads too), with the names in it and each
  entry's key; of every file a descriptor names (its `filename`s); of each extra pair.
A new, removed, replaced, touched or chmod-ed file changes the key, and the catalog is
loaded afresh (and stored again), re-reading only the files whose own key changed
(`FileResults`). The key is computed *before* a load, so a file that
changes during one is seen by the next process.

The file is written by root into the state dir (temp + rename, 0600, or 0640 to
`admin_group` like the state database); it is loaded only
when it is a regular file owned by this user or root and writable by no one else, as a
pickle must never come from someone else.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from typing import TypeVar

from varsd import __version__
from varsd.adapters import fsio
from varsd.adapters.filecache import file_key, trusted_cache
from varsd.config import Config
from varsd.model.firmware import Catalog

log = logging.getLogger(__name__)

NAME = "catalog-cache.pickle"
V = TypeVar("V")


def _path(cfg: Config) -> str:
    return os.path.join(cfg.state_dir, NAME)


def _filenames(doc: object) -> Iterator[str]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "filename" and isinstance(v, str):
                yield v
            else:
                yield from _filenames(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _filenames(v)


def _listing(d: str) -> list[str]:
    try:
        return sorted(os.listdir(d))
    except OSError:
        return []


def key(cfg: Config) -> str:
    """The digest of everything the catalog is read from (module doc)."""
    parts: list = [__version__, list(cfg.firmware_dirs), [[e.code, e.template] for e in cfg.extra_firmware],
                   list(cfg.firmware_search_dirs), cfg.secureboot_templates]
    named: set[str] = {p for e in cfg.extra_firmware for p in (e.code, e.template) if p}
    for d in cfg.firmware_dirs:
        names = _listing(d)
        parts.append([d, file_key(d), [[n, file_key(os.path.join(d, n))] for n in names]])
        for n in names:
            try:  # fsio never blocks in open() (a FIFO) and reads regular files only
                named.update(_filenames(json.loads(fsio.read_file(os.path.join(d, n), max_size=1 << 20))))
            except (fsio.ReadError, ValueError, RecursionError):  # hostile descriptors: the loader reports them
                continue  # its key above says it changed, if it does
    dirs = []
    for top in cfg.firmware_search_dirs:
        dirs.append(top)
        dirs += [os.path.join(top, n) for n in _listing(top) if os.path.isdir(os.path.join(top, n))]
    for d in dirs:
        parts.append([d, file_key(d), [[n, file_key(os.path.join(d, n))] for n in _listing(d)]])
    parts.append(sorted([p, file_key(p)] for p in named))
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def _stored(cfg: Config) -> tuple:
    """(key, catalog, file results) as stored; () when there is none we may trust."""
    path = _path(cfg)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not trusted_cache(st):
                return ()
            stored = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError):
        return ()
    return tuple(stored) if isinstance(stored, tuple) and len(stored) in (2, 3) else ()


def load(cfg: Config, cache_key: str) -> Catalog | None:
    """The stored catalog, when it was stored under `cache_key` (else None)."""
    stored = _stored(cfg)
    if not stored:
        return None
    catalog = stored[1]
    return catalog if stored[0] == cache_key and isinstance(catalog, Catalog) else None


class FileResults:
    """What the last load computed from each file's content (digests, layouts, discovery's
    probes), reused while that file's `file_key` is unchanged: after a package upgrade the
    next load reads only the files it replaced, not every 64 MiB AAVMF image again. The key
    is taken before the file is read, so a file changing during a read is read again next time."""

    def __init__(self, cfg: Config) -> None:
        stored = _stored(cfg)
        old = stored[2] if len(stored) == 3 else None
        self._old: dict = old if isinstance(old, dict) else {}
        self.new: dict = {}

    def get(self, what: str, path: str, compute: Callable[[str], V]) -> V:
        """`compute(path)`, or what it gave for the same file last time (a raise is not kept)."""
        fkey = file_key(path)
        hit = self._old.get((what, path))
        value = hit[1] if isinstance(hit, tuple) and len(hit) == 2 and hit[0] == fkey else compute(path)
        self.new[(what, path)] = (fkey, value)
        return value


def save(cfg: Config, cache_key: str, catalog: Catalog, results: FileResults | None = None) -> None:
    """Best effort (a cache): temp file 0600 + rename, never a half-written file."""
    path = _path(cfg)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            if cfg.admin_group:  # readable by the admins who may read the state database (status)
                with contextlib.suppress(KeyError, OSError):
                    os.fchown(f.fileno(), -1, grp.getgrnam(cfg.admin_group).gr_gid)
                    os.fchmod(f.fileno(), 0o640)
            stored = (cache_key, catalog) if results is None else (cache_key, catalog, results.new)
            pickle.dump(stored, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("firmware catalog: cache not written: %s", exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
