"""What a running guest booted: read from the file QEMU has open, never from the path
(which may already hold a newer build). Exercised on this test process's own fds."""

from __future__ import annotations

import hashlib
import os

from varsd.engine.boots import _open_code_digest


def test_digest_of_the_open_file_through_a_symlink_after_an_upgrade(tmp_path) -> None:
    """Debian's OVMF_CODE_4M.ms.fd is a symlink; dpkg renames the new target over the old."""
    real = tmp_path / "OVMF_CODE_4M.secboot.fd"
    link = tmp_path / "OVMF_CODE_4M.ms.fd"
    real.write_bytes(b"old build")
    link.symlink_to(real.name)
    with open(link, "rb"):  # what QEMU holds: the resolved file
        new = tmp_path / "OVMF_CODE_4M.secboot.fd.dpkg-new"
        new.write_bytes(b"new build")
        os.rename(new, real)  # the upgrade: our fd now reads "... (deleted)"
        got = _open_code_digest(os.getpid(), str(link))
    assert got == hashlib.sha256(b"old build").hexdigest()


def test_no_digest_when_the_process_does_not_have_the_code_open(tmp_path) -> None:
    code = tmp_path / "CODE.fd"
    code.write_bytes(b"x")
    assert _open_code_digest(os.getpid(), str(code)) is None
