"""Per-variable diffs over Debian's real varstores, decoded the way an admin reads them."""

from __future__ import annotations

import struct

from ovmf_files import EFI_GLOBAL, VARS_4M, VARS_4M_MS
from support.varstores import read_variables

from varsd.adapters import virtfw
from varsd.adapters.virtfw import EfiVariable
from varsd.planning.varstore_diff import Change, diff_variables


def _load_option(title: str, path: str) -> bytes:
    file_path = (path + "\0").encode("utf-16-le")
    node = bytes([4, 4]) + (4 + len(file_path)).to_bytes(2, "little") + file_path
    dp = node + b"\x7f\xff\x04\x00"
    return struct.pack("<LH", 1, len(dp)) + (title + "\0").encode("utf-16-le") + dp


def test_enrolled_keys_are_shown_by_certificate_subject():
    plain, ms = read_variables(VARS_4M), read_variables(VARS_4M_MS)
    diff = {d.name: d for d in diff_variables(plain, ms, virtfw.describe_variable)}
    assert diff["db"].change is Change.ADDED
    assert "CN=Microsoft Corporation UEFI CA 2011" in diff["db"].new
    assert "CN=Microsoft Corporation KEK CA 2011" in diff["KEK"].new
    assert list(diff)[:1] != ["db"]  # boot variables come first


def test_boot_entries_and_boot_order_are_decoded():
    old = virtfw.variables_of_bytes(virtfw.with_variables(VARS_4M, [
        EfiVariable("Boot0003", EFI_GLOBAL, 7, _load_option("debian", r"\EFI\debian\shimx64.efi")),
        EfiVariable("BootOrder", EFI_GLOBAL, 7, struct.pack("<2H", 3, 1)),
    ]), "old")
    new = virtfw.variables_of_bytes(virtfw.with_variables(VARS_4M, [
        EfiVariable("BootOrder", EFI_GLOBAL, 7, struct.pack("<H", 1)),
    ]), "new")
    diff = {d.name: d for d in diff_variables(old, new, virtfw.describe_variable)}
    assert diff["Boot0003"].change is Change.REMOVED
    assert "title='debian'" in diff["Boot0003"].old and "shimx64.efi" in diff["Boot0003"].old
    assert diff["BootOrder"].old == "[Boot0003, Boot0001]" and diff["BootOrder"].new == "[Boot0001]"
    assert diff["BootOrder"].line() == "~ BootOrder: [Boot0003, Boot0001]  ->  [Boot0001]"


def test_equal_stores_have_no_diff_and_odd_data_never_raises():
    v = read_variables(VARS_4M)
    assert diff_variables(v, v, virtfw.describe_variable) == []
    odd = EfiVariable("Boot0001", EFI_GLOBAL, 7, b"\x01")
    assert virtfw.describe_variable(odd) == "01"
