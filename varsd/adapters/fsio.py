"""Filesystem primitives: hashing, careful reads and atomic exclusive file creation.

Rules of this module (a varstore is user data):
- Never overwrite, truncate or rewrite an existing file. New files are written to a
  private temp file in the target's directory and appear under their final name by
  `link()`, which fails when *anything* (file, symlink, dangling symlink) is there.
- The final path component is never followed. The parent directory may be a symlink
  (libvirt's nvram dir is one on some hosts): it is resolved once into a dir fd and
  every later step works relative to that fd.
- On any failure nothing is left behind: no temp file, no partial target.
- Errors name the file and say what went wrong in an admin's words.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
import time

from varsd.errors import ProvisionError, StateDirError, VarsdError

TEMP_MARKER = ".varsd-tmp."
"""Temp files are `.<name>.varsd-tmp.<random>`: hidden, and recognisably ours."""

DEFAULT_MAX_READ = 64 * 1024 * 1024
"""Largest file `read_file` accepts, and the largest firmware file or varstore varsd looks
at: x86 images are a few MiB, the largest any distro ships (AAVMF/QEMU_EFI pflash) 64 MiB."""

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EEXIST: "already exists",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a path component is not a directory",
    errno.ELOOP: "is a symbolic link (varsd does not follow it)",
    errno.EIO: "I/O error",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMLINK: "too many links",
    errno.EXDEV: "cross-device link",
}


class ReadError(VarsdError):
    """A file could not be read as asked; callers re-raise it as their own error kind."""


class TargetExists(ProvisionError):
    """`create_exclusive` found something at the target name (raised instead of overwriting)."""


def describe_oserror(exc: OSError) -> str:
    """An OSError's reason in admin terms, without the Python noise."""
    if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
        return "operation not supported by this file system"
    return _REASONS.get(exc.errno or 0) or exc.strerror or str(exc)


def state_dir_error(path: str, exc: OSError, what: str) -> StateDirError:
    """The one message for a state directory varsd cannot use: what is wrong, what to do."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        why = f"{path} is not a directory (a file is in the way); move it away (varsd recreates the directory)"
    elif exc.errno == errno.EROFS:
        why = f"{path} is on a read-only file system; make it writable"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = f"{path}: permission denied; run varsd and varsctl as root, or fix the directory's owner and mode"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"{path}: {describe_oserror(exc)}; free space there"
    else:
        why = f"{path}: {describe_oserror(exc)}"
    return StateDirError(f"cannot use the varsd {what}: {why}, or set state_dir in the config to a directory "
                         "varsd may write")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    """Hex sha256 of a regular file's content; OSError for anything else.

    Opened non-blocking and checked, so a FIFO or device planted where a firmware image
    is expected fails at once instead of hanging (or reading /dev/zero forever).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def sha256_split(path: str, split: int | None = None) -> tuple[str, str | None]:
    """Hex sha256 of the whole regular file and, with `split`, of its bytes from `split` on,
    streamed in one pass (a firmware image is never held in memory to digest it)."""
    fd, _ = _open_regular(path, True)
    whole = hashlib.sha256()
    tail = hashlib.sha256() if split is not None else None
    pos = 0
    try:
        while chunk := os.read(fd, 1 << 20):
            whole.update(chunk)
            if tail is not None and pos + len(chunk) > split:  # type: ignore[operator]
                tail.update(chunk[max(0, split - pos):])  # type: ignore[operator]
            pos += len(chunk)
    except OSError as exc:
        raise ReadError(f"{path}: cannot read: {describe_oserror(exc)}") from None
    finally:
        os.close(fd)
    return whole.hexdigest(), tail.hexdigest() if tail is not None and pos > split else None  # type: ignore[operator]


def read_head(path: str, length: int, *, max_size: int = DEFAULT_MAX_READ) -> bytes:
    """Up to the first `length` bytes of the regular file `path` (following symlinks);
    ReadError for a file over `max_size`, refused before anything is read."""
    fd, st = _open_regular(path, True)
    try:
        if st.st_size > max_size:
            raise ReadError(too_big(path, st.st_size, max_size))
        return _read_upto(fd, path, length)
    finally:
        os.close(fd)


