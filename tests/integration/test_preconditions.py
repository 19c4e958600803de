"""Repairs complete what libvirt requires, or say why not before touching anything.

A hand-written `-bios` guest with no `<features>` at all: libvirt refuses UEFI pflash on
x86 without ACPI, so the repair adds `<acpi/>` (and says so), and the guest boots. A
Secure Boot `-bios` guest on i440fx cannot get SMM: the plan is an error naming it, and no
varstore file is created.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ovmf_files
from support.domains import guest_xml, with_cmdline

from varsd.adapters.libvirt_api import Hypervisor
from varsd.domain.xml import parse_domain

from .guests import CODE_4M, NVRAM_DIR, open_paths, qemu_pid, varsctl, wait_for_serial

OVMF_2M_UNIFIED = ovmf_files.UNIFIED  # Debian 12's, release-aware
SB_CODE_4M = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"


def _no_features(name: str, args: list[str], machine: str = "q35") -> str:
    return with_cmdline(guest_xml(name, "", serial_log="{serial_log}", features=None, machine=machine), args)


def test_no_acpi_guest_is_repaired_with_acpi_and_boots(hv: Hypervisor, guest_factory, config) -> None:
    name = guest_factory.name("noacpi")
    g = guest_factory.define(name, xml=_no_features(name, ["-bios", OVMF_2M_UNIFIED]))
    assert not parse_domain(hv.persistent_xml(g.uuid)).acpi

    r = varsctl(config, "reconcile", "--json", g.name)
    assert r.returncode == 0, r.stdout + r.stderr
    (d,) = json.loads(r.stdout)["domains"]
    assert d["status"] == "ok" and "UEFI on x86 needs ACPI" in d["detail"], d
    fw = parse_domain(hv.persistent_xml(g.uuid))
    assert fw.acpi and fw.loader_path == CODE_4M and fw.nvram_path == f"{NVRAM_DIR}/{g.name}_VARS.fd"

    hv.start(g.uuid)
    try:
        wait_for_serial(g.serial_log, r"BdsDxe: (loading|starting) Boot", timeout=240)
        files = open_paths(qemu_pid(g.name))
        assert CODE_4M in files and fw.nvram_path in files, sorted(files)
    finally:
        hv.destroy(g.uuid)


def test_a_plan_libvirt_would_refuse_is_an_error_and_creates_nothing(hv: Hypervisor, guest_factory, config) -> None:
    name = guest_factory.name("sb-i440fx")
    g = guest_factory.define(name, xml=_no_features(name, ["-bios", SB_CODE_4M], machine="pc"))
    xml = hv.persistent_xml(g.uuid)
    before = set(os.listdir(NVRAM_DIR))

    r = varsctl(config, "reconcile", "--json", g.name)
    assert r.returncode == 1, r.stdout + r.stderr
    (d,) = json.loads(r.stdout)["domains"]
    assert d["status"] == "error" and "SMM" in d["detail"], d
    assert not d["changes"]
    assert hv.persistent_xml(g.uuid) == xml
    assert not {f for f in set(os.listdir(NVRAM_DIR)) - before if f.startswith(g.name)}
    assert not Path(NVRAM_DIR, f"{g.name}_VARS.fd").exists()
