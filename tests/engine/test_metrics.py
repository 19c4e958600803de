"""The daemon's metrics exporter: /metrics on a loopback port and the textfile, both parse."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from varsd.engine.metrics import BackupFigure, Exporter, Snapshot, samples
from varsd.engine.qemu_hook import HookReport, HookState


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _names(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_http_serves_the_latest_snapshot_and_textfile_is_replaced(tmp_path):
    port = _free_port()
    textfile = tmp_path / "varsd.prom"
    exporter = Exporter(str(textfile), ("127.0.0.1", port))
    try:
        exporter.publish(Snapshot(backups=[BackupFigure("g1", "u1", None)], now=1000.0))
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert [s.value for s in _names(body)["varsd_backups_missing"]] == [1.0]
        exporter.publish(Snapshot(backups=[BackupFigure("g1", "u1", "1970-01-01T00:00:10Z")], now=1000.0,
                                  errors_since={"u1": 400.0}))
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        fams = _names(body)
        assert [s.value for s in fams["varsd_backups_missing"]] == [0.0]
        assert [(s.labels, s.value) for s in fams["varsd_backup_age_seconds"]] == [({"domain": "g1"}, 990.0)]
        assert [s.value for s in fams["varsd_last_error_age_seconds"]] == [600.0]
        assert _names(textfile.read_text()).keys() == fams.keys()
        assert oct(textfile.stat().st_mode & 0o777) == "0o644"
    finally:
        exporter.close()


def test_the_qemu_hook_state_is_one_gauge_per_state() -> None:
    pending = HookReport(HookState.PENDING_RESTART, "libvirtd (pid 7) was running ...")
    got = {s["labels"]["state"]: s["value"] for s in samples(Snapshot(hook=pending))
           if s["name"] == "varsd_qemu_hook_state"}
    assert got == {"active": 0.0, "pending-restart": 1.0, "missing": 0.0}
    assert not [s for s in samples(Snapshot()) if s["name"] == "varsd_qemu_hook_state"]  # not this host's daemon
