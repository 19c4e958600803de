"""Proof that the tier-3 bed observes what varsd's claims are about.

If this test passes, a split OVMF guest really boots here, we can see which
firmware files its QEMU holds open (by inode), and OVMF really writes its
varstore: the three observations later tests rely on.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from support.domains import split_os

from .guests import CODE_4M, NVRAM_DIR, VARS_4M, open_firmware_files, qemu_pid, wait_for_serial, wait_for_varstore_write


def test_split_guest_boots_holds_code_and_varstore_and_writes_varstore(hv, guest_factory):
    for path in (CODE_4M, VARS_4M, NVRAM_DIR):
        assert os.path.exists(path), f"{path} missing: run scripts/host-setup"
    name = guest_factory.name("testbed")
    varstore = str(guest_factory.track(Path(NVRAM_DIR, f"{name}_VARS.fd")))
    shutil.copyfile(VARS_4M, varstore)
    template = Path(VARS_4M).read_bytes()

    guest = guest_factory.define(name, split_os(CODE_4M, varstore))
    assert hv.live_xml(guest.uuid) is None
    hv.start(guest.uuid)
    ref = guest.ref(hv)
    assert (ref.state, ref.active) == ("running", True)

    line = wait_for_serial(guest.serial_log, r"BdsDxe: (loading|starting) Boot", timeout=60)
    assert "BdsDxe" in line

    pid = qemu_pid(guest.name)
    assert hv.qemu_pid(guest.uuid) == pid
    held = open_firmware_files(pid)
    assert set(held) == {os.path.realpath(CODE_4M), os.path.realpath(varstore)}, held
    assert held[os.path.realpath(CODE_4M)].st_ino == os.stat(CODE_4M).st_ino
    assert held[os.path.realpath(varstore)].st_ino == os.stat(varstore).st_ino

    written = wait_for_varstore_write(varstore, template, timeout=30)
    assert len(written) == len(template)

    live = hv.live_xml(guest.uuid)
    assert live is not None and varstore in live
