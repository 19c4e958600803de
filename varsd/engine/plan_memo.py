"""The compliant-plan memo, persisted, so a fresh process need not plan what is known.

The reconciler memoises each compliant plan (no actions, no shared varstore) in memory.
It also writes it to the state database (`varsd.adapters.plan_memo_store`) as a row
whose key is a digest of every input the plan was made from:

- varsd's version (the planner's rules), a canonical digest of the catalog and of the
  upgrade context (policy, verified archive, archived builds' features), `nvram_dir`,
  whether the domain is excluded, whether it is persistent;
- the sha256 of its persistent XML, and of its live XML (none: not running; so a start,
  a stop or a new boot record changes the key);
- `stat` (device, inode, size, mtime, ctime, mode) and, for a symlink, `lstat` of each
  file the plan read: the loader image and the varstore (templates are in the catalog).

A row is reused only when the key computed now is equal, so a reuse costs one XML fetch
(two when running), one hash and two stats per domain. What the key cannot cover is
checked live by its user (`varsd.engine.status`): the run state shown, sharing of the
varstore with another domain (the varstore index over every domain as it is now), the
last failed attempt (only plans with actions have one, and those are never memoised),
backups (their own index). Equal inputs give the same plan (the planner is pure, and its
clock value reaches only the metadata of actions), so a row never goes stale for its key.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from varsd import __version__
from varsd.adapters import fsio
from varsd.adapters.filecache import file_key
from varsd.adapters.plan_memo_store import StoredMemo
from varsd.engine import backups
from varsd.model.domain import DomainRef, FirmwareConfig, Status
from varsd.model.firmware import Build, Catalog
from varsd.planning.repair import Plan
from varsd.planning.sharing import VarstoreUser
from varsd.planning.upgrade import UpgradeContext


def canonical(obj: object) -> object:
    """A JSON-able form of frozen records that is the same in every process (sets sorted:
    their iteration order depends on the hash seed)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [type(obj).__name__] + [canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Mapping):
        return sorted([str(k), canonical(v)] for k, v in obj.items())
    if isinstance(obj, (set, frozenset)):
        return sorted(json.dumps(canonical(v), sort_keys=True) for v in obj)
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    return obj


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()


_context_lock = threading.Lock()
_context: tuple[Catalog, UpgradeContext, str, str] | None = None


def context_digest(catalog: Catalog, upgrades: UpgradeContext, nvram_dir: str) -> str:
    """The inputs shared by every domain's plan; computed once per catalog and context."""
    global _context
    with _context_lock:
        last = _context
        if last is not None and last[0] is catalog and last[1] is upgrades and last[2] == nvram_dir:
            return last[3]
    value = _digest([__version__, canonical(catalog), canonical(upgrades), nvram_dir])
    with _context_lock:
        _context = (catalog, upgrades, nvram_dir, value)
    return value


def xml_digest(xml: str | None) -> str | None:
    return hashlib.sha256(xml.encode("utf-8")).hexdigest() if xml is not None else None


def memo_key(context: str, xml: str, live_xml: str | None, *, excluded: bool, persistent: bool,
             files: list[list]) -> str:
    h = hashlib.sha256(f"{context}\0{excluded}\0{persistent}\0{files!r}\0".encode())
    h.update(xml.encode("utf-8"))
    if live_xml is not None:  # XML holds no NUL: the separator is unambiguous
        h.update(b"\0live\0")
        h.update(live_xml.encode("utf-8"))
    return h.hexdigest()


@dataclass(frozen=True)
class Row:
    """What a row holds: the plan's report, and what status needs besides it."""

    plan: Plan
    boot_unrecorded: bool
    nvram_path: str | None  # the <nvram> of the definition (backups, sharing)
    user: VarstoreUser | None  # the varstore index's record of it (running filled in live)
    realpath: str | None
    varstore: tuple[str, str] | None  # backups' stat key and sha256 of the varstore file (backup status)


