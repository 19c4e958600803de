"""Provisioning a domain's private varstore from a template (or a unified image's prefix).

Rules:
- A varstore is user data: an existing file at the target is never overwritten,
  truncated or chowned. If it already holds exactly the bytes we would write (a
  retry after a crash between provisioning and the XML redefinition), it is adopted
  as is; anything else at the target is refused with advice for the admin.
- The source must be a real edk2 varstore with exactly the layout the code image
  expects, and exactly that many bytes: a 2 MiB varstore behind 4 MiB code fails
  silently in the guest, and a whole unified image is not a varstore.
- The file is created by `fsio.create_exclusive`: atomic, exclusive, 0600, owned by
  the qemu user, nothing left behind on failure.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from varsd.adapters import fsio, virtfw
from varsd.adapters.filecache import ContentCache, stat_key_of
from varsd.errors import ProvisionError, VarstoreError
from varsd.model.firmware import VarstoreLayout


@dataclass(frozen=True)
class Provisioned:
    """A varstore that now exists at `path`; `adopted` when it was already there, identical."""

    path: str
    adopted: bool
    layout: VarstoreLayout


def provision_varstore(
    target: str,
    source: str,
    *,
    expected_layout: VarstoreLayout,
    owner: tuple[int, int],
    length: int | None = None,
) -> Provisioned:
    """Create the varstore `target` from `source`, or adopt an identical existing one.

    `source` is a varstore template (`length` None: the whole file) or a unified
    image (`length` = template size: its leading varstore is taken). `owner` is the
    (uid, gid) of the qemu user. Raises ProvisionError (VarstoreError for a source
    that is not a varstore) naming the file; on error nothing was created.
    """
    data, layout = _verified_source(source, length, expected_layout)
    if layout != expected_layout:
        raise VarstoreError(
            f"{source}: varstore layout ({layout.describe()}) does not match the layout the firmware "
            f"code expects ({expected_layout.describe()}); use the template built with that code"
        )
    if len(data) != layout.size:
        raise ProvisionError(
            f"{source}: {len(data)} bytes, but its varstore is only the first {layout.size}; "
            "a unified image must be given with the template size as length"
        )
    if _adoptable(target, data, source):
        return Provisioned(path=target, adopted=True, layout=layout)
    try:
        fsio.create_exclusive(target, data, mode=0o600, uid=owner[0], gid=owner[1])
    except fsio.TargetExists:
        # Someone created it between our look and our link: judge what is there now.
        if _adoptable(target, data, source):
            return Provisioned(path=target, adopted=True, layout=layout)
        raise  # it vanished again in between: report the collision rather than loop
    return Provisioned(path=target, adopted=False, layout=layout)


def preflight(target: str, source: str, *, length: int | None = None,
              expected_layout: VarstoreLayout | None = None) -> str | None:
    """Why `provision_varstore(target, source)` would fail now, or None: what `status` and
    `reconcile --dry-run` report instead of promising a repair that cannot be made."""
    try:
        data, _layout = _verified_source(source, length, expected_layout)
        _adoptable(target, data[:length] if length else data, source)
    except (ProvisionError, VarstoreError) as exc:
        return str(exc)
    return None


# Templates are read and parsed once per content (a burst of new domains shares one),
# keyed by stat so a replaced or rewritten source is read again.
_VERIFIED: ContentCache[tuple[bytes, VarstoreLayout]] = ContentCache(limit=16)


def _verified_source(source: str, length: int | None,
                     blank_as: VarstoreLayout | None = None) -> tuple[bytes, VarstoreLayout]:
    """The source's bytes and layout. With `blank_as`, a source that is blank flash of exactly
    that layout's size passes as having it: a copy of a blank AAVMF template, which the code
    formats at its first boot (the catalog learned that layout from the same code's formatted
    template); anything else must be a varstore of that layout itself."""
    def read() -> tuple[bytes, VarstoreLayout]:
        data = _read_source(source, length)
        try:
            return data, virtfw.layout_of_bytes(data, source)
        except VarstoreError:
            if blank_as is not None and len(data) == blank_as.size and virtfw.is_blank_flash(data):
                return data, blank_as
            raise

    key = stat_key_of(source)
    if key is None:
        return read()  # _read_source reports it
    return _VERIFIED.get((source, length, blank_as), key, read)


def _read_source(source: str, length: int | None) -> bytes:
    try:
        if length is None:
            return fsio.read_file(source)
        return fsio.read_prefix(source, length, follow_symlinks=True)
    except fsio.ReadError as exc:
        raise ProvisionError(f"cannot read varstore template: {exc}") from None


def _adoptable(target: str, data: bytes, source: str) -> bool:
    """False if nothing is at `target`; True if it is a regular file holding exactly `data`.

    Anything else there raises: varsd never overwrites a varstore, and a symlink is
    not followed (it could point at another VM's varstore or at a system file).
    """
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ProvisionError(f"cannot examine {target}: {fsio.describe_oserror(exc)}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ProvisionError(
            f"{target} already exists as a symbolic link; varsd never writes through or replaces a link "
            "at a varstore path. Replace it with the varstore file it points to, or remove it, and retry."
        )
    if not stat.S_ISREG(st.st_mode):
        raise ProvisionError(f"{target} already exists and is not a regular file; remove it and retry.")
    same = False
    if st.st_size == len(data):
        try:
            same = fsio.read_prefix(target, len(data), follow_symlinks=False) == data
        except fsio.ReadError as exc:
            raise ProvisionError(f"{target} already exists and cannot be compared: {exc}") from None
    if not same:
        raise ProvisionError(
            f"{target} already exists and differs from {source}; varsd never overwrites a varstore "
            "(it holds the VM's boot entries and Secure Boot keys). If it is this VM's varstore, point the "
            "domain at it; if it is stale, move it aside (e.g. to a .bak name) and retry."
        )
    return True
