"""Shared varstores by file identity on the real libvirtd (issue 7 item 5, issue 12 defect 5).

Two hand-made clones reach the base domain's varstore through another name: a symlink and
a hard link. Each is reconciled alone, before the base is ever looked at; each gets its
own copy with every variable, and all three then boot at once with three different
varstore files open. After `virsh domrename`, a newcomer defined with the old name (libvirt
fills in `<old>_VARS.fd` for it) gets a varstore of its own and both guests boot.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from support.domains import guest_xml, split_os
from support.varstores import read_variables

from varsd.adapters import virtfw
from varsd.adapters.libvirt_api import Hypervisor
from varsd.domain.xml import parse_domain

from .guests import CODE_4M, NVRAM_DIR, VARS_4M, open_paths, qemu_pid, varsctl, wait_for_serial

VENDOR_GUID = "2d7c9a41-5e3b-4f1a-9c8d-6b5a4e3d2c1f"
PROOF = f"{VENDOR_GUID}:VarsdProof"
BOOT_LINE = r"BdsDxe: (loading|starting) Boot"


def _varstore(path: Path) -> None:
    path.write_bytes(virtfw.with_variable(VARS_4M, "VarsdProof", VENDOR_GUID, b"base", attr=7))
    os.chmod(path, 0o600)
    os.chown(path, *_qemu_ids())


def _qemu_ids() -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam("libvirt-qemu")
    return pw.pw_uid, pw.pw_gid


def _varstore_inodes(hv: Hypervisor, guests) -> dict[str, int]:
    out = {}
    for g in guests:
        nvram = parse_domain(hv.persistent_xml(g.uuid)).nvram_path
        files = open_paths(qemu_pid(g.name))
        assert CODE_4M in files and nvram in files, f"{g.name}: QEMU has {sorted(files)}"
        out[g.name] = files[nvram].st_ino
    return out


def _boot_all(hv: Hypervisor, guests) -> dict[str, int]:
    for g in guests:
        hv.start(g.uuid)
    try:
        for g in guests:
            wait_for_serial(g.serial_log, BOOT_LINE, timeout=240)
        return _varstore_inodes(hv, guests)
    finally:
        for g in guests:
            hv.destroy(g.uuid)


def test_clones_sharing_by_symlink_and_by_inode_get_their_own_copies(hv: Hypervisor, guest_factory, config) -> None:
    base_name = guest_factory.name("zbase")  # sorts after its clones
    base_vars = guest_factory.track(f"{NVRAM_DIR}/{base_name}_VARS.fd")
    _varstore(base_vars)
    link = guest_factory.track(f"{NVRAM_DIR}/{base_name}-link.fd")
    os.symlink(base_vars, link)
    hard = guest_factory.track(f"{NVRAM_DIR}/{base_name}-hard.fd")
    os.link(base_vars, hard)
    base = guest_factory.define(base_name, split_os(CODE_4M, str(base_vars), template=VARS_4M))
    by_link = guest_factory.define("alink", split_os(CODE_4M, str(link), template=VARS_4M))
    by_inode = guest_factory.define("ahard", split_os(CODE_4M, str(hard), template=VARS_4M))

    for g in (by_link, by_inode):  # each alone, before the base was ever looked at
        s = varsctl(config, "status", "--json", g.name)
        (entry,) = json.loads(s.stdout)["domains"]
        assert entry["status"] == "error" and base_name in entry["detail"], entry
    r = varsctl(config, "reconcile", "--json", base.name)  # binds the base: it keeps its file
    assert r.returncode == 0, r.stdout + r.stderr
    for g in (by_link, by_inode):
        r = varsctl(config, "reconcile", "--json", g.name)
        assert r.returncode == 0, r.stdout + r.stderr
        (entry,) = json.loads(r.stdout)["domains"]
        assert entry["status"] == "ok" and entry["changes"], entry
        new = entry["varstore"]
        assert new not in (str(base_vars), str(link), str(hard)) and PROOF in read_variables(new)
    assert parse_domain(hv.persistent_xml(base.uuid)).nvram_path == str(base_vars)

    inodes = _boot_all(hv, [base, by_link, by_inode])
    assert len(set(inodes.values())) == 3, inodes


def test_after_domrename_a_newcomer_with_the_old_name_gets_its_own_varstore(hv: Hypervisor, guest_factory,
                                                                          config, tmp_path) -> None:
    old_name = guest_factory.name("old")
    old = guest_factory.define(old_name, f"<loader readonly='yes' type='pflash'>{CODE_4M}</loader>")
    old_vars = parse_domain(hv.persistent_xml(old.uuid)).nvram_path
    assert old_vars == f"{NVRAM_DIR}/{old_name}_VARS.fd"  # libvirt's naming, filled in at define
    r = varsctl(config, "reconcile", old.name)
    assert r.returncode == 0, r.stdout + r.stderr
    before = Path(old_vars).read_bytes()

    new_name = guest_factory.name("renamed")
    hv.connection.lookupByUUIDString(old.uuid).rename(new_name, 0)
    renamed = replace(old, name=new_name)
    assert parse_domain(hv.persistent_xml(old.uuid)).nvram_path == old_vars  # what domrename leaves

    log = str(tmp_path / "newcomer.serial.log")  # the renamed guest keeps writing the old name's log
    newcomer = guest_factory.define(old_name, xml=guest_xml(
        old_name, f"<loader readonly='yes' type='pflash'>{CODE_4M}</loader>", serial_log=log))
    newcomer = replace(newcomer, serial_log=log)
    assert parse_domain(hv.persistent_xml(newcomer.uuid)).nvram_path == old_vars  # the trap
    r = varsctl(config, "reconcile", "--json", newcomer.name)
    assert r.returncode == 0, r.stdout + r.stderr
    (entry,) = json.loads(r.stdout)["domains"]
    assert entry["varstore"] != old_vars and new_name in entry["detail"], entry
    assert parse_domain(hv.persistent_xml(old.uuid)).nvram_path == old_vars
    assert Path(old_vars).read_bytes() == before

    inodes = _boot_all(hv, [renamed, newcomer])
    assert len(set(inodes.values())) == 2, inodes
