"""The catalog from Debian's real descriptors and images, and from broken ones in tmp dirs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from aavmf_files import hide_aarch64, without_aarch64, x86_only
from ovmf_files import DEBIAN12_OVMF  # Debian 12's files, release-aware
from ovmf_files import UNIFIED as UNIFIED_2M_IMAGE
from support.firmware import descriptor

from varsd.adapters import fsio, virtfw
from varsd.config import ExtraFirmware
from varsd.firmware.catalog import load_catalog
from varsd.model.firmware import MappingMode, Target, VarstoreLayout

DEBIAN_DIRS = ("/usr/share/qemu/firmware", "/etc/qemu/firmware")
FW = "/usr/share/qemu/firmware"
OVMF = "/usr/share/OVMF"
LAYOUT_4M = VarstoreLayout(size=540672, start=100, end=262144)
LAYOUT_2M = VarstoreLayout(size=131072, start=100, end=57344)
EXTRA_2M = ExtraFirmware(code=f"{DEBIAN12_OVMF}/OVMF_CODE.fd", template=f"{DEBIAN12_OVMF}/OVMF_VARS.fd")


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Counting:
    """Wraps the real readers and records every path they were asked to read."""

    def __init__(self):
        self.hashed: list[str] = []
        self.layouts: list[str] = []

    def sha256(self, path):
        self.hashed.append(path)
        return fsio.sha256_file(path)

    def read_layout(self, path):
        self.layouts.append(path)
        return virtfw.read_layout(path)


def test_real_debian_catalog():
    cat = x86_only(load_catalog(DEBIAN_DIRS))
    assert cat.problems == ()
    assert [os.path.basename(b.origin) for b in cat.builds] == [
        "40-edk2-x86_64-secure-enrolled.json",
        "50-edk2-x86_64-secure.json",
        "60-edk2-x86_64.json",
    ]
    expected = [
        ("OVMF_CODE_4M.ms.fd", "OVMF_VARS_4M.ms.fd", True, True),
        ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.fd", True, False),
        ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", False, False),
    ]
    for b, (code, tmpl, secure, enrolled) in zip(cat.builds, expected, strict=True):
        assert b.origin.startswith(FW + "/")
        assert b.mode is MappingMode.SPLIT
        assert (b.code_path, b.template_path) == (f"{OVMF}/{code}", f"{OVMF}/{tmpl}")
        assert (b.code_format, b.template_format) == ("raw", "raw")
        assert b.code_sha256 == digest(b.code_path)
        assert b.template_sha256 == digest(b.template_path)
        assert b.code_size == 3653632 == os.path.getsize(b.code_path)
        assert b.layout == LAYOUT_4M
        assert (b.secure_boot, b.requires_smm, b.enrolled_keys) == (secure, secure, enrolled)
        assert b.interface_types == ("uefi",)
    # the MS code is a symlink to the secboot code: same bytes, different path
    assert cat.builds[0].code_sha256 == cat.builds[1].code_sha256 != cat.builds[2].code_sha256
    assert cat.builds[0].template_sha256 != cat.builds[1].template_sha256 == cat.builds[2].template_sha256
    assert cat.by_code_path(f"{OVMF}/OVMF_CODE_4M.fd") is cat.builds[2]
    assert cat.by_code_sha(cat.builds[0].code_sha256) == [cat.builds[0], cat.builds[1]]


def test_extra_pair_is_appended_as_split_build():
    extra = ExtraFirmware(
        code=f"{DEBIAN12_OVMF}/OVMF_CODE.fd",
        template=f"{DEBIAN12_OVMF}/OVMF_VARS.fd",
        machines=("pc-i440fx-*",),
        features=("acpi-s3",),
    )
    cat = x86_only(load_catalog(DEBIAN_DIRS, [extra]))
    assert cat.problems == ()
    assert len(cat.builds) == 4
    b = cat.builds[3]
    assert b.origin == "config:extra_firmware[0]"
    assert (b.code_path, b.template_path, b.mode) == (extra.code, extra.template, MappingMode.SPLIT)
    assert b.code_size == 1966080
    assert b.layout == LAYOUT_2M
    assert b.code_sha256 == digest(extra.code)
    assert b.template_sha256 == digest(extra.template)
    assert b.targets == (Target("x86_64", ("pc-i440fx-*",)),)
    assert b.features == frozenset({"acpi-s3"})
    assert not b.secure_boot


def test_each_image_is_read_once_per_load(tmp_path):
    c = Counting()
    dirs = (*DEBIAN_DIRS, hide_aarch64(tmp_path / "hide"))
    cat = load_catalog(dirs, [EXTRA_2M], sha256=c.sha256, read_layout=c.read_layout)
    assert len(cat.builds) == 4
    # OVMF_CODE_4M.ms.fd is a symlink to .secboot.fd, and two builds share OVMF_VARS_4M.fd
    # (the 2 MiB pair is Debian 12's: the host's on Debian 12, its unpacked .deb on Debian 13)
    assert sorted(os.path.realpath(p) for p in c.hashed) == sorted(
        [f"{OVMF}/{n}" for n in ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd", "OVMF_VARS_4M.fd", "OVMF_CODE_4M.fd")]
        + [f"{DEBIAN12_OVMF}/{n}" for n in ("OVMF_CODE.fd", "OVMF_VARS.fd")]
    )
    assert sorted(c.layouts) == sorted([f"{OVMF}/OVMF_VARS_4M.ms.fd", f"{OVMF}/OVMF_VARS_4M.fd",
                                        f"{DEBIAN12_OVMF}/OVMF_VARS.fd"])
    # memo is per call: a second load reads again
    load_catalog(dirs, sha256=c.sha256, read_layout=c.read_layout)
    assert len(c.layouts) == 5


def test_copies_are_distinct_files_each_read(tmp_path):
    """The memo is keyed by file identity, not content or name: copies are read separately."""
    img = tmp_path / "img"
    img.mkdir()
    shutil.copy(f"{OVMF}/OVMF_VARS_4M.fd", img / "a.fd")
    shutil.copy(f"{DEBIAN12_OVMF}/OVMF_VARS.fd", img / "b.fd")
    c = Counting()
    cat = load_catalog(
        (),
        [
            ExtraFirmware(f"{OVMF}/OVMF_CODE_4M.fd", str(img / "a.fd")),
            ExtraFirmware(f"{DEBIAN12_OVMF}/OVMF_CODE.fd", str(img / "b.fd")),
        ],
        sha256=c.sha256,
        read_layout=c.read_layout,
    )
    assert [b.layout for b in cat.builds] == [LAYOUT_4M, LAYOUT_2M]
    assert len(c.layouts) == 2


@pytest.fixture
def fw_dirs(tmp_path):
    """A distro dir with Debian's real descriptors and an admin dir full of trouble.

    Images are symlinks to the real ones, so paths are tmp paths but the bytes are real.
    """
    img = tmp_path / "img"
    img.mkdir()
    for name in ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", "OVMF_CODE.fd", "OVMF_VARS.fd"):  # 2 MiB: Debian 12's
        (img / name).symlink_to(f"{OVMF if '_4M' in name else DEBIAN12_OVMF}/{name}")
    (img / "OVMF.fd").symlink_to(UNIFIED_2M_IMAGE)
    usr = tmp_path / "usr"
    shutil.copytree(FW, usr)
    for name in set(os.listdir(usr)) - set(without_aarch64(os.listdir(usr))):
        os.unlink(usr / name)  # these rows are about x86 descriptors (aarch64: test_aarch64.py)
    etc = tmp_path / "etc"
    etc.mkdir()
    files = {
        "10-bad-json.json": "{ this is not json",
        "11-no-mapping.json": json.dumps({"interface-types": ["uefi"], "targets": [], "features": []}),
        "12-no-executable.json": json.dumps(
            {
                "interface-types": ["uefi"],
                "mapping": {"device": "flash"},
                "targets": [],
                "features": [],
            }
        ),
        "13-split-no-template.json": descriptor(img / "OVMF_CODE_4M.fd"),
        "14-bad-targets.json": descriptor(img / "OVMF_CODE_4M.fd", img / "OVMF_VARS_4M.fd").replace(
            '"targets": [{', '"targets": [7, {'
        ),
        "20-dangling-code.json": descriptor(img / "missing_CODE.fd", img / "OVMF_VARS_4M.fd"),
        "21-dangling-template.json": descriptor(img / "OVMF_CODE_4M.fd", img / "missing_VARS.fd"),
        "22-code-as-template.json": descriptor(img / "OVMF_CODE_4M.fd", img / "OVMF_CODE_4M.fd"),
        "23-unified-as-template.json": descriptor(img / "OVMF_CODE.fd", img / "OVMF.fd"),
        "24-template-is-dir.json": descriptor(img / "OVMF_CODE.fd", img),
        "30-memory.json": descriptor(img / "OVMF.fd", device="memory"),
        "31-bios.json": descriptor(img / "OVMF_CODE.fd", img / "OVMF_VARS.fd", interfaces=("bios",)),
        "32-combined.json": descriptor(img / "OVMF.fd", mode="combined", machines=("pc-i440fx-*",)),
        "33-stateless.json": descriptor(img / "OVMF_CODE_4M.fd", mode="stateless"),
        "35-good-2m.json": descriptor(img / "OVMF_CODE.fd", img / "OVMF_VARS.fd"),
        "50-edk2-x86_64-secure.json": "",  # hides Debian's file of that name
    }
    for name, text in files.items():
        (etc / name).write_text(text)
    (etc / "15-dangling-descriptor.json").symlink_to(tmp_path / "nowhere.json")
    return tmp_path, [str(usr), str(etc)]


def test_broken_descriptors_are_problems_and_good_ones_still_load(fw_dirs):
    root, dirs = fw_dirs
    etc, img = root / "etc", root / "img"
    cat = load_catalog(dirs, [ExtraFirmware(str(img / "missing.fd"), str(img / "OVMF_VARS.fd"))])

    problems = {os.path.basename(p.source): p.message for p in cat.problems}
    expected = {
        "10-bad-json.json": "not valid JSON",
        "11-no-mapping.json": "missing 'mapping'",
        "12-no-executable.json": "missing 'mapping.executable'",
        "13-split-no-template.json": "split flash mapping without 'mapping.nvram-template'",
        "14-bad-targets.json": "'targets[0]' must be a JSON object",
        "15-dangling-descriptor.json": "cannot read descriptor: cannot open: no such file or directory",
        "20-dangling-code.json": f"code image {img}/missing_CODE.fd does not exist",
        "21-dangling-template.json": f"varstore template {img}/missing_VARS.fd does not exist",
        "22-code-as-template.json": "not usable as a varstore template",
        "23-unified-as-template.json": "is 2097152 bytes but its varstore is 131072 bytes",
        "24-template-is-dir.json": "is not a regular file",
        "config:extra_firmware[0]": f"code image {img}/missing.fd does not exist",
    }
    assert set(problems) == set(expected)
    for name, fragment in expected.items():
        assert fragment in problems[name], (name, problems[name])
    for p in cat.problems:  # every message names its source
        assert p.message.startswith(("firmware descriptor " + p.source, p.source))
    assert "OVMF_CODE_4M.fd: not an edk2 varstore" in problems["22-code-as-template.json"]

    # valid but unusable (memory device, BIOS) are skipped quietly; 50 is hidden by the empty /etc file
    assert [(os.path.basename(b.origin), b.mode, b.layout) for b in cat.builds] == [
        ("32-combined.json", MappingMode.COMBINED, None),
        ("33-stateless.json", MappingMode.STATELESS, None),
        ("35-good-2m.json", MappingMode.SPLIT, LAYOUT_2M),
        ("40-edk2-x86_64-secure-enrolled.json", MappingMode.SPLIT, LAYOUT_4M),
        ("60-edk2-x86_64.json", MappingMode.SPLIT, LAYOUT_4M),
    ]
    combined, stateless, good = cat.builds[:3]
    assert combined.origin == str(etc / "32-combined.json")
    assert (combined.code_size, combined.code_sha256) == (2097152, digest(UNIFIED_2M_IMAGE))
    assert combined.template_path is combined.template_sha256 is None
    assert (stateless.code_size, stateless.template_path) == (3653632, None)
    assert (good.code_size, good.code_sha256) == (1966080, digest(f"{DEBIAN12_OVMF}/OVMF_CODE.fd"))
    assert good.template_sha256 == digest(f"{DEBIAN12_OVMF}/OVMF_VARS.fd")


def test_reader_failures_never_raise(fw_dirs):
    _, dirs = fw_dirs

    def exploding_layout(path):
        raise RuntimeError("library surprise")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", path)

    cat = load_catalog(dirs, read_layout=exploding_layout)
    assert not any(b.mode is MappingMode.SPLIT for b in cat.builds)
    assert any("unexpected error: library surprise" in p.message for p in cat.problems)

    cat = load_catalog(dirs, sha256=unreadable)
    assert cat.builds == ()
    assert any("cannot read code image" in p.message and "Permission denied" in p.message for p in cat.problems)


def test_no_dirs_no_builds():
    cat = load_catalog(["/nonexistent/firmware"])
    assert cat.builds == () and cat.problems == ()


def test_qcow2_builds_are_skipped_quietly_not_problems(tmp_path):
    """Fedora/RHEL ship qcow2 descriptors beside the raw ones: not a problem on such a host."""
    d = tmp_path / "firmware"
    d.mkdir()
    (d / "30-edk2-ovmf-4m-qcow2-x64-sb-enrolled.json").write_text(json.dumps({
        "description": "qcow2 build", "interface-types": ["uefi"],
        "mapping": {"device": "flash", "mode": "split",
                    "executable": {"filename": "/usr/share/edk2/ovmf/OVMF_CODE_4M.secboot.qcow2", "format": "qcow2"},
                    "nvram-template": {"filename": "/usr/share/edk2/ovmf/OVMF_VARS_4M.secboot.qcow2",
                                       "format": "qcow2"}},
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
        "features": ["secure-boot", "requires-smm"], "tags": [],
    }))
    catalog = x86_only(load_catalog(["/usr/share/qemu/firmware", str(d)]))
    assert catalog.problems == ()
    assert [b.origin.rsplit("/", 1)[1] for b in catalog.builds] == [
        "40-edk2-x86_64-secure-enrolled.json", "50-edk2-x86_64-secure.json", "60-edk2-x86_64.json"]


# -- issue 12: hostile descriptors ---------------------------------------------------


def _one_problem(tmp_path, name: str, text: str, extra=()):
    d = tmp_path / "fw"
    d.mkdir()
    (d / name).write_text(text)
    cat = load_catalog([str(d)], list(extra))
    return cat, {os.path.basename(p.source): p.message for p in cat.problems}


def test_mismatched_code_and_template_is_a_catalog_problem(tmp_path):
    """#12 defect 4: 4 MiB code with the 2 MiB OVMF_VARS.fd is no build's pair, never used."""
    cat, problems = _one_problem(tmp_path, "50-bad-pair.json",
                                 descriptor(f"{OVMF}/OVMF_CODE_4M.fd", f"{DEBIAN12_OVMF}/OVMF_VARS.fd"))
    assert cat.builds == ()
    assert "are not one build's pair" in problems["50-bad-pair.json"]
    assert "fix the descriptor" in problems["50-bad-pair.json"]
    # the same for an extra_firmware pair the other way round
    cat = load_catalog([], [ExtraFirmware(f"{DEBIAN12_OVMF}/OVMF_CODE.fd", f"{OVMF}/OVMF_VARS_4M.fd")])
    assert cat.builds == () and "not one build's pair" in cat.problems[0].message


