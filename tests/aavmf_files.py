"""Debian 12's real AAVMF files (qemu-efi-aarch64, installed by scripts/host-setup).

Importable from any test module, like `ovmf_files`. Debian 12 ships one 64 MiB code image
(`AAVMF_CODE.fd`, with `.ms` and `.snakeoil` symlinks to it) and 64 MiB varstore templates:
`AAVMF_VARS.fd` is blank (all zeros: the firmware formats it at first boot), `.ms` and
`.snakeoil` are formatted with keys enrolled. `QEMU_EFI.fd` is the 2 MiB code the old
`-bios` spelling boots (AAVMF_CODE.fd is it, padded with zeros to the flash bank).
"""

from __future__ import annotations

import os
from dataclasses import replace

from varsd.model.firmware import Catalog, VarstoreLayout

AAVMF = "/usr/share/AAVMF"
CODE = f"{AAVMF}/AAVMF_CODE.fd"
CODE_MS = f"{AAVMF}/AAVMF_CODE.ms.fd"
VARS = f"{AAVMF}/AAVMF_VARS.fd"
VARS_MS = f"{AAVMF}/AAVMF_VARS.ms.fd"
QEMU_EFI = "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"
FLASH = 64 << 20  # a QEMU `virt` flash bank; QEMU refuses a smaller file
LAYOUT = VarstoreLayout(size=FLASH, start=100, end=262144)  # the NvData volume is 768 KiB of it
DESCRIPTORS = "/usr/share/qemu/firmware"
PLAIN = f"{DESCRIPTORS}/60-edk2-aarch64.json"
ENROLLED = f"{DESCRIPTORS}/40-edk2-aarch64-secure-enrolled.json"
BROKEN = f"{DESCRIPTORS}/50-edk2-aarch64-secure.json"  # names AAVMF_CODE.secboot.fd, which Debian 12 lacks


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
    for path in (ENROLLED, BROKEN, PLAIN):
        open(os.path.join(directory, os.path.basename(path)), "w").close()
    return str(directory)


def without_aarch64(names) -> list:
    """Descriptor names or paths minus the aarch64 ones qemu-efi-aarch64 installs."""
    return [n for n in names if "aarch64" not in os.path.basename(str(n))]