def encode(plan: Plan, *, boot_unrecorded: bool, nvram_path: str | None, user: VarstoreUser | None,
           realpath: str | None, varstore: tuple[str, str] | None) -> str:
    build = [plan.build.code_path, plan.build.code_sha256] if plan.build is not None else None
    return json.dumps({
        "config": plan.config.value, "status": plan.status.value, "detail": plan.detail, "code": plan.code,
        "varstore": plan.varstore, "code_sha256": plan.code_sha256, "build": build,
        "boot_unrecorded": boot_unrecorded, "nvram": nvram_path, "realpath": realpath,
        "user": None if user is None else [user.own, user.bound, user.managed],
        "varstore_digest": list(varstore) if varstore else None,
    }, separators=(",", ":"))


_builds_lock = threading.Lock()
_builds: tuple[Catalog, dict[tuple[str, str], Build]] | None = None


def _build_of(catalog: Catalog, path: str, sha: str) -> Build | None:
    """The catalog's first build of this code path and digest (indexed once per catalog)."""
    global _builds
    with _builds_lock:
        last = _builds
        if last is None or last[0] is not catalog:
            index: dict[tuple[str, str], Build] = {}
            for b in catalog.builds:
                index.setdefault((b.code_path, b.code_sha256), b)
            last = _builds = (catalog, index)
    return last[1].get((path, sha))


def decode(uuid: str, name: str, text: str, catalog: Catalog, *, running: bool = False,
           files: Mapping[str, list] | None = None) -> Row | None:
    """The row, or None when it cannot be used (another version's shape, a build the
    catalog does not list: then the key could not have matched either). `running` and
    `files` (the file keys now) fill in what is live in its varstore user: running, link."""
    try:
        d = json.loads(text)
        build: Build | None = None
        if d["build"] is not None:
            path, sha = d["build"]
            build = _build_of(catalog, path, sha)
            if build is None:
                return None
        plan = Plan(FirmwareConfig(d["config"]), Status(d["status"]), d["detail"], build=build, code=d["code"],
                    varstore=d["varstore"], code_sha256=d["code_sha256"])
        user = None
        if d["user"] is not None and d["nvram"]:
            own, bound, managed = d["user"]
            key = files.get(d["nvram"]) if files is not None else None
            user = VarstoreUser(uuid, name, d["nvram"], own, key is not None and is_link(key), bound, managed, running)
        digest = d["varstore_digest"]
        return Row(plan, bool(d["boot_unrecorded"]), d["nvram"], user, d["realpath"],
                   (digest[0], digest[1]) if digest else None)
    except (ValueError, KeyError, TypeError):
        return None


def varstore_digest(path: str) -> tuple[str, str] | None:
    """(backups' stat key, sha256) of the whole varstore file, when it did not change
    during the read (a guest writing it moves its mtime: then none is kept, and status
    hashes the file itself)."""
    try:
        before = os.lstat(path)
        if not stat.S_ISREG(before.st_mode):
            return None
        data = fsio.read_file(path, follow_symlinks=False)
        after = os.lstat(path)
    except (OSError, fsio.ReadError):
        return None
    key = backups.stat_key(after)
    return (key, fsio.sha256_bytes(data)) if key == backups.stat_key(before) else None


def identity(key: list) -> tuple[int, int] | None:
    """(device, inode) of the file a `file_key` describes; None when there is none."""
    if key[0] == "absent" or "dangling" in key:
        return None
    return key[-6], key[-5]


def is_link(key: list) -> bool:
    return key[0] == "link"


def stored(key: str, files: list[str], row: str) -> StoredMemo:
    return StoredMemo(json.dumps(files), key, row)


def lookup(stored_memo: StoredMemo, ref: DomainRef, context: str, xml: str, live_xml: str | None, *,
           excluded: bool) -> dict[str, list] | None:
    """The file keys now (by path), when the row's key still matches (else None)."""
    try:
        paths = json.loads(stored_memo.paths)
    except ValueError:
        return None
    files = [file_key(p) for p in paths]
    key = memo_key(context, xml, live_xml, excluded=excluded, persistent=ref.persistent, files=files)
    return dict(zip(paths, files, strict=True)) if key == stored_memo.key else None
