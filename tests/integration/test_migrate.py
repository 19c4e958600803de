"""`varsctl migrate` on a real host: a 2 MiB Secure Boot domain moves to the 4 MiB build.

The host's catalog is Debian 12's descriptors: only 4 MiB builds. A domain still on
Debian's 2 MiB `OVMF_CODE.secboot.fd`, with a varstore made from `OVMF_VARS.ms.fd`
(Microsoft keys enrolled) plus a boot entry, BootOrder and a vendor variable of our
own, therefore needs migration. It is first booted on its 2 MiB code (so OVMF adds
what a used guest's store holds), the migration is refused while it runs, then done
while it is shut off; the domain then boots the central 4 MiB code for real, and
OVMF writes into the migrated store, which proves the layout fits. A migration onto
a template too small for a store's variables is refused and changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ovmf_files
from support.domains import guest_xml, split_os
from support.varstores import read_variables

from varsd.adapters import virtfw
from varsd.adapters.libvirt_api import Hypervisor
from varsd.domain.xml import parse_domain

from .guests import NVRAM_DIR, open_files, qemu_pid, wait_for_serial, wait_for_varstore_write

OVMF = "/usr/share/OVMF"
SB_CODE_2M = f"{ovmf_files.DEBIAN12_OVMF}/OVMF_CODE.secboot.fd"  # Debian 12's, release-aware
VARS_2M_MS = ovmf_files.VARS_2M_MS
SB_CODE_4M_MS = f"{OVMF}/OVMF_CODE_4M.ms.fd"  # -> OVMF_CODE_4M.secboot.fd
VARS_4M_MS = f"{OVMF}/OVMF_VARS_4M.ms.fd"
CODE_4M, VARS_4M = f"{OVMF}/OVMF_CODE_4M.fd", f"{OVMF}/OVMF_VARS_4M.fd"
CODE_2M, VARS_2M = ovmf_files.CODE_2M, ovmf_files.VARS_2M
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
IMAGE_SECURITY_DB = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"
VENDOR = "5b3c9c5e-1f6a-4b8e-9d2a-7a1f0e6d4c21"
PROOF = f"{VENDOR}:VarsdProof"
BOOT_LINE = r"BdsDxe: (loading|starting|failed to load) Boot"
SECURE_FEATURES = "<acpi/><smm state='on'/>"
# Debian 12's 2 MiB Secure Boot build hangs early and silently while QEMU offers S3
# (checked: nothing on serial or debugcon; the 4 MiB build boots either way), so this
# guest has S3 off.
NO_S3 = "\n  <pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>"


def varsctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "varsd.cli.varsctl", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=300)


def _config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "varsd.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\nnvram_dir = "{NVRAM_DIR}"\n'
                   # A host without the 2 MiB builds (as after Debian 13): no discovery of this host's.
                   f'firmware_dirs = ["/usr/share/qemu/firmware"]\nfirmware_search_dirs = []\n{extra}')
    return cfg


def _status(config: Path, name: str) -> dict:
    r = varsctl(config, "status", "--json", name)
    assert r.returncode in (0, 1), r.stderr
    [entry] = json.loads(r.stdout)["domains"]
    return entry


def _load_option(description: str, path: str) -> bytes:
    """An EFI_LOAD_OPTION: active, a media file-path node + end node, as a boot manager writes."""
    file_path = (path + "\0").encode("utf-16-le")
    node = bytes([4, 4]) + (4 + len(file_path)).to_bytes(2, "little") + file_path
    dp = node + b"\x7f\xff\x04\x00"
    return (1).to_bytes(4, "little") + len(dp).to_bytes(2, "little") + (description + "\0").encode("utf-16-le") + dp


def _place_varstore(factory, name: str, data: bytes) -> Path:
    path = factory.track(f"{NVRAM_DIR}/{name}_VARS.fd")
    path.write_bytes(data)
    os.chmod(path, 0o600)
    shutil.chown(path, "libvirt-qemu", "libvirt-qemu")
    return path


def test_migrate_2m_secure_boot_domain_to_the_4m_build_and_boot_it(hv: Hypervisor, guest_factory, tmp_path) -> None:
    config = _config(tmp_path)
    name = guest_factory.name("mig2m")
    store = _place_varstore(guest_factory, name, virtfw.with_variables(VARS_2M_MS, [
        virtfw.EfiVariable("Boot0007", EFI_GLOBAL, 7, _load_option("varsd test entry", r"\EFI\varsd\test.efi")),
        virtfw.EfiVariable("BootOrder", EFI_GLOBAL, 7, b"\x07\x00\x00\x00\x01\x00\x02\x00"),
        virtfw.EfiVariable("VarsdProof", VENDOR, 7, b"kept across the migration"),
    ]))
    xml = guest_xml(name, split_os(SB_CODE_2M, str(store), template=VARS_2M_MS, secure=True),
                     serial_log="{serial_log}", features=SECURE_FEATURES).replace("</features>", "</features>" + NO_S3)
    guest = guest_factory.define(name, xml=xml)
    entry = _status(config, name)
    assert (entry["config"], entry["status"]) == ("split", "needs-migration"), entry

    # Running: refused, nothing changed. (This boot on the 2 MiB code also makes the store a used one.)
    xml = hv.persistent_xml(guest.uuid)
    hv.start(guest.uuid)
    try:
        wait_for_serial(guest.serial_log, BOOT_LINE, timeout=180)
        refused = varsctl(config, "migrate", name)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"domain '{name}': is running" in refused.stderr and "nothing was changed" in refused.stderr
        assert hv.persistent_xml(guest.uuid) == xml
        assert not (tmp_path / "state" / "backups").exists()
    finally:
        hv.destroy(guest.uuid)

    old = store.read_bytes()
    old_vars = virtfw.variables_of_bytes(old, str(store))
    for key in (f"{EFI_GLOBAL}:Boot0007", f"{EFI_GLOBAL}:BootOrder", f"{EFI_GLOBAL}:PK", f"{EFI_GLOBAL}:KEK",
                f"{IMAGE_SECURITY_DB}:db", f"{IMAGE_SECURITY_DB}:dbx", PROOF):
        assert key in old_vars, f"{key} missing from the 2 MiB store before the migration"

    done = varsctl(config, "migrate", name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"{name}: migrated {len(old_vars)} variable(s) into {store} ")

    # Every variable, equal; the 4 MiB layout; the same path; the backup equals the old store.
    assert read_variables(str(store)) == old_vars
    assert virtfw.read_layout(str(store)) == virtfw.read_layout(VARS_4M_MS)
    assert store.stat().st_size == os.path.getsize(VARS_4M_MS)
    assert not list(Path(NVRAM_DIR).glob(f".{name}_VARS.fd.varsd-tmp.*"))  # no temp file left behind
    [backup] = json.loads(varsctl(config, "backup", "list", "--json", name).stdout)["backups"]
    assert backup["reason"] == "before-write:migrate"
    assert (tmp_path / "state" / "backups" / "objects" / f"{backup['sha256']}.fd").read_bytes() == old
    fw = parse_domain(hv.persistent_xml(guest.uuid))
    assert (fw.loader_path, fw.loader_secure, fw.smm, fw.nvram_path, fw.nvram_template) == (
        SB_CODE_4M_MS, True, True, str(store), VARS_4M_MS)
    entry = _status(config, name)
    assert (entry["status"], entry["code"]) == ("ok", SB_CODE_4M_MS), entry

    # It boots the central 4 MiB Secure Boot code, and OVMF writes the migrated store.
    Path(guest.serial_log).unlink(missing_ok=True)
    migrated = store.read_bytes()
    hv.start(guest.uuid)
    try:
        wait_for_serial(guest.serial_log, BOOT_LINE, timeout=180)
        files = open_files(qemu_pid(name))
        code = os.path.realpath(SB_CODE_4M_MS)
        assert code in files and files[code].st_ino == os.stat(code).st_ino, sorted(files)
        assert str(store) in files and not any(p.startswith(SB_CODE_2M) for p in files), sorted(files)
        after = wait_for_varstore_write(str(store), migrated, timeout=180)
    finally:
        hv.destroy(guest.uuid)
    booted_vars = virtfw.variables_of_bytes(after, str(store))
    for key in (PROOF, f"{EFI_GLOBAL}:Boot0007", f"{EFI_GLOBAL}:PK", f"{EFI_GLOBAL}:KEK", f"{IMAGE_SECURITY_DB}:db",
                f"{IMAGE_SECURITY_DB}:dbx"):
        assert booted_vars[key] == old_vars[key], f"{key} changed after the first 4 MiB boot"


def test_migration_onto_a_too_small_template_changes_nothing(hv: Hypervisor, guest_factory, tmp_path) -> None:
    """160 KiB of variables in a 4 MiB store cannot go into the 2 MiB template's 56 KiB."""
    config = _config(tmp_path, f'[[extra_firmware]]\ncode = "{CODE_2M}"\ntemplate = "{VARS_2M}"\n')
    name = guest_factory.name("big4m")
    store = _place_varstore(guest_factory, name, virtfw.with_variables(VARS_4M, [
        virtfw.EfiVariable(f"Big{i}", VENDOR, 7, bytes([i]) * 16384) for i in range(10)
    ]))
    guest = guest_factory.define(name, split_os(CODE_4M, str(store), template=VARS_4M))
    before, inode, xml = store.read_bytes(), store.stat().st_ino, hv.persistent_xml(guest.uuid)

    r = varsctl(config, "migrate", name, "--to", CODE_2M)

    assert r.returncode == 1, r.stdout + r.stderr
    assert f"domain '{name}': cannot migrate:" in r.stderr and "room for only" in r.stderr
    assert "nothing was changed" in r.stderr
    assert store.read_bytes() == before and store.stat().st_ino == inode
    assert hv.persistent_xml(guest.uuid) == xml
    assert not (tmp_path / "state" / "backups").exists()
    journal = varsctl(config, "journal", name, "--json")
    assert journal.returncode == 0 and json.loads(journal.stdout) == {"changes": []}
