"""The daemon's varstore lifecycle on the test:/// driver: a stop backs up a changed
varstore, a rename moves `<old>_VARS.fd` to `<new>_VARS.fd`. (Real boots: tests/integration/test_backups.py.)"""

from __future__ import annotations

import os

from ovmf_files import EFI_GLOBAL

from varsd.adapters import fsio, virtfw
from varsd.adapters.backup_index import BackupIndex
from varsd.domain.xml import parse_domain

from .conftest import bios_xml, wait_until


def _repaired_varstore(conn, name: str) -> str | None:
    return parse_domain(conn.lookupByName(name).XMLDesc(0)).nvram_path


def _backups(svc, uuid: str):
    index = BackupIndex(svc.cfg.journal_path)
    try:
        return index.records(uuid)
    finally:
        index.close()


def test_a_stop_backs_up_the_changed_varstore_once(conn, service_factory) -> None:
    svc = service_factory()
    name = "evt-stop-backup"
    conn.defineXML(bios_xml(name))
    conn.made.append(name)
    path = wait_until(lambda: _repaired_varstore(conn, name), what="repair")
    wait_until(lambda: os.path.exists(path), what="varstore")
    dom = conn.lookupByName(name)
    uuid = dom.UUIDString()
    dom.create()
    fsio.replace_atomic(path, virtfw.with_variable(path, "BootOrder", EFI_GLOBAL, b"\x01\x00"))  # "the guest"
    sha = fsio.sha256_file(path)
    dom.destroy()
    wait_until(lambda: any(b.sha256 == sha and b.reason == "stop" for b in _backups(svc, uuid)),
               what="a stop backup of the changed varstore")
    wait_until(svc.queue.idle, what="queue idle")
    dom.create()
    dom.destroy()  # nothing changed: no second copy
    wait_until(svc.queue.idle, what="queue idle")
    assert [b.sha256 for b in _backups(svc, uuid)].count(sha) == 1


def test_rename_moves_the_varstore_and_points_the_xml_at_it(conn, service_factory) -> None:
    svc = service_factory()
    name, new = "evt-ren-a", "evt-ren-b"
    conn.defineXML(bios_xml(name))
    conn.made.append(new)
    old = wait_until(lambda: _repaired_varstore(conn, name), what="repair")
    wait_until(lambda: os.path.exists(old), what="varstore")
    wait_until(svc.queue.idle, what="queue idle")
    data = open(old, "rb").read()
    conn.lookupByName(name).rename(new, 0)
    want = os.path.join(svc.cfg.nvram_dir, f"{new}_VARS.fd")
    # varsd links <new>, redefines, then unlinks <old> (crash-safe order): wait for the last step
    wait_until(lambda: _repaired_varstore(conn, new) == want and not os.path.exists(old),
               what="XML follows the rename and the old name is gone")
    assert open(want, "rb").read() == data
