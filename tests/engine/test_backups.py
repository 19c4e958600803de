"""The backup store: content addressing, verification, stat-only passes, coherent copies."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
from ovmf_files import EFI_GLOBAL, LAYOUT_4M, VARS_4M

from varsd.adapters import fsio, virtfw
from varsd.adapters.backup_index import BackupIndex
from varsd.engine.backups import BackupCorrupt, BackupStore, IncoherentCopy, Target, read_coherent


@pytest.fixture
def store(tmp_path) -> BackupStore:
    return BackupStore(str(tmp_path / "state" / "backups"), BackupIndex(str(tmp_path / "state" / "s.sqlite3")))


def _varstores(tmp_path, n: int) -> list[Target]:
    d = tmp_path / "nvram"
    d.mkdir(exist_ok=True)
    targets = []
    for i in range(n):
        p = d / f"g{i}_VARS.fd"
        shutil.copyfile(VARS_4M, p)
        targets.append(Target(uuid=f"00000000-0000-4000-8000-{i:012d}", name=f"g{i}", path=str(p)))
    return targets


def test_fresh_varstores_of_many_guests_store_one_file(tmp_path, store):
    targets = _varstores(tmp_path, 200)
    results = store.run_pass(targets, reason="schedule")
    assert all(r.record is not None for r in results)
    assert len(store.index.records()) == 200
    assert os.listdir(store.objects_dir) == [f"{fsio.sha256_file(VARS_4M)}.fd"]
    st = os.stat(store.objects_dir + "/" + os.listdir(store.objects_dir)[0])
    assert st.st_mode & 0o777 == 0o600
    assert os.stat(store.objects_dir).st_mode & 0o777 == 0o700


def test_a_pass_with_nothing_changed_reads_nothing(tmp_path, store, monkeypatch):
    targets = _varstores(tmp_path, 20)
    store.run_pass(targets, reason="schedule")
    data = virtfw.with_variable(targets[3].path, "VarsdTest", EFI_GLOBAL, b"\x01")
    reads = []
    real = fsio.read_file
    nvram = os.path.dirname(targets[0].path)

    def counting(p, **kw):
        if os.path.dirname(p) == nvram:
            reads.append(p)
        return real(p, **kw)

    monkeypatch.setattr(fsio, "read_file", counting)
    again = store.run_pass(targets, reason="schedule")
    assert all(r.unchanged and not r.read for r in again)
    assert reads == []
    # one guest writes a variable: only it is read and backed up again
    fsio.replace_atomic(targets[3].path, data)
    third = store.run_pass(targets, reason="schedule")
    assert [r.target.name for r in third if r.record] == ["g3"]
    assert reads == [targets[3].path]
    assert len(os.listdir(store.objects_dir)) == 2


def test_touched_but_equal_content_is_read_once_and_not_stored_again(tmp_path, store):
    [t] = _varstores(tmp_path, 1)
    store.run_pass([t], reason="schedule")
    os.utime(t.path)  # e.g. a backup tool touched it
    r = store.run_pass([t], reason="schedule")[0]
    assert r.unchanged and r.read and r.record is None
    assert store.run_pass([t], reason="schedule")[0].read is False


def test_flipped_byte_is_detected_and_never_loaded(tmp_path, store):
    [t] = _varstores(tmp_path, 1)
    record = store.run_pass([t], reason="schedule")[0].record
    obj = store.object_path(record.sha256)
    data = bytearray(open(obj, "rb").read())
    data[1000] ^= 0x01
    os.chmod(obj, 0o600)
    with open(obj, "r+b") as f:
        f.write(data)
    with pytest.raises(BackupCorrupt, match=f"backup #{record.id} of domain 'g0'.*damaged"):
        store.load(record)
    # storing the same content again moves the damaged object aside and writes it anew
    store.put(open(t.path, "rb").read())
    assert store.load(record) == open(t.path, "rb").read()
    assert any(".corrupt-" in n for n in os.listdir(store.objects_dir))


def test_missing_and_symlinked_varstores_are_reported_not_followed(tmp_path, store):
    [t] = _varstores(tmp_path, 1)
    os.unlink(t.path)
    assert "no varstore" in store.run_pass([t], reason="schedule")[0].skipped
    os.symlink(VARS_4M, t.path)
    assert "not a regular file" in store.run_pass([t], reason="schedule")[0].error


def test_coherent_read_needs_two_equal_reads_that_parse(tmp_path):
    [t] = _varstores(tmp_path, 1)
    assert read_coherent(t.path, LAYOUT_4M) == open(VARS_4M, "rb").read()
    garbage = tmp_path / "g.fd"
    garbage.write_bytes(b"\0" * 4096)
    with pytest.raises(IncoherentCopy, match="does not parse"):
        read_coherent(str(garbage), tries=2, delay=0)


def test_coherent_read_of_a_file_being_rewritten_waits_for_a_whole_copy(tmp_path):
    [t] = _varstores(tmp_path, 1)
    other = virtfw.with_variable(t.path, "VarsdTest", EFI_GLOBAL, b"\x02" * 64)
    calls = []

    def sleep(_s):  # a writer that rewrites the file between the first reads, then stops
        calls.append(1)
        if len(calls) <= 2:
            with open(t.path, "r+b") as f:
                f.write(other if len(calls) % 2 else open(VARS_4M, "rb").read())

    data = read_coherent(t.path, LAYOUT_4M, sleep=sleep)
    assert data == open(VARS_4M, "rb").read() and len(calls) >= 3


def test_concurrent_puts_of_one_content_agree(tmp_path, store):
    data = open(VARS_4M, "rb").read()
    errors = []

    def put():
        try:
            store.put(data)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert store.problem(fsio.sha256_bytes(data)) is None


def test_a_pass_or_report_over_many_domains_says_what_one_over_each_does(tmp_path, store):
    """Passes and status reports over many targets read the index once for all (FEW or
    more); over one target, its rows. Both give the same answers."""
    from varsd.engine.backups import FEW, backup_status

    targets = _varstores(tmp_path, FEW + 4)
    store.run_pass(targets[:2], reason="defined")  # a pass of a few: rows looked up one by one
    store.run_pass(targets, reason="schedule")  # of many: all rows at once
    assert len(store.index.records()) == len(targets)  # each backed up once, whichever pass did it
    with open(targets[5].path, "r+b") as f:  # the guest wrote a variable
        f.write(virtfw.with_variable(targets[5].path, "VarsdTest", EFI_GLOBAL, b"\x01"))
    together = backup_status(store, targets)
    alone = {t.uuid: backup_status(store, [t])[t.uuid] for t in targets}
    assert together == alone
    assert [together[t.uuid]["current_in_backup"] for t in targets] == [i != 5 for i in range(len(targets))]
