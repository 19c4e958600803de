"""Descriptor parsing (against Debian's real files) and the directory precedence rule."""

from __future__ import annotations

import json
import os

import pytest
from aavmf_files import without_aarch64

from varsd.errors import DescriptorError
from varsd.firmware.catalog import list_descriptor_paths
from varsd.firmware.descriptors import (
    Descriptor,
    ordered_descriptor_paths,
    parse_descriptor,
)
from varsd.model.firmware import MappingMode, Target

DEBIAN_DIR = "/usr/share/qemu/firmware"
Q35 = (Target("x86_64", ("pc-q35-*",)),)
BOTH = (Target("x86_64", ("pc-i440fx-*", "pc-q35-*")),)
COMMON = {"acpi-s3", "amd-sev", "verbose-dynamic"}

# file name -> (code, template, features, targets, description start)
DEBIAN = {
    "40-edk2-x86_64-secure-enrolled.json": (
        "/usr/share/OVMF/OVMF_CODE_4M.ms.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
        COMMON | {"enrolled-keys", "requires-smm", "secure-boot"},
        Q35,
        "UEFI firmware for x86_64, with Secure Boot and SMM, SB enabled, MS certs enrolled",
    ),
    "50-edk2-x86_64-secure.json": (
        "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
        COMMON | {"requires-smm", "secure-boot"},
        Q35,
        "UEFI firmware for x86_64, with Secure Boot and SMM, empty varstore",
    ),
    "60-edk2-x86_64.json": (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
        COMMON,
        BOTH,
        "UEFI firmware for x86_64, without Secure Boot without SMM",
    ),
}


def test_debian_ships_exactly_the_three_descriptors():
    assert sorted(without_aarch64(os.listdir(DEBIAN_DIR))) == sorted(DEBIAN)


@pytest.mark.parametrize("name", sorted(DEBIAN))
def test_parse_real_debian_descriptor(name):
    code, template, features, targets, description = DEBIAN[name]
    path = os.path.join(DEBIAN_DIR, name)
    with open(path, "rb") as f:
        d = parse_descriptor(f.read(), path)
    assert d == Descriptor(
        path=path,
        description=d.description,
        interface_types=("uefi",),
        device="flash",
        mode=MappingMode.SPLIT,  # Debian's files have no "mode": split is the default
        executable_path=code,
        executable_format="raw",
        template_path=template,
        template_format="raw",
        features=frozenset(features),
        targets=targets,
    )
    assert d.description.startswith(description)
    assert d.is_uefi_flash


def _doc(**over):
    """A valid split descriptor; keyword overrides replace top-level keys (None deletes)."""
    doc = {
        "description": "test",
        "interface-types": ["uefi"],
        "mapping": {
            "device": "flash",
            "executable": {"filename": "/fw/CODE.fd", "format": "raw"},
            "nvram-template": {"filename": "/fw/VARS.fd", "format": "raw"},
        },
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
        "features": ["secure-boot"],
        "tags": ["ignored"],
    }
    for k, v in over.items():
        k = k.replace("_", "-")
        if v is None:
            doc.pop(k)
        else:
            doc[k] = v
    return json.dumps(doc)


def _mapping(**over):
    m = {
        "device": "flash",
        "executable": {"filename": "/fw/CODE.fd", "format": "raw"},
        "nvram-template": {"filename": "/fw/VARS.fd", "format": "raw"},
    }
    for k, v in over.items():
        k = k.replace("_", "-")
        if v is None:
            m.pop(k)
        else:
            m[k] = v
    return m


@pytest.mark.parametrize(
    "mapping, device, mode, exe, template",
    [
        (_mapping(), "flash", MappingMode.SPLIT, "/fw/CODE.fd", "/fw/VARS.fd"),
        (_mapping(mode="split"), "flash", MappingMode.SPLIT, "/fw/CODE.fd", "/fw/VARS.fd"),
        (_mapping(mode="combined", nvram_template=None), "flash", MappingMode.COMBINED, "/fw/CODE.fd", None),
        # a template listed for a non-split build means nothing and is not kept
        (_mapping(mode="stateless"), "flash", MappingMode.STATELESS, "/fw/CODE.fd", None),
        ({"device": "memory", "filename": "/fw/OVMF.fd"}, "memory", None, "/fw/OVMF.fd", None),
        ({"device": "kernel", "filename": "/fw/kernel"}, "kernel", None, "/fw/kernel", None),
    ],
)
def test_parse_mapping_variants(mapping, device, mode, exe, template):
    d = parse_descriptor(_doc(mapping=mapping), "/x/t.json")
    assert (d.device, d.mode, d.executable_path, d.template_path) == (device, mode, exe, template)
    assert d.is_uefi_flash == (device == "flash")
    if template is None:
        assert d.template_format is None


