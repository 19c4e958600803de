"""Debian's real AAVMF files (qemu-efi-aarch64, installed by scripts/host-setup).

Importable from any test module, like `ovmf_files`. Debian 12 (2022.11) ships one 64 MiB code
image (`AAVMF_CODE.fd`, with `.ms` and `.snakeoil` symlinks to it) and 64 MiB varstore
templates: `AAVMF_VARS.fd` is blank (all zeros: the firmware formats it at first boot), `.ms`
and `.snakeoil` are formatted with keys enrolled; its 50- descriptor names an
`AAVMF_CODE.secboot.fd` it does not ship. Debian 13 (2025.02) ships `AAVMF_CODE.no-secboot.fd`
and `.secboot.fd` (`AAVMF_CODE.fd` and `.ms.fd` are symlinks to them) and a formatted
`AAVMF_VARS.fd`. `QEMU_EFI.fd` is the code the old `-bios` spelling boots (AAVMF code is
it, padded with zeros to the flash bank). Which one this host has is read from its files.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

from varsd.model.firmware import Catalog, VarstoreLayout

AAVMF = "/usr/share/AAVMF"
CODE = f"{AAVMF}/AAVMF_CODE.fd"  # in both releases (a symlink in Debian 13)
CODE_MS = f"{AAVMF}/AAVMF_CODE.ms.fd"
VARS = f"{AAVMF}/AAVMF_VARS.fd"
VARS_MS = f"{AAVMF}/AAVMF_VARS.ms.fd"
QEMU_EFI = "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"
FLASH = 64 << 20  # a QEMU `virt` flash bank; QEMU refuses a smaller file
LAYOUT = VarstoreLayout(size=FLASH, start=100, end=262144)  # the NvData volume is 768 KiB of it
DESCRIPTORS = "/usr/share/qemu/firmware"
PLAIN = f"{DESCRIPTORS}/60-edk2-aarch64.json"
ENROLLED = f"{DESCRIPTORS}/40-edk2-aarch64-secure-enrolled.json"
SECURE = f"{DESCRIPTORS}/50-edk2-aarch64-secure.json"  # Debian 12's names a code file it lacks


def _executable(descriptor: str) -> str | None:
    try:
        with open(descriptor, encoding="utf-8") as f:
            return json.load(f)["mapping"]["executable"]["filename"]
    except FileNotFoundError:  # no qemu-efi-aarch64 here: x86 helpers still work, AAVMF tests fail
        return None


INSTALLED = os.path.exists(PLAIN)  # scripts/host-setup installs qemu-efi-aarch64 on every host
PLAIN_CODE = _executable(PLAIN)  # what a repaired plain guest gets: AAVMF_CODE.fd, or .no-secboot.fd
_SECURE_CODE = _executable(SECURE)
DEBIAN12 = _SECURE_CODE is not None and not os.path.exists(_SECURE_CODE)  # Debian 12's set: blank VARS, one code


def blank_flash(path) -> str:
    """A blank 64 MiB flash file (sparse zeros), like Debian 12's AAVMF_VARS.fd."""
    with open(path, "wb") as f:
        f.truncate(FLASH)
    return str(path)


def x86_only(catalog: Catalog) -> Catalog:
    """`catalog` without the aarch64 builds and problems qemu-efi-aarch64 adds to the host's
    descriptors, for tests about x86 guests on this host (aarch64's have their own)."""
    return replace(
        catalog,
        builds=tuple(b for b in catalog.builds if any(t.architecture != "aarch64" for t in b.targets)),
        problems=tuple(p for p in catalog.problems if "aarch64" not in os.path.basename(p.source)),
    )


def hide_aarch64(directory) -> str:
    """A descriptor directory (made in `directory`) that hides the host's aarch64 descriptors
    the way an admin would, with zero-length files of their names: put it last in
    firmware_dirs for tests about the x86 ones that count what the catalog reads."""
    os.makedirs(directory, exist_ok=True)
    for path in (ENROLLED, SECURE, PLAIN):
        open(os.path.join(directory, os.path.basename(path)), "w").close()
    return str(directory)


def without_aarch64(names) -> list:
    """Descriptor names or paths minus the aarch64 ones qemu-efi-aarch64 installs."""
    return [n for n in names if "aarch64" not in os.path.basename(str(n))]
