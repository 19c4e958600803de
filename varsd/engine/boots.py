"""What a running guest booted: recorded in its *live* metadata at every start.

A package upgrade replaces the code file by rename while QEMU keeps the old inode
open, and a guest reboot keeps the same QEMU process; so "what is this guest running"
is the digest of the file QEMU opened at start, read through /proc/<pid>/fd when
libvirt runs locally (the path may already hold a newer build). Live metadata lives
exactly as long as the QEMU process, which is the lifetime of the fact.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from lxml import etree

from varsd.adapters.fsio import sha256_file
from varsd.adapters.libvirt_api import Hypervisor
from varsd.domain.xml import BOOT_KEY, BOOT_NS, parse_domain

__all__ = ["BOOT_KEY", "BOOT_NS", "BootRecord", "booted", "observe_boot", "record_boot"]


@dataclass(frozen=True)
class BootRecord:
    code_path: str
    sha256: str
    at: str
    source: str  # "qemu-fd" (what QEMU has open) or "path" (hashed by name)


def boot_fragment(rec: BootRecord) -> str:
    # libvirt's setMetadata puts the element into BOOT_NS itself; it must arrive bare.
    el = etree.Element(BOOT_KEY)
    for k, v in (("code", rec.code_path), ("sha256", rec.sha256), ("at", rec.at), ("source", rec.source)):
        el.set(k, v)
    return etree.tostring(el, encoding="unicode")


def parse_boot_fragment(fragment: str | None) -> BootRecord | None:
    if not fragment:
        return None
    try:
        el = etree.fromstring(fragment.encode())
    except etree.XMLSyntaxError:
        return None
    if not el.get("sha256"):
        return None
    return BootRecord(el.get("code", ""), el.get("sha256", ""), el.get("at", ""), el.get("source", ""))


def _open_code_digest(pid: int, code_path: str) -> str | None:
    """sha256 of the code file QEMU `pid` has open (old inode even after an upgrade)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    # QEMU opened the loader path, which may be a symlink (Debian's *.ms.fd): its fd names
    # the resolved file, with " (deleted)" once a package upgrade renamed a new one over it.
    names = {code_path, os.path.realpath(code_path)}
    for fd in fds:
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.removesuffix(" (deleted)") in names:
            h = hashlib.sha256()
            try:
                with open(os.path.join(fd_dir, fd), "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            except OSError:
                return None
            return h.hexdigest()
    return None


def observe_boot(hv: Hypervisor, uuid: str, at: str) -> BootRecord | None:
    """Digest of the code the domain's current QEMU process booted, or None (no UEFI)."""
    xml = hv.live_xml(uuid)
    if xml is None:
        return None
    fw = parse_domain(xml)
    code = fw.loader_path or fw.cmdline_bios
    if not code:
        return None
    pid = hv.qemu_pid(uuid)
    if pid:
        # With QEMU's process at hand, only its open file tells the truth: hashing the
        # path could record a build installed after it started.
        digest = _open_code_digest(pid, code)
        return BootRecord(code, digest, at, "qemu-fd") if digest else None
    try:
        return BootRecord(code, sha256_file(code), at, "path")
    except OSError:
        return None


def record_boot(hv: Hypervisor, uuid: str, at: str) -> BootRecord | None:
    rec = observe_boot(hv, uuid, at)
    if rec is not None:
        hv.set_metadata(uuid, boot_fragment(rec), key=BOOT_KEY, ns_uri=BOOT_NS, live=True, config=False)
    return rec


def booted(hv: Hypervisor, uuid: str) -> BootRecord | None:
    return parse_boot_fragment(hv.get_metadata(uuid, ns_uri=BOOT_NS, live=True))
