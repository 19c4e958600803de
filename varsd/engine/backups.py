"""Varstore backups: a content-addressed store under state_dir, indexed in the state DB.

Why: a varstore holds a guest's boot entries, BootOrder, Secure Boot keys, MokList and
shim's SBAT level, and libvirt's own tools destroy it without a copy (`virsh undefine
--nvram`, `virsh start --reset-nvram`). varsd keeps every version it saw.

- Bytes live once per digest: `<state_dir>/backups/objects/<sha256>.fd` (0600, dir
  0700), created exclusively and read back before it counts; a host of 1000 guests
  with fresh varstores stores one file. Every use (restore, diff) verifies the digest
  again: a flipped byte is detected and never restored.
- The index (`BackupIndex`) has one row per (domain UUID, name, time, digest, reason).
- A pass that finds nothing changed costs one `lstat` per varstore: what varsd last
  saw of each file (device, inode, size, mtime, ctime and digest) is remembered.
- A running guest's varstore is copied only when the copy is known whole
  (`backup_running`): `coherent` reads until two reads agree and the result parses as
  a varstore of the expected layout, else it is retried at the next pass; `suspend`
  pauses the guest for the one read and resumes it; `skip` leaves running guests to
  the copy taken when they stop.

`BackupStore` is the API other modules build on (restore, reset, migrate, Secure Boot
updates): `backup_now(ref, path, reason)` returns a verified `BackupRecord`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from varsd.adapters import fsio, virtfw
from varsd.adapters.backup_index import BackupIndex
from varsd.adapters.libvirt_api import DomainRef, Hypervisor
from varsd.clock import SYSTEM, Clock, stamp
from varsd.config import Config
from varsd.domain.xml import parse_domain
from varsd.errors import VarsdError, VarstoreError
from varsd.messages import about_domain
from varsd.model.backup import BackupRecord, BackupRunning, SeenVarstore
from varsd.model.firmware import Catalog, VarstoreLayout

log = logging.getLogger("varsd.backups")

OBJECTS = "objects"
COHERENT_TRIES = 5
COHERENT_DELAY = 0.05  # seconds between two reads of a running guest's varstore
FEW = 8  # targets of a pass that are looked up one by one in the index (more: all rows at once)
PASS_BATCH = 100  # varstores per index transaction in a pass (a suspend pass never holds it long)


class BackupError(VarsdError):
    """A backup could not be taken or used; the message names the domain or file."""


class BackupCorrupt(BackupError):
    """A stored backup no longer has the digest it was stored under: never used."""


class IncoherentCopy(BackupError):
    """A running guest's varstore could not be read whole (it was being written); retried later."""


