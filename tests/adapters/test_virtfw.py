"""virtfw: real OVMF images parse, bad input is a VarstoreError, migration keeps every variable."""

from __future__ import annotations

import logging
import os
import signal
import struct
import uuid

import pytest
from ovmf_files import (  # tests/ is on the import path (see ovmf_files)
    CODE_2M,
    CODE_4M,
    LAYOUT_2M,
    LAYOUT_4M,
    UNIFIED,
    VARS_2M,
    VARS_2M_MS,
    VARS_4M,
    VARS_4M_MS,
)
from ovmf_files import EFI_GLOBAL as GLOBAL
from support.varstores import read_variables

from varsd.adapters import virtfw
from varsd.adapters.virtfw import EfiVariable
from varsd.errors import VarstoreError

VENDOR = "2d3a1f3e-5b0c-4d6a-9e57-8c0f7a1b2c3d"


def _write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("path", "layout"),
    [
        (VARS_2M, LAYOUT_2M),
        (VARS_2M_MS, LAYOUT_2M),
        (VARS_4M, LAYOUT_4M),
        (VARS_4M_MS, LAYOUT_4M),
        (UNIFIED, LAYOUT_2M),
    ],
)
def test_layouts_of_real_images(path, layout):
    assert virtfw.read_layout(path) == layout
    with open(path, "rb") as f:
        assert virtfw.layout_of_bytes(f.read(), path) == layout


def test_unified_image_is_template_plus_code():
    """The fact read_layout's unified-image semantics rest on (domain brief, section 1)."""
    unified = open(UNIFIED, "rb").read()
    assert unified == open(VARS_2M, "rb").read() + open(CODE_2M, "rb").read()


