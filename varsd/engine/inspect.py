"""Reading the facts of firmware files for the planner, with a cache keyed on stat.

A full reconcile looks at every domain's code image and varstore; most domains share
one central code file. Facts are cached by (device, inode, size, mtime), so a pass
over hundreds of compliant domains costs one stat per file, and a file that changes
(a package upgrade, a guest writing its varstore) is read again.
"""

from __future__ import annotations

import hashlib
import os

from varsd.adapters import virtfw
from varsd.errors import VarstoreError
from varsd.model.domain import FileFacts


class FileInspector:
    def __init__(self) -> None:
        self._cache: dict[tuple, FileFacts] = {}

    def inspect(self, path: str, *, digest: bool) -> FileFacts:
        """Facts of `path`: existence, size, realpath, leading varstore layout, digests.

        `digest` asks for the sha256 (code images); varstores only need their layout.
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return FileFacts(path=path, exists=False)
        except OSError as exc:
            return FileFacts(path=path, exists=False, error=f"cannot stat: {exc.strerror}")
        key = (path, digest, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        facts = self._read(path, st.st_size, digest)
        self._cache[key] = facts
        return facts

    def _read(self, path: str, size: int, digest: bool) -> FileFacts:
        try:
            layout = virtfw.read_layout(path)
            error = None
        except VarstoreError as exc:
            layout, error = None, str(exc)
        sha = trailing = None
        if digest:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                return FileFacts(path=path, exists=True, size=size, error=f"cannot read: {exc.strerror}")
            sha = hashlib.sha256(data).hexdigest()
            if layout is not None and layout.size < len(data):
                trailing = hashlib.sha256(data[layout.size :]).hexdigest()
        return FileFacts(
            path=path,
            exists=True,
            size=size,
            sha256=sha,
            realpath=os.path.realpath(path),
            varstore_layout=layout,
            trailing_sha256=trailing,
            error=error if layout is None and not digest else None,
        )