def test_parse_keeps_unknown_features_and_accepts_str():
    d = parse_descriptor(_doc(features=["secure-boot", "future-thing"], description=None), "/x/t.json")
    assert d.features == frozenset({"secure-boot", "future-thing"})
    assert d.description == ""
    assert not parse_descriptor(_doc(interface_types=["bios"]), "/x/t.json").is_uefi_flash


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid"),
        ("[1, 2]", "the document must be a JSON object"),
        (_doc(interface_types=None), "missing 'interface-types'"),
        (_doc(interface_types="uefi"), "'interface-types' in the document must be a list of strings"),
        (_doc(mapping=None), "missing 'mapping'"),
        (_doc(mapping=[]), "'mapping' must be a JSON object"),
        (_doc(mapping=_mapping(device=None)), "missing 'mapping.device'"),
        (_doc(mapping=_mapping(device="rom")), "unknown 'mapping.device' 'rom'"),
        (_doc(mapping=_mapping(mode="weird")), "unknown 'mapping.mode' 'weird'"),
        (_doc(mapping=_mapping(executable=None)), "missing 'mapping.executable'"),
        (_doc(mapping=_mapping(executable={"format": "raw"})), "missing 'filename' in 'mapping.executable'"),
        (_doc(mapping=_mapping(executable={"filename": "/a"})), "missing 'format' in 'mapping.executable'"),
        (_doc(mapping=_mapping(executable={"filename": "CODE.fd", "format": "raw"})), "must be an absolute path"),
        (_doc(mapping=_mapping(nvram_template=None)), "split flash mapping without 'mapping.nvram-template'"),
        (_doc(mapping=_mapping(nvram_template={"filename": 3, "format": "raw"})), "must be a non-empty string"),
        (_doc(mapping={"device": "memory"}), "missing 'filename' in 'mapping'"),
        (_doc(targets=None), "missing 'targets'"),
        (_doc(targets={"architecture": "x86_64"}), "'targets' must be a list"),
        (_doc(targets=["x86_64"]), "'targets[0]' must be a JSON object"),
        (_doc(targets=[{"machines": ["pc-q35-*"]}]), "missing 'architecture' in 'targets[0]'"),
        (_doc(targets=[{"architecture": "x86_64"}]), "missing 'machines' in 'targets[0]'"),
        (_doc(targets=[{"architecture": "x86_64", "machines": [1]}]), "must be a list of strings"),
        (_doc(features=None), "missing 'features'"),
        (_doc(description=7), "'description' must be a string"),
    ],
)
def test_malformed_descriptor_names_path_and_fault(text, message):
    with pytest.raises(DescriptorError) as exc:
        parse_descriptor(text, "/etc/qemu/firmware/10-bad.json")
    assert "/etc/qemu/firmware/10-bad.json" in str(exc.value)
    assert message in str(exc.value)


USR, ETC = "/usr/share/qemu/firmware", "/etc/qemu/firmware"


