"""aarch64 for real: an AAVMF guest on the `virt` machine, booted under TCG (no KVM) by the
host's libvirtd, after varsd repaired it from the old `-bios QEMU_EFI.fd` spelling into
Debian's central AAVMF code + a private 64 MiB varstore. QEMU's open files show both, the
firmware reaches its boot manager and formats the varstore, and the next pass changes nothing.

One boot only: TCG emulation of a Cortex-A57 is slow (the test takes ~40 s on an idle 2-core host).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from aavmf_files import DEBIAN12, FLASH, LAYOUT, PLAIN_CODE, QEMU_EFI, VARS
from support.domains import domain_xml, with_cmdline

from varsd.adapters import virtfw
from varsd.adapters.libvirt_api import Hypervisor
from varsd.domain.xml import parse_domain

from .guests import NVRAM_DIR, open_paths, qemu_pid, varsctl, wait_for_serial, wait_for_varstore_write

BOOT_TIMEOUT = 420


def aarch64_xml(name: str, serial_log: str) -> str:
    """A minimal TCG aarch64 guest with no disk (AAVMF falls through to its boot manager and
    shell); no <features>: aarch64 UEFI needs no ACPI element (libvirt's rule is x86's)."""
    devices = ("\n    <emulator>/usr/bin/qemu-system-aarch64</emulator>\n"
               f"    <serial type='file'><source path='{serial_log}'/></serial>\n  ")
    return domain_xml(name, "", domain_type="qemu", uuid=None, memory_kib=524288, vcpu=1, arch="aarch64",
                      machine="virt", extra="<cpu mode='custom' match='exact'><model fallback='forbid'>cortex-a57"
                      "</model></cpu>", on_crash="destroy", devices=devices)


def test_bios_qemu_efi_guest_is_repaired_and_boots_central_aavmf(hv: Hypervisor, guest_factory, config) -> None:
    name = guest_factory.name("aarch64")
    g = guest_factory.define(name, xml=with_cmdline(aarch64_xml(name, "{serial_log}"), ["-bios", QEMU_EFI]))

    r = varsctl(config, "reconcile", "--json", g.name)
    assert r.returncode == 0, r.stdout + r.stderr
    (entry,) = json.loads(r.stdout)["domains"]
    assert (entry["config"], entry["status"]) == ("bios-rom", "ok"), entry
    varstore = entry["varstore"]
    assert os.path.dirname(varstore) == NVRAM_DIR

    fw = parse_domain(hv.persistent_xml(g.uuid))
    assert (fw.loader_path, fw.loader_type, fw.loader_readonly, fw.nvram_path) == (PLAIN_CODE, "pflash", True, varstore)
    assert (fw.nvram_template, fw.loader_secure, fw.smm, fw.acpi, fw.cmdline_firmware) == (
        VARS, None, False, False, False)
    assert fw.metadata.build_code_sha256  # bound like any x86 guest
    st = os.lstat(varstore)
    assert (st.st_size, st.st_mode & 0o777, st.st_uid) == (FLASH, 0o600, _qemu_uid())  # the full 64 MiB bank
    assert st.st_blocks * 512 < FLASH // 8  # sparse: the template's zeros are holes
    fresh = Path(varstore).read_bytes()
    assert fresh == Path(VARS).read_bytes() and virtfw.is_blank_flash(fresh) is DEBIAN12

    s = varsctl(config, "status", "--json", g.name)
    (before_boot,) = json.loads(s.stdout)["domains"]
    assert (before_boot["config"], before_boot["status"]) == ("split", "ok"), before_boot  # Debian 12: still blank

    hv.start(g.uuid)
    try:
        wait_for_serial(g.serial_log, r"BdsDxe: (loading|starting) Boot", timeout=BOOT_TIMEOUT)  # its boot manager
        files = open_paths(qemu_pid(g.name))
        assert PLAIN_CODE in files and varstore in files, f"QEMU has {sorted(files)}"
        assert QEMU_EFI not in files
        formatted = wait_for_varstore_write(varstore, fresh, timeout=BOOT_TIMEOUT)
        assert len(formatted) == FLASH
    finally:
        hv.destroy(g.uuid)

    assert virtfw.read_layout(varstore) == LAYOUT  # what the catalog expected of the blank template
    again = varsctl(config, "reconcile", "--json", g.name)
    assert again.returncode == 0, again.stdout + again.stderr
    (after,) = json.loads(again.stdout)["domains"]
    assert (after["config"], after["status"], after["changes"]) == ("split", "ok", []), after
    fw = parse_domain(hv.persistent_xml(g.uuid))
    assert (fw.loader_path, fw.nvram_path, fw.metadata.template_path) == (PLAIN_CODE, varstore, VARS)


def _qemu_uid() -> int:
    import pwd

    return pwd.getpwnam("libvirt-qemu").pw_uid
