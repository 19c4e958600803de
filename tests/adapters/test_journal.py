"""The SQLite journal of domain XML changes: private file, round trip, order, reopen, errors."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import threading

import pytest

from varsd.adapters.journal import Change, Journal
from varsd.clock import parse_stamp
from varsd.errors import StateDirError, VarsdError
from varsd.model.journal import MIGRATION_REASON, ChangeKind

U1 = "11111111-1111-1111-1111-111111111111"
U2 = "22222222-2222-2222-2222-222222222222"


def _record(j: Journal, uuid: str = U1, n: int = 0, **kw: str) -> int:
    args = dict(
        at=parse_stamp(f"2025-01-01T00:00:{n:02d}Z"), uuid=uuid, name=f"vm{n}", actor="varsctl", reason=f"reason {n}",
        old_xml=f"<domain>old {n}</domain>", new_xml=f"<domain>new {n}</domain>",
    )
    args.update(kw)
    return j.record(**args)


@pytest.fixture
def journal(tmp_path):
    j = Journal(str(tmp_path / "state" / "state.sqlite3"))
    yield j
    j.close()


def test_file_and_directory_are_private(tmp_path):
    path = tmp_path / "state" / "state.sqlite3"
    j = Journal(str(path))
    try:
        _record(j)  # WAL mode: the write creates the -wal and -shm files too
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        for side in ("state.sqlite3-wal", "state.sqlite3-shm"):
            side_path = path.parent / side
            assert side_path.exists(), side
            assert stat.S_IMODE(os.stat(side_path).st_mode) == 0o600, side
    finally:
        j.close()


def test_record_settle_change_round_trip(journal):
    cid = _record(journal, U1, 1, old_xml="<domain><name>a</name></domain>", new_xml="<domain>b & 'q'</domain>")
    got = journal.change(cid)
    assert got == Change(
        id=cid, at=parse_stamp("2025-01-01T00:00:01Z"), uuid=U1, name="vm1", actor="varsctl", reason="reason 1",
        old_xml="<domain><name>a</name></domain>", new_xml="<domain>b & 'q'</domain>", outcome="pending",
    )
    journal.settle(cid, "applied")
    assert journal.change(cid).outcome == "applied"
    journal.settle(cid, "failed: libvirt said no")
    assert journal.change(cid).outcome == "failed: libvirt said no"
    assert journal.changes() == [journal.change(cid)]


def test_unknown_change_is_none(journal):
    assert journal.change(12345) is None
    assert journal.changes() == []
    assert journal.changes(U1) == []


def test_ids_increase_and_changes_lists_newest_first(journal):
    ids = [_record(journal, U1 if n % 2 else U2, n) for n in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert [c.id for c in journal.changes()] == ids[::-1]
    assert [c.reason for c in journal.changes()] == [f"reason {n}" for n in range(4, -1, -1)]
    assert [c.id for c in journal.changes(limit=2)] == ids[:-3:-1]


def test_per_uuid_filter(journal):
    ids = {n: _record(journal, U1 if n % 2 else U2, n) for n in range(6)}
    assert [c.id for c in journal.changes(U1)] == [ids[5], ids[3], ids[1]]
    assert [c.id for c in journal.changes(U2)] == [ids[4], ids[2], ids[0]]
    assert {c.uuid for c in journal.changes(U1)} == {U1}
    assert [c.id for c in journal.changes(U2, limit=1)] == [ids[4]]
    assert journal.changes("33333333-3333-3333-3333-333333333333") == []


def test_persists_across_reopen(tmp_path):
    path = str(tmp_path / "state.sqlite3")
    j = Journal(path)
    a = _record(j, U1, 1)
    b = _record(j, U2, 2)
    j.settle(a, "applied")
    j.close()
    j2 = Journal(path)
    try:
        assert [(c.id, c.outcome) for c in j2.changes()] == [(b, "pending"), (a, "applied")]
        assert j2.change(a).old_xml == "<domain>old 1</domain>"
        c = _record(j2, U1, 3)
        assert c > b  # AUTOINCREMENT never reuses ids
    finally:
        j2.close()


def test_two_handles_see_each_others_writes(tmp_path):
    path = str(tmp_path / "state.sqlite3")
    daemon, cli = Journal(path), Journal(path)
    try:
        cid = _record(cli, U1, 1)
        assert daemon.change(cid).name == "vm1"
        daemon.settle(cid, "applied")
        assert cli.change(cid).outcome == "applied"
    finally:
        daemon.close()
        cli.close()


def test_read_only_state_dir_reads_and_refuses_writes_naming_the_path(mount_tmpfs):
    """#12 defect 11: reading commands work; a write says what is wrong and what to do."""
    ro = mount_tmpfs("size=64k,ro")
    path = os.path.join(ro, "state.sqlite3")
    journal = Journal(path)
    try:
        assert journal.read_only and journal.changes() == []
        with pytest.raises(StateDirError) as info:
            _record(journal, U1, 1)
    finally:
        journal.close()
    msg = str(info.value)
    assert f"{ro} is on a read-only file system; make it writable" in msg and "Errno" not in msg
    assert not os.path.exists(path)


