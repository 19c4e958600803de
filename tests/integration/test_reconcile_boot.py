"""`varsctl reconcile` on a real host: each wrong firmware configuration is repaired,
then booted for real, and the host shows QEMU running central code with a private
varstore that OVMF writes. A SeaBIOS guest comes out untouched, and a second
reconcile changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ovmf_files
import pytest
from support.domains import guest_xml, split_os, with_cmdline
from support.varstores import read_variables

from varsd.adapters import virtfw
from varsd.adapters.libvirt_api import Hypervisor

from .guests import CODE_4M, NVRAM_DIR, VARS_4M, open_files, qemu_pid, wait_for_serial, wait_for_varstore_write

OVMF_2M_UNIFIED = ovmf_files.UNIFIED  # Debian 12's, release-aware
CODE_2M, VARS_2M = ovmf_files.CODE_2M, ovmf_files.VARS_2M
VENDOR_GUID = "5b3c9c5e-1f6a-4b8e-9d2a-7a1f0e6d4c21"  # a vendor GUID of our own


def varsctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "varsd.cli.varsctl", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "varsd.toml"
    cfg.write_text(
        f"""
state_dir = "{tmp_path / 'state'}"
nvram_dir = "{NVRAM_DIR}"

[[extra_firmware]]
code = "{CODE_2M}"
template = "{VARS_2M}"
"""
    )
    return cfg


def _private_image(path: Path, data: bytes) -> str:
    """A file QEMU (running as the qemu user) may open: world-readable dir, owned by root."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)
    path.write_bytes(data)
    os.chmod(path, 0o644)
    return str(path)


def _unified_with_proof(image: str, length: int) -> bytes:
    """`image` (a unified OVMF) with a vendor variable no template has, in its varstore part."""
    whole = Path(image).read_bytes()
    head = Path(image + ".head")
    head.write_bytes(whole[:length])
    try:
        varstore = virtfw.with_variable(str(head), "VarsdProof", VENDOR_GUID, b"kept across the split", attr=7)
    finally:
        head.unlink()
    return varstore + whole[length:]


