"""varsd.firmware.discovery on Debian's real OVMF files: builds no descriptor lists,
paired by content (virt-firmware), symlinks resolved, identified by digest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from aavmf_files import hide_aarch64
from ovmf_files import DEBIAN12_OVMF  # Debian 12's files, release-aware

from varsd.adapters import fsio
from varsd.firmware.catalog import load_catalog
from varsd.firmware.discovery import Probe, discover, pair_builds

OVMF = "/usr/share/OVMF"
FW_DIR = "/usr/share/qemu/firmware"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A firmware dir: name -> a file of /usr/share/OVMF to copy, or '->target' for a symlink."""
    d = tmp_path / "OVMF"
    d.mkdir()
    for name, src in files.items():
        if src.startswith("->"):
            os.symlink(src[2:], d / name)
        else:
            shutil.copyfile(src, d / name)
    return d


def _summary(builds) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(os.path.basename(b.code_path), os.path.basename(b.template_path), tuple(sorted(b.features)))
            for b in builds]


def test_debian12_2mib_builds_are_found_beside_the_descriptor_ones() -> None:
    # Debian 12's files (the host's on Debian 12, its unpacked .deb elsewhere); its descriptors
    # name exactly its 4 MiB code images
    root = os.path.dirname(DEBIAN12_OVMF)
    described = {fsio.sha256_file(str(p)) for p in Path(DEBIAN12_OVMF).glob("OVMF_CODE_4M*.fd")}
    builds = discover([DEBIAN12_OVMF, f"{root}/ovmf", f"{root}/qemu"], described)
    sb, enrolled = ("requires-smm", "secure-boot"), ("enrolled-keys", "requires-smm", "secure-boot")
    assert _summary(builds) == [  # the symlink OVMF_CODE.ms.fd is a name of the Secure Boot build too
        ("OVMF_CODE.fd", "OVMF_VARS.fd", ()),
        ("OVMF_CODE.ms.fd", "OVMF_VARS.ms.fd", enrolled), ("OVMF_CODE.ms.fd", "OVMF_VARS.fd", sb),
        ("OVMF_CODE.secboot.fd", "OVMF_VARS.ms.fd", enrolled), ("OVMF_CODE.secboot.fd", "OVMF_VARS.fd", sb),
    ]
    assert len({b.code_sha256 for b in builds if "secure-boot" in b.features}) == 1
    assert all(b.layout and b.layout.size == 131072 for b in builds)
    assert all(b.origin == f"discovered:{b.code_path}" for b in builds)


def test_descriptor_builds_come_first_and_are_not_listed_twice(tmp_path: Path) -> None:
    catalog = load_catalog([FW_DIR, hide_aarch64(tmp_path / "hide")], search_dirs=[OVMF])
    origins = [b.origin for b in catalog.builds]
    assert [o for o in origins if not o.startswith("discovered:")] == origins[:3]
    pairs = [(b.code_path, b.template_path) for b in catalog.builds]
    assert len(pairs) == len(set(pairs))
    # nothing a descriptor names is discovered again (Debian 13 ships OVMF_CODE_4M.secboot.strictnx.fd,
    # which no descriptor names: that one is discovered)
    described = {os.path.realpath(b.code_path) for b in catalog.builds if not b.origin.startswith("discovered:")}
    assert not any(b.origin.startswith("discovered:") and os.path.realpath(b.code_path) in described
                   for b in catalog.builds)


def test_symlinks_are_resolved_and_names_mean_nothing(tmp_path: Path) -> None:
    # Debian's layout, but with names that say nothing: content decides.
    d = _tree(tmp_path, {"a.fd": f"{DEBIAN12_OVMF}/OVMF_CODE.secboot.fd", "b.fd": f"{DEBIAN12_OVMF}/OVMF_VARS.fd",
                         "c.fd": f"{DEBIAN12_OVMF}/OVMF_VARS.ms.fd", "OVMF_CODE.ms.fd": "->a.fd",
                         "bios-256k.bin": "/usr/share/seabios/bios-256k.bin"})
    builds = discover([str(d)], set())
    sb, enrolled = ("requires-smm", "secure-boot"), ("enrolled-keys", "requires-smm", "secure-boot")
    assert _summary(builds) == [("OVMF_CODE.ms.fd", "c.fd", enrolled), ("OVMF_CODE.ms.fd", "b.fd", sb),
                                ("a.fd", "c.fd", enrolled), ("a.fd", "b.fd", sb)]
    assert len({b.code_sha256 for b in builds}) == 1  # one build, two names; bios-256k.bin is none


