"""varsctl opt-out / opt-in on the test:/// driver: the flag is in the domain's XML,
journaled, respected by reconcile, and reversible."""

from __future__ import annotations

import json

import libvirt

from varsd.cli.context import EXIT_OK

from .common import DEFAULT, run
from .common import define_rom as _define_rom


def test_opt_out_is_respected_and_reversible(capsys, host, default_conn):
    name, before = _define_rom(default_conn)
    rc, out, _ = run(capsys, host, "opt-out", name, uri=DEFAULT)
    assert rc == EXIT_OK and out == f"{name}: opted out by the admin\n"
    xml = default_conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert 'manage="no"' in xml or "manage='no'" in xml
    assert "<loader type='rom'>" in xml  # nothing else changed

    rc, out, _ = run(capsys, host, "reconcile", "--json", name, uri=DEFAULT)
    (d,) = json.loads(out)["domains"]
    assert (rc, d["status"], d["changes"]) == (EXIT_OK, "unmanaged", [])
    assert "opted out" in d["detail"]

    rc, out, _ = run(capsys, host, "opt-out", name, uri=DEFAULT)
    assert out == f"{name}: already opted out\n"

    rc, out, _ = run(capsys, host, "opt-in", name, uri=DEFAULT)
    assert rc == EXIT_OK and out == f"{name}: opted back in by the admin\n"
    rc, out, _ = run(capsys, host, "reconcile", "--json", name, uri=DEFAULT)
    (d,) = json.loads(out)["domains"]
    assert d["status"] == "ok" and d["changes"], d

    rc, out, _ = run(capsys, host, "journal", "--json", name, uri=DEFAULT)
    reasons = [c["reason"] for c in json.loads(out)["changes"]]
    assert reasons[1:] == ["opted back in by the admin", "opted out by the admin"]
