"""The hostile-input suite's test bed (tier 2: libvirt's test:/// driver, real OVMF files,
real tmpfs mounts): a throw-away host per row.

Contract: every row of `test_hostile.py` builds one bad input or fault in a fresh `Bed`
(its own nvram, state and descriptor directories, its own config file, its own domains on
test:///default), runs varsctl on it in-process, and checks three things: what the admin
sees (the message names the thing and what to do), the exit code, and that nothing
changed or was lost (every file under the bed and every domain definition is byte for
byte what it was). test:/// suffices here: these are varsd's answers to bad input, not
libvirt's or QEMU's behaviour (the slow-libvirt row runs on the real libvirtd, in
tests/integration/test_slow_libvirt.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

# The real files, release-aware (Debian 12's 2 MiB ones fetched for bookworm where the host is not Debian 12).
from ovmf_files import CODE_2M, CODE_4M, OVMF, UNIFIED, VARS_2M, VARS_4M  # noqa: F401
from ovmf_files import CODE_4M_SECBOOT as SB_CODE_4M  # noqa: F401
from support.domains import VARSD_NS, domain_xml, split_os

from varsd.cli.varsctl import main

URI = "test:///default"


class Bed:
    def __init__(self, root: Path, conn: libvirt.virConnect) -> None:
        self.root, self.conn = root, conn
        self.nvram, self.state, self.etc = root / "nvram", root / "state", root / "etc-firmware"
        self.images = root / "images"
        for d in (self.nvram, self.etc, self.images):
            d.mkdir()
        self.config = root / "varsd.toml"
        self.names: list[str] = []
        self.watch: list[Path] = []  # files outside the bed that must not appear or change
        self.write_config()

    def write_config(self, extra: str = "", *, state: str | None = None) -> None:
        self.config.write_text(
            f'state_dir = "{state or self.state}"\nnvram_dir = "{self.nvram}"\n'
            f'firmware_dirs = ["/usr/share/qemu/firmware", "{self.etc}"]\n'
            # the descriptors alone are this bed's firmware (no builds found by searching the
            # host's /usr/share/OVMF: rows such as "a pin to a build this host does not know"
            # rely on the 2 MiB images being unknown)
            'firmware_search_dirs = []\n'
            'qemu_user = "root"\nqemu_group = "root"\n' + extra
        )

    def domain(
        self,
        os_inner: str,
        *,
        extra: str = "",
        machine: str = "pc-q35-7.2",
        features: str = "",
        metadata: str = "",
        start: bool = False,
        name: str | None = None,
    ) -> str:
        name = name or f"hostile-{uuidlib.uuid4().hex[:10]}"
        md = f"<varsd:firmware xmlns:varsd='{VARSD_NS}'{metadata}" if metadata else ""
        self.conn.defineXML(domain_xml(name, os_inner, metadata=md, machine=machine, features=features, extra=extra,
                                       pretty=False))
        self.names.append(name)
        if start:
            self.conn.lookupByName(name).create()
        return name

    def file(self, name: str, data: bytes = b"", *, like: str | None = None, where: Path | None = None) -> str:
        path = (where or self.images) / name
        path.write_bytes(open(like, "rb").read() + data if like else data)
        return str(path)

    def varstore(self, name: str, *, like: str = VARS_4M, data: bytes = b"") -> str:
        path = self.file(f"{name}_VARS.fd", data, like=like, where=self.nvram)
        os.chmod(path, 0o600)
        return path

    def split(self, varstore: str, code: str = CODE_4M) -> str:
        return split_os(code, varstore)

    def descriptor(self, name: str, text: str | bytes) -> None:
        path = self.etc / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)

    def run(self, capsys, *args: str) -> tuple[int, str]:
        if args and args[0] == "varsd":  # the daemon's start-up (it exits before serving on bad input)
            from varsd.daemon.main import main as varsd_main

            rc = varsd_main(["--config", str(self.config), "--connect", URI, *args[1:]])
            out, err = capsys.readouterr()
            return rc, out + err
        try:
            rc = main(["--config", str(self.config), "--connect", URI, *args])
        except SystemExit as exc:  # argparse usage errors
            rc = int(exc.code or 0)
        out, err = capsys.readouterr()
        return rc, out + err

    def snapshot(self) -> dict[str, object]:
        """Every file (content digest, or its kind) and every domain definition of the bed."""
        snap: dict[str, object] = {}
        for top, dirs, files in os.walk(self.root):
            if Path(top) == self.state or self.state in Path(top).parents:
                continue  # varsd's own bookkeeping (journal, locks) may be written
            for f in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
                p = os.path.join(top, f)
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode):
                    if st.st_size > 64 * 1024 * 1024:
                        snap[p] = ("big", st.st_size, st.st_mtime_ns)
                    else:
                        snap[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
                else:
                    snap[p] = (stat.S_IFMT(st.st_mode), os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
        if self.state.exists() and not self.state.is_dir():
            snap[str(self.state)] = hashlib.sha256(self.state.read_bytes()).hexdigest()
        for p in self.watch:
            snap[str(p)] = p.exists() and hashlib.sha256(p.read_bytes()).hexdigest()
        for name in self.names:
            try:
                snap[f"domain:{name}"] = self.conn.lookupByName(name).XMLDesc(
                    libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
                )
            except libvirt.libvirtError:
                snap[f"domain:{name}"] = None
        return snap

    def cleanup(self) -> None:
        for name in self.names:
            try:
                dom = self.conn.lookupByName(name)
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass
        for p in self.watch:
            if p.exists() and p.is_file():
                p.unlink()


@pytest.fixture
def bed(tmp_path) -> Iterator[Bed]:
    conn = libvirt.open(URI)  # keeps test:///default's state alive across main() calls
    b = Bed(tmp_path / "bed", conn) if (tmp_path / "bed").mkdir() is None else None
    assert b is not None
    try:
        yield b
    finally:
        b.cleanup()
        conn.close()
        shutil.rmtree(tmp_path / "bed", ignore_errors=True)
