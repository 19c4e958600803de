"""Reading the facts of firmware files for the planner, with a cache keyed on stat.

A full reconcile looks at every domain's code image and varstore; most domains share
one central code file. Facts are cached by (device, inode, size, mtime), so a pass
over hundreds of compliant domains costs one stat per file, and a file that changes
(a package upgrade, a guest writing its varstore) is read again.
"""

from __future__ import annotations

import os

from varsd.adapters import fsio, virtfw
from varsd.adapters.filecache import ContentCache, stat_key, stat_key_of
from varsd.errors import VarstoreError
from varsd.model.domain import FileFacts


class FileInspector:
    def __init__(self) -> None:
        # (path, digest) -> facts, per stat key (varsd.adapters.filecache)
        self._cache: ContentCache[FileFacts] = ContentCache()

    stat_key = staticmethod(stat_key_of)

    def inspect(self, path: str, *, digest: bool) -> FileFacts:
        """Facts of `path`: existence, size, realpath, leading varstore layout, digests.

        `digest` asks for the sha256 (code images); varstores only need their layout.
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            # A dangling symlink still says which build it named (OVMF_CODE.ms.fd ->
            # OVMF_CODE.secboot.fd after a package removed the target).
            return FileFacts(path=path, exists=False, realpath=os.path.realpath(path))
        except OSError as exc:
            return FileFacts(path=path, exists=False, error=f"cannot stat: {exc.strerror}")
        return self._cache.get((path, digest), stat_key(st), lambda: self._read(path, st.st_size, digest))

    def _read(self, path: str, size: int, digest: bool) -> FileFacts:
        if size > fsio.DEFAULT_MAX_READ:  # no firmware file is this large: refused unread
            return FileFacts(path=path, exists=True, size=size, error=fsio.too_big(path, size))
        blank = False
        if not os.access(path, os.R_OK):
            return FileFacts(path=path, exists=True, size=size, realpath=os.path.realpath(path), unreadable=True,
                             error="this user may not read it")
        try:
            layout = virtfw.read_layout(path)  # reads the varstore volume only
            error = None
        except VarstoreError as exc:
            layout, error = None, str(exc)
            blank = virtfw.is_flash_size(size) and _blank(path)
        sha = trailing = None
        if digest:
            # fsio refuses anything but a regular file and never blocks in open(): a FIFO
            # or /dev/zero at a loader path must not hang the daemon. Digests are streamed.
            try:
                sha, trailing = fsio.sha256_split(path, layout.size if layout is not None else None)
            except fsio.ReadError as exc:
                return FileFacts(path=path, exists=True, size=size, error=str(exc))
        return FileFacts(
            path=path,
            exists=True,
            size=size,
            sha256=sha,
            realpath=os.path.realpath(path),
            varstore_layout=layout,
            trailing_sha256=trailing,
            error=error if layout is None and not digest and not blank else None,
            blank=blank,
        )


def _blank(path: str) -> bool:
    """All erased (streamed: a blank AAVMF varstore is 64 MiB of zeros)."""
    try:
        return fsio.erased_from(path, 0)
    except fsio.ReadError:
        return False
