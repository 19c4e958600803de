"""The reconciler with aarch64 and x86 guests side by side, on libvirt's in-process
`test:///default` driver and the host's full catalog (OVMF and AAVMF descriptors): each
gets its own architecture's firmware, the AAVMF varstore is the whole 64 MiB flash bank
(created atomically, 0600, sparse), and a second pass changes nothing."""

from __future__ import annotations

import contextlib
import os
import stat
import uuid as uuidlib
from collections.abc import Iterator

import pytest
from aavmf_files import FLASH, PLAIN_CODE, QEMU_EFI, VARS
from support.clock import FixedClock
from support.domains import domain_xml

from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.config import Config
from varsd.domain.xml import parse_domain
from varsd.engine.reconciler import Reconciler
from varsd.firmware.catalog import load_catalog
from varsd.model.domain import FirmwareConfig, Status

URI = "test:///default"
NOW = "2026-12-01T12:00:00Z"


def _xml(name: str, arch: str, machine: str, os_inner: str) -> str:
    return domain_xml(name, os_inner, arch=arch, machine=machine, memory_kib=524288)


@pytest.fixture
def setup(tmp_path) -> Iterator[tuple[Reconciler, Hypervisor, Config]]:
    cfg = Config(uri=URI, nvram_dir=str(tmp_path / "nvram"), state_dir=str(tmp_path / "state"),
                 firmware_dirs=("/usr/share/qemu/firmware",), firmware_search_dirs=())
    os.makedirs(cfg.nvram_dir)
    catalog = load_catalog(cfg.firmware_dirs)
    with Hypervisor(URI) as hv:
        journal = Journal(cfg.journal_path)
        made: list[str] = []
        rec = Reconciler(cfg, hv, catalog, journal, (os.getuid(), os.getgid()), actor="test", clock=FixedClock(NOW))
        rec.made = made  # type: ignore[attr-defined]
        yield rec, hv, cfg
        for u in made:  # the test driver's state lives as long as this process: leave no domain behind
            with contextlib.suppress(Exception):  # it refuses undefine flags for nvram (test_reconciler does so)
                hv.undefine(u, remove_nvram=False)
        journal.close()


def test_each_architecture_gets_its_own_firmware_and_aavmf_keeps_the_whole_bank(setup) -> None:
    rec, hv, cfg = setup
    tag = uuidlib.uuid4().hex[:8]
    arm = hv.define(_xml(f"arm-{tag}", "aarch64", "virt-7.2", f"<loader type='rom'>{QEMU_EFI}</loader>"))
    x86 = hv.define(_xml(f"x86-{tag}", "x86_64", "pc-q35-7.2", "<loader type='rom'>/usr/share/ovmf/OVMF.fd</loader>"))
    rec.made += [arm.uuid, x86.uuid]  # type: ignore[attr-defined]

    out = {ref.name: rec.reconcile(ref) for ref in (arm, x86)}
    assert {n: (o.plan.config, o.status) for n, o in out.items()} == {
        arm.name: (FirmwareConfig.BIOS_ROM, Status.OK), x86.name: (FirmwareConfig.BIOS_ROM, Status.OK)}

    a = parse_domain(hv.persistent_xml(arm.uuid))
    x = parse_domain(hv.persistent_xml(x86.uuid))
    assert (a.loader_path, a.nvram_template) == (PLAIN_CODE, VARS)
    assert x.loader_path.startswith("/usr/share/OVMF/") and x.acpi and not a.acpi
    target = os.path.join(cfg.nvram_dir, f"{arm.name}_VARS.fd")
    assert a.nvram_path == target
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == FLASH
    assert st.st_blocks * 512 < FLASH // 8  # the template's zero padding is holes
    with open(target, "rb") as f, open(VARS, "rb") as t:
        assert f.read() == t.read()  # byte for byte AAVMF_VARS.fd (blank on Debian 12)
    assert not [n for n in os.listdir(cfg.nvram_dir) if n.startswith(".")]  # no temp file left

    # bound and archived like an x86 build: a sparse, verified copy of the 64 MiB code
    sha = a.metadata.build_code_sha256
    copy = os.path.join(cfg.state_dir, "archive", f"{sha}.fd")
    assert os.path.getsize(copy) == FLASH and os.stat(copy).st_blocks * 512 < FLASH // 4
    assert sha in rec.upgrade_context().archive.verified

    again = [rec.reconcile(hv.lookup(ref.uuid)) for ref in (arm, x86)]
    assert [(o.plan.config, o.status, o.done) for o in again] == [(FirmwareConfig.SPLIT, Status.OK, ())] * 2