def _ffs_loop_image() -> bytes:
    # A firmware volume header claiming length 0: virt-firmware's own scan never ends on it.
    head = bytearray(4096)
    head[16:32] = uuid.UUID("8c8ce578-8a3d-4f1c-9935-896185c32dd3").bytes_le
    return bytes(head)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda: open(CODE_2M, "rb").read(), id="code-2m"),
        pytest.param(lambda: open(CODE_4M, "rb").read(), id="code-4m"),
        pytest.param(lambda: os.urandom(131072), id="random"),
        pytest.param(lambda: b"", id="empty"),
        pytest.param(lambda: open(VARS_2M, "rb").read()[:100000], id="truncated-varstore"),
        pytest.param(lambda: open(VARS_4M, "rb").read()[:200], id="truncated-header"),
        pytest.param(_ffs_loop_image, id="zero-length-volume"),
    ],
)
def test_not_a_varstore_is_a_varstore_error(tmp_path, content):
    path = _write(tmp_path, "bad.fd", content())
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("parser did not terminate"))
    signal.alarm(10)
    try:
        with pytest.raises(VarstoreError) as info:
            virtfw.read_layout(path)
        with pytest.raises(VarstoreError):
            read_variables(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert path in str(info.value)


def test_missing_file_is_a_varstore_error_naming_it(tmp_path):
    path = str(tmp_path / "missing.fd")
    with pytest.raises(VarstoreError, match="no such file") as info:
        read_variables(path)
    assert path in str(info.value)


def test_library_does_not_log_to_the_root_logger(tmp_path, caplog):
    handlers = list(logging.getLogger().handlers)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(VarstoreError):
        virtfw.read_layout(CODE_2M)
    read_variables(VARS_4M_MS)
    assert [r for r in caplog.records if r.name == "root"] == []
    assert logging.getLogger().handlers == handlers


def test_read_variables_of_real_templates():
    assert read_variables(VARS_4M) == {}
    ms = read_variables(VARS_4M_MS)
    pk = ms[f"{GLOBAL}:PK"]
    assert pk.attr == 0x27 and len(pk.data) > 0
    assert all(key == f"{v.guid}:{v.name}" for key, v in ms.items())


def test_read_variables_shows_a_modified_variable(tmp_path):
    blob = virtfw.with_variable(VARS_4M, "VarsdTest", VENDOR, b"hello varsd", attr=0x3)
    path = _write(tmp_path, "vm_VARS.fd", blob)
    got = read_variables(path)
    assert got == {f"{VENDOR}:VarsdTest": EfiVariable("VarsdTest", VENDOR, 0x3, b"hello varsd")}
    assert virtfw.read_layout(path) == LAYOUT_4M

    blob = virtfw.with_variable(path, "BootOrder", GLOBAL, struct.pack("<3H", 2, 0, 1))
    path2 = _write(tmp_path, "vm2_VARS.fd", blob)
    got2 = read_variables(path2)
    assert got2[f"{GLOBAL}:BootOrder"].data == b"\x02\x00\x00\x00\x01\x00"
    assert got2[f"{GLOBAL}:BootOrder"].attr == virtfw.ATTR_NV_BS_RT
    assert got2[f"{VENDOR}:VarsdTest"] == got[f"{VENDOR}:VarsdTest"]


def test_same_name_under_two_guids_are_two_variables(tmp_path):
    blob = virtfw.with_variables(
        VARS_2M,
        [EfiVariable("Twin", VENDOR, 0x7, b"vendor"), EfiVariable("Twin", GLOBAL, 0x7, b"global")],
    )
    got = read_variables(_write(tmp_path, "v.fd", blob))
    assert got[f"{VENDOR}:Twin"].data == b"vendor"
    assert got[f"{GLOBAL}:Twin"].data == b"global"


def _record_state_offset(blob: bytes, name: str) -> int:
    at = blob.index(name.encode("utf-16le") + b"\0\0")
    return at - 60 + 2  # the record header is 60 bytes; State is its third byte


def test_edk2_record_states(tmp_path):
    blob = bytearray(virtfw.with_variable(VARS_2M, "VarsdTest", VENDOR, b"x"))
    state = _record_state_offset(blob, "VarsdTest")
    assert blob[state] == 0x3F
    blob[state] = 0x3E  # ADDED & IN_DELETED_TRANSITION with no newer copy: still live in edk2
    assert f"{VENDOR}:VarsdTest" in read_variables(_write(tmp_path, "t.fd", bytes(blob)))
    blob[state] = 0x3C  # DELETED
    assert read_variables(_write(tmp_path, "d.fd", bytes(blob))) == {}


def test_read_variables_of_a_unified_image_prefix(tmp_path):
    vars_blob = virtfw.with_variable(VARS_2M, "VarsdTest", VENDOR, b"in the image")
    unified = _write(tmp_path, "vm.fd", vars_blob + open(CODE_2M, "rb").read())
    got = read_variables(unified, 131072)
    assert got == read_variables(_write(tmp_path, "v.fd", vars_blob))
    assert f"{VENDOR}:VarsdTest" in got
    with pytest.raises(VarstoreError, match="only"):
        read_variables(_write(tmp_path, "short.fd", vars_blob[:1000]), 131072)


def test_migrate_2m_to_4m_keeps_every_variable(tmp_path):
    src_blob = virtfw.with_variables(
        VARS_2M_MS,
        [
            EfiVariable("VarsdTest", VENDOR, 0x7, b"keep me"),
            EfiVariable("BootOrder", GLOBAL, 0x7, struct.pack("<2H", 1, 0)),
        ],
    )
    src = _write(tmp_path, "vm_VARS.fd", src_blob)
    before = open(src, "rb").read()
    blob = virtfw.migrate_variables(src, VARS_4M)
    assert len(blob) == 540672
    out = _write(tmp_path, "vm_VARS_4M.fd", blob)
    assert virtfw.read_layout(out) == LAYOUT_4M
    src_vars = read_variables(src)
    assert len(src_vars) >= 6  # PK, KEK, db, dbx, ... plus ours
    assert read_variables(out) == src_vars
    assert open(src, "rb").read() == before  # the source is only read


def test_migrate_4m_to_2m_when_it_fits():
    blob = virtfw.migrate_variables(VARS_4M_MS, VARS_2M)
    assert virtfw.layout_of_bytes(blob, "migrated") == LAYOUT_2M
    assert virtfw.variables_of_bytes(blob, "migrated") == read_variables(VARS_4M_MS)


def test_migrate_into_a_template_too_small_raises(tmp_path):
    big = [EfiVariable(f"VarsdBig{i}", VENDOR, 0x7, bytes([i]) * 8192) for i in range(10)]
    src = _write(tmp_path, "stuffed.fd", virtfw.with_variables(VARS_4M, big))
    assert len(read_variables(src)) == 10
    with pytest.raises(VarstoreError, match="room for only") as info:
        virtfw.migrate_variables(src, VARS_2M)
    assert src in str(info.value) and VARS_2M in str(info.value)


def test_with_variables_that_do_not_fit_raise():
    huge = [EfiVariable(f"VarsdHuge{i}", VENDOR, 0x7, b"\0" * 30000) for i in range(2)]
    with pytest.raises(VarstoreError, match="room for only"):
        virtfw.with_variables(VARS_2M, huge)


def test_with_variable_rejects_a_bad_guid():
    with pytest.raises(VarstoreError, match="not a GUID"):
        virtfw.with_variable(VARS_2M, "X", "not-a-guid", b"")
