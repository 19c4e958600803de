"""Shared by the varsctl tests: test-driver host layouts and a way to call main()."""

from __future__ import annotations

import uuid as uuidlib

import libvirt
from ovmf_files import UNIFIED as UNIFIED_2M_IMAGE  # Debian 12's files, release-aware
from support.domains import domain_xml, rom_os

from varsd.cli.varsctl import main

CODE_4M = "/usr/share/OVMF/OVMF_CODE_4M.fd"
VARS_4M = "/usr/share/OVMF/OVMF_VARS_4M.fd"
SB_CODE_4M = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
UNIFIED = UNIFIED_2M_IMAGE

U_ROM = "0a000000-0000-4000-8000-000000000001"
U_BIOS = "0a000000-0000-4000-8000-000000000002"
U_SEABIOS = "0a000000-0000-4000-8000-000000000003"
U_SEV = "0a000000-0000-4000-8000-000000000004"
U_SB = "0a000000-0000-4000-8000-000000000005"
U_SPLIT = "0a000000-0000-4000-8000-000000000006"

DEFAULT = "test:///default"


def write_host(tmp_path, domains: list[str], *, nvram, state) -> tuple[str, str]:
    """A test-driver node file holding `domains` and a varsd config naming the dirs.

    Returns (uri, config path). Every connection to the URI re-reads the node file, so
    each main() call sees the same fresh host.
    """
    node = tmp_path / "node.xml"
    node.write_text(
        "<node>\n  <cpu><mhz>2000</mhz><model>x86_64</model><active>2</active><total>2</total></cpu>\n"
        "  <memory>4194304</memory>" + "".join(domains) + "\n</node>\n"
    )
    config = tmp_path / "varsd.toml"
    config.write_text(
        f'state_dir = "{state}"\nnvram_dir = "{nvram}"\nfirmware_dirs = ["/usr/share/qemu/firmware"]\n'
        'firmware_search_dirs = []\n'
        'qemu_user = "root"\nqemu_group = "root"\n'
    )
    return f"test://{node}", str(config)


def run(capsys, host: dict[str, str], *args: str, uri: str | None = None) -> tuple[int, str, str]:
    rc = main(["--config", host["config"], "--connect", uri or host["uri"], *args])
    out, err = capsys.readouterr()
    return rc, out, err


def define_rom(conn: libvirt.virConnect) -> tuple[str, str]:
    name = f"cli-{uuidlib.uuid4().hex[:8]}-rom"
    conn.defineXML(domain_xml(name, rom_os(UNIFIED), pretty=False))
    conn.made.append(name)
    dom = conn.lookupByName(name)
    return name, dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
