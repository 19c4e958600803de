"""Fixtures of the varsctl tests (test:/// driver tier: no libvirtd, no QEMU)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import libvirt
import pytest
from support.domains import SHUTOFF, domain_xml, rom_os, split_os
from support.testdriver import tracked_connection

from .common import (
    CODE_4M,
    DEFAULT,
    SB_CODE_4M,
    U_BIOS,
    U_ROM,
    U_SB,
    U_SEABIOS,
    U_SEV,
    U_SPLIT,
    UNIFIED,
    VARS_4M,
    write_host,
)


@pytest.fixture
def host(tmp_path) -> dict[str, str]:
    """A node file, a config file and the directories it names."""
    nvram = tmp_path / "nvram"
    state = tmp_path / "state"
    nvram.mkdir()
    split_vars = nvram / "split_VARS.fd"
    shutil.copyfile(VARS_4M, split_vars)
    os.chmod(split_vars, 0o600)
    domains = [
        domain_xml("romguest", rom_os(UNIFIED), uuid=U_ROM, runstate=SHUTOFF),
        # a loader without a type is what libvirt passes as -bios too. (-bios smuggled
        # through <qemu:commandline> cannot be tested here: the test driver drops that
        # namespace when it parses the domain.)
        domain_xml("biosguest", f"<loader>{UNIFIED}</loader>", uuid=U_BIOS, machine="pc-i440fx-7.2", runstate=SHUTOFF),
        domain_xml("seabiosguest", uuid=U_SEABIOS, machine="pc-i440fx-7.2"),
        domain_xml(
            "sevguest", f"<loader type='pflash'>{UNIFIED}</loader>", uuid=U_SEV,
            extra="<launchSecurity type='sev'><cbitpos>47</cbitpos><reducedPhysBits>1</reducedPhysBits>"
            "<policy>0x0003</policy></launchSecurity>",
        ),
        domain_xml("sbguest", f"<loader type='pflash'>{SB_CODE_4M}</loader>", uuid=U_SB, machine="pc-i440fx-7.2",
                   runstate=SHUTOFF),
        domain_xml("splitguest", split_os(CODE_4M, str(split_vars), template=VARS_4M), uuid=U_SPLIT,
                   runstate=SHUTOFF),
    ]
    uri, config = write_host(tmp_path, domains, nvram=nvram, state=state)
    return {"uri": uri, "config": config, "nvram": str(nvram), "state": str(state), "split_vars": str(split_vars)}


@pytest.fixture
def default_conn() -> Iterator[libvirt.virConnect]:
    """Keeps test:///default's state alive across main() calls; undefines what tests made."""
    with tracked_connection(DEFAULT) as conn:
        yield conn
