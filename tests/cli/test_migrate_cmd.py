"""`varsctl migrate` through `main([...])` on a test-driver node file.

Every `main()` call connects afresh and sees the host the node file describes, so a
call's effects are checked where they last: the varstores and backups on disk, the
journal (which holds the XML each change wrote), and what varsctl printed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from ovmf_files import DEBIAN12_OVMF  # Debian 12's files, release-aware
from support.domains import SHUTOFF, domain_xml, split_os
from support.varstores import read_variables

from varsd.adapters import virtfw
from varsd.adapters.backup_index import BackupIndex
from varsd.adapters.journal import Journal
from varsd.cli.varsctl import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE, main
from varsd.domain.xml import parse_domain

from .common import write_host

OVMF = "/usr/share/OVMF"
SB_CODE_2M, VARS_2M_MS = f"{DEBIAN12_OVMF}/OVMF_CODE.secboot.fd", f"{DEBIAN12_OVMF}/OVMF_VARS.ms.fd"
CODE_2M, VARS_2M = f"{DEBIAN12_OVMF}/OVMF_CODE.fd", f"{DEBIAN12_OVMF}/OVMF_VARS.fd"
CODE_4M, VARS_4M = f"{OVMF}/OVMF_CODE_4M.fd", f"{OVMF}/OVMF_VARS_4M.fd"
VENDOR = "5b3c9c5e-1f6a-4b8e-9d2a-7a1f0e6d4c21"

U_SB2 = "0b000000-0000-4000-8000-000000000001"  # shut off, Secure Boot 2 MiB, MS keys: migrates
U_RUN = "0b000000-0000-4000-8000-000000000002"  # running plain 2 MiB: skipped
U_I440 = "0b000000-0000-4000-8000-000000000003"  # Secure Boot 2 MiB on i440fx: no build can have SMM
U_OK = "0b000000-0000-4000-8000-000000000004"  # already fine: not touched
U_PLAIN = "0b000000-0000-4000-8000-000000000005"  # shut off plain 2 MiB: migrates


SMM = "<smm state='on'/>"


@pytest.fixture
def bed(tmp_path) -> dict:
    nvram = tmp_path / "nvram"
    nvram.mkdir()
    stores = {}
    for name, template in (("sb2", VARS_2M_MS), ("run", VARS_2M), ("i440", VARS_2M_MS), ("ok", VARS_4M),
                           ("plain", VARS_2M)):
        path = nvram / f"{name}_VARS.fd"
        path.write_bytes(virtfw.with_variable(template, "VarsdProof", VENDOR, f"{name} was here".encode()))
        os.chmod(path, 0o600)
        stores[name] = path
    domains = [
        domain_xml("sb2", split_os(SB_CODE_2M, stores["sb2"], secure=True), uuid=U_SB2, features=SMM,
                   runstate=SHUTOFF),
        domain_xml("run", split_os(CODE_2M, stores["run"]), uuid=U_RUN),
        domain_xml("i440", split_os(SB_CODE_2M, stores["i440"], secure=True), uuid=U_I440, machine="pc-i440fx-7.2",
                   runstate=SHUTOFF),
        domain_xml("ok", split_os(CODE_4M, stores["ok"], template=VARS_4M), uuid=U_OK, runstate=SHUTOFF),
        domain_xml("plain", split_os(CODE_2M, stores["plain"]), uuid=U_PLAIN, runstate=SHUTOFF),
    ]
    uri, config = write_host(tmp_path, domains, nvram=nvram, state=tmp_path / "state")
    before = {name: path.read_bytes() for name, path in stores.items()}
    return {"uri": uri, "config": config, "state": tmp_path / "state", "stores": stores, "before": before}


def run(capsys, bed: dict, *args: str) -> tuple[int, str, str]:
    rc = main(["--config", bed["config"], "--connect", bed["uri"], "migrate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _journal(bed: dict, uuid: str) -> list:
    journal = Journal(str(bed["state"] / "state.sqlite3"))
    try:
        return journal.changes(uuid)
    finally:
        journal.close()


def _backups(bed: dict, uuid: str) -> list[Path]:
    """The domain's backups in the backup store (index rows -> content-addressed files)."""
    db = bed["state"] / "state.sqlite3"
    if not db.exists():
        return []
    index = BackupIndex(str(db))
    try:
        return [bed["state"] / "backups" / "objects" / f"{r.sha256}.fd" for r in index.records(uuid)]
    finally:
        index.close()


@pytest.mark.parametrize(
    "args",
    [(), ("sb2", "--all"), ("--all", "--to", "60-edk2-x86_64.json")],
    ids=["nothing", "domain-and-all", "all-with-to"],
)
def test_usage_errors_are_exit_2(capsys, bed, args) -> None:
    rc, out, err = run(capsys, bed, *args)
    assert rc == EXIT_USAGE and out == "" and "varsctl migrate:" in err
    assert not bed["state"].exists() or not (bed["state"] / "backups").exists()


def test_migrate_one_domain(capsys, bed) -> None:
    rc, out, err = run(capsys, bed, "sb2")
    assert rc == EXIT_OK, err
    store = bed["stores"]["sb2"]
    backups = _backups(bed, U_SB2)
    assert len(backups) == 1 and backups[0].read_bytes() == bed["before"]["sb2"]
    assert stat.S_IMODE(backups[0].stat().st_mode) == 0o600
    assert out.startswith("sb2: migrated 32 variable(s) into ") and f"backup: {backups[0]}" in out
    assert "131072 -> 540672 bytes" in out and "40-edk2-x86_64-secure-enrolled.json" in out
    old_vars = virtfw.variables_of_bytes(bed["before"]["sb2"], "old")
    assert read_variables(str(store)) == old_vars and len(old_vars) == 32
    [change] = _journal(bed, U_SB2)
    new = parse_domain(change.new_xml)
    assert (new.loader_path, new.loader_secure, new.nvram_path) == (f"{OVMF}/OVMF_CODE_4M.ms.fd", True, str(store))
    assert parse_domain(change.old_xml).loader_path == SB_CODE_2M


