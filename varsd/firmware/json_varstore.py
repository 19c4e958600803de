"""QEMU's JSON varstores (the `uefi-vars` device; libvirt 12.1+ `<os><varstore>`).

QEMU keeps a guest's non-volatile variables in a JSON file when its firmware talks to
the `uefi-vars-x64` device instead of a pflash varstore. The format is QEMU's
`UefiVarStore` (qapi/uefi.json, shared with virt-firmware and python-uefivars):
`{"version": 2, "variables": [{"guid", "name", "attr", "data", optional "time",
"digest"}]}`, data as hex.

Why varsd reads it: QEMU starts a guest whose JSON file is missing or empty with no
variables at all, so a Secure Boot guest comes up without PK/KEK/db. Such a file is
therefore provisioned from the domain's template before the guest is started, and a
template that is not a JSON varstore is refused (naming the file) instead of copied.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum

from varsd.errors import VarstoreError

VERSION = 2
_HEX = re.compile(r"^(?:[0-9a-fA-F]{2})*$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class JsonState(StrEnum):
    """What is at a domain's `<varstore path>`, as `status` reports it."""

    MISSING = "missing"
    EMPTY = "empty"  # zero bytes: QEMU would treat it as a store without variables
    VALID = "valid"
    INVALID = "invalid"


@dataclass(frozen=True)
class JsonVarstore:
    """A parsed JSON varstore: how many variables, and their names (`guid:name`)."""

    variables: tuple[str, ...]


def parse(data: bytes, path: str) -> JsonVarstore:
    """`data` as a JSON varstore, or VarstoreError naming `path` and what is wrong."""
    def bad(why: str) -> VarstoreError:
        return VarstoreError(f"{path}: not a QEMU JSON varstore ({why})")

    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise bad("the top level is not an object")
    if doc.get("version") != VERSION:
        raise bad(f"version {doc.get('version')!r}, expected {VERSION}")
    variables = doc.get("variables")
    if not isinstance(variables, list):
        raise bad("no 'variables' list")
    names = []
    for i, var in enumerate(variables):
        if not isinstance(var, dict):
            raise bad(f"variable {i} is not an object")
        guid, name, attr, value = var.get("guid"), var.get("name"), var.get("attr"), var.get("data")
        if not isinstance(guid, str) or not _GUID.match(guid):
            raise bad(f"variable {i}: guid {guid!r} is not a GUID")
        if not isinstance(name, str) or not name:
            raise bad(f"variable {i}: no name")
        if not isinstance(attr, int) or isinstance(attr, bool) or not 0 <= attr < 1 << 32:
            raise bad(f"variable {i} ({name}): attr {attr!r} is not a 32-bit attribute mask")
        if not isinstance(value, str) or not _HEX.match(value):
            raise bad(f"variable {i} ({name}): data is not hex")
        names.append(f"{guid.lower()}:{name}")
    return JsonVarstore(variables=tuple(names))


def facts_of(path: str, data: bytes | None) -> JsonFileFacts:
    """The state of the file at a `<varstore path>` from its bytes (None: no such file)."""
    if data is None:
        return JsonFileFacts(path, JsonState.MISSING)
    if not data:
        return JsonFileFacts(path, JsonState.EMPTY)
    try:
        parse(data, path)
    except VarstoreError as exc:
        return JsonFileFacts(path, JsonState.INVALID, str(exc))
    return JsonFileFacts(path, JsonState.VALID)


@dataclass(frozen=True)
class JsonFileFacts:
    """What the engine found at a domain's `<varstore path>` (the planner's input)."""

    path: str
    state: JsonState
    problem: str | None = None  # why it is INVALID (or could not be read)
