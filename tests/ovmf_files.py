"""Debian 12's real OVMF files and their varstore layouts, as every test tier uses them.

Installed by the `ovmf` package (scripts/host-setup); importable from any test module
because pytest puts tests/ on the import path (its conftest.py is outside a package).
"""

from __future__ import annotations

from varsd.model.firmware import VarstoreLayout

OVMF = "/usr/share/OVMF"
CODE_2M = f"{OVMF}/OVMF_CODE.fd"
CODE_4M = f"{OVMF}/OVMF_CODE_4M.fd"
CODE_4M_SECBOOT = f"{OVMF}/OVMF_CODE_4M.secboot.fd"
VARS_2M = f"{OVMF}/OVMF_VARS.fd"
VARS_2M_MS = f"{OVMF}/OVMF_VARS.ms.fd"
VARS_4M = f"{OVMF}/OVMF_VARS_4M.fd"
VARS_4M_MS = f"{OVMF}/OVMF_VARS_4M.ms.fd"
UNIFIED = "/usr/share/ovmf/OVMF.fd"  # Debian 12's unified image: 2 MiB layout

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
