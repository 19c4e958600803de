"""The one write path writes a change of only varsd's metadata element with
virDomainSetMetadata (AFFECT_CONFIG), journaled like any change (test:///default)."""

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
from varsd.engine.transaction import StaleDefinition, Writer
from varsd.firmware.archive import Archive
from varsd.model.domain import VarsdMetadata

NOW = parse_stamp("2026-12-01T12:00:00Z")


@pytest.fixture
def setup(tmp_path):
    with Hypervisor("test:///default") as hv, closing(Journal(str(tmp_path / "state.sqlite3"))) as journal:
        ref = hv.define(domain_xml(f"tx-{uuidlib.uuid4().hex[:8]}"))
        writer = Writer(hv, journal, Archive(str(tmp_path / "archive")), lambda u: str(tmp_path / f"{u}.lock"),
                        actor="test", clock=FixedClock(NOW))
        calls: list[str] = []
        for name in ("define", "set_metadata"):
            original = getattr(hv, name)

            def spy(*a, _name=name, _original=original, **kw):
                calls.append(_name)
                return _original(*a, **kw)

            setattr(hv, name, spy)
        try:
            yield hv, journal, writer, ref, calls
        finally:
            hv.connection.lookupByUUIDString(ref.uuid).undefine()


def test_a_rebind_is_set_as_metadata_and_journaled_with_the_previous_xml(setup):
    hv, journal, writer, ref, calls = setup
    md = VarsdMetadata(build_code_path="/x/CODE.fd", build_code_sha256="a" * 64)
    with writer.transaction(ref) as tx:
        before = tx.xml
        tx.write(set_metadata(before, md), "bound")
        tx.write(set_metadata(tx.xml, replace(md, build_code_sha256="b" * 64)), "rebound")
    assert calls == ["set_metadata", "set_metadata"]
    now = hv.persistent_xml(ref.uuid)
    assert parse_domain(now).metadata.build_code_sha256 == "b" * 64
    second, first = journal.changes(ref.uuid)
    assert (first.old_xml, first.outcome) == (before, "applied")
    assert second.old_xml == first.new_xml and second.new_xml == now  # libvirt's copy: undo compares it


def test_a_firmware_change_is_a_define_and_a_stale_plan_is_refused_before_either(setup):
    hv, journal, writer, ref, calls = setup
    with writer.transaction(ref) as tx:
        before = tx.xml
        hv.define(before.replace("262144", "524288"))  # an admin's virsh edit meanwhile
        calls.clear()
        with pytest.raises(StaleDefinition):
            tx.write(set_metadata(before, VarsdMetadata(opt_out=True)), "opt out", planned_from=before)
        assert calls == [] and journal.changes(ref.uuid) == []
        current = hv.persistent_xml(ref.uuid)
        tx.write(current.replace("<type arch", "<loader type='rom'>/usr/share/ovmf/OVMF.fd</loader><type arch"),
                 "firmware", planned_from=current)
    assert calls == ["define"]