@pytest.mark.parametrize(
    "listings, expected",
    [
        # the distro directory alone, already out of order: sorted by file name
        ({USR: [("60-b.json", 9), ("40-a.json", 9)]}, [f"{USR}/40-a.json", f"{USR}/60-b.json"]),
        # /etc overrides a same-named distro file and sorts among the others by name
        (
            {USR: [("40-a.json", 9), ("60-b.json", 9)], ETC: [("60-b.json", 5), ("50-c.json", 5)]},
            [f"{USR}/40-a.json", f"{ETC}/50-c.json", f"{ETC}/60-b.json"],
        ),
        # a zero-length file in /etc hides the name entirely
        ({USR: [("40-a.json", 9), ("60-b.json", 9)], ETC: [("40-a.json", 0)]}, [f"{USR}/60-b.json"]),
        # a zero-length file with nothing to hide is simply ignored
        ({ETC: [("40-a.json", 0)]}, []),
        # a zero-length distro file is overridden by a real /etc one
        ({USR: [("40-a.json", 0)], ETC: [("40-a.json", 3)]}, [f"{ETC}/40-a.json"]),
        # only *.json; dot-files ignored
        ({USR: [("40-a.json.dpkg-old", 9), ("README", 9), (".40-a.json", 9), ("a.JSON", 9)]}, []),
        # a directory missing from the listings (missing on disk) contributes nothing
        ({ETC: [("40-a.json", 9)]}, [f"{ETC}/40-a.json"]),
        ({}, []),
        # byte order, like libvirt's strcmp: digits < upper case < lower case
        ({USR: [("b.json", 1), ("B.json", 1), ("9.json", 1)]}, [f"{USR}/9.json", f"{USR}/B.json", f"{USR}/b.json"]),
    ],
)
def test_ordered_descriptor_paths(listings, expected):
    assert ordered_descriptor_paths(listings, [USR, ETC]) == expected


def test_ordered_descriptor_paths_follows_dir_order_not_mapping_order():
    listings = {ETC: [("a.json", 1)], USR: [("a.json", 1)]}
    assert ordered_descriptor_paths(listings, [USR, ETC]) == [f"{ETC}/a.json"]
    assert ordered_descriptor_paths(listings, [ETC, USR]) == [f"{USR}/a.json"]


def test_list_descriptor_paths_on_disk(tmp_path):
    usr, etc = tmp_path / "usr", tmp_path / "etc"
    usr.mkdir()
    etc.mkdir()
    for name in ("40-a.json", "50-b.json", "60-c.json", "70-d.json"):
        (usr / name).write_text("{}")
    (etc / "40-a.json").write_text("")  # hides
    (etc / "50-b.json").write_text("{ }")  # overrides
    (etc / "55-new.json").symlink_to(usr / "60-c.json")  # symlinks are followed
    (etc / "70-d.json").symlink_to(tmp_path / "gone.json")  # dangling: still overrides, fails later
    (etc / "80-dir.json").mkdir()  # not a regular file
    (etc / "notes.txt").write_text("x")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    dirs = [str(tmp_path / "missing"), str(usr), str(not_a_dir), str(etc)]
    assert list_descriptor_paths(dirs) == [
        str(etc / "50-b.json"),
        str(etc / "55-new.json"),
        str(usr / "60-c.json"),
        str(etc / "70-d.json"),
    ]


def test_list_real_debian_dirs():
    assert without_aarch64(list_descriptor_paths([DEBIAN_DIR, "/etc/qemu/firmware"])) == [
        os.path.join(DEBIAN_DIR, n) for n in sorted(DEBIAN)
    ]


# Builds whose variables QEMU's uefi-vars device keeps (libvirt 12.1+ <varstore>): the shapes
# in use while the spec still moves. Read without error, never a pflash build.
@pytest.mark.parametrize(
    "mapping, features",
    [
        # x86_64: OVMF.qemuvars.fd loaded as a ROM, the feature says where the variables are
        ({"device": "memory", "filename": "/usr/share/OVMF/OVMF.qemuvars.fd"}, ["host-uefi-vars"]),
        # aarch64: a stateless flash image, variables in the host
        (_mapping(mode="stateless", nvram_template=None), ["host-uefi-vars", "verbose-static"]),
        # a split-looking flash mapping that still asks for host variables is not split pflash
        (_mapping(), ["host-uefi-vars", "secure-boot"]),
        # early drafts: a device of its own
        ({"device": "uefi-vars", "filename": "/usr/share/edk2/ovmf/OVMF.qemuvars.fd"}, []),
    ],
)
def test_host_uefi_vars_builds_are_read_and_never_pflash(mapping, features):
    d = parse_descriptor(_doc(mapping=mapping, features=features), "/x/50-edk2-x86_64-qemuvars.json")
    assert d.uses_host_varstore
    assert not d.is_uefi_flash


def test_a_plain_flash_build_keeps_its_varstore_in_flash():
    d = parse_descriptor(_doc(), "/x/t.json")
    assert not d.uses_host_varstore and d.is_uefi_flash