def test_migrate_to_a_named_build(capsys, bed) -> None:
    rc, out, err = run(capsys, bed, "plain", "--to", "60-edk2-x86_64")
    assert rc == EXIT_OK, err
    [change] = _journal(bed, U_PLAIN)
    assert parse_domain(change.new_xml).loader_path == CODE_4M
    assert virtfw.read_layout(str(bed["stores"]["plain"])).size == 540672


def test_dry_run_changes_nothing(capsys, bed) -> None:
    rc, out, err = run(capsys, bed, "sb2", "--dry-run")
    assert rc == EXIT_OK, err
    assert out.startswith("sb2: would migrate: domain 'sb2': variables of ") and "OVMF_VARS_4M.ms.fd" in out
    assert bed["stores"]["sb2"].read_bytes() == bed["before"]["sb2"]
    assert _backups(bed, U_SB2) == [] and _journal(bed, U_SB2) == []


def test_running_domain_is_refused_exit_1(capsys, bed) -> None:
    rc, out, err = run(capsys, bed, "run")
    assert rc == EXIT_ATTENTION and out == ""
    assert err.startswith("varsctl: domain 'run': is running;") and "nothing was changed" in err
    assert bed["stores"]["run"].read_bytes() == bed["before"]["run"] and _backups(bed, U_RUN) == []


def test_already_migrated_is_exit_0(capsys, bed) -> None:
    rc, out, _ = run(capsys, bed, "ok")
    assert rc == EXIT_OK and "already uses" in out and "nothing to migrate" in out
    assert _journal(bed, U_OK) == []


def test_unknown_build_is_refused(capsys, bed) -> None:
    rc, _, err = run(capsys, bed, "sb2", "--to", "no-such-build")
    assert rc == EXIT_ATTENTION and "--to no-such-build: no catalog build" in err
    assert bed["stores"]["sb2"].read_bytes() == bed["before"]["sb2"]


def test_all_migrates_what_it_can_reports_the_rest_and_exits_1(capsys, bed) -> None:
    rc, out, err = run(capsys, bed, "--all")
    lines = out.splitlines()
    assert lines[0] == "migrate --all: 4 domain(s) need migration"
    # one progress line per domain, in name order: i440, plain, run, sb2
    assert lines[1].startswith("[1/4] i440: migrating (")
    assert lines[2].startswith("[1/4] i440: FAILED: no catalog build to migrate to")
    assert lines[3].startswith("[2/4] plain: migrating (")
    assert lines[4].startswith("[2/4] plain: migrated ")
    assert lines[5].startswith("[3/4] run: skipped: is running; shut it down, then run 'varsctl migrate run'")
    assert lines[6].startswith("[4/4] sb2: migrating (")
    assert lines[7].startswith("[4/4] sb2: migrated ")
    assert lines[8] == "migrate --all: 2 migrated, 1 failed, 1 skipped (running)"
    assert rc == EXIT_ATTENTION, err
    # what was migrated is on disk; what was not is untouched
    for name, uuid in (("plain", U_PLAIN), ("sb2", U_SB2)):
        assert virtfw.read_layout(str(bed["stores"][name])).size == 540672
        assert [b.read_bytes() for b in _backups(bed, uuid)] == [bed["before"][name]]
    for name, uuid in (("i440", U_I440), ("run", U_RUN), ("ok", U_OK)):
        assert bed["stores"][name].read_bytes() == bed["before"][name]
        assert _backups(bed, uuid) == [] and _journal(bed, uuid) == []


def test_all_dry_run_shows_the_plan_and_changes_nothing(capsys, bed) -> None:
    rc, out, _ = run(capsys, bed, "--all", "--dry-run")
    lines = out.splitlines()
    assert lines[1].startswith("[1/4] i440: FAILED: no catalog build to migrate to")
    assert lines[2].startswith("[2/4] plain: would migrate: domain 'plain': variables of ")
    assert lines[3].startswith("[3/4] run: skipped: is running")
    assert lines[4].startswith("[4/4] sb2: would migrate: ") and "OVMF_VARS_4M.ms.fd" in lines[4]
    assert lines[5] == "migrate --all: 2 would be migrated (dry run), 1 failed, 1 skipped (running)"
    assert rc == EXIT_ATTENTION
    for name, path in bed["stores"].items():
        assert path.read_bytes() == bed["before"][name]
    assert not (bed["state"] / "backups").exists()


def test_all_with_nothing_to_do_is_exit_0(capsys, tmp_path) -> None:
    store = tmp_path / "ok_VARS.fd"
    store.write_bytes(Path(VARS_4M).read_bytes())
    uri, config = write_host(tmp_path, [domain_xml("ok", split_os(CODE_4M, store), uuid=U_OK, runstate=SHUTOFF)],
                             nvram=tmp_path, state=tmp_path / "state")
    rc = main(["--config", config, "--connect", uri, "migrate", "--all"])
    out, _ = capsys.readouterr()
    assert (rc, out) == (EXIT_OK, "migrate --all: no domain needs migration\n")
