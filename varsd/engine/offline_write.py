"""The one way varsd writes to an existing guest's varstore: offline, backed up, verified.

A varstore is user data. Every operation that changes one (restore, reset, migrate,
Secure Boot certificate updates) goes through `VarstoreWriter.write`, which:

1. takes the domain's lock (varsd and varsctl never act on one domain at once);
2. announces the write to the libvirt QEMU hook (`InHand`): from now on a `virsh
   start` of the domain waits, bounded by `start_wait`, until the write is done;
3. checks that the domain is shut off and has no managed save: a start that had
   already begun (libvirt counts it active from its first step, before any hook) or a
   saved RAM image refuses the write;
4. reads the current store and backs it up (`BackupStore.add`, verified);
5. computes the new bytes (`transform`) and checks them in memory (`check`);
6. journals the intent (`varstore_writes`), then, under the hook's commit lock and
   only if no start gave up waiting meanwhile, replaces the file atomically (temp in
   the same directory, fsync, rename, fsync the directory; owner and mode kept; the
   old content must still be what was read) or creates it (0600, qemu user);
7. reads it back and checks again, runs `after` (e.g. a journaled XML change), and
   settles the journal entry.
Any failure after the file was replaced puts the old bytes back; the backup stays.

The hook side of the protocol is `packaging/libvirt/varsd-qemu-hook`: `<offline_dir>/
<uuid>.write` held with flock(LOCK_EX) while a write is in hand (line `wait=N`), and
`<uuid>.gaveup`, written under flock of `<uuid>.commit` by a start that stopped
waiting. It never calls libvirt; this side never waits for a start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from varsd.adapters import fsio, virtfw
from varsd.adapters.libvirt_api import DomainRef, Hypervisor
from varsd.clock import SYSTEM, Clock
from varsd.config import Config, qemu_owner
from varsd.domain.xml import parse_domain
from varsd.engine import qemu_hook
from varsd.engine.backups import BackupStore, open_store, read_offline
from varsd.engine.lock import host_lock
from varsd.errors import VarsdError, VarstoreError
from varsd.messages import about_domain
from varsd.model.backup import BackupRecord, before_write

log = logging.getLogger("varsd.offline_write")

COMMIT_LOCK_WAIT = 10.0  # seconds; the hook holds the commit lock only to write one small file


class WriteRefused(VarsdError):
    """The write was not made (domain running or starting, another write, bad new content); nothing changed."""


class WriteFailed(VarsdError):
    """A step after the backup failed; the message says what was put back."""


class StartBegan(WriteRefused):
    """A start of the domain stopped waiting for this write and went on: the write is refused."""


@dataclass(frozen=True)
class WriteResult:
    """An offline write that was made (or, with `changed` False, found nothing to change)."""

    uuid: str
    name: str
    op: str
    path: str
    backup: BackupRecord | None  # None: there was no file before
    before_sha256: str | None
    after_sha256: str
    changed: bool
    write_id: int | None


class InHand:
    """Announces one offline write of a domain's varstore to the libvirt QEMU hook.

    Held for the whole write. A second writer for the same domain is refused (the
    domain lock already keeps varsd's own actors apart; this catches anything else).
    """

    def __init__(self, offline_dir: str, uuid: str, *, op: str, wait: int) -> None:
        self.dir = offline_dir
        self.uuid = uuid.lower()
        self.op = op
        self.wait = wait
        self._fd = -1

    def _path(self, suffix: str) -> str:
        return os.path.join(self.dir, f"{self.uuid}.{suffix}")

    def __enter__(self) -> InHand:
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            fd = os.open(self._path("write"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise WriteRefused(f"{self.dir}: cannot announce the write to the libvirt hook: "
                               f"{fsio.describe_oserror(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise WriteRefused(f"another offline write of domain {self.uuid}'s varstore is in progress") from None
            raise WriteRefused(f"{self._path('write')}: cannot lock: {fsio.describe_oserror(exc)}") from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"wait={self.wait}\nop={self.op}\npid={os.getpid()}\n".encode())
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path("gaveup"))  # left by a start that gave up on an earlier write
        except OSError as exc:
            self.__exit__(None, None, None)
            raise WriteRefused(f"{self._path('write')}: cannot write: {fsio.describe_oserror(exc)}") from None
        return self

    @contextlib.contextmanager
    def commit(self) -> Iterator[None]:
        """The moment the file is replaced: refused if a start gave up waiting (StartBegan)."""
        with host_lock(self._path("commit"), doing=f"{self.op}: committing", max_wait=COMMIT_LOCK_WAIT):
            if os.path.lexists(self._path("gaveup")):
                raise StartBegan(
                    f"a start of domain {self.uuid} waited {self.wait}s for this {self.op} and went on; "
                    "nothing was written (shut the domain down and run the operation again)")
            yield

    def __exit__(self, *_exc: object) -> None:
        for suffix in ("gaveup", "commit", "write"):  # the .write last: it is what the hook looks for
            with contextlib.suppress(OSError):
                os.unlink(self._path(suffix))
        if self._fd != -1:
            os.close(self._fd)
            self._fd = -1


def check_layout_like(old: bytes | None, layout_name: str) -> Callable[[bytes], None]:
    """A `check` that new bytes parse as a varstore of the old store's layout (if there was one)."""
    old_layout = virtfw.layout_of_bytes(old, layout_name) if old is not None else None

    def check(new: bytes) -> None:
        got = virtfw.layout_of_bytes(new, layout_name)
        if old_layout is not None and got != old_layout:
            raise VarstoreError(f"{layout_name}: new content has layout {got.describe()}, the varstore "
                                f"{old_layout.describe()}")
        if got.size != len(new):
            raise VarstoreError(f"{layout_name}: new content is {len(new)} bytes but its varstore {got.size}")

    return check


class VarstoreWriter:
    """Offline writes to domains' varstores (module doc); one per actor (varsd, varsctl)."""

    def __init__(self, cfg: Config, hv: Hypervisor, store: BackupStore, owner: tuple[int, int], *,
                 clock: Clock = SYSTEM) -> None:
        self.cfg = cfg
        self.hv = hv
        self.store = store
        self.owner = owner
        self.clock = clock

    @classmethod
    def for_host(cls, cfg: Config, hv: Hypervisor, *, clock: Clock = SYSTEM) -> VarstoreWriter:
        """The writer for this host's configuration: its backup store and qemu user."""
        return cls(cfg, hv, open_store(cfg, clock=clock), qemu_owner(cfg), clock=clock)

    def write(
        self,
        ref: DomainRef,
        transform: Callable[[bytes | None], bytes],
        *,
        op: str,
        path: str | None = None,
        check: Callable[[bytes], None] | None = None,
        after: Callable[[], None] | None = None,
        refuse_running: bool = True,
        on_stage: Callable[[str], None] | None = None,
    ) -> WriteResult:
        """Write the domain's varstore (`path`, default its XML's nvram) to `transform(old)`.

        `old` is the current content, or None when the file does not exist (e.g. after
        `virsh undefine --nvram`). `check(new)` raises VarsdError for content that must
        not be written (default: a varstore of the old one's layout). `after` runs once
        the new content is in place and verified; if it fails the old content is put
        back. `on_stage` sees "in-hand" and "before-commit" (tests use it to race a start).
        Raises WriteRefused (nothing changed) or WriteFailed."""
        hook = qemu_hook.probe(self.cfg.uri)
        if hook.attention:  # the write stays safe against a start that began; one beginning now is not held
            log.warning("%s", about_domain(ref.name, f"{op} of the varstore goes on without the start hook "
                                             f"({hook.state.value}): {hook.detail}"))
        with host_lock(self.cfg.domain_lock_path(ref.uuid), doing=f"{op} of the varstore of domain {ref.name!r}"):
            with InHand(self.cfg.offline_dir, ref.uuid, op=op, wait=self.cfg.start_wait) as hand:
                if on_stage:
                    on_stage("in-hand")
                return self._write(ref, hand, transform, op, path, check, after, refuse_running, on_stage)

    def _write(self, ref, hand, transform, op, path, check, after, refuse_running, on_stage) -> WriteResult:
        ref = self.hv.lookup(ref.uuid)  # the current name
        name = ref.name
        if refuse_running and self.hv.is_running(ref.uuid):
            raise WriteRefused(f"domain '{name}' is {ref.state} (or starting): its varstore is written only while "
                               "it is shut off; shut it down first")
        if self.hv.has_managed_save(ref.uuid):
            raise WriteRefused(f"domain '{name}' has a managed save image: its next start resumes a guest that "
                               "expects the varstore as it is. Start it and shut it down, or 'virsh managedsave-"
                               "remove' it, first")
        if path is None:
            path = parse_domain(self.hv.persistent_xml(ref.uuid)).nvram_path
            if not path:
                raise WriteRefused(f"domain '{name}' has no file-backed varstore in its definition")
        old = self._read_current(path, name)
        backup = None
        if old is not None:
            backup = self.store.add(uuid=ref.uuid, name=name, data=old, reason=before_write(op), source=path,
                                    st=os.lstat(path))
        try:
            new = transform(old)
            (check or check_layout_like(old, path))(new)
        except VarsdError as exc:
            raise WriteRefused(f"domain '{name}': {op} refused: {exc}; nothing was changed") from None
        before_sha = fsio.sha256_bytes(old) if old is not None else None
        after_sha = fsio.sha256_bytes(new)
        if new == old:
            return WriteResult(ref.uuid, name, op, path, backup, before_sha, after_sha, False, None)
        index = self.store.index
        write_id = index.record_write(at=self.clock.now(), uuid=ref.uuid, name=name, op=op, path=path,
                                      before_sha256=before_sha, after_sha256=after_sha,
                                      backup_id=backup.id if backup else None)
        if on_stage:
            on_stage("before-commit")
        written = False
        try:
            with hand.commit():
                if old is None:
                    fsio.create_exclusive(path, new, mode=0o600, uid=self.owner[0], gid=self.owner[1])
                else:
                    fsio.replace_atomic(path, new, expect=old)
                written = True
            on_disk = read_offline(path)
            if on_disk != new:
                raise WriteFailed(f"{path} does not read back as written")
            (check or check_layout_like(old, path))(on_disk)
            if after is not None:
                after()
        except BaseException as exc:
            undo = self._put_back(path, old, new, backup) if written else "nothing was written"
            outcome = f"refused: {exc}" if isinstance(exc, WriteRefused) and not written else f"failed: {exc}"
            with contextlib.suppress(VarsdError):
                index.settle_write(write_id, outcome)
            if isinstance(exc, WriteRefused) and not written:
                raise type(exc)(f"domain '{name}': {exc}") from None
            if isinstance(exc, VarsdError):
                raise WriteFailed(f"domain '{name}': {op} failed: {exc}; {undo}") from None
            raise
        index.settle_write(write_id, "applied")
        self.store.note_written(ref.uuid, path, new)
        log.info("domain '%s': %s wrote %s (sha256 %s; previous content in backup #%s)", name, op, path,
                 after_sha[:12], backup.id if backup else "-")
        return WriteResult(ref.uuid, name, op, path, backup, before_sha, after_sha, True, write_id)

    @staticmethod
    def _read_current(path: str, name: str) -> bytes | None:
        try:
            os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise WriteRefused(f"domain '{name}': {path}: cannot stat: {fsio.describe_oserror(exc)}") from None
        try:
            return read_offline(path)
        except VarsdError as exc:
            raise WriteRefused(f"domain '{name}': {exc}") from None

    def _put_back(self, path: str, old: bytes | None, new: bytes, backup: BackupRecord | None) -> str:
        """Undo our replace (still in hand: no start can have opened the file)."""
        try:
            current = fsio.read_file(path, follow_symlinks=False)
        except fsio.ReadError:
            current = None
        if old is None:
            if current == new:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                return f"the new file {path} was removed"
            return f"{path} was left as it is"
        if current == old:
            return f"the varstore is unchanged (backup #{backup.id if backup else '-'})"
        try:
            fsio.replace_atomic(path, old, expect=current)
            if fsio.read_file(path, follow_symlinks=False) != old:
                raise WriteFailed("restored file does not read back equal to the backup")
        except (VarsdError, OSError) as exc:
            where = f"backup #{backup.id}" if backup else "the backup"
            return (f"PUTTING THE OLD VARSTORE BACK FAILED ({exc}): run 'varsctl backup restore' with {where} "
                    "before starting the domain")
        return f"the old varstore was put back (backup #{backup.id if backup else '-'})"