def test_deeply_nested_descriptor_is_a_problem_not_a_recursion_error(tmp_path):
    """#12 defect 3: '[' * 1000 + ']' * 1000 among the descriptors."""
    cat, problems = _one_problem(tmp_path, "10-deep.json", "[" * 1000 + "]" * 1000)
    assert "nested too deeply" in problems["10-deep.json"]
    (tmp_path / "x").mkdir()
    cat, problems = _one_problem(tmp_path / "x", "10-bigint.json", "[" + "9" * 5000 + "]")
    assert "not a usable JSON document" in problems["10-bigint.json"]


def test_nul_in_filename_is_a_plain_descriptor_error(tmp_path, caplog):
    """#12 defect 10: caught before any os call, with no traceback logged."""
    text = descriptor(f"{OVMF}/OVMF_CODE_4M.fd\0evil", f"{OVMF}/OVMF_VARS_4M.fd")
    with caplog.at_level("DEBUG"):
        cat, problems = _one_problem(tmp_path, "20-nul.json", text)
    assert "contains a NUL byte" in problems["20-nul.json"]
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]


# -- aarch64: blank templates ---------------------------------------------------------


def _arm(code, template) -> str:
    doc = json.loads(descriptor(code, template))
    doc["targets"] = [{"architecture": "aarch64", "machines": ["virt-*"]}]
    return json.dumps(doc)