def test_every_wrong_configuration_is_repaired_and_boots(hv: Hypervisor, guest_factory, config, tmp_path) -> None:
    images = tmp_path / "images"
    # 1. -bios style through <loader type='rom'> on i440fx
    rom = guest_factory.define("rom", f"<loader type='rom'>{OVMF_2M_UNIFIED}</loader>", machine="pc")
    # 2. -bios smuggled through <qemu:commandline> on q35
    cmd_name = guest_factory.name("cmdline")
    cmd_xml = with_cmdline(guest_xml(cmd_name, "", serial_log="{serial_log}"), ["-bios", OVMF_2M_UNIFIED])
    cmdline = guest_factory.define(cmd_name, xml=cmd_xml)
    # 3. one writable pflash holding only the code
    code_only = guest_factory.define("codeonly", f"<loader readonly='no' type='pflash'>{CODE_4M}</loader>")
    # 4. private unified 4 MiB copy (VARS_4M + CODE_4M) with a variable the template lacks
    with open(VARS_4M, "rb") as v, open(CODE_4M, "rb") as c:
        unified_bytes = v.read() + c.read()
    staged = _private_image(images / "u4.fd", unified_bytes)
    unified_4m = _private_image(images / "unified4m.fd", _unified_with_proof(staged, 540672))
    unified = guest_factory.define("unified4m", f"<loader readonly='no' type='pflash'>{unified_4m}</loader>")
    # 5. private unified 2 MiB copy of Debian's OVMF.fd (paired with the configured 2 MiB build)
    staged2 = _private_image(images / "u2.fd", Path(OVMF_2M_UNIFIED).read_bytes())
    unified_2m = _private_image(images / "unified2m.fd", _unified_with_proof(staged2, 131072))
    unified2 = guest_factory.define("unified2m", f"<loader readonly='no' type='pflash'>{unified_2m}</loader>")
    # 6. split, but the code is a stale private copy; the varstore holds a variable
    stale_code = _private_image(images / "stale_CODE.fd", Path(CODE_4M).read_bytes())
    stale_name = guest_factory.name("stale")
    stale_vars = guest_factory.track(f"{NVRAM_DIR}/{stale_name}_VARS.fd")
    stale_vars.write_bytes(virtfw.with_variable(VARS_4M, "VarsdProof", VENDOR_GUID, b"untouched", attr=7))
    os.chmod(stale_vars, 0o600)
    shutil.chown(stale_vars, "libvirt-qemu", "libvirt-qemu")
    stale = guest_factory.define(stale_name, split_os(stale_code, str(stale_vars)))
    stale_before = stale_vars.read_bytes()
    # 7. left alone: SeaBIOS (confidential guests cannot be defined on this host's QEMU, which
    #    lacks SEV: they are covered by the planner tables and tests/cli on the test driver)
    seabios = guest_factory.define("seabios", "")
    untouched = {g.name: hv.persistent_xml(g.uuid) for g in (seabios,)}

    repaired = [rom, cmdline, code_only, unified, unified2, stale]
    names = [g.name for g in repaired + [seabios]]

    first = varsctl(config, "reconcile", "--json", *names)
    assert first.returncode == 0, first.stderr + first.stdout
    report = {d["name"]: d for d in json.loads(first.stdout)["domains"]}
    expected_config = {
        rom.name: "bios-rom", cmdline.name: "bios-rom", code_only.name: "code-only", unified.name: "unified",
        unified2.name: "unified", stale.name: "split", seabios.name: "none",
    }
    assert {n: report[n]["config"] for n in names} == expected_config
    assert {n: report[n]["status"] for n in names} == {
        **{g.name: "ok" for g in repaired}, seabios.name: "unmanaged",
    }
    for g in repaired:
        assert report[g.name]["changes"], f"{g.name}: nothing was done"

    # Left-alone domains are byte-for-byte unchanged; the stale domain's varstore too.
    assert {g.name: hv.persistent_xml(g.uuid) for g in (seabios,)} == untouched
    assert stale_vars.read_bytes() == stale_before

    # The unified images' variables are in the new private varstores, before any boot.
    for g, image, length in ((unified, unified_4m, 540672), (unified2, unified_2m, 131072)):
        new_vars = report[g.name]["varstore"]
        assert new_vars.startswith(NVRAM_DIR + "/")
        assert read_variables(new_vars) == read_variables(image, length)
        assert f"{VENDOR_GUID}:VarsdProof" in read_variables(new_vars)

    # Second reconcile: nothing to do.
    second = varsctl(config, "reconcile", "--json", *names)
    assert second.returncode == 0, second.stderr
    assert all(not d["changes"] for d in json.loads(second.stdout)["domains"])

    # Boot each repaired domain for real.
    expected_code = {
        rom.name: CODE_4M, cmdline.name: CODE_4M, code_only.name: CODE_4M, unified.name: CODE_4M,
        unified2.name: CODE_2M, stale.name: CODE_4M,
    }
    before = {g.name: Path(report[g.name]["varstore"]).read_bytes() for g in repaired}
    for g in repaired:
        hv.start(g.uuid)
    try:
        for g in repaired:
            wait_for_serial(g.serial_log, r"BdsDxe: (loading|starting) Boot", timeout=120)
            files = open_files(qemu_pid(g.name))
            varstore = report[g.name]["varstore"]
            assert expected_code[g.name] in files, f"{g.name}: QEMU has {sorted(files)}"
            assert varstore in files, f"{g.name}: QEMU has {sorted(files)}"
            assert not any(p.startswith(str(images)) for p in files), f"{g.name} still uses a private image"
            after = wait_for_varstore_write(varstore, before[g.name], timeout=120)
            assert after != before[g.name]
            proof = f"{VENDOR_GUID}:VarsdProof"
            if g in (unified, unified2, stale):
                assert proof in read_variables(varstore), f"{g.name}: variable lost after boot"
    finally:
        for g in repaired:
            hv.destroy(g.uuid)

    status = varsctl(config, "status", "--json", *names)
    assert status.returncode == 0, status.stderr
    assert {d["name"]: d["status"] for d in json.loads(status.stdout)["domains"]} == {
        **{g.name: "ok" for g in repaired}, seabios.name: "unmanaged",
    }
