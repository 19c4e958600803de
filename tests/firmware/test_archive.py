"""The firmware archive: content-addressed, read-only, verified before use, pruned with care."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from varsd.adapters import fsio
from varsd.firmware.archive import Archive, ArchiveError, archive_path, is_archive_path, sha_of_archive_path

CODE_A = b"\x90" * 4096 + b"build A"
CODE_B = b"\x90" * 4096 + b"build B"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def state(tmp_path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def archive(state) -> Archive:
    return Archive(str(state / "archive"), state_dir=str(state))


def source(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_store_is_content_addressed_read_only_and_reachable_by_qemu(tmp_path, state, archive) -> None:
    stored = archive.store_file(source(tmp_path, "CODE.fd", CODE_A))
    assert stored.created and stored.entry.ok
    path = Path(archive.path_for(sha(CODE_A)))
    assert stored.entry.path == str(path) and path.read_bytes() == CODE_A
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert stat.S_IMODE(state.stat().st_mode) == 0o711  # search only: the journal beside it stays private
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "a temp file was left behind"


def test_storing_again_is_a_no_op_and_two_paths_share_one_copy(tmp_path, archive) -> None:
    first = archive.store_file(source(tmp_path, "a.fd", CODE_A))
    again = archive.store_file(source(tmp_path, "link-target-copy.fd", CODE_A))
    assert first.created and not again.created
    assert [e.sha256 for e in archive.entries()] == [sha(CODE_A)]


def test_symlinked_source_is_followed(tmp_path, archive) -> None:
    """Distro paths are often links (OVMF_CODE_4M.ms.fd -> OVMF_CODE_4M.secboot.fd)."""
    real = source(tmp_path, "real.fd", CODE_A)
    os.symlink(real, tmp_path / "link.fd")
    assert archive.store_file(str(tmp_path / "link.fd")).entry.sha256 == sha(CODE_A)


def test_a_source_that_changed_since_it_was_read_is_refused(tmp_path, archive) -> None:
    path = source(tmp_path, "CODE.fd", CODE_B)
    with pytest.raises(ArchiveError, match=r"CODE.fd: it changed since it was read"):
        archive.store_file(path, expect_sha256=sha(CODE_A))
    assert archive.entries() == []


def test_unreadable_source_names_the_file(tmp_path, archive) -> None:
    with pytest.raises(ArchiveError, match=r"cannot archive .*missing.fd"):
        archive.store_file(str(tmp_path / "missing.fd"))


def test_index_lists_verified_builds(tmp_path, archive) -> None:
    archive.store_file(source(tmp_path, "a.fd", CODE_A))
    archive.store_file(source(tmp_path, "b.fd", CODE_B))
    index = archive.index()
    assert index.verified == {sha(CODE_A), sha(CODE_B)} and dict(index.corrupt) == {}
    assert index.path_for(sha(CODE_A)) == archive_path(archive.directory, sha(CODE_A))


def _corrupt(archive: Archive, digest: str, data: bytes = b"flipped bits") -> Path:
    path = Path(archive.path_for(digest))
    os.chmod(path, 0o644)
    path.write_bytes(data)
    os.chmod(path, 0o444)
    return path


def test_corrupt_archived_image_is_reported_and_never_offered(tmp_path, archive) -> None:
    archive.store_file(source(tmp_path, "a.fd", CODE_A))
    archive.store_file(source(tmp_path, "b.fd", CODE_B))
    assert archive.index().verified == {sha(CODE_A), sha(CODE_B)}  # verified once, cached by stat
    path = _corrupt(archive, sha(CODE_A))
    entry = archive.verify(sha(CODE_A))
    assert not entry.ok and "corrupt" in entry.problem and str(path) in entry.problem
    assert sha(b"flipped bits")[:12] in entry.problem
    index = archive.index()
    assert index.verified == {sha(CODE_B)}
    assert sha(CODE_A) in index.corrupt and "corrupt" in index.corrupt[sha(CODE_A)]


def test_a_corrupt_image_is_replaced_only_by_the_right_bytes_and_kept_aside(tmp_path, archive) -> None:
    archive.store_file(source(tmp_path, "a.fd", CODE_A))
    _corrupt(archive, sha(CODE_A))
    stored = archive.store_file(source(tmp_path, "again.fd", CODE_A))
    assert stored.created and stored.entry.ok and stored.replaced_corrupt
    assert Path(stored.replaced_corrupt).read_bytes() == b"flipped bits"  # evidence kept, not deleted
    assert Path(archive.path_for(sha(CODE_A))).read_bytes() == CODE_A
    assert archive.index().verified == {sha(CODE_A)}


def test_a_symlink_planted_in_the_archive_is_not_followed(tmp_path, archive) -> None:
    archive.prepare()
    target = source(tmp_path, "elsewhere.fd", CODE_A)
    os.symlink(target, archive.path_for(sha(CODE_A)))
    entry = archive.verify(sha(CODE_A))
    assert not entry.ok and "not a regular file" in entry.problem
    assert sha(CODE_A) not in archive.index().verified


def test_missing_archive_is_empty(tmp_path) -> None:
    archive = Archive(str(tmp_path / "nothing-here"))
    assert archive.entries() == [] and archive.index().verified == frozenset()
    assert archive.verify("0" * 64).problem == "not archived"


def test_archive_dir_that_is_a_file_names_the_path(tmp_path) -> None:
    (tmp_path / "archive").write_text("oops")
    with pytest.raises(ArchiveError, match="archive"):
        Archive(str(tmp_path / "archive")).store_file(source(tmp_path, "a.fd", CODE_A))


NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("why", "in_use", "last_used_days_ago", "pruned"), [
    ("used by a domain or the catalog: kept however old", True, 400, False),
    ("unused, but within the retention period", False, 29, False),
    ("unused and past retention", False, 31, True),
])
def test_prune(tmp_path, archive, why, in_use, last_used_days_ago, pruned) -> None:
    archive.store_file(source(tmp_path, "a.fd", CODE_A))
    used = {sha(CODE_A)} if in_use else set()
    removed = archive.prune(used, {sha(CODE_A): NOW - timedelta(days=last_used_days_ago)}, NOW, timedelta(days=30))
    assert (removed == [sha(CODE_A)]) is pruned, why
    assert Path(archive.path_for(sha(CODE_A))).exists() is not pruned


def test_prune_without_a_recorded_use_counts_from_archiving(tmp_path, archive) -> None:
    archive.store_file(source(tmp_path, "a.fd", CODE_A))
    assert archive.prune(set(), {}, datetime.now(UTC), timedelta(days=1)) == []
    assert archive.prune(set(), {}, datetime.now(UTC) + timedelta(days=2), timedelta(days=1)) == [sha(CODE_A)]


def test_archive_paths() -> None:
    digest = sha(CODE_A)
    path = archive_path("/var/lib/varsd/archive", digest)
    assert is_archive_path("/var/lib/varsd/archive", path) and sha_of_archive_path(path) == digest
    assert not is_archive_path("/var/lib/varsd/archive", "/usr/share/OVMF/OVMF_CODE.fd")
    assert not is_archive_path("/var/lib/varsd/archive", "/var/lib/varsd/archive/b157d97b1f69.fd")
    assert not is_archive_path("/var/lib/varsd/archive", None)


def test_a_new_process_trusts_a_verification_until_the_file_changes(tmp_path, state, archive, monkeypatch) -> None:
    """Every varsctl command is a new process: what one verified (stat key with ctime) is not
    hashed again by the next, as the daemon's own memory does not; a change is seen at once."""
    archive.store_file(source(tmp_path, "a.fd", CODE_A))
    assert archive.index().verified == {sha(CODE_A)}
    kept = state / "archive-verified.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o644 and sha(CODE_A) in kept.read_text()

    real_read = fsio.read_file
    reads: list[str] = []
    monkeypatch.setattr(fsio, "read_file", lambda path, **kw: reads.append(path) or real_read(path, **kw))
    fresh = Archive(archive.directory, state_dir=str(state))
    assert fresh.index().verified == {sha(CODE_A)} and reads == []  # trusted, not read

    _corrupt(archive, sha(CODE_A))  # a write: new mtime and ctime
    again = Archive(archive.directory, state_dir=str(state))
    assert sha(CODE_A) in again.index().corrupt and reads  # hashed again, found corrupt
    assert sha(CODE_A) not in kept.read_text()  # and forgotten

    kept.write_text(json.dumps({sha(CODE_B): [1, 2, 3, 4, 5]}))
    kept.chmod(0o666)  # writable by others: never trusted
    assert Archive(archive.directory, state_dir=str(state))._persisted_key(sha(CODE_B)) is None