def test_a_blank_template_alone_is_a_problem_not_a_build(tmp_path):
    """Without a formatted template of the same code nothing says which layout the code formats."""
    from aavmf_files import CODE, blank_flash

    d = tmp_path / "fw"
    d.mkdir()
    (d / "60-arm.json").write_text(_arm(CODE, blank_flash(tmp_path / "VARS.fd")))
    cat = load_catalog([str(d)])
    assert cat.builds == ()
    (problem,) = cat.problems
    assert "is blank flash" in problem.message and "does not offer it" in problem.message


def test_a_blank_template_is_never_taken_for_x86(tmp_path):
    """OVMF needs a formatted varstore: on x86 a blank file is no template at all."""
    from aavmf_files import blank_flash

    d = tmp_path / "fw"
    d.mkdir()
    (d / "60-x86.json").write_text(descriptor(f"{OVMF}/OVMF_CODE_4M.fd", blank_flash(tmp_path / "VARS.fd")))
    (problem,) = load_catalog([str(d)]).problems
    assert "not usable as a varstore template" in problem.message


def test_a_broken_distro_descriptor_says_how_to_hide_it(fw_dirs):
    """A descriptor in a lower-precedence directory is not the admin's to fix (Debian 12's
    50-edk2-aarch64-secure.json names a file its package lacks): the problem says which empty
    file hides it; the admin's own broken files (highest directory) get no such advice."""
    root, dirs = fw_dirs
    usr, etc = dirs
    (Path(usr) / "70-vendor-broken.json").write_text(descriptor(root / "img" / "vendor_CODE.fd",
                                                                root / "img" / "OVMF_VARS_4M.fd"))
    cat = load_catalog(dirs)
    problems = {os.path.basename(p.source): p.message for p in cat.problems}
    assert problems["70-vendor-broken.json"].endswith(
        f"does not exist; to hide it from varsd and libvirt, create an empty {etc}/70-vendor-broken.json")
    assert "to hide it" not in problems["20-dangling-code.json"]
    (Path(etc) / "70-vendor-broken.json").write_text("")
    assert "70-vendor-broken.json" not in {os.path.basename(p.source) for p in load_catalog(dirs).problems}