def erased_from(path: str, offset: int, *, chunk: int = 1 << 20) -> bool:
    """Whether the regular file `path` holds only erased flash (all 0x00 or all 0xff) from
    `offset` to its end, read in chunks (an AAVMF varstore's 63 MiB of padding); False if
    there is nothing there."""
    fd, st = _open_regular(path, True)
    try:
        if st.st_size <= offset:
            return False
        os.lseek(fd, offset, os.SEEK_SET)
        erased: bytes | None = None
        while True:
            block = os.read(fd, chunk)
            if not block:
                return erased is not None
            if erased is None:
                if block[0] not in (0, 0xFF):
                    return False
                erased = bytes([block[0]]) * chunk
            if block != erased[: len(block)]:  # memcmp: far faster than counting bytes
                return False
    finally:
        os.close(fd)


def too_big(path: str, size: int, max_size: int = DEFAULT_MAX_READ) -> str:
    """The one message for a file larger than any firmware file or varstore."""
    return (f"{path}: file is {size} bytes, more than the {max_size} any firmware file or varstore is; "
            "not read")


def _open_regular(path: str, follow_symlinks: bool) -> tuple[int, os.stat_result]:
    """Open `path` read-only, refusing anything but a regular file.

    O_NONBLOCK keeps a FIFO planted at the path from hanging the daemon in open().
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ReadError(f"{path}: cannot open: {describe_oserror(exc)}") from None
    except ValueError:  # embedded NUL
        raise ReadError(f"{path!r}: invalid file name") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ReadError(f"{path}: not a regular file")
    return fd, st


def _read_upto(fd: int, path: str, length: int) -> bytes:
    chunks: list[bytes] = []
    remaining = length
    try:
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise ReadError(f"{path}: cannot read: {describe_oserror(exc)}") from None
    return b"".join(chunks)


def read_prefix(path: str, length: int, *, follow_symlinks: bool = False) -> bytes:
    """The first `length` bytes of the regular file `path`; ReadError if it is shorter.

    Used to take the leading varstore of a unified image and to compare an existing
    target with what would be written. The final component is not followed unless
    asked (templates in /usr/share/OVMF are often symlinks, varstore targets never).
    """
    if length < 0:
        raise ValueError("length must be >= 0")
    fd, _ = _open_regular(path, follow_symlinks)
    try:
        data = _read_upto(fd, path, length)
    finally:
        os.close(fd)
    if len(data) < length:
        raise ReadError(f"{path}: file is only {len(data)} bytes, expected at least {length}")
    return data


def read_file(path: str, *, follow_symlinks: bool = True, max_size: int = DEFAULT_MAX_READ) -> bytes:
    """Whole content of the regular file `path`, refusing files over `max_size` bytes."""
    fd, st = _open_regular(path, follow_symlinks)
    try:
        if st.st_size > max_size:
            raise ReadError(too_big(path, st.st_size, max_size))
        data = _read_upto(fd, path, max_size + 1)
    finally:
        os.close(fd)
    if len(data) > max_size:
        raise ReadError(f"{path}: file grew beyond {max_size} bytes while being read")
    return data


def _final_name(path: str) -> tuple[str, str]:
    """Split `path` into (parent, name), rejecting names that are not one plain component."""
    if "\0" in path:
        raise ProvisionError(f"{path!r}: invalid file name (contains NUL)")
    parent, name = os.path.split(path)
    if not name or name in (".", "..") or "/" in name:
        raise ProvisionError(f"{path!r}: invalid file name (the last component must be a plain file name)")
    return parent or ".", name


def _temp_name(name: str) -> str:
    # Keep the temp name within NAME_MAX (255) even for long target names.
    return f".{name[:200]}{TEMP_MARKER}{secrets.token_hex(8)}"


_SPARSE_BLOCK = 1 << 20


def _write_sparse(fd: int, data: bytes) -> None:
    """Write `data` at the start of the empty file `fd`, leaving whole MiB blocks of zeros as
    holes: an AAVMF varstore is 64 MiB, all but 768 KiB of it zero padding, and every guest
    gets one. Reading a hole gives zeros, so the content is the same byte for byte."""
    zero = bytes(_SPARSE_BLOCK)
    view = memoryview(data)
    for at in range(0, len(data), _SPARSE_BLOCK):
        block = view[at : at + _SPARSE_BLOCK]
        if len(block) == _SPARSE_BLOCK and block == zero:
            os.lseek(fd, _SPARSE_BLOCK, os.SEEK_CUR)
            continue
        while block:
            written = os.write(fd, block)
            block = block[written:]
    os.ftruncate(fd, len(data))  # a trailing hole still counts towards the size


def create_exclusive(path: str, data: bytes, *, mode: int = 0o600, uid: int = -1, gid: int = -1) -> None:
    """Create `path` holding `data`, atomically and exclusively, or raise ProvisionError.

    Why this dance: readers (QEMU, libvirt, a retrying varsd) must only ever see no
    file or the complete file, a crash must not leave a truncated varstore under the
    final name, and nothing that already exists may be replaced. Content, owner and
    mode are set on a private temp file, fsynced, then hard-linked into place (link()
    never overwrites), and the directory is fsynced so the name survives a crash.
    Raises TargetExists when something is already at `path`.
    """
    parent, name = _final_name(path)
    try:
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        reason = "directory does not exist" if exc.errno == errno.ENOENT else describe_oserror(exc)
        raise ProvisionError(f"cannot create {path}: {parent}: {reason}") from None

    tmp = _temp_name(name)
    fd = -1
    tmp_created = False
    linked = False
    ident: tuple[int, int] | None = None
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        tmp_created = True
        _write_sparse(fd, data)
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.fsync(fd)
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        os.close(fd)  # close() can report delayed write errors (NFS): check it before linking
        fd = -1
        os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        linked = True
        os.unlink(tmp, dir_fd=dfd)
        tmp_created = False
        os.fsync(dfd)
    except OSError as exc:
        _cleanup(dfd, fd, tmp if tmp_created else None, name if linked else None, ident)
        if exc.errno == errno.EEXIST and not linked:
            raise TargetExists(f"cannot create {path}: already exists (varsd never overwrites a file)") from None
        raise ProvisionError(f"cannot create {path}: {describe_oserror(exc)}") from None
    except BaseException:
        _cleanup(dfd, fd, tmp if tmp_created else None, name if linked else None, ident)
        raise
    finally:
        os.close(dfd)


def _cleanup(dfd: int, fd: int, tmp: str | None, final: str | None, ident: tuple[int, int] | None) -> None:
    """Undo a failed create: close, drop the temp, and drop the final name only if it is still ours."""
    if fd != -1:
        try:
            os.close(fd)
        except OSError:
            pass
    if tmp is not None:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
    if final is not None and ident is not None:
        try:
            st = os.stat(final, dir_fd=dfd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == ident:
                os.unlink(final, dir_fd=dfd)
        except OSError:
            pass


class ReplaceError(VarsdError):
    """An atomic replace failed; the old file is still in place, whole."""


def replace_atomic(path: str, data: bytes, *, expect: bytes | None = None) -> None:
    """Atomically replace the regular file `path` with `data`, keeping its owner and mode.

    Readers see the old file or the new one, never a mix, and a crash leaves one of the
    two under the name: the bytes go to a temp file in the same directory, fsynced,
    renamed over the name, and the directory is fsynced. The final component is never
    followed (a symlink there is refused), and with `expect` the current content must
    be exactly that (nobody wrote the file since it was read). Raises ReplaceError.

    Only for explicit admin operations that back the file up first (varsctl migrate):
    varsd never rewrites a varstore on its own.
    """
    parent, name = os.path.split(path)
    try:
        dfd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ReplaceError(f"cannot replace {path}: {parent}: {describe_oserror(exc)}") from None
    tmp = _temp_name(name)
    fd = -1
    tmp_created = False
    try:
        try:
            old_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
        except OSError as exc:
            raise ReplaceError(f"cannot replace {path}: {describe_oserror(exc)}") from None
        try:
            st = os.fstat(old_fd)
            if not stat.S_ISREG(st.st_mode):
                raise ReplaceError(f"cannot replace {path}: not a regular file")
            if expect is not None:
                current = b"".join(iter(lambda: os.read(old_fd, 1 << 20), b""))
                if current != expect:
                    raise ReplaceError(f"{path} changed while varsd was migrating it (is the domain running?)")
        finally:
            os.close(old_fd)
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        tmp_created = True
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        tmp_created = False
        os.fsync(dfd)
    except OSError as exc:
        reason = "too small" if exc.errno == errno.EFBIG else describe_oserror(exc)
        raise ReplaceError(f"cannot replace {path}: {reason}") from None
    finally:
        if fd != -1:
            os.close(fd)
        if tmp_created:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
        os.close(dfd)


def sweep_temp_files(directory: str, older_than: float = 600.0) -> list[str]:
    """Remove varsd's own temp files (`.<name>.varsd-tmp.<random>`) that a killed process
    left in `directory`; only older ones, as another actor may be writing one right now.

    Never touches anything else: the name pattern is varsd's alone. Returns the names removed.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        if not (e.name.startswith(".") and TEMP_MARKER in e.name):
            continue
        try:
            if e.is_file(follow_symlinks=False) and now - e.stat(follow_symlinks=False).st_mtime > older_than:
                os.unlink(e.path)
                removed.append(e.name)
        except OSError:
            continue
    return removed
