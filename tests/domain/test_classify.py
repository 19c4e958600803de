"""classify(): the firmware configuration class of a domain, as a table (pure, no files)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from varsd.domain.classify import classify, firmware_image_path, looks_like_ovmf
from varsd.model.domain import DomainFirmware, FileFacts, FirmwareConfig
from varsd.model.firmware import Build, Catalog, Target, VarstoreLayout

C = FirmwareConfig
LAYOUT_4M = VarstoreLayout(size=540672, start=100, end=262144)
CODE_SHA = "b157d97b" * 8
CATALOG = Catalog(builds=(
    Build(origin="60-edk2-x86_64.json", code_path="/usr/share/OVMF/OVMF_CODE_4M.fd", code_format="raw",
          code_sha256=CODE_SHA, code_size=3653632, template_path="/usr/share/OVMF/OVMF_VARS_4M.fd",
          layout=LAYOUT_4M, targets=(Target("x86_64", ("pc-q35-*",)),)),
))
BASE = DomainFirmware(name="vm", uuid="u", arch="x86_64", machine="pc-q35-7.2", domain_type="kvm")

CODE = FileFacts(path="/x/code.fd", exists=True, size=3653632, sha256=CODE_SHA)
UNIFIED = FileFacts(path="/x/OVMF.fd", exists=True, size=4194304, sha256="aa" * 32, varstore_layout=LAYOUT_4M)
SEABIOS = FileFacts(path="/usr/share/seabios/bios-256k.bin", exists=True, size=262144, sha256="bb" * 32)
MISSING = FileFacts(path="/x/gone.fd", exists=False)

ROWS = [
    # (id, DomainFirmware changes, image facts, expected class)
    ("no loader: SeaBIOS", {}, None, C.NONE),
    ("firmware=efi: autoselect", {"os_firmware": "efi"}, None, C.AUTOSELECT),
    ("firmware=efi + secure loader without path", {"os_firmware": "efi", "loader_secure": True}, None, C.AUTOSELECT),
    ("firmware=efi + resolved paths (libvirt 9.2+)",
     {"os_firmware": "efi", "loader_path": "/x/code.fd", "loader_type": "pflash", "loader_readonly": True,
      "nvram_path": "/n/vm_VARS.fd"}, CODE, C.SPLIT),
    ("launchSecurity wins over everything",
     {"launch_security": "sev", "loader_path": "/x/OVMF.fd", "loader_type": "pflash"}, UNIFIED, C.CONFIDENTIAL),
    ("launchSecurity with split firmware is still confidential",
     {"launch_security": "tdx", "loader_path": "/x/code.fd", "loader_type": "pflash", "nvram_path": "/n/v"},
     CODE, C.CONFIDENTIAL),
    ("stateless", {"loader_path": "/x/OVMF.fd", "loader_type": "pflash", "loader_stateless": True}, UNIFIED,
     C.STATELESS),
    ("-bios OVMF via qemu:commandline", {"cmdline_bios": "/x/OVMF.fd"}, UNIFIED, C.BIOS_ROM),
    ("-bios SeaBIOS via qemu:commandline", {"cmdline_bios": "/usr/share/seabios/bios-256k.bin"}, SEABIOS, C.NONE),
    ("loader type=rom OVMF", {"loader_path": "/x/OVMF.fd", "loader_type": "rom"}, UNIFIED, C.BIOS_ROM),
    ("loader type=rom SeaBIOS", {"loader_path": "/usr/share/seabios/bios-256k.bin", "loader_type": "rom"}, SEABIOS,
     C.NONE),
    ("loader without type is -bios, even read-only with nvram (libvirt makes it rom)",
     {"loader_path": "/x/code.fd", "loader_readonly": True, "nvram_path": "/n/vm_VARS.fd"}, CODE, C.BIOS_ROM),
    ("rom code recognised by digest, not name", {"loader_path": "/x/fw.bin", "loader_type": "rom"}, CODE, C.BIOS_ROM),
    ("rom missing, recognised by name", {"loader_path": "/usr/share/edk2/ovmf/OVMF.fd", "loader_type": "rom"},
     replace(MISSING, path="/usr/share/edk2/ovmf/OVMF.fd"), C.BIOS_ROM),
    ("split", {"loader_path": "/x/code.fd", "loader_type": "pflash", "loader_readonly": True, "nvram_path": "/n/v"},
     CODE, C.SPLIT),
    ("read-only pflash without nvram: libvirt fills it in",
     {"loader_path": "/x/code.fd", "loader_type": "pflash", "loader_readonly": True}, CODE, C.SPLIT),
    ("writable pflash with nvram is split (to be made read-only)",
     {"loader_path": "/x/code.fd", "loader_type": "pflash", "loader_readonly": False, "nvram_path": "/n/v"},
     CODE, C.SPLIT),
    ("single writable pflash with a unified image",
     {"loader_path": "/x/OVMF.fd", "loader_type": "pflash"}, UNIFIED, C.UNIFIED),
    ("single writable pflash with code only",
     {"loader_path": "/x/code.fd", "loader_type": "pflash", "loader_readonly": False}, CODE, C.CODE_ONLY),
    ("single pflash whose image is gone: code-only, the planner will not act on it",
     {"loader_path": "/x/gone.fd", "loader_type": "pflash"}, MISSING, C.CODE_ONLY),
]


@pytest.mark.parametrize(("changes", "image", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_classify(changes, image, expected) -> None:
    assert classify(replace(BASE, **changes), image, CATALOG) is expected


def test_looks_like_ovmf() -> None:
    assert looks_like_ovmf(UNIFIED, "/x/whatever.bin", CATALOG)  # begins with a varstore
    assert looks_like_ovmf(CODE, "/x/whatever.bin", CATALOG)  # digest of a catalog build
    assert looks_like_ovmf(None, "/usr/share/AAVMF/AAVMF_CODE.fd", CATALOG)
    assert not looks_like_ovmf(SEABIOS, SEABIOS.path, CATALOG)


def test_firmware_image_path_prefers_bios_argument() -> None:
    fw = replace(BASE, cmdline_bios="/x/OVMF.fd", loader_path="/x/code.fd")
    assert firmware_image_path(fw) == "/x/OVMF.fd"
    assert firmware_image_path(BASE) is None
