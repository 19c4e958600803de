"""varsctl firmware sync/list/history, pin, unpin, upgrade approve through main() on test:///default.

A temp firmware tree (descriptor, `CODE.fd` of our own bytes, Debian's 2 MiB template)
stands in for /usr/share; the test keeps a connection open so the default driver's
domains outlive each main() call.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid as uuidlib
from pathlib import Path

import libvirt
import pytest
from ovmf_files import (
    DEBIAN12_OVMF,  # Debian 12's files, release-aware
    fit_code,
)
from support.domains import domain_xml, split_os

from varsd.adapters.libvirt_api import Hypervisor
from varsd.cli.context import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE
from varsd.domain.xml import parse_domain
from varsd.engine.boots import record_boot

from .common import DEFAULT, run

VARS_2M = f"{DEBIAN12_OVMF}/OVMF_VARS.fd"
VARS_4M = "/usr/share/OVMF/OVMF_VARS_4M.fd"
CODE_A = fit_code(b"\x90" * 8192 + b"build A", VARS_2M)  # 2 MiB builds' code size
CODE_B = fit_code(b"\x90" * 8192 + b"build B", VARS_2M)
A, B = hashlib.sha256(CODE_A).hexdigest(), hashlib.sha256(CODE_B).hexdigest()
B4 = hashlib.sha256(fit_code(CODE_B, VARS_4M)).hexdigest()  # build B's code beside the 4 MiB template


class FwHost(dict):
    """The `host` dict `run()` wants (config, uri), plus the tree and a way to change it."""

    def install(self, code: bytes, template: str = VARS_2M) -> None:
        fw = Path(self["fw"])
        for data, name in ((fit_code(code, template), "CODE.fd"), (Path(template).read_bytes(), "VARS.fd")):
            (fw / f"{name}.new").write_bytes(data)
            os.rename(fw / f"{name}.new", fw / name)
        Path(self["descriptor"]).write_text(json.dumps({
            "description": "test", "interface-types": ["uefi"],
            "mapping": {"device": "flash", "mode": "split",
                        "executable": {"filename": self["code"], "format": "raw"},
                        "nvram-template": {"filename": self["vars"], "format": "raw"}},
            "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}], "features": [], "tags": []}))

    def archived(self, sha: str) -> str:
        return os.path.join(self["state"], "archive", f"{sha}.fd")


def _host(tmp_path: Path, policy: str = "auto") -> FwHost:
    (tmp_path / "fw").mkdir()
    (tmp_path / "descriptors").mkdir()
    (tmp_path / "nvram").mkdir()
    h = FwHost(
        uri=DEFAULT, fw=str(tmp_path / "fw"), code=str(tmp_path / "fw" / "CODE.fd"),
        vars=str(tmp_path / "fw" / "VARS.fd"), descriptor=str(tmp_path / "descriptors" / "60-test.json"),
        state=str(tmp_path / "state"), nvram=str(tmp_path / "nvram"), config=str(tmp_path / "varsd.toml"),
    )
    Path(h["config"]).write_text(
        f'state_dir = "{h["state"]}"\nnvram_dir = "{h["nvram"]}"\nfirmware_dirs = ["{tmp_path / "descriptors"}"]\n'
        'firmware_search_dirs = []\n'
        f'qemu_user = "root"\nqemu_group = "root"\nupgrade_policy = "{policy}"\n'
    )
    h.install(CODE_A)
    return h


@pytest.fixture
def fw(tmp_path) -> FwHost:
    return _host(tmp_path)


@pytest.fixture
def manual(tmp_path) -> FwHost:
    return _host(tmp_path, "manual")


def define(conn: libvirt.virConnect, h: FwHost, *, template: str = VARS_2M) -> str:
    name = f"fwcli-{uuidlib.uuid4().hex[:8]}"
    varstore = os.path.join(h["nvram"], f"{name}_VARS.fd")
    shutil.copyfile(template, varstore)
    conn.defineXML(domain_xml(name, split_os(h["code"], varstore)))
    conn.made.append(name)
    return name  # bound to the tree's build by the first sync


def xml_of(conn: libvirt.virConnect, name: str):
    return parse_domain(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def status(capsys, h: FwHost, name: str) -> dict:
    rc, out, _ = run(capsys, h, "status", "--json", name)
    return json.loads(out)["domains"][0]


def sync(capsys, h: FwHost, *names: str) -> tuple[int, dict]:
    rc, out, err = run(capsys, h, "firmware", "sync", "--json", *names)
    assert "Traceback" not in err
    return rc, json.loads(out)


def test_sync_exit_codes_and_report(capsys, fw, default_conn) -> None:
    name = define(default_conn, fw)
    rc, report = sync(capsys, fw, name)
    assert rc == EXIT_OK and report["exit_code"] == 0
    assert report["firmware"]["changes"] == [{"path": fw["code"], "event": "appeared", "sha256": A, "previous": None}]
    assert report["firmware"]["archived"] == [f"{A} {fw['code']}"]
    assert report["domains"][0]["status"] == "ok"

    Path(fw["descriptor"]).write_text('{"interface-types": ')  # half-written
    rc, report = sync(capsys, fw, name)
    assert rc == EXIT_ATTENTION and any("60-test.json" in p for p in report["firmware"]["problems"])
    assert report["firmware"]["changes"] == [] and report["domains"][0]["changes"] == []

    rc, out, err = run(capsys, fw, "firmware", "sync", uri="test:///nonexistent/node.xml")
    assert rc == EXIT_USAGE and "Traceback" not in err and "firmware was archived and recorded" in err


def test_sync_prints_changes_for_a_package_log(capsys, fw, default_conn) -> None:
    name = define(default_conn, fw)
    run(capsys, fw, "firmware", "sync", name)
    fw.install(CODE_B)
    rc, out, _ = run(capsys, fw, "firmware", "sync", name)
    assert rc == EXIT_OK
    assert f"firmware: {fw['code']}: changed {A[:12]} -> {B[:12]}" in out
    assert f"firmware: archived build {B[:12]} from {fw['code']}" in out
    assert f"{name}: redefined: firmware upgrade" in out


def test_running_domain_is_pending_until_its_next_cold_boot(capsys, fw, default_conn) -> None:
    name = define(default_conn, fw)
    sync(capsys, fw, name)
    default_conn.lookupByName(name).create()
    with Hypervisor(DEFAULT) as hv:
        uuid = hv.lookup(name).uuid
        record_boot(hv, uuid, "2025-06-01T12:00:00Z")
        fw.install(CODE_B)
        rc, report = sync(capsys, fw, name)
        d = report["domains"][0]
        assert (rc, d["status"], d["code_sha256"]) == (EXIT_OK, "pending-cold-boot", B)
        assert f"running build {A[:12]}" in d["detail"]
        hv.destroy(uuid)
        hv.start(uuid)
        record_boot(hv, uuid, "2025-06-01T12:05:00Z")
        assert status(capsys, fw, name)["status"] == "ok"
        hv.destroy(uuid)


def test_pin_and_unpin(capsys, fw, default_conn) -> None:
    name = define(default_conn, fw)
    sync(capsys, fw, name)
    rc, out, _ = run(capsys, fw, "pin", name, "--reason", "vendor says so")
    # held on the archived copy at once: a package upgrade cannot change what it boots
    assert rc == EXIT_OK and out == f"{name}: pinned to build {A[:12]} ({fw.archived(A)})\n"
    fwx = xml_of(default_conn, name)
    held = (fwx.loader_path, fwx.metadata.pin_by, fwx.metadata.pin_reason)
    assert held == (fw.archived(A), "admin", "vendor says so")
    assert status(capsys, fw, name)["status"] == "pinned"

    fw.install(CODE_B)  # an upgrade: the pin holds, on the archived copy
    rc, report = sync(capsys, fw, name)
    d = report["domains"][0]
    assert (rc, d["status"], d["code"]) == (EXIT_OK, "pinned", fw.archived(A))
    assert xml_of(default_conn, name).metadata.build_code_sha256 == A

    rc, out, _ = run(capsys, fw, "unpin", name)
    assert rc == EXIT_OK and f"{name}: unpinned; now ok" in out
    fwx = xml_of(default_conn, name)
    assert (fwx.loader_path, fwx.metadata.build_code_sha256, fwx.metadata.pinned_sha256) == (fw["code"], B, None)
    rc, out, _ = run(capsys, fw, "unpin", name)
    assert (rc, out) == (EXIT_OK, f"{name}: not pinned\n")

    # Roll one guest back to the old build by digest prefix.
    rc, out, err = run(capsys, fw, "pin", name, "--build", A[:8])
    assert rc == EXIT_OK, err
    assert xml_of(default_conn, name).loader_path == fw.archived(A)
    rc, _, _ = run(capsys, fw, "journal", name)
    assert rc == EXIT_OK


def test_pin_refusals(capsys, fw, default_conn, tmp_path) -> None:
    name = define(default_conn, fw)
    rc, _, err = run(capsys, fw, "pin", name)
    assert rc == EXIT_ATTENTION and "not bound to a build yet" in err
    sync(capsys, fw, name)
    for spec, why in (("abc", "prefix of at least 6"), ("0123456789", "no catalog or archived build")):
        rc, _, err = run(capsys, fw, "pin", name, "--build", spec)
        assert rc == EXIT_ATTENTION and why in err, err
    # A build of another varstore layout would not boot this domain's varstore.
    (tmp_path / "other").mkdir()
    other = _host(tmp_path / "other")
    other.install(CODE_B, template=VARS_4M)
    # Archived (with its 4 MiB layout) into the other state dir; no domain planned there.
    run(capsys, other, "firmware", "sync", "no-such-domain")
    shutil.copytree(os.path.join(other["state"], "archive"), os.path.join(fw["state"], "archive"),
                    dirs_exist_ok=True)
    rc, _, err = run(capsys, fw, "pin", name, "--build", B4)
    assert rc == EXIT_ATTENTION and "is not known" in err  # this host never saw it in a catalog
    assert xml_of(default_conn, name).metadata.pinned_sha256 is None
    fw.install(CODE_B, template=VARS_4M)  # now it did: and its layout is not the varstore's
    sync(capsys, fw, name)
    rc, _, err = run(capsys, fw, "pin", name, "--build", B4)
    assert rc == EXIT_ATTENTION and "expects a varstore of 540672 bytes" in err, err
    assert xml_of(default_conn, name).metadata.pin_by == "incompatible"


def test_manual_policy_holds_until_approved(capsys, manual, default_conn) -> None:
    name = define(default_conn, manual)
    sync(capsys, manual, name)
    manual.install(CODE_B)
    rc, report = sync(capsys, manual, name)
    d = report["domains"][0]
    assert (rc, d["status"], d["code"]) == (EXIT_OK, "pinned", manual.archived(A))
    assert f"varsctl upgrade approve {name}" in d["detail"]

    rc, _, err = run(capsys, manual, "unpin", name)
    assert rc == EXIT_ATTENTION and "upgrade approve" in err
    rc, _, err = run(capsys, manual, "upgrade", "approve")
    assert rc == EXIT_USAGE
    rc, out, _ = run(capsys, manual, "upgrade", "approve", name)
    assert rc == EXIT_OK and f"{name}: approved; now ok" in out
    fwx = xml_of(default_conn, name)
    assert (fwx.loader_path, fwx.metadata.build_code_sha256, fwx.metadata.pinned_sha256) == (manual["code"], B, None)
    assert sync(capsys, manual, name)[1]["domains"][0]["changes"] == []  # the daemon's view agrees

    rc, out, _ = run(capsys, manual, "upgrade", "approve", name)
    assert (rc, out) == (EXIT_OK, f"{name}: nothing held back\n")


def test_approve_all_leaves_admin_pins_alone(capsys, manual, default_conn) -> None:
    held, pinned = define(default_conn, manual), define(default_conn, manual)
    sync(capsys, manual, held, pinned)
    assert run(capsys, manual, "pin", pinned)[0] == EXIT_OK
    manual.install(CODE_B)
    sync(capsys, manual, held, pinned)
    rc, out, _ = run(capsys, manual, "upgrade", "approve", pinned)
    assert rc == EXIT_OK and "pinned by an admin" in out
    rc, out, _ = run(capsys, manual, "upgrade", "approve", "--all")
    assert rc == EXIT_OK and f"{held}: approved" in out and pinned not in out
    assert xml_of(default_conn, pinned).metadata.pin_by == "admin"


def test_layout_change_is_needs_migration_and_unpin_refuses(capsys, fw, default_conn) -> None:
    name = define(default_conn, fw)
    sync(capsys, fw, name)
    fw.install(CODE_B, template=VARS_4M)
    rc, report = sync(capsys, fw, name)
    d = report["domains"][0]
    assert (rc, d["status"], d["code"]) == (EXIT_ATTENTION, "needs-migration", fw.archived(A))
    assert status(capsys, fw, name)["status"] == "needs-migration"
    rc, _, err = run(capsys, fw, "unpin", name)
    assert rc == EXIT_ATTENTION and f"varsctl migrate {name}" in err
    rc, out, _ = run(capsys, fw, "status", name)
    assert "needs-migration" in out


def test_list_and_history(capsys, fw, default_conn) -> None:
    name = define(default_conn, fw)
    sync(capsys, fw, name)
    fw.install(CODE_B)
    sync(capsys, fw, name)
    rc, out, _ = run(capsys, fw, "firmware", "list", "--json")
    data = json.loads(out)
    assert rc == EXIT_OK and [b["sha256"] for b in data["catalog"]] == [B]
    assert {a["sha256"]: a["ok"] for a in data["archive"]} == {A: True, B: True}
    rc, out, _ = run(capsys, fw, "firmware", "list")
    assert A[:12] in out and "ARCHIVE" in out
    rc, out, _ = run(capsys, fw, "firmware", "history")
    lines = out.splitlines()
    assert "changed" in lines[0] and B[:12] in lines[0] and "appeared" in lines[1]

    archived = Path(fw.archived(A))
    os.chmod(archived, 0o644)
    archived.write_bytes(b"bit rot")
    rc, out, _ = run(capsys, fw, "firmware", "list")
    assert rc == EXIT_ATTENTION and "CORRUPT" in out