def stat_key(st: os.stat_result) -> str:
    """What identifies a file's content without reading it; ctime too, which no copy tool can set."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def inode_of(key: str) -> str:
    """The `dev:ino` part of a stat key: which file, whatever its content."""
    return ":".join(key.split(":")[:2])


def lstat_varstore(path: str) -> os.stat_result:
    """lstat the varstore, refusing anything but a regular file (never follows a symlink)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise BackupError(f"{path}: cannot stat: {fsio.describe_oserror(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BackupError(f"{path}: not a regular file (varsd backs up only plain varstore files)")
    return st


def read_offline(path: str) -> bytes:
    """The whole varstore of a guest that is not running: one read, never via a symlink."""
    try:
        return fsio.read_file(path, follow_symlinks=False)
    except fsio.ReadError as exc:
        raise BackupError(str(exc)) from None


def read_coherent(path: str, layout: VarstoreLayout | None = None, *, tries: int = COHERENT_TRIES,
                  delay: float = COHERENT_DELAY, sleep: Callable[[float], None] = time.sleep) -> bytes:
    """A running guest's varstore, known whole: two consecutive reads agree and parse as a
    varstore (of `layout`, when known). QEMU writes the file in place while the guest
    changes variables, so one read can be torn. IncoherentCopy if no two reads agree."""
    previous: bytes | None = None
    problem = "the file changed between every two reads"
    for attempt in range(tries):
        data = read_offline(path)
        if data == previous:
            try:
                got = virtfw.layout_of_bytes(data, path)
            except VarstoreError as exc:
                problem = f"it does not parse as a varstore ({exc})"
            else:
                if layout is not None and got != layout:
                    problem = f"its layout {got.describe()} is not the expected {layout.describe()}"
                elif got.size != len(data):
                    problem = f"its varstore is {got.size} bytes but the file has {len(data)}"
                else:
                    return data
        previous = data
        if attempt + 1 < tries:
            sleep(delay)
    raise IncoherentCopy(f"{path}: no whole copy of the running guest's varstore after {tries} reads: {problem}; "
                         "retried at the next pass")


@dataclass(frozen=True)
class Target:
    """One varstore a backup pass looks at (gathered from libvirt by the caller)."""

    uuid: str
    name: str
    path: str
    running: bool = False
    layout: VarstoreLayout | None = None  # expected, when known (checks a running guest's copy)
    paused: bool = False  # running but paused (by the admin): its vCPUs write nothing


@dataclass(frozen=True)
class PassResult:
    """What a pass did to one target."""

    target: Target
    record: BackupRecord | None = None  # a new backup
    unchanged: bool = False  # same content as the newest backup
    read: bool = False  # False: a stat said enough
    skipped: str | None = None  # why no copy was taken (running with backup_running=skip, torn, missing)
    error: str | None = None
    paused_ms: float | None = None  # backup_running=suspend: how long the guest was paused


def open_store(cfg: Config, *, clock: Clock = SYSTEM, read_only: bool = False) -> BackupStore:
    """The host's backup store (`<state_dir>/backups`, index in the state database);
    `read_only` for commands that only look (status, list, diff): nothing is created."""
    index = BackupIndex(cfg.journal_path, read_only=read_only, readers=cfg.admin_group)
    return BackupStore(cfg.backup_dir, index, clock=clock)


class BackupStore:
    """The content-addressed files plus their index; every public method verifies."""

    def __init__(self, directory: str, index: BackupIndex, *, clock: Clock = SYSTEM) -> None:
        self.directory = directory
        self.index = index
        self.clock = clock

    # -- objects ------------------------------------------------------------------------

    @property
    def objects_dir(self) -> str:
        return os.path.join(self.directory, OBJECTS)

    def object_path(self, sha256: str) -> str:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise BackupError(f"{sha256!r}: not a sha256 digest")
        return os.path.join(self.objects_dir, f"{sha256}.fd")

    def _ensure_dirs(self) -> None:
        for d in (self.directory, self.objects_dir):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
            except OSError as exc:
                raise BackupError(f"cannot create backup directory {d}: {fsio.describe_oserror(exc)}") from None

    def put(self, data: bytes) -> str:
        """Store `data` once under its digest (verified on disk); returns the digest.

        An existing object is reused only if it still reads back with its digest; a
        damaged one is moved aside (`.corrupt-<time>`) and written again."""
        sha = fsio.sha256_bytes(data)
        path = self.object_path(sha)
        self._ensure_dirs()
        for _ in range(2):
            try:
                fsio.create_exclusive(path, data, mode=0o600)
            except fsio.TargetExists:
                if self.problem(sha) is None:
                    return sha
                aside = f"{path}.corrupt-{int(time.time())}"
                log.error("backup object %s is damaged; moved to %s and stored again", path, aside)
                try:
                    os.rename(path, aside)
                except OSError as exc:
                    raise BackupError(f"{path}: damaged and cannot be moved aside: "
                                      f"{fsio.describe_oserror(exc)}") from None
                continue
            except VarsdError as exc:
                raise BackupError(f"cannot store a backup: {exc}") from None
            problem = self.problem(sha)
            if problem is not None:
                raise BackupError(f"backup {path} does not read back as written: {problem}")
            return sha
        raise BackupError(f"{path}: cannot store the backup (replaced again while being written)")

    def problem(self, sha256: str) -> str | None:
        """None when the object is there with its digest; else what is wrong."""
        path = self.object_path(sha256)
        try:
            got = fsio.sha256_bytes(fsio.read_file(path, follow_symlinks=False))
        except fsio.ReadError as exc:
            return str(exc)
        return None if got == sha256 else f"its content has digest {got[:16]}..., not {sha256[:16]}..."

    def load(self, record: BackupRecord) -> bytes:
        """The backup's bytes, verified against its digest (BackupCorrupt if they differ)."""
        path = self.object_path(record.sha256)
        try:
            data = fsio.read_file(path, follow_symlinks=False)
        except fsio.ReadError as exc:
            raise BackupCorrupt(f"backup #{record.id} of domain '{record.name}': {exc}") from None
        got = fsio.sha256_bytes(data)
        if got != record.sha256:
            raise BackupCorrupt(
                f"backup #{record.id} of domain '{record.name}' ({path}) is damaged: its content has digest "
                f"{got[:16]}..., not {record.sha256[:16]}...; it will not be used (pick another with "
                "'varsctl backup list')")
        return data

    # -- records ------------------------------------------------------------------------

    def add(self, *, uuid: str, name: str, data: bytes, reason: str, source: str,
            st: os.stat_result | None = None) -> BackupRecord:
        """Store bytes already read and index them; `st` (the stat before the read) lets the
        next pass skip an unchanged file."""
        sha = self.put(data)
        at = self.clock.now()
        record = self.index.add(uuid=uuid, name=name, taken=at, sha256=sha, size=len(data), reason=reason,
                                source=source)
        if st is not None:
            self.index.note_seen(SeenVarstore(uuid=uuid, path=source, stat_key=stat_key(st), sha256=sha, at=at))
        log.info("domain '%s': backed up %s (%s, sha256 %s, #%d)", name, source, reason, sha[:12], record.id)
        return record

    def backup_now(self, ref: DomainRef, path: str, reason: str, *, running: bool = False,
                   layout: VarstoreLayout | None = None) -> BackupRecord:
        """Back up the domain's varstore at `path` now and return the verified record.

        The caller says whether the guest runs (then the copy must be coherent, see
        `read_coherent`); for an offline write the caller holds the domain's lock and
        knows it is shut off, so one read is the file."""
        st = lstat_varstore(path)
        data = read_coherent(path, layout) if running else read_offline(path)
        return self.add(uuid=ref.uuid, name=ref.name, data=data, reason=reason, source=path, st=st)

    def note_written(self, uuid: str, path: str, data: bytes) -> None:
        """varsd itself just wrote `data` to `path`: remember its identity, so the new inode
        is not mistaken for someone else replacing the file."""
        try:
            st = os.lstat(path)
        except OSError:
            return
        self.index.note_seen(SeenVarstore(uuid=uuid, path=path, stat_key=stat_key(st),
                                          sha256=fsio.sha256_bytes(data), at=self.clock.now()))

    # -- a pass ---------------------------------------------------------------------------

    def run_pass(self, targets: Iterable[Target], *, reason: str, running_mode: BackupRunning = BackupRunning.COHERENT,
                 hv: Hypervisor | None = None) -> list[PassResult]:
        """Back up every target whose varstore changed since its newest backup.

        An unchanged file (same stat key as last seen, and that content already backed
        up) costs one lstat. `running_mode` (backup_running) decides running guests;
        `suspend` needs `hv` to pause and resume them."""
        pending = list(targets)
        if len(pending) <= FEW:  # one domain defined or stopped: its rows, not every domain's (a burst of
            # 1000 defines would read 1000 x 1000 rows)
            seen = {t.uuid: s for t in pending if (s := self.index.seen(t.uuid)) is not None}
            latest = {t.uuid: r for t in pending if (r := self.index.latest(t.uuid)) is not None}
        else:
            seen = self.index.seen_all()
            latest = self.index.latest_all()
        results: list[PassResult] = []
        while pending:  # index rows in batches: one fsync per batch, not two per varstore
            chunk, pending = pending[:PASS_BATCH], pending[PASS_BATCH:]
            with self.index.batch():
                results += [self._one(t, seen.get(t.uuid), latest.get(t.uuid), reason, running_mode, hv)
                            for t in chunk]
        return results

    def _one(self, t: Target, seen: SeenVarstore | None, latest: BackupRecord | None, reason: str,
             running_mode: BackupRunning, hv: Hypervisor | None) -> PassResult:
        try:
            st = os.lstat(t.path)
        except FileNotFoundError:
            return PassResult(t, skipped="no varstore file (the guest was never started)")
        except OSError as exc:
            return PassResult(t, error=f"{t.path}: cannot stat: {fsio.describe_oserror(exc)}")
        if not stat.S_ISREG(st.st_mode):
            return PassResult(t, error=f"{t.path}: not a regular file")
        key = stat_key(st)
        if (seen is not None and latest is not None and seen.path == t.path and seen.stat_key == key
                and latest.sha256 == seen.sha256):
            # In-place writes by QEMU move mtime/ctime, so an equal key is equal content.
            return PassResult(t, unchanged=True)
        paused = None
        try:
            if not t.running:
                data = read_offline(t.path)
            elif running_mode is BackupRunning.SKIP:
                return PassResult(t, skipped="running (backup_running = \"skip\": copied when it stops)")
            elif running_mode is BackupRunning.SUSPEND:
                data, paused = self._read_suspended(t, hv)
            else:
                data = read_coherent(t.path, t.layout)
            sha = fsio.sha256_bytes(data)
            latest = self.index.latest(t.uuid)  # again: another pass (a stop, the schedule) may have just stored it
            if latest is not None and latest.sha256 == sha:
                self.index.note_seen(SeenVarstore(t.uuid, t.path, key, sha, self.clock.now()))
                return PassResult(t, unchanged=True, read=True, paused_ms=paused)
            # `st` is from before the read: if the file changed since, the next pass reads again.
            record = self.add(uuid=t.uuid, name=t.name, data=data, reason=reason, source=t.path, st=st)
            return PassResult(t, record=record, read=True, paused_ms=paused)
        except IncoherentCopy as exc:
            return PassResult(t, read=True, skipped=str(exc))
        except VarsdError as exc:
            return PassResult(t, read=True, error=f"domain '{t.name}': {exc}")

    def _read_suspended(self, t: Target, hv: Hypervisor | None) -> tuple[bytes, float]:
        """Pause the guest for one read (milliseconds), always resuming it."""
        if t.paused:  # already paused: one read is whole, and the admin's pause is not ours to lift
            return read_offline(t.path), 0.0
        if hv is None:
            raise BackupError("backup_running = \"suspend\" needs the libvirt connection")
        hv.suspend(t.uuid)
        began = time.monotonic()
        try:
            data = read_offline(t.path)
        finally:
            paused = (time.monotonic() - began) * 1000
            try:
                hv.resume(t.uuid)
            except VarsdError as exc:
                log.error("%s", about_domain(t.name, f"could not resume after the backup copy: {exc}", t.uuid))
                raise
        return data, paused

    # -- pruning --------------------------------------------------------------------------

    def remove_unreferenced(self) -> list[str]:
        """Delete objects no index row refers to any more (after retention pruned rows)."""
        wanted = self.index.digests()
        removed = []
        try:
            entries = list(os.scandir(self.objects_dir))
        except FileNotFoundError:
            return removed
        except OSError as exc:
            raise BackupError(f"{self.objects_dir}: cannot list: {fsio.describe_oserror(exc)}") from None
        for e in entries:
            if not e.name.endswith(".fd") or e.name[:-3] in wanted:
                continue
            try:
                os.unlink(e.path)
                removed.append(e.name)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("cannot remove unreferenced backup %s: %s", e.path, fsio.describe_oserror(exc))
        return removed


def domain_targets(hv: Hypervisor, refs: Iterable[DomainRef], cfg: Config | None = None,
                   catalog: Catalog | None = None) -> tuple[list[Target], list[tuple[DomainRef, str]]]:
    """The file-backed varstores of these domains (persistent XML), and the domains that
    could not be read. Domains without a varstore file (SeaBIOS, stateless) are left out,
    and with `cfg` those its `exclude` names (varsd leaves them alone). With `catalog`,
    a running guest's copy must also have the layout of its code's build."""
    targets: list[Target] = []
    errors: list[tuple[DomainRef, str]] = []
    for ref in refs:
        if cfg is not None and cfg.is_excluded(ref.name, ref.uuid):
            continue
        try:
            fw = parse_domain(hv.persistent_xml(ref.uuid))
        except VarsdError as exc:
            errors.append((ref, str(exc)))
            continue
        build = catalog.by_code_path(fw.loader_path) if catalog is not None and fw.loader_path else None
        target = target_of(ref, fw.nvram_path, build.layout if build else None)
        if target is not None:
            targets.append(target)
    return targets, errors


def target_of(ref: DomainRef, nvram_path: str | None, layout: VarstoreLayout | None = None) -> Target | None:
    """The domain's varstore as a backup target; None for no file-backed varstore."""
    if not nvram_path or not os.path.isabs(nvram_path):
        return None
    return Target(uuid=ref.uuid, name=ref.name, path=nvram_path, running=ref.active, paused=ref.state == "paused",
                  layout=layout)


def backup_status(store: BackupStore, targets: Iterable[Target],
                  known: Mapping[str, SeenVarstore] | None = None) -> dict[str, dict]:
    """`varsctl status`'s `backup` per domain UUID: the newest backup (time, digest) and
    whether the current varstore is in a backup; `never_backed_up` flags the rest.

    Costs an lstat per varstore; the file is hashed only when it changed since varsd
    last saw it (in a backup pass, or in `known`: digests of the plan memo)."""
    known = known or {}
    latest = store.index.latest_all()
    seen = store.index.seen_all()
    events = {}
    for ev in reversed(store.index.events(limit=1000)):
        events[ev.uuid] = ev
    out: dict[str, dict] = {}
    targets = list(targets)
    pairs = store.index.digest_pairs() if len(targets) > FEW else None  # one query, not one per domain

    def in_backup(uuid: str, sha: str) -> bool:
        return (uuid, sha) in pairs if pairs is not None else store.index.has_digest(uuid, sha)

    for t in targets:
        newest = latest.get(t.uuid)
        entry: dict = {"newest": stamp(newest.taken) if newest else None, "sha256": newest.sha256 if newest else None,
                       "id": newest.id if newest else None, "never_backed_up": newest is None}
        current = None
        try:
            st = os.lstat(t.path)
            key = stat_key(st)
            current = next((s.sha256 for s in (seen.get(t.uuid), known.get(t.uuid))
                            if s is not None and s.path == t.path and s.stat_key == key), None)
            if current is None and stat.S_ISREG(st.st_mode):
                current = fsio.sha256_bytes(read_offline(t.path))
        except (OSError, VarsdError):
            current = None
        entry["current_sha256"] = current
        entry["current_in_backup"] = bool(current and newest is not None and in_backup(t.uuid, current))
        ev = events.get(t.uuid)
        if ev is not None:
            entry["last_event"] = {"at": stamp(ev.at), "event": ev.event, "detail": ev.detail,
                                   "backup_id": ev.backup_id}
        out[t.uuid] = entry
    return out
