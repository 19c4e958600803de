"""The firmware archive as the planner sees it: which builds have a verified copy, and where.

Pure: names and paths only. `varsd.firmware.archive.Archive` (the store, which does
the I/O) produces an `ArchiveIndex`; the upgrade planner reads it to decide where a
held domain's loader may point (verify-before-use).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

SUFFIX = ".fd"
_NAME = re.compile(r"^([0-9a-f]{64})\.fd$")


@dataclass(frozen=True)
class ArchiveIndex:
    """What the archive holds, verified: what the planner may point a loader at.

    `verified` digests have a file whose content matches; `corrupt` maps digests whose
    file does not (or cannot be read) to why, so a plan can say so instead of using it.
    """

    directory: str
    verified: frozenset[str] = frozenset()
    corrupt: Mapping[str, str] = field(default_factory=dict)

    def path_for(self, sha256: str) -> str:
        return archive_path(self.directory, sha256)


def archive_path(directory: str, sha256: str) -> str:
    """Where the image with this digest is (or would be) archived."""
    return os.path.join(directory, sha256 + SUFFIX)


def is_archive_path(directory: str, path: str | None) -> bool:
    """Whether `path` names an image in the archive directory."""
    if not path:
        return False
    parent, name = os.path.split(os.path.normpath(path))
    return parent == os.path.normpath(directory) and _NAME.match(name) is not None


def sha_of_archive_path(path: str) -> str | None:
    m = _NAME.match(os.path.basename(path))
    return m.group(1) if m else None
