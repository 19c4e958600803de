"""FileInspector: facts of real OVMF files, and a cache that re-reads exactly what changed."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading

import pytest
from ovmf_files import DEBIAN12_OVMF  # Debian 12's files, release-aware
from ovmf_files import UNIFIED as UNIFIED_2M_IMAGE

from varsd.adapters import virtfw
from varsd.engine.inspect import FileInspector
from varsd.model.domain import FileFacts
from varsd.model.firmware import VarstoreLayout

CODE_4M = "/usr/share/OVMF/OVMF_CODE_4M.fd"
VARS_4M = "/usr/share/OVMF/OVMF_VARS_4M.fd"
CODE_2M = f"{DEBIAN12_OVMF}/OVMF_CODE.fd"
VARS_2M = f"{DEBIAN12_OVMF}/OVMF_VARS.fd"
UNIFIED = UNIFIED_2M_IMAGE

LAYOUT_2M = VarstoreLayout(size=131072, start=100, end=57344)
LAYOUT_4M = VarstoreLayout(size=540672, start=100, end=262144)


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _copy(src: str, tmp_path, name: str | None = None) -> str:
    dst = str(tmp_path / (name or os.path.basename(src)))
    shutil.copyfile(src, dst)
    return dst


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """Every path virtfw.read_layout is asked to parse (the expensive read)."""
    calls: list[str] = []
    real = virtfw.read_layout

    def counting(path: str) -> VarstoreLayout:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(virtfw, "read_layout", counting)
    return calls


def test_code_image(tmp_path):
    path = _copy(CODE_4M, tmp_path)
    facts = FileInspector().inspect(path, digest=True)
    assert facts == FileFacts(
        path=path, exists=True, size=3653632, sha256=_sha(CODE_4M), realpath=path,
        varstore_layout=None, trailing_sha256=None, error=None,
    )


def test_symlinked_code_image_has_its_realpath(tmp_path):
    link = tmp_path / "OVMF_CODE.ms.fd"
    link.symlink_to(CODE_4M)
    facts = FileInspector().inspect(str(link), digest=True)
    assert facts.realpath == os.path.realpath(CODE_4M)
    assert facts.sha256 == _sha(CODE_4M) and facts.size == os.path.getsize(CODE_4M)


@pytest.mark.parametrize("template, layout", [(VARS_4M, LAYOUT_4M), (VARS_2M, LAYOUT_2M)])
def test_varstore(tmp_path, template, layout):
    path = _copy(template, tmp_path, "vm_VARS.fd")
    facts = FileInspector().inspect(path, digest=False)
    assert facts == FileFacts(
        path=path, exists=True, size=layout.size, sha256=None, realpath=path,
        varstore_layout=layout, trailing_sha256=None, error=None,
    )


def test_unified_image(tmp_path):
    path = _copy(UNIFIED, tmp_path, "vm-OVMF.fd")
    facts = FileInspector().inspect(path, digest=True)
    assert facts.exists and facts.size == 131072 + 1966080 == os.path.getsize(UNIFIED)
    assert facts.varstore_layout == LAYOUT_2M
    assert facts.sha256 == _sha(UNIFIED)
    # the code part after the leading varstore is byte for byte Debian's OVMF_CODE.fd
    with open(path, "rb") as f:
        data = f.read()
    assert facts.trailing_sha256 == hashlib.sha256(data[LAYOUT_2M.size:]).hexdigest() == _sha(CODE_2M)
    assert facts.error is None


def test_unified_image_as_varstore_has_layout_but_no_digests(tmp_path):
    path = _copy(UNIFIED, tmp_path)
    facts = FileInspector().inspect(path, digest=False)
    assert facts.varstore_layout == LAYOUT_2M
    assert facts.sha256 is None and facts.trailing_sha256 is None


@pytest.mark.parametrize("digest", [True, False])
def test_missing_file(tmp_path, digest):
    path = str(tmp_path / "gone.fd")
    assert FileInspector().inspect(path, digest=digest) == FileFacts(path=path, exists=False, realpath=path)


def test_dangling_symlink_is_missing(tmp_path):
    link = tmp_path / "vm_VARS.fd"
    link.symlink_to(tmp_path / "nowhere")
    facts = FileInspector().inspect(str(link), digest=False)
    assert not facts.exists and facts.varstore_layout is None


def test_garbage_varstore(tmp_path):
    path = tmp_path / "vm_VARS.fd"
    path.write_bytes(b"\x00garbage" * 16384)
    facts = FileInspector().inspect(str(path), digest=False)
    assert facts.exists and facts.size == 8 * 16384
    assert facts.varstore_layout is None
    assert facts.error is not None and facts.error.startswith(f"{path}: not an edk2 varstore")


def test_garbage_code_image_is_no_error(tmp_path):
    """A code image is not a varstore: no layout, a digest, and no complaint."""
    path = tmp_path / "CODE.fd"
    path.write_bytes(b"\xffcode" * 1000)
    facts = FileInspector().inspect(str(path), digest=True)
    assert facts.varstore_layout is None and facts.error is None
    assert facts.sha256 == _sha(path)


def test_truncated_varstore(tmp_path):
    path = tmp_path / "vm_VARS.fd"
    with open(VARS_4M, "rb") as f:
        path.write_bytes(f.read()[: 200 * 1024])
    facts = FileInspector().inspect(str(path), digest=False)
    assert facts.varstore_layout is None and "truncated" in (facts.error or "")


def test_a_directory_is_not_a_firmware_image(tmp_path):
    d = tmp_path / "dir.fd"
    d.mkdir()
    for digest in (True, False):
        facts = FileInspector().inspect(str(d), digest=digest)
        assert facts.exists and facts.varstore_layout is None and facts.sha256 is None
        assert facts.error is not None and "not a regular file" in facts.error


def test_a_fifo_does_not_hang_the_inspector(tmp_path):
    """A FIFO planted at a loader path must not block the daemon (nor /dev/zero exhaust memory)."""
    fifo = str(tmp_path / "OVMF_CODE.fd")
    os.mkfifo(fifo)
    result: list[FileFacts] = []
    t = threading.Thread(target=lambda: result.append(FileInspector().inspect(fifo, digest=True)), daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # unblock the stuck open() so the thread can finish, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        pytest.fail("inspect() blocked opening a FIFO")
    (facts,) = result
    assert facts.exists and facts.sha256 is None and facts.varstore_layout is None
    assert "not a regular file" in (facts.error or "")


# -- cache ---------------------------------------------------------------------------


def test_second_call_does_not_read_again(tmp_path, counted):
    path = _copy(VARS_4M, tmp_path, "vm_VARS.fd")
    ins = FileInspector()
    first = ins.inspect(path, digest=False)
    assert counted == [path]
    assert ins.inspect(path, digest=False) == first
    assert ins.inspect(path, digest=False) is first
    assert counted == [path]


def test_digest_and_no_digest_are_cached_separately(tmp_path, counted):
    path = _copy(UNIFIED, tmp_path)
    ins = FileInspector()
    plain = ins.inspect(path, digest=False)
    full = ins.inspect(path, digest=True)
    assert plain.sha256 is None and full.sha256 == _sha(UNIFIED)
    assert len(counted) == 2
    ins.inspect(path, digest=True)
    ins.inspect(path, digest=False)
    assert len(counted) == 2


def test_changed_mtime_is_read_again(tmp_path, counted):
    path = _copy(VARS_4M, tmp_path, "vm_VARS.fd")
    ins = FileInspector()
    ins.inspect(path, digest=False)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, same inode, newer
    again = ins.inspect(path, digest=False)
    assert counted == [path, path]
    assert again.varstore_layout == LAYOUT_4M


def test_changed_size_is_read_again(tmp_path, counted):
    path = _copy(CODE_4M, tmp_path, "CODE.fd")
    ins = FileInspector()
    before = ins.inspect(path, digest=True)
    st = os.stat(path)
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: the size alone must tell
    after = ins.inspect(path, digest=True)
    assert len(counted) == 2
    assert after.size == before.size + 4096 and after.sha256 == _sha(path) != before.sha256


def test_replaced_file_is_read_again(tmp_path, counted):
    """A package upgrade replaces a code file by rename: new inode, maybe same size and mtime."""
    path = _copy(CODE_4M, tmp_path, "CODE.fd")
    ins = FileInspector()
    before = ins.inspect(path, digest=True)
    st = os.stat(path)
    new = tmp_path / "CODE.fd.dpkg-new"
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    new.write_bytes(bytes(data))
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(new, path)
    after = ins.inspect(path, digest=True)
    assert len(counted) == 2
    assert after.sha256 == _sha(path) != before.sha256


def test_deleted_file_is_not_served_from_cache(tmp_path):
    path = _copy(VARS_4M, tmp_path, "vm_VARS.fd")
    ins = FileInspector()
    assert ins.inspect(path, digest=False).exists
    os.unlink(path)
    assert ins.inspect(path, digest=False) == FileFacts(path=path, exists=False, realpath=path)


def test_cache_keeps_one_entry_per_file(tmp_path):
    """A varstore is rewritten at every guest boot: a long-running daemon must not keep every version."""
    path = _copy(VARS_4M, tmp_path, "vm_VARS.fd")
    ins = FileInspector()
    st = os.stat(path)
    for n in range(50):
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + n * 1_000_000))
        ins.inspect(path, digest=False)
        ins.inspect(path, digest=True)
    assert len(ins._cache) == 2  # (path, digest=False) and (path, digest=True)


def test_stat_key(tmp_path):
    path = _copy(VARS_4M, tmp_path, "vm_VARS.fd")
    st = os.stat(path)
    assert FileInspector.stat_key(path) == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    assert FileInspector.stat_key(str(tmp_path / "gone")) is None


def test_a_big_varstore_is_not_read_whole_and_an_impossible_one_not_at_all(tmp_path) -> None:
    """#12 defect 17: only the varstore volume is read and digests are streamed; a file
    larger than any firmware file (the cap) is refused before reading."""
    import tracemalloc

    big = tmp_path / "big_VARS.fd"
    with open(big, "wb") as f:
        f.write(open(VARS_4M, "rb").read())
        f.truncate(48 * 1024 * 1024)  # template + 47 MiB junk, under the cap
    tracemalloc.start()
    try:
        facts = FileInspector().inspect(str(big), digest=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert facts.varstore_layout == LAYOUT_4M and facts.size == 48 * 1024 * 1024
    assert facts.sha256 == _sha(big) and facts.trailing_sha256 is not None
    assert peak < 8 * 1024 * 1024, f"inspecting a 48 MiB file took {peak} bytes"

    huge = tmp_path / "huge_VARS.fd"
    with open(huge, "wb") as f:
        f.write(open(VARS_4M, "rb").read())
        f.truncate(200 * 1000 * 1000)
    facts = FileInspector().inspect(str(huge), digest=False)
    assert facts.varstore_layout is None and "more than the 67108864 any firmware file or varstore is" in facts.error
