"""`varsd.messages`: a message names its domain once, whoever adds the name.

A table for the three helpers, then real failures on libvirt's `test:///default`
driver: what the reconciler logs and reports for a domain that vanished, one that was
redefined under it, and an archived loader that is gone must name the domain once.
"""

from __future__ import annotations

import logging
import os
import uuid as uuidlib

import pytest
from support.clock import FixedClock
from support.domains import domain_xml, rom_os

from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.config import Config
from varsd.engine.reconciler import Reconciler
from varsd.firmware.catalog import load_catalog
from varsd.messages import about_domain, for_row, line
from varsd.model.domain import DomainRef, FirmwareConfig, Status

U = "6bdb0c4e-58a1-4c1f-9d5c-6d2f1f0b7e11"


def named_once(text: str, name: str, uuid: str) -> bool:
    """The domain appears once: as `domain 'NAME'` (optionally followed by its UUID)."""
    label = f"domain '{name}'"
    return text.count(f"'{name}'") == 1 and label in text and text.count(uuid) <= 1 \
        and f"domain {uuid}" not in text


@pytest.mark.parametrize(("message", "about", "row", "printed"), [
    ("lookup failed", "domain 'web1': lookup failed", "lookup failed", "web1: lookup failed"),
    (f"domain {U}: lookup failed: no domain", "domain 'web1': lookup failed: no domain",
     "lookup failed: no domain", "web1: lookup failed: no domain"),
    (f"domain 'web1' ({U}): cannot start: busy", f"domain 'web1' ({U}): cannot start: busy", "cannot start: busy",
     "web1: cannot start: busy"),
    ("domain 'web1' was redefined meanwhile", "domain 'web1' was redefined meanwhile",
     "domain 'web1' was redefined meanwhile", "domain 'web1' was redefined meanwhile"),
    ("domain 'web1': not pointed at x", "domain 'web1': not pointed at x", "not pointed at x",
     "web1: not pointed at x"),
])
def test_helpers_name_the_domain_once(message, about, row, printed) -> None:
    assert about_domain("web1", message, U) == about
    assert for_row("web1", message, U) == row
    assert line("web1", message, U) == printed
    assert named_once(about, "web1", U)


@pytest.fixture
def rec(tmp_path):
    cfg = Config(uri="test:///default", nvram_dir=str(tmp_path / "nvram"), state_dir=str(tmp_path / "state"),
                 firmware_dirs=("/usr/share/qemu/firmware",))
    os.makedirs(cfg.nvram_dir)
    with Hypervisor(cfg.uri) as hv:
        journal = Journal(cfg.journal_path)
        yield Reconciler(cfg, hv, load_catalog(cfg.firmware_dirs), journal, (os.getuid(), os.getgid()), actor="test",
                         clock=FixedClock("2025-06-01T12:00:00Z"))
        journal.close()


def _define(hv: Hypervisor, name: str) -> DomainRef:
    return hv.define(domain_xml(name, rom_os()))


def test_a_vanished_domain_is_named_once_in_log_and_status(rec, caplog) -> None:
    name = f"msg-{uuidlib.uuid4().hex[:8]}"
    ref = _define(rec.hv, name)
    rec.hv.connection.lookupByUUIDString(ref.uuid).undefine()
    ghost = DomainRef(ref.uuid, name, "shut off", False, True)
    rec.hv._handles.clear()  # a fresh process: the UUID must be looked up
    with caplog.at_level(logging.ERROR, logger="varsd"):
        out = rec.reconcile(ghost)
    assert out.status is Status.ERROR and out.plan.config is FirmwareConfig.UNKNOWN
    assert named_once(out.detail, name, ref.uuid), out.detail
    # The reconciler logs nothing at ERROR itself: the outcome carries the message, and the
    # daemon logs it once when it appears (issue 7); whatever is logged names the domain once.
    records = [r.getMessage() for r in caplog.records]
    assert all(named_once(m, name, ref.uuid) for m in records), records


def test_a_domain_redefined_under_a_write_is_named_once(rec, caplog, monkeypatch) -> None:
    name = f"msg-{uuidlib.uuid4().hex[:8]}"
    ref = _define(rec.hv, name)
    try:
        real = rec.hv.persistent_xml
        calls = []

        def moving(uuid: str) -> str:
            calls.append(uuid)
            xml = real(uuid)
            return xml if len(calls) == 1 else xml.replace("262144", "131072")  # someone else's edit

        monkeypatch.setattr(rec.hv, "persistent_xml", moving)
        with caplog.at_level(logging.ERROR, logger="varsd"):
            out = rec.reconcile(ref)
        assert out.status is Status.ERROR and "redefined meanwhile" in out.detail
        # A failed write keeps the plan it carried out (its class is known) and is recorded
        # as the domain's last failure (issue 7); it is never `none`.
        assert out.plan.config is not FirmwareConfig.NONE and out.failure is not None
        assert named_once(out.detail, name, ref.uuid), out.detail
        assert all(named_once(r.getMessage(), name, ref.uuid) for r in caplog.records)
    finally:
        monkeypatch.undo()
        rec.hv.connection.lookupByUUIDString(ref.uuid).undefine()
