"""Which of the firmware configurations a domain uses (pure).

Rules, first match wins:
1. `<launchSecurity>` present, or a confidential-computing object passed through
   `<qemu:commandline>` (SNP/TDX on libvirt versions without an element for them)
   -> confidential, whatever the loader: measured firmware must never be split
   (QEMU measures only pflash unit 0).
2. `<os><varstore>` (libvirt 12.1+: variables in a JSON file QEMU's uefi-vars device
   serves, the firmware a ROM) -> uefi-vars, its own class: a ROM loader here is right,
   and rewriting it into pflash would abandon every variable.
3. `<loader stateless='yes'>` -> stateless.
4. Firmware arguments in `<qemu:commandline>` that varsd does not fully understand
   (`varsd.domain.cmdline`) -> unknown: reported, never rewritten.
5. `-bios PATH` in `<qemu:commandline>`, or a loader of type rom or of no type (libvirt
   passes both as -bios, even with readonly='yes' or an `<nvram>` beside it): bios-rom
   when the image is OVMF, none otherwise (a custom SeaBIOS build).
6. No loader: autoselect with `<os firmware='efi'>`, otherwise none (SeaBIOS). A loader
   path next to `firmware='efi'` is what libvirt >= 9.2 resolved at define time: the
   paths rule, so such a domain is classified by them like any other.
7. pflash with `<nvram>`: split. A read-only pflash without one is split too: libvirt
   fills in `<nvram>` when it defines the domain (not for flash on the command line:
   unit 0 alone there is code-only or unified, as nobody adds unit 1).
8. A single writable pflash: unified when the image begins with a varstore, none when
   the image is readable and not OVMF (SeaBIOS or a custom build as pflash), else
   code-only (the varstore range is backed by nothing persistent). A missing or
   unreadable image is classified code-only; the planner must not act on that guess.
"""

from __future__ import annotations

from varsd.model.domain import DomainFirmware, FileFacts, FirmwareConfig
from varsd.model.firmware import Catalog


def looks_like_ovmf(facts: FileFacts | None, path: str, catalog: Catalog) -> bool:
    """True for images that are edk2 firmware rather than SeaBIOS.

    A unified OVMF image starts with a varstore; a bare code image is recognised by
    its digest matching a catalog build, or failing that by its conventional *file*
    name (never a directory's: a SeaBIOS image under /srv/edk2-tests/ stays SeaBIOS).
    """
    if facts is not None:
        if facts.varstore_layout is not None:
            return True
        if facts.sha256 and catalog.by_code_sha(facts.sha256):
            return True
    lowered = path.rsplit("/", 1)[-1].lower()
    # QEMU_EFI.fd: edk2's ArmVirtQemu build output, what Debian's qemu-efi-aarch64 ships for -bios
    return any(word in lowered for word in ("ovmf", "edk2", "uefi", "aavmf", "qemu_efi"))


def classify(fw: DomainFirmware, loader: FileFacts | None, catalog: Catalog) -> FirmwareConfig:
    """The configuration class of `fw`; `loader` are the facts of its firmware image."""
    if fw.launch_security:
        return FirmwareConfig.CONFIDENTIAL
    if fw.host_varstore:
        return FirmwareConfig.HOST_VARSTORE
    if fw.loader_stateless:
        return FirmwareConfig.STATELESS
    if fw.cmdline_problem:
        return FirmwareConfig.UNKNOWN
    if fw.cmdline_bios:
        if looks_like_ovmf(loader, fw.cmdline_bios, catalog):
            return FirmwareConfig.BIOS_ROM
        return FirmwareConfig.NONE
    if fw.loader_path is None:
        return FirmwareConfig.AUTOSELECT if fw.os_firmware == "efi" else FirmwareConfig.NONE
    if fw.loader_type != "pflash":
        if looks_like_ovmf(loader, fw.loader_path, catalog):
            return FirmwareConfig.BIOS_ROM
        return FirmwareConfig.NONE
    if fw.nvram_path or (fw.loader_readonly and not fw.cmdline_pflash):
        return FirmwareConfig.SPLIT
    if loader is not None and loader.varstore_layout is not None:
        return FirmwareConfig.UNIFIED
    readable = loader is not None and loader.exists and not loader.error
    if readable and not looks_like_ovmf(loader, fw.loader_path, catalog):
        # SeaBIOS's bios-256k.bin or a custom image as writable pflash: not OVMF, so
        # "completing" it with OVMF code would change the guest's firmware family.
        return FirmwareConfig.NONE
    return FirmwareConfig.CODE_ONLY


def firmware_image_path(fw: DomainFirmware) -> str | None:
    """The image the domain boots as firmware: -bios argument or loader path."""
    return fw.cmdline_bios or fw.loader_path
