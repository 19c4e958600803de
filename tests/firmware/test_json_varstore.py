"""QEMU's JSON varstores (uefi-vars): what counts as one, and the states `status` reports."""

from __future__ import annotations

import json

import pytest

from varsd.errors import VarstoreError
from varsd.firmware.json_varstore import JsonState, facts_of, parse

GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
GOOD = {"version": 2, "variables": [
    {"name": "BootOrder", "guid": GLOBAL, "attr": 7, "data": "0100"},
    {"name": "PK", "guid": GLOBAL, "attr": 39, "data": "", "time": "2024-01-01T00:00:00Z", "digest": "00"},
]}


def _doc(**change) -> bytes:
    doc = json.loads(json.dumps(GOOD))
    for key, value in change.items():
        if key.startswith("var0_"):
            doc["variables"][0][key[5:]] = value
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def test_a_varstore_as_virt_firmware_and_qemu_write_it_parses() -> None:
    assert parse(_doc(), "/t.json").variables == (f"{GLOBAL}:BootOrder", f"{GLOBAL}:PK")


@pytest.mark.parametrize(("data", "why"), [
    (b"\xff\xfe\x00", "not JSON"),
    (b"{\"version\": 2, ", "not JSON"),
    (b"[]", "top level is not an object"),
    (_doc(version=1), "version 1, expected 2"),
    (_doc(variables={}), "no 'variables' list"),
    (_doc(var0_guid="8be4df61"), "is not a GUID"),
    (_doc(var0_name=""), "no name"),
    (_doc(var0_attr="7"), "not a 32-bit attribute mask"),
    (_doc(var0_attr=True), "not a 32-bit attribute mask"),
    (_doc(var0_attr=1 << 32), "not a 32-bit attribute mask"),
    (_doc(var0_data="0x01"), "data is not hex"),
    (_doc(var0_data="012"), "data is not hex"),
    # an edk2 pflash varstore is not a JSON one (the usual mix-up of template files)
    (b"\x00" * 16 + b"\x8d\x2b\xf1\xff\x96\x76\x8b\x4c", "not JSON"),
])
def test_anything_else_is_refused_naming_the_file(data: bytes, why: str) -> None:
    with pytest.raises(VarstoreError) as err:
        parse(data, "/usr/share/OVMF/OVMF.qemuvars.json")
    assert str(err.value).startswith("/usr/share/OVMF/OVMF.qemuvars.json: not a QEMU JSON varstore (")
    assert why in str(err.value)


@pytest.mark.parametrize(("data", "state"), [
    (None, JsonState.MISSING), (b"", JsonState.EMPTY), (_doc(), JsonState.VALID), (b"{}", JsonState.INVALID)])
def test_states(data: bytes | None, state: JsonState) -> None:
    facts = facts_of("/v/g.json", data)
    assert (facts.path, facts.state) == ("/v/g.json", state)
    assert (facts.problem is not None) == (state is JsonState.INVALID)
