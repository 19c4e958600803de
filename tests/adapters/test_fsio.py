"""fsio: exclusive atomic creation never overwrites, follows no final symlink, leaves nothing behind."""

from __future__ import annotations

import os
import stat
import time

import pytest

from varsd.adapters import fsio
from varsd.errors import ProvisionError

VARS_4M = "/usr/share/OVMF/OVMF_VARS_4M.fd"


def _snapshot(path: str) -> tuple[bytes, int, int]:
    st = os.lstat(path)
    with open(path, "rb") as f:
        return f.read(), st.st_ino, st.st_mtime_ns


def test_creates_with_mode_owner_and_exact_content(tmp_path, qemu_owner):
    target = tmp_path / "vm_VARS.fd"
    data = open(VARS_4M, "rb").read()
    fsio.create_exclusive(str(target), data, uid=qemu_owner[0], gid=qemu_owner[1])
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == qemu_owner
    assert target.read_bytes() == data
    assert st.st_nlink == 1  # the temp name is gone
    assert os.listdir(tmp_path) == ["vm_VARS.fd"]


def test_mode_argument_is_applied_exactly(tmp_path):
    target = tmp_path / "f"
    old = os.umask(0o077)
    try:
        fsio.create_exclusive(str(target), b"x", mode=0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(target).st_mode) == 0o640


def test_existing_file_is_untouched(tmp_path):
    target = tmp_path / "vm_VARS.fd"
    target.write_bytes(b"guest variables")
    before = _snapshot(str(target))
    with pytest.raises(fsio.TargetExists, match="already exists") as info:
        fsio.create_exclusive(str(target), b"template bytes")
    assert str(target) in str(info.value)
    assert isinstance(info.value, ProvisionError)
    assert _snapshot(str(target)) == before
    assert os.listdir(tmp_path) == ["vm_VARS.fd"]


def test_symlink_at_target_is_not_followed(tmp_path):
    victim = tmp_path / "other_vm_VARS.fd"
    victim.write_bytes(b"another VM's variables")
    before = _snapshot(str(victim))
    link = tmp_path / "vm_VARS.fd"
    link.symlink_to(victim)
    with pytest.raises(ProvisionError, match="already exists"):
        fsio.create_exclusive(str(link), b"template bytes")
    assert _snapshot(str(victim)) == before
    assert os.readlink(link) == str(victim)
    assert sorted(os.listdir(tmp_path)) == ["other_vm_VARS.fd", "vm_VARS.fd"]


def test_dangling_symlink_at_target_creates_nothing_at_its_destination(tmp_path):
    dest = tmp_path / "elsewhere"
    link = tmp_path / "vm_VARS.fd"
    link.symlink_to(dest)
    with pytest.raises(ProvisionError, match="already exists"):
        fsio.create_exclusive(str(link), b"template bytes")
    assert not dest.exists()
    assert os.path.islink(link)
    assert os.listdir(tmp_path) == ["vm_VARS.fd"]


def test_missing_directory(tmp_path):
    target = tmp_path / "no-such-dir" / "vm_VARS.fd"
    with pytest.raises(ProvisionError, match="does not exist") as info:
        fsio.create_exclusive(str(target), b"x")
    assert str(target) in str(info.value)
    assert not (tmp_path / "no-such-dir").exists()


def test_parent_directory_may_be_a_symlink(tmp_path):
    real = tmp_path / "real-nvram"
    real.mkdir()
    (tmp_path / "nvram").symlink_to(real)
    fsio.create_exclusive(str(tmp_path / "nvram" / "vm_VARS.fd"), b"data")
    assert (real / "vm_VARS.fd").read_bytes() == b"data"
    assert os.listdir(real) == ["vm_VARS.fd"]


@pytest.mark.parametrize("bad", ["{d}/", "{d}/..", "{d}/.", "{d}/a\0b"])
def test_rejects_names_that_are_not_one_plain_component(tmp_path, bad):
    with pytest.raises(ProvisionError, match="invalid file name"):
        fsio.create_exclusive(bad.format(d=tmp_path), b"x")
    assert os.listdir(tmp_path) == []


def test_read_only_filesystem_fails_even_for_root(mount_tmpfs):
    d = mount_tmpfs("size=1m,ro")
    target = os.path.join(d, "vm_VARS.fd")
    with pytest.raises(ProvisionError, match="read-only file system") as info:
        fsio.create_exclusive(target, b"x" * 4096)
    assert target in str(info.value)
    assert os.listdir(d) == []