def test_read_only_state_dir_with_a_journal_reads_it(tmp_path, mount_tmpfs):
    rw = mount_tmpfs("size=1m")
    journal = Journal(os.path.join(rw, "state.sqlite3"))
    cid = _record(journal, U1, 1)
    journal.close()
    subprocess.run(["mount", "-o", "remount,ro", rw], check=True)
    journal = Journal(os.path.join(rw, "state.sqlite3"))
    try:
        assert journal.read_only and journal.change(cid).name == "vm1"
    finally:
        journal.close()


def test_uncreatable_state_dir_names_the_path(mount_tmpfs):
    ro = mount_tmpfs("size=64k,ro")
    path = os.path.join(ro, "varsd", "state.sqlite3")
    with pytest.raises(StateDirError, match=f"{ro}/varsd is on a read-only file system; make it writable"):
        Journal(path)


def test_state_dir_that_is_a_file(tmp_path):
    (tmp_path / "state").write_text("not a directory")
    path = str(tmp_path / "state" / "state.sqlite3")
    with pytest.raises(StateDirError, match=f"{tmp_path}/state is not a directory \\(a file is in the way\\)"):
        Journal(path)


def test_symlinked_journal_is_refused(tmp_path):
    target = tmp_path / "elsewhere.sqlite3"
    link = tmp_path / "state.sqlite3"
    link.symlink_to(target)
    with pytest.raises(StateDirError, match=f"^{link}: the varsd journal is not a plain file"):
        Journal(str(link))
    assert not target.exists()


def test_a_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "state.sqlite3"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(VarsdError, match=f"^{path}: cannot open the varsd journal"):
        Journal(str(path))


def test_full_disk_is_a_varsd_error_naming_the_path(mount_tmpfs):
    """A failed write must surface as a VarsdError (callers handle those), never a raw sqlite3 error."""
    small = mount_tmpfs("size=256k")
    path = os.path.join(small, "state.sqlite3")
    j = Journal(path)
    try:
        first = _record(j, U1, 1)
        with pytest.raises(VarsdError, match=f"^{path}: "):
            _record(j, U1, 2, old_xml="<domain>" + "x" * 1024 * 1024 + "</domain>")
        with pytest.raises(VarsdError, match=f"^{path}: "):
            j.settle(first, "applied: " + "y" * 1024 * 1024)
        # what was written before is still there and readable
        assert [c.id for c in j.changes()] == [first]
        assert j.change(first).outcome == "pending"
    finally:
        j.close()


def test_one_journal_shared_by_threads(journal):
    """The daemon's workers share one Journal: concurrent writes all land, each with its own id."""
    ids: list[int] = []
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for n in range(20):
                cid = _record(journal, U1 if k % 2 else U2, n, name=f"t{k}")
                journal.settle(cid, "applied")
                ids.append(cid)
                journal.changes(U1, limit=5)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(ids) == len(set(ids)) == 160
    assert sorted(c.id for c in journal.changes(limit=1000)) == sorted(ids)
    assert {c.outcome for c in journal.changes(limit=1000)} == {"applied"}


def test_an_entry_keeps_its_kind(journal):
    edit = _record(journal)
    migration = journal.record(at=parse_stamp("2025-01-01T00:00:09Z"), uuid=U1, name="vm", actor="varsctl",
                               reason="any words", old_xml="<a/>", new_xml="<b/>", kind=ChangeKind.MIGRATION)
    assert journal.change(edit).kind is ChangeKind.EDIT
    assert journal.change(migration).kind is ChangeKind.MIGRATION
    assert [c.kind for c in journal.changes()] == [ChangeKind.MIGRATION, ChangeKind.EDIT]


def _old_journal(path) -> None:
    """A journal as written before entries had a kind: migrations told only by their reason."""
    path.parent.mkdir(mode=0o700)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE xml_changes (id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, uuid TEXT NOT NULL,"
               " name TEXT NOT NULL, actor TEXT NOT NULL, reason TEXT NOT NULL, old_xml TEXT NOT NULL,"
               " new_xml TEXT NOT NULL, outcome TEXT NOT NULL DEFAULT 'pending')")
    for reason in (f"{MIGRATION_REASON} (540672 -> 540672 bytes) to OVMF_CODE_4M", "firmware upgrade"):
        db.execute("INSERT INTO xml_changes (at, uuid, name, actor, reason, old_xml, new_xml) VALUES (?,?,?,?,?,?,?)",
                   ("2025-01-01T00:00:00Z", U1, "vm", "varsctl", reason, "<a/>", "<b/>"))
    db.commit()
    db.close()
    os.chmod(path, 0o600)


@pytest.mark.parametrize("read_only", [True, False])
def test_an_old_journal_classifies_migrations_by_their_reason(tmp_path, read_only):
    path = tmp_path / "state" / "state.sqlite3"
    _old_journal(path)
    j = Journal(str(path), read_only=read_only)
    try:
        assert [c.kind for c in j.changes()] == [ChangeKind.EDIT, ChangeKind.MIGRATION]
        assert j.change(1).kind is ChangeKind.MIGRATION
    finally:
        j.close()
    if read_only:  # nothing was written: the file still has no kind column
        db = sqlite3.connect(path)
        assert "kind" not in [row[1] for row in db.execute("PRAGMA table_info(xml_changes)")]
        db.close()
