"""Build selection on the real Debian catalog plus the 2 MiB pair, and the no-match text."""

from __future__ import annotations

import os

import pytest
from aavmf_files import x86_only

from varsd.config import ExtraFirmware
from varsd.firmware.catalog import load_catalog
from varsd.firmware.selection import explain_no_build, select_build
from varsd.model.firmware import Build, Catalog, MappingMode, Target, VarstoreLayout

LAYOUT_4M = VarstoreLayout(size=540672, start=100, end=262144)
LAYOUT_2M = VarstoreLayout(size=131072, start=100, end=57344)
EXTRA = "config:extra_firmware[0]"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    cat = x86_only(load_catalog(
        ["/usr/share/qemu/firmware", "/etc/qemu/firmware"],
        [ExtraFirmware("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd")],
    ))
    assert len(cat.builds) == 4 and cat.problems == ()
    return cat


def name(build: Build | None) -> str | None:
    if build is None:
        return None
    return build.origin if build.origin.startswith("config:") else os.path.basename(build.origin)[:2]


Q35, FX = "pc-q35-7.2", "pc-i440fx-7.2"


@pytest.mark.parametrize(
    "kw, expected",
    [
        # Secure Boot: first in order is the MS-enrolled build
        ({"machine": Q35, "secure_boot": True}, "40"),
        ({"machine": Q35, "secure_boot": True, "enrolled_keys": True}, "40"),
        ({"machine": Q35, "secure_boot": True, "enrolled_keys": False}, "50"),
        # plain
        ({"machine": Q35, "secure_boot": False}, "60"),
        ({"machine": FX, "secure_boot": False}, "60"),
        ({"machine": Q35, "secure_boot": False, "enrolled_keys": False}, "60"),
        ({"machine": Q35, "secure_boot": False, "enrolled_keys": True}, None),
        # Debian's secure descriptors list only pc-q35-*
        ({"machine": FX, "secure_boot": True}, None),
        # SMM: secure builds require it, the plain one does not
        ({"machine": Q35, "secure_boot": True, "smm_allowed": False}, None),
        ({"machine": Q35, "secure_boot": False, "smm_allowed": False}, "60"),
        # a domain's existing varstore pins the layout; its code pins the size
        ({"machine": FX, "secure_boot": False, "layout": LAYOUT_2M}, EXTRA),
        ({"machine": Q35, "secure_boot": False, "layout": LAYOUT_4M}, "60"),
        ({"machine": Q35, "secure_boot": True, "layout": LAYOUT_4M, "enrolled_keys": False}, "50"),
        ({"machine": Q35, "secure_boot": True, "layout": LAYOUT_2M}, None),
        ({"machine": Q35, "secure_boot": False, "layout": VarstoreLayout(540672, 100, 131072)}, None),
        ({"machine": FX, "secure_boot": False, "code_size": 1966080}, EXTRA),
        ({"machine": FX, "secure_boot": False, "code_size": 3653632}, "60"),
        ({"machine": FX, "secure_boot": False, "code_size": 1966080, "layout": LAYOUT_4M}, None),
        # aliases libvirt canonicalises on define
        ({"machine": "q35", "secure_boot": True}, "40"),
        ({"machine": "q35", "secure_boot": False}, "60"),
        ({"machine": "pc", "secure_boot": False}, "60"),
        ({"machine": "pc", "secure_boot": True}, None),
        # other architectures, machines and modes
        ({"machine": "virt-7.2", "secure_boot": False, "arch": "aarch64"}, None),
        ({"machine": Q35, "secure_boot": False, "arch": "i686"}, None),
        ({"machine": "microvm", "secure_boot": False}, None),
        ({"machine": Q35, "secure_boot": False, "mode": MappingMode.COMBINED}, None),
    ],
)
def test_select_build(catalog, kw, expected):
    kw = {"arch": "x86_64", **kw}
    assert name(select_build(catalog, **kw)) == expected
    text = explain_no_build(catalog, **kw)
    if expected is None:
        assert text.startswith("no ")
    else:
        assert " fits: " in text


def _build(origin, mode, machines=("pc-i440fx-*",), features=()):
    return Build(
        origin=origin,
        code_path=f"/fw/{origin}.fd",
        code_format="raw",
        code_sha256="0" * 64,
        code_size=2097152,
        mode=mode,
        features=frozenset(features),
        targets=(Target("x86_64", machines),),
    )


def test_mode_selects_among_combined_and_stateless():
    cat = Catalog(builds=(_build("s", MappingMode.STATELESS), _build("c", MappingMode.COMBINED)))
    assert select_build(cat, arch="x86_64", machine=FX, secure_boot=False) is None
    for mode, origin in ((MappingMode.COMBINED, "c"), (MappingMode.STATELESS, "s")):
        assert select_build(cat, arch="x86_64", machine=FX, secure_boot=False, mode=mode).origin == origin



def test_explain_names_the_request_and_every_rejection(catalog):
    four_mib_only = Catalog(builds=catalog.builds[:3])
    text = explain_no_build(four_mib_only, arch="x86_64", machine=FX, secure_boot=False, layout=LAYOUT_2M)
    assert text.startswith(
        "no split UEFI build for x86_64 pc-i440fx-7.2 without Secure Boot "
        "with varstore layout 131072 bytes, variables 0x64-0xe000. Passed over: "
    )
    assert "40-edk2-x86_64-secure-enrolled.json: targets x86_64 pc-q35-*" in text
    assert "50-edk2-x86_64-secure.json: targets x86_64 pc-q35-*" in text
    assert "60-edk2-x86_64.json: varstore layout 540672 bytes, variables 0x64-0x40000" in text


@pytest.mark.parametrize(
    "kw, fragments",
    [
        ({"machine": Q35, "secure_boot": True, "smm_allowed": False}, ["not requiring SMM", "40-", "requires SMM"]),
        (
            {"machine": Q35, "secure_boot": False, "enrolled_keys": True},
            [
                "without Secure Boot with enrolled keys",
                "secure-enrolled.json: Secure Boot build",
                "60-edk2-x86_64.json: no keys enrolled",
            ],
        ),
        ({"machine": Q35, "secure_boot": True, "layout": LAYOUT_2M}, [EXTRA + ": no Secure Boot"]),
        ({"machine": FX, "secure_boot": False, "code_size": 1, "layout": LAYOUT_4M}, ["with a 1-byte code image"]),
        ({"machine": Q35, "secure_boot": False, "mode": MappingMode.STATELESS}, ["no stateless UEFI build"]),
    ],
)
def test_explain_reasons(catalog, kw, fragments):
    text = explain_no_build(catalog, arch="x86_64", **kw)
    for f in fragments:
        assert f in text, text


def test_explain_empty_catalog():
    assert explain_no_build(Catalog(), arch="x86_64", machine=Q35, secure_boot=True) == (
        "no split UEFI build for x86_64 pc-q35-7.2 with Secure Boot: the firmware catalog is empty"
    )