def test_full_disk_leaves_neither_temp_nor_target(mount_tmpfs, qemu_owner):
    d = mount_tmpfs("size=64k")
    target = os.path.join(d, "vm_VARS.fd")
    data = open(VARS_4M, "rb").read()
    assert len(data) == 540672
    with pytest.raises(ProvisionError, match="no space left on device") as info:
        fsio.create_exclusive(target, data, uid=qemu_owner[0], gid=qemu_owner[1])
    assert target in str(info.value)
    assert os.listdir(d) == []
    # and the space is really given back: a small file fits afterwards
    fsio.create_exclusive(target, b"small")
    assert os.listdir(d) == ["vm_VARS.fd"]


def test_read_prefix(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"0123456789")
    assert fsio.read_prefix(str(f), 4) == b"0123"
    assert fsio.read_prefix(str(f), 10) == b"0123456789"
    with pytest.raises(fsio.ReadError, match="only 10 bytes"):
        fsio.read_prefix(str(f), 11)


def test_read_prefix_does_not_follow_a_final_symlink_unless_asked(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "l").symlink_to(tmp_path / "f")
    with pytest.raises(fsio.ReadError, match="symbolic link"):
        fsio.read_prefix(str(tmp_path / "l"), 3)
    assert fsio.read_prefix(str(tmp_path / "l"), 3, follow_symlinks=True) == b"abc"


def test_reads_refuse_non_regular_files_without_hanging(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(fsio.ReadError, match="not a regular file"):
        fsio.read_prefix(str(fifo), 1)
    with pytest.raises(fsio.ReadError, match="not a regular file"):
        fsio.read_file(str(tmp_path))


def test_read_file_size_cap_and_missing_file(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    assert fsio.read_file(str(f)) == b"x" * 100
    with pytest.raises(fsio.ReadError, match="more than"):
        fsio.read_file(str(f), max_size=99)
    with pytest.raises(fsio.ReadError, match="no such file") as info:
        fsio.read_file(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(info.value)


def test_sha256_helpers_agree():
    data = open(VARS_4M, "rb").read()
    assert fsio.sha256_bytes(data) == fsio.sha256_file(VARS_4M)


def test_sweep_removes_only_old_varsd_temp_files(tmp_path):
    old_tmp = tmp_path / f".vm_VARS.fd{fsio.TEMP_MARKER}0123abcd"
    fresh_tmp = tmp_path / f".vm2_VARS.fd{fsio.TEMP_MARKER}4567ef01"
    varstore = tmp_path / "vm_VARS.fd"
    other = tmp_path / ".vm_VARS.fd.swp"
    for p in (old_tmp, fresh_tmp, varstore, other):
        p.write_bytes(b"x")
    past = time.time() - 3600
    for p in (old_tmp, varstore, other):
        os.utime(p, (past, past))
    assert fsio.sweep_temp_files(str(tmp_path)) == [old_tmp.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh_tmp.name, varstore.name, other.name])


@pytest.mark.parametrize("data", [
    bytes(64 << 20),  # a blank AAVMF varstore: all holes
    b"\x5a" * 100 + bytes((3 << 20) - 100) + b"\x01",  # data, a hole, data at the very end
    b"\x00" * 1000,  # less than one block: written
    b"",
])
def test_zero_blocks_become_holes_and_content_is_exact(tmp_path, data):
    target = tmp_path / "v.fd"
    fsio.create_exclusive(str(target), data)
    assert target.read_bytes() == data and target.stat().st_size == len(data)
    if len(data) >= 64 << 20:
        assert target.stat().st_blocks * 512 < 1 << 20


def test_erased_from(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"head" + bytes(3 << 20))
    assert fsio.erased_from(str(f), 4) and not fsio.erased_from(str(f), 0)
    f.write_bytes(b"head" + b"\xff" * 5000)
    assert fsio.erased_from(str(f), 4)
    f.write_bytes(b"head" + b"\xff" * 5000 + b"\x00")  # mixed is not erased
    assert not fsio.erased_from(str(f), 4, chunk=1024)
    assert not fsio.erased_from(str(f), 1 << 20)  # nothing there
