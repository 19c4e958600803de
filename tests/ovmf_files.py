"""The real OVMF files and their varstore layouts, as every test tier uses them.

Release-aware: the 4 MiB images are the host's own (`ovmf`, installed by
scripts/host-setup; the descriptors in /usr/share/qemu/firmware name them). The 2 MiB
images and the 2 MiB unified `OVMF.fd` exist only in Debian 12's `ovmf`: on a Debian 12
host they are the host's files; on any other host (Debian 13, or inside the Debian 13
bed) they come from Debian 12's ovmf .deb fetched explicitly from bookworm and unpacked
into the test cache (tests/debian_archive.py), readable by QEMU. Nothing here depends on
which ovmf the host's apt happens to offer.

Importable from any test module because pytest puts tests/ on the import path (its
conftest.py is outside a package).
"""

from __future__ import annotations

import re
from pathlib import Path

import debian_archive

from varsd.model.firmware import VarstoreLayout


def host_codename() -> str:
    m = re.search(r"^VERSION_CODENAME=(\w+)", Path("/etc/os-release").read_text(), re.M)
    return m.group(1) if m else ""


HOST_IS_DEBIAN12 = host_codename() == "bookworm"


def _debian12_root() -> str:
    """Where Debian 12's ovmf files are: the host itself, or its .deb unpacked in the test cache."""
    if HOST_IS_DEBIAN12:
        return ""
    return str(debian_archive.extracted("ovmf", debian_archive.DEBIAN12_OVMF, "bookworm"))


OVMF = "/usr/share/OVMF"
DEBIAN12_ROOT = _debian12_root()  # "" on a Debian 12 host
DEBIAN12_OVMF = f"{DEBIAN12_ROOT}/usr/share/OVMF"
CODE_2M = f"{DEBIAN12_OVMF}/OVMF_CODE.fd"
CODE_4M = f"{OVMF}/OVMF_CODE_4M.fd"
CODE_4M_SECBOOT = f"{OVMF}/OVMF_CODE_4M.secboot.fd"
VARS_2M = f"{DEBIAN12_OVMF}/OVMF_VARS.fd"
VARS_2M_MS = f"{DEBIAN12_OVMF}/OVMF_VARS.ms.fd"
VARS_4M = f"{OVMF}/OVMF_VARS_4M.fd"
VARS_4M_MS = f"{OVMF}/OVMF_VARS_4M.ms.fd"
UNIFIED = f"{DEBIAN12_ROOT}/usr/share/ovmf/OVMF.fd"  # Debian 12's unified image: 2 MiB layout

# What the host's 4 MiB Secure Boot build (OVMF_CODE_4M.secboot.fd with OVMF_VARS_4M.ms.fd) prints on
# the serial console of a guest with no disk once its boot manager ran, read from real boots:
# Debian 12 (2022.11) tries the template's hard disk entry ("BdsDxe: failed to load Boot0001 ...");
# Debian 13 (2025.02) finds no option to try ("BdsDxe: No bootable option or device was found.").
_SECURE_BOOT_LINES = {
    "bookworm": r"BdsDxe: (loading|starting|failed to load) Boot",
    "trixie": r"BdsDxe: No bootable option or device was found",
}
SECURE_BOOT_LINE = _SECURE_BOOT_LINES.get(host_codename(), "|".join(f"({r})" for r in _SECURE_BOOT_LINES.values()))



def debian12_path(path: str) -> str:
    """Where a file of Debian 12's ovmf (named as on Debian 12: /usr/share/...) is on this host."""
    return DEBIAN12_ROOT + path if path.startswith("/usr/share/") else path


def debian12_name(local: str) -> str:
    """The Debian 12 name (/usr/share/...) of a file under DEBIAN12_ROOT; other paths as they are."""
    if DEBIAN12_ROOT and local.startswith(DEBIAN12_ROOT + "/usr/share/"):
        return local[len(DEBIAN12_ROOT):]
    return local


LAYOUT_2M = VarstoreLayout(size=131072, start=100, end=57344)
LAYOUT_4M = VarstoreLayout(size=540672, start=100, end=262144)

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"  # the EFI global variable GUID


def fit_code(code: bytes, template: str) -> bytes:
    """`code` padded to what a real build's code is beside `template`: code and varstore of
    one x86 build add up to its flash size (1, 2 or 4 MiB), which the catalog checks."""
    tsize = len(open(template, "rb").read())
    flash = 1 << 20
    while flash < len(code) + tsize:
        flash <<= 1
    return code + b"\xff" * (flash - tsize - len(code))