def test_a_path_whose_target_changes_is_a_new_build(tmp_path: Path) -> None:
    d = _tree(tmp_path, {"plain.fd": f"{DEBIAN12_OVMF}/OVMF_CODE.fd", "sb.fd": f"{DEBIAN12_OVMF}/OVMF_CODE.secboot.fd",
                         "VARS.fd": f"{DEBIAN12_OVMF}/OVMF_VARS.fd", "CODE.fd": "->plain.fd"})
    first = {b.code_sha256 for b in discover([str(d)], set())}
    os.unlink(d / "CODE.fd")
    os.unlink(d / "plain.fd")
    os.symlink("sb.fd", d / "CODE.fd")
    second = {b.code_sha256 for b in discover([str(d)], set())}
    assert second < first and len(second) == 1


def test_code_without_a_template_of_its_layout_is_no_build(tmp_path: Path) -> None:
    d = _tree(tmp_path, {"OVMF_CODE.fd": f"{DEBIAN12_OVMF}/OVMF_CODE.fd", "OVMF_VARS_4M.fd": f"{OVMF}/OVMF_VARS_4M.fd"})
    assert discover([str(d)], set()) == []


def test_a_unified_image_proves_the_layout_of_its_code() -> None:
    from varsd.model.firmware import VarstoreLayout

    two, four = VarstoreLayout(131072, 100, 57344), VarstoreLayout(540672, 100, 262144)
    code = Probe("/fw/CODE.fd", 3653632, "c0de", modules=frozenset({"AmdSevDxe"}))
    probes = [code, Probe("/fw/V2.fd", 131072, "v2", layout=two), Probe("/fw/V4.fd", 540672, "v4", layout=four),
              Probe("/other/OVMF.fd", 4194304, "u", layout=four, trailing_sha256="c0de")]
    (build,) = pair_builds(probes, set())
    assert (build.template_path, build.layout) == ("/fw/V4.fd", four)
    assert pair_builds(probes, {"c0de"}) == []  # already listed by a descriptor


# -- aarch64: AAVMF's 64 MiB banks ------------------------------------------------------


def test_aavmf_code_pairs_with_the_templates_of_its_bank_size_by_content(tmp_path: Path) -> None:
    """Names that say nothing (links to Debian's files): the code is ArmVirtQemu's, the
    blank template takes the layout of the formatted one beside it; no SMM, so the plain
    build has the blank template and the Secure Boot one the enrolled template.

    The code is the Secure Boot capable one (AAVMF_CODE.ms.fd: Debian 12's one image, Debian 13's
    AAVMF_CODE.secboot.fd). Debian 13's AAVMF_CODE.fd is AAVMF_CODE.no-secboot.fd: built without
    Secure Boot, it gets the plain build only."""
    from aavmf_files import CODE, CODE_MS, DEBIAN12, LAYOUT, VARS_MS, blank_flash

    d = _tree(tmp_path, {"c.fd": f"->{CODE_MS}", "keys.fd": f"->{VARS_MS}",
                         "efi.fd": "->/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"})
    blank_flash(d / "blank.fd")
    builds = discover([str(d)], set())
    assert _summary(builds) == [("c.fd", "keys.fd", ("enrolled-keys", "secure-boot")), ("c.fd", "blank.fd", ())]
    assert all(b.layout == LAYOUT and b.targets[0].architecture == "aarch64" for b in builds)
    assert [b.template_blank for b in builds] == [False, True]
    if not DEBIAN12:  # Debian 13: the code without Secure Boot is never paired with the enrolled template
        os.unlink(d / "c.fd")
        os.symlink(CODE, d / "c.fd")
        assert _summary(discover([str(d)], set())) == [("c.fd", "blank.fd", ())]


def test_aavmf_code_without_a_formatted_template_is_no_build(tmp_path: Path) -> None:
    """A blank template alone says nothing about the layout the code formats."""
    from aavmf_files import CODE, blank_flash

    d = _tree(tmp_path, {"c.fd": f"->{CODE}"})
    blank_flash(d / "blank.fd")
    assert discover([str(d)], set()) == []


def test_listed_aavmf_code_is_not_listed_again(tmp_path: Path) -> None:
    """Debian's descriptors list AAVMF_CODE.fd (Debian 12; .no-secboot/.secboot on 13) and its
    links: discovery adds nothing for that code (Debian 13's unlisted strictnx build it may)."""
    catalog = load_catalog([FW_DIR], search_dirs=["/usr/share/AAVMF"])
    listed = {b.code_sha256 for b in catalog.builds if not b.origin.startswith("discovered:")}
    found = [b for b in catalog.builds if b.origin.startswith("discovered:")]
    assert listed and not [b for b in found if b.code_sha256 in listed]
    assert all("strictnx" in b.code_path for b in found), [b.code_path for b in found]
