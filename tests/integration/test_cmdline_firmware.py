"""Firmware handed over in `<qemu:commandline>`, every spelling: `varsctl reconcile` moves it
into libvirt's `<loader>`/`<nvram>`, keeps every other argument in order, and the guest
boots for real: QEMU has the central code and a private varstore open, and OVMF writes it.
A spelling varsd does not fully understand is reported and left byte for byte as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ovmf_files
from support.domains import guest_xml, with_cmdline
from support.varstores import read_variables

from varsd.adapters import virtfw
from varsd.adapters.libvirt_api import Hypervisor
from varsd.domain.xml import QEMU_NS, parse_domain

from .guests import CODE_4M, NVRAM_DIR, VARS_4M, open_paths, qemu_pid, varsctl, wait_for_serial, wait_for_varstore_write

OVMF_2M_UNIFIED = ovmf_files.UNIFIED  # Debian 12's, release-aware
SB_CODE_4M = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
VENDOR_GUID = "0f7d2c3a-9b1e-4d6f-8a25-3c4b5d6e7f80"
PROOF = f"{VENDOR_GUID}:VarsdProof"
KEEP = ["-global", "ICH9-LPC.disable_s3=1"]  # an unrelated argument every guest carries


def _qemu_file(path: Path, data: bytes, mode: int = 0o600) -> str:
    """A file QEMU (the qemu user) may write; its directory traversable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)
    path.write_bytes(data)
    os.chmod(path, mode)
    shutil.chown(path, "libvirt-qemu", "libvirt-qemu")
    return str(path)


def _with_proof(template: str) -> bytes:
    return virtfw.with_variable(template, "VarsdProof", VENDOR_GUID, b"kept", attr=7)


def _args(hv: Hypervisor, uuid: str) -> list[str]:
    from lxml import etree

    root = etree.fromstring(hv.persistent_xml(uuid).encode())
    return [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]


def test_every_cmdline_form_is_repaired_and_boots(hv: Hypervisor, guest_factory, config, tmp_path) -> None:
    images = tmp_path / "images"
    define = {}  # label -> (guest, varstore the guest keeps or None for a new one, variables kept?)

    def guest(label: str, args: list[str], *, features: str = "<acpi/>", vars_path: str | None = None,
              proof: bool = False, name: str | None = None):
        name = name or guest_factory.name(label)
        xml = with_cmdline(guest_xml(name, "", serial_log="{serial_log}", features=features), args + KEEP)
        define[label] = (guest_factory.define(name, xml=xml), vars_path, proof)

    # issue 12 defect 1: -bios beside a code-only pflash; QEMU boots the pflash
    guest("bios-pflash", ["-bios", OVMF_2M_UNIFIED, "-drive",
                          f"if=pflash,format=raw,readonly=on,file={CODE_4M}"])
    guest("pflash", ["-pflash", CODE_4M])
    n = guest_factory.name("drive-pair")
    pair_vars = _qemu_file(guest_factory.track(f"{NVRAM_DIR}/{n}_VARS.fd"), _with_proof(VARS_4M))
    guest("drive-pair", ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={CODE_4M}",
                         "-drive", f"if=pflash,format=raw,unit=1,file={pair_vars}"],
          vars_path=pair_vars, proof=True, name=n)
    unified = _qemu_file(images / "unified4m.fd", _with_proof(VARS_4M) + Path(CODE_4M).read_bytes())
    guest("drive-unified", ["-drive", f"if=pflash,format=raw,file={unified}"], proof=True)
    n = guest_factory.name("blockdev-sb")
    sb_vars = _qemu_file(guest_factory.track(f"{NVRAM_DIR}/{n}_VARS.fd"), _with_proof(VARS_4M))
    guest("blockdev-sb", [
        "-blockdev", json.dumps({"driver": "file", "filename": SB_CODE_4M, "node-name": "fwc", "read-only": True}),
        "-blockdev", f"driver=raw,node-name=fwv,file.driver=file,file.filename={sb_vars}",
        "-machine", "pflash0=fwc,pflash1=fwv",
        "-global", "driver=cfi.pflash01,property=secure,value=on",
    ], features="<acpi/><smm state='on'/>", vars_path=sb_vars, proof=True, name=n)
    odd_name = guest_factory.name("odd")
    odd = guest_factory.define(odd_name, xml=with_cmdline(
        guest_xml(odd_name, "", serial_log="{serial_log}"),
        ["-drive", f"if=pflash,format=qcow2,file={images}/fw.qcow2"]))

    names = [g.name for g, _, _ in define.values()]
    before_args = {label: _args(hv, g.uuid) for label, (g, _, _) in define.items()}
    r = varsctl(config, "reconcile", "--json", *names)
    assert r.returncode == 0, r.stdout + r.stderr
    report = {d["name"]: d for d in json.loads(r.stdout)["domains"]}
    configs = {label: report[g.name]["config"] for label, (g, _, _) in define.items()}
    assert configs == {"bios-pflash": "code-only", "pflash": "code-only", "drive-pair": "split",
                       "drive-unified": "unified", "blockdev-sb": "split"}
    assert {report[n]["status"] for n in names} == {"ok"}

    for label, (g, vars_path, proof) in define.items():
        fw = parse_domain(hv.persistent_xml(g.uuid))
        assert (fw.loader_type, fw.loader_readonly, fw.cmdline_firmware) == ("pflash", True, False), label
        assert _args(hv, g.uuid) == KEEP, f"{label}: {before_args[label]} -> {_args(hv, g.uuid)}"
        if vars_path:
            assert fw.nvram_path == vars_path, label
        if proof:
            assert PROOF in read_variables(fw.nvram_path), f"{label}: variable lost"
    assert parse_domain(hv.persistent_xml(define["blockdev-sb"][0].uuid)).loader_secure is True

    again = varsctl(config, "reconcile", "--json", *names)
    assert again.returncode == 0 and all(not d["changes"] for d in json.loads(again.stdout)["domains"])

    untouched = hv.persistent_xml(odd.uuid)
    s = varsctl(config, "status", "--json", odd.name)
    assert s.returncode == 1
    (entry,) = json.loads(s.stdout)["domains"]
    assert (entry["config"], entry["status"]) == ("unknown", "error")
    assert "format 'qcow2'" in entry["detail"]
    assert varsctl(config, "reconcile", odd.name).returncode == 1
    assert hv.persistent_xml(odd.uuid) == untouched

    varstores = {g.name: report[g.name]["varstore"] for g, _, _ in define.values()}
    fresh = {n: Path(v).read_bytes() for n, v in varstores.items()}
    for g, _, _ in define.values():
        hv.start(g.uuid)
    try:
        for label, (g, _, proof) in define.items():
            # Debian 13's 4 MiB Secure Boot build prints "No bootable option" where Debian 12's
            # prints "loading Boot0001": either is OVMF's boot manager, booted
            wait_for_serial(g.serial_log, r"BdsDxe: ((loading|starting) Boot|No bootable option)", timeout=240)
            files = open_paths(qemu_pid(g.name))
            code = SB_CODE_4M if label == "blockdev-sb" else CODE_4M
            assert code in files and varstores[g.name] in files, f"{label}: QEMU has {sorted(files)}"
            assert str(images) not in " ".join(files), f"{label} still uses a private image"
            wait_for_varstore_write(varstores[g.name], fresh[g.name], timeout=240)
            if proof:
                assert PROOF in read_variables(varstores[g.name]), f"{label}: variable lost after boot"
    finally:
        for g, _, _ in define.values():
            hv.destroy(g.uuid)
