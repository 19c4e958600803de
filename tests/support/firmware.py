"""Firmware files for tests: the one descriptor builder, and installing a file the way dpkg does."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path


def descriptor(code: str | Path, template: str | Path | None = None, *, mode: str | None = None,
               device: str = "flash", interfaces: Sequence[str] = ("uefi",), machines: Sequence[str] = ("pc-q35-*",),
               features: Sequence[str] = (), description: str = "test") -> str:
    """A QEMU firmware descriptor (docs/interop/firmware.json) for an x86_64 build, as JSON text."""
    mapping: dict = {"device": device}
    if device == "flash":
        mapping["executable"] = {"filename": str(code), "format": "raw"}
        if template is not None:
            mapping["nvram-template"] = {"filename": str(template), "format": "raw"}
        if mode:
            mapping["mode"] = mode
    else:
        mapping["filename"] = str(code)
    return json.dumps({
        "description": description,
        "interface-types": list(interfaces),
        "mapping": mapping,
        "targets": [{"architecture": "x86_64", "machines": list(machines)}],
        "features": list(features),
    })


class BuildPaths:
    """Where a test's firmware build lives: CODE.fd and VARS.fd in `self.fw`."""

    fw: Path

    @property
    def code(self) -> str:
        return str(self.fw / "CODE.fd")

    @property
    def vars(self) -> str:
        return str(self.fw / "VARS.fd")


def install_like_dpkg(data: bytes, dst: str | Path, mode: int = 0o644) -> None:
    """Put `data` at `dst` as dpkg does: written aside as `dst.dpkg-new`, renamed over (a new inode)."""
    tmp = f"{dst}.dpkg-new"
    Path(tmp).write_bytes(data)
    os.chmod(tmp, mode)
    os.rename(tmp, dst)
