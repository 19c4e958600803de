"""The batch form of the one write path (`Writer.write_batch`), on test:///default: the same
lock, fresh read, stale refusal and journal-first as one domain's transaction, with one
journal transaction for the intents and one for the outcomes."""

from __future__ import annotations

import uuid as uuidlib
from contextlib import closing
from dataclasses import replace

import pytest
from support.clock import FixedClock
from support.domains import domain_xml

from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.clock import parse_stamp
from varsd.domain.xml import parse_domain, set_metadata
from varsd.engine.lock import host_lock
from varsd.engine.transaction import PlannedWrite, Writer
from varsd.errors import HypervisorError
from varsd.firmware.archive import Archive
from varsd.model.domain import VarsdMetadata

NOW = parse_stamp("2026-12-01T12:00:00Z")
MD = VarsdMetadata(build_code_path="/x/CODE.fd", build_code_sha256="b" * 64)


class Killed(BaseException):
    """The actor dies mid-batch (SIGKILL between two libvirt calls)."""


@pytest.fixture
def setup(tmp_path):
    with Hypervisor("test:///default") as hv, closing(Journal(str(tmp_path / "state.sqlite3"))) as journal:
        refs = [hv.define(domain_xml(f"batch-{uuidlib.uuid4().hex[:8]}")) for _ in range(6)]
        writer = Writer(hv, journal, Archive(str(tmp_path / "archive")), lambda u: str(tmp_path / f"{u}.lock"),
                        actor="test", clock=FixedClock(NOW))
        statements: list[str] = []  # what SQLite runs: transactions and their writes
        journal._db.set_trace_callback(lambda sql: statements.append(sql.split("(")[0].split(" SET")[0].strip()))
        try:
            yield hv, journal, writer, refs, statements
        finally:
            for ref in refs:
                hv.connection.lookupByUUIDString(ref.uuid).undefine()


def rebinds(hv, refs) -> list[PlannedWrite]:
    out = []
    for ref in refs:
        xml = hv.persistent_xml(ref.uuid)
        out.append(PlannedWrite(ref, xml, set_metadata(xml, MD), "rebound", parsed=parse_domain(xml)))
    return out


def bound(hv, ref) -> str | None:
    return parse_domain(hv.persistent_xml(ref.uuid)).metadata.build_code_sha256


def test_a_batch_journals_every_intent_in_one_transaction_before_any_write(setup):
    hv, journal, writer, refs, calls = setup
    writes = rebinds(hv, refs)
    seen_at_write: list[int] = []
    original = hv.set_metadata

    def set_metadata(uuid, *a, **kw):  # every intent is on disk before libvirt sees the first change
        seen_at_write.append(sum(1 for r in refs if journal.pending(r.uuid)))
        return original(uuid, *a, **kw)

    hv.set_metadata = set_metadata
    result = writer.write_batch(writes)
    assert set(result.stored) == {r.uuid for r in refs} and not (result.failed or result.stale or result.busy)
    assert seen_at_write and seen_at_write[0] == len(refs)
    writes_sql = [s for s in calls if s.startswith(("BEGIN", "COMMIT", "INSERT INTO xml", "UPDATE xml"))]
    n = len(refs)  # one transaction for the intents, one for the outcomes: not one (fsync) per domain
    assert writes_sql == ["BEGIN IMMEDIATE", *["INSERT INTO xml_changes"] * n, "COMMIT",
                          "BEGIN IMMEDIATE", *["UPDATE xml_changes"] * n, "COMMIT"], writes_sql
    for w in writes:
        (change,) = journal.changes(w.ref.uuid)
        now = hv.persistent_xml(w.ref.uuid)
        assert (change.old_xml, change.outcome, change.new_xml) == (w.planned_from, "applied", now)
        assert result.stored[w.ref.uuid] == now and bound(hv, w.ref) == "b" * 64


