"""Fixtures of the varsctl tests (test:/// driver tier: no libvirtd, no QEMU)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import libvirt
import pytest

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
    _dom,
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
        _dom("romguest", U_ROM, "pc-q35-7.2", f"<loader type='rom'>{UNIFIED}</loader>"),
        # a loader without a type is what libvirt passes as -bios too. (-bios smuggled
        # through <qemu:commandline> cannot be tested here: the test driver drops that
        # namespace when it parses the domain.)
        _dom("biosguest", U_BIOS, "pc-i440fx-7.2", f"<loader>{UNIFIED}</loader>"),
        _dom("seabiosguest", U_SEABIOS, "pc-i440fx-7.2", "", runstate=""),
        _dom(
            "sevguest", U_SEV, "pc-q35-7.2", f"<loader type='pflash'>{UNIFIED}</loader>",
            "<launchSecurity type='sev'><cbitpos>47</cbitpos><reducedPhysBits>1</reducedPhysBits>"
            "<policy>0x0003</policy></launchSecurity>",
            runstate="",
        ),
        _dom("sbguest", U_SB, "pc-i440fx-7.2", f"<loader type='pflash'>{SB_CODE_4M}</loader>"),
        _dom(
            "splitguest", U_SPLIT, "pc-q35-7.2",
            f"<loader readonly='yes' type='pflash'>{CODE_4M}</loader>"
            f"<nvram template='{VARS_4M}'>{split_vars}</nvram>",
        ),
    ]
    uri, config = write_host(tmp_path, domains, nvram=nvram, state=state)
    return {"uri": uri, "config": config, "nvram": str(nvram), "state": str(state), "split_vars": str(split_vars)}


@pytest.fixture
def default_conn() -> Iterator[libvirt.virConnect]:
    """Keeps test:///default's state alive across main() calls; undefines what tests made."""
    conn = libvirt.open(DEFAULT)
    made: list[str] = []
    conn.made = made  # type: ignore[attr-defined]
    yield conn
    for name in made:
        try:
            conn.lookupByName(name).undefine()
        except libvirt.libvirtError:
            pass
    conn.close()