def test_a_domain_changed_since_it_was_planned_is_refused_and_the_rest_written(setup):
    hv, journal, writer, refs, _ = setup
    writes = rebinds(hv, refs)
    middle = refs[3]
    hv.define(writes[3].planned_from.replace("262144", "524288"))  # an admin's virsh edit meanwhile
    result = writer.write_batch(writes)
    assert result.stale == [middle] and middle.uuid not in result.stored
    assert journal.changes(middle.uuid) == [] and bound(hv, middle) is None
    assert "524288" in hv.persistent_xml(middle.uuid)  # the admin's change stands
    assert set(result.stored) == {r.uuid for r in refs} - {middle.uuid}
    assert all(bound(hv, r) == "b" * 64 for r in refs if r != middle)


def test_a_libvirt_failure_mid_batch_fails_that_domain_only_and_is_journaled(setup):
    hv, journal, writer, refs, _ = setup
    writes = rebinds(hv, refs)
    broken = refs[2]
    original = hv.set_metadata

    def set_metadata(uuid, *a, **kw):
        if uuid == broken.uuid:
            raise HypervisorError("domain 'x': cannot set metadata: internal error: disk full")
        return original(uuid, *a, **kw)

    hv.set_metadata = set_metadata
    result = writer.write_batch(writes)
    assert list(result.failed) == [broken.uuid] and "disk full" in str(result.failed[broken.uuid])
    (change,) = journal.changes(broken.uuid)
    assert change.outcome.startswith("failed: ") and "disk full" in change.outcome
    assert bound(hv, broken) is None
    assert set(result.stored) == {r.uuid for r in refs} - {broken.uuid}
    assert all(journal.changes(r.uuid)[0].outcome == "applied" for r in refs if r != broken)


def test_a_domain_whose_lock_is_held_is_left_untouched(setup, tmp_path):
    hv, journal, writer, refs, _ = setup
    writes = rebinds(hv, refs)
    with host_lock(str(tmp_path / f"{refs[1].uuid}.lock"), doing="varsd: reconciling"):
        result = writer.write_batch(writes)
    assert result.busy == [refs[1]] and journal.changes(refs[1].uuid) == [] and bound(hv, refs[1]) is None
    assert len(result.stored) == len(refs) - 1


def test_an_actor_killed_mid_batch_leaves_a_journal_the_next_lock_holder_settles(setup):
    hv, journal, writer, refs, _ = setup
    writes = rebinds(hv, refs)
    original = hv.set_metadata
    writer_threads = set()

    def set_metadata(uuid, *a, **kw):
        if uuid == refs[3].uuid:
            raise Killed()
        writer_threads.add(uuid)
        return original(uuid, *a, **kw)

    hv.set_metadata = set_metadata
    with pytest.raises(Killed):
        writer.write_batch(writes)
    # every intent was journaled before the first write; none is settled
    assert all([c.outcome for c in journal.changes(r.uuid)] == ["pending"] for r in refs)
    hv.set_metadata = original
    for ref in refs:
        with writer.transaction(ref):  # whoever takes the lock next settles what it finds
            pass
        (change,) = journal.changes(ref.uuid)
        if ref.uuid in writer_threads:
            assert change.outcome == "applied (settled after an interrupted define)"
            assert change.new_xml == hv.persistent_xml(ref.uuid) and bound(hv, ref) == "b" * 64
        else:
            assert change.outcome == "failed: interrupted before libvirt stored it (settled)"
            assert bound(hv, ref) is None
    assert refs[3].uuid not in writer_threads


def test_a_full_redefine_in_a_batch_is_a_define(setup):
    hv, journal, writer, refs, _ = setup
    ref = refs[0]
    xml = hv.persistent_xml(ref.uuid)
    new = xml.replace("<type arch", "<loader type='rom'>/usr/share/ovmf/OVMF.fd</loader><type arch")
    defines: list[str] = []
    original = hv.define
    hv.define = lambda x: (defines.append(x), original(x))[1]
    result = writer.write_batch([replace(PlannedWrite(ref, xml, new, "firmware"), parsed=parse_domain(xml))])
    assert list(result.stored) == [ref.uuid] and len(defines) == 1
    assert parse_domain(hv.persistent_xml(ref.uuid)).loader_path == "/usr/share/ovmf/OVMF.fd"
