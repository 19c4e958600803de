"""QEMU firmware descriptors (QEMU's docs/interop/firmware.json), parsed and ordered.

Rules this module implements, as QEMU's spec and libvirt (qemu_interop_config.c,
qemu_firmware.c) do:

- Descriptors are `*.json` files in a list of directories given lowest precedence
  first (default: /usr/share/qemu/firmware, then /etc/qemu/firmware). A file in a
  later directory replaces a same-named file in an earlier one; a zero-length file
  hides the name altogether. Names starting with "." are ignored.
- The surviving files are sorted by file name (byte order, like libvirt's strcmp);
  consumers take the first descriptor that matches.
- `mapping.mode` absent means `split` (the historical default); a split build must
  name an `nvram-template`, combined and stateless builds have none.
- `memory` and `kernel` devices are valid descriptors but not flash, so varsd cannot
  use them; parsing them is not an error.
- Builds whose variables live in the host (QEMU's `uefi-vars` device, libvirt 12.1+
  `<varstore>`) are never pflash builds, whatever their mapping says: the feature
  `host-uefi-vars` (x86: a `memory` mapping of a ROM; aarch64: a stateless flash), or
  a `uefi-vars` device as early drafts of the spec named it. They are read, and kept
  out of every pflash decision.
- Unknown feature names are kept verbatim (new QEMU versions add features); `tags`
  is ignored.

Pure: parsing and ordering only. Listing the directories on disk is catalog loading
(`varsd.firmware.catalog.list_descriptor_paths`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from varsd.errors import DescriptorError
from varsd.model.firmware import MappingMode, Target

DEVICES = ("flash", "memory", "kernel", "uefi-vars")
HOST_UEFI_VARS = "host-uefi-vars"


@dataclass(frozen=True)
class Descriptor:
    """One parsed descriptor file; `path` is the descriptor's own path, for reports."""

    path: str
    description: str
    interface_types: tuple[str, ...]
    device: str
    mode: MappingMode | None  # None unless device is flash
    executable_path: str
    executable_format: str | None  # None for memory/kernel devices (no format field)
    template_path: str | None = None  # only for split flash builds
    template_format: str | None = None
    features: frozenset[str] = frozenset()
    targets: tuple[Target, ...] = ()

    @property
    def uses_host_varstore(self) -> bool:
        """Variables kept by QEMU's uefi-vars device in a JSON file, not in a flash varstore."""
        return HOST_UEFI_VARS in self.features or self.device == "uefi-vars"

    @property
    def is_uefi_flash(self) -> bool:
        """Whether varsd can use it at all: a UEFI build mapped as pflash, variables in flash."""
        return "uefi" in self.interface_types and self.device == "flash" and not self.uses_host_varstore


def _fail(path: str, msg: str) -> DescriptorError:
    return DescriptorError(f"firmware descriptor {path}: {msg}")


def _str(obj: Mapping[str, object], key: str, path: str, where: str) -> str:
    value = obj.get(key)
    if value is None:
        raise _fail(path, f"missing '{key}' in {where}")
    if not isinstance(value, str) or not value:
        raise _fail(path, f"'{key}' in {where} must be a non-empty string")
    return value


def _str_list(obj: Mapping[str, object], key: str, path: str, where: str) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        raise _fail(path, f"missing '{key}' in {where}")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, f"'{key}' in {where} must be a list of strings")
    return tuple(value)


def _object(value: object, path: str, where: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise _fail(path, f"{where} must be a JSON object")
    return value


def _file(mapping: Mapping[str, object], key: str, path: str) -> tuple[str, str]:
    """A `{filename, format}` flash file; QEMU requires an absolute filename."""
    if key not in mapping:
        raise _fail(path, f"missing 'mapping.{key}'")
    obj = _object(mapping[key], path, f"'mapping.{key}'")
    filename = _str(obj, "filename", path, f"'mapping.{key}'")
    if "\0" in filename:
        raise _fail(path, f"'mapping.{key}.filename' contains a NUL byte, which no file name can hold")
    if not os.path.isabs(filename):
        raise _fail(path, f"'mapping.{key}.filename' must be an absolute path, got {filename!r}")
    return filename, _str(obj, "format", path, f"'mapping.{key}'")


def _targets(doc: Mapping[str, object], path: str) -> tuple[Target, ...]:
    raw = doc.get("targets")
    if raw is None:
        raise _fail(path, "missing 'targets'")
    if not isinstance(raw, list):
        raise _fail(path, "'targets' must be a list")
    out = []
    for i, item in enumerate(raw):
        where = f"'targets[{i}]'"
        obj = _object(item, path, where)
        out.append(Target(_str(obj, "architecture", path, where), _str_list(obj, "machines", path, where)))
    return tuple(out)


MAX_NESTING = 32  # real descriptors nest 3 levels; the spec's deepest shape is 4


def _nesting(doc: object) -> int:
    """How deeply lists and objects nest in a parsed JSON document (iteratively: no recursion)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_NESTING:
            stack.extend((c, depth + 1) for c in children)
    return deepest


def parse_descriptor(text: str | bytes, path: str) -> Descriptor:
    """Parse one descriptor's content; raise DescriptorError naming `path` and the fault.

    Like libvirt, `interface-types`, `mapping`, `targets` and `features` are required:
    a descriptor libvirt rejects must not be offered by varsd either.
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise _fail(path, f"not valid UTF-8 text: {exc.reason}") from None
    except RecursionError:
        # e.g. '[' * 1000 + ']' * 1000: no real descriptor nests more than a few levels
        raise _fail(path, "nested too deeply to be a firmware descriptor") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise _fail(path, f"not a usable JSON document: {exc}") from None
    if _nesting(doc) > MAX_NESTING:  # Python 3.13's parser takes 1000 levels without a RecursionError
        raise _fail(path, "nested too deeply to be a firmware descriptor")
    doc = _object(doc, path, "the document")

    description = doc.get("description", "")
    if not isinstance(description, str):
        raise _fail(path, "'description' must be a string")
    interfaces = _str_list(doc, "interface-types", path, "the document")

    if "mapping" not in doc:
        raise _fail(path, "missing 'mapping'")
    mapping = _object(doc["mapping"], path, "'mapping'")
    if "device" not in mapping:
        raise _fail(path, "missing 'mapping.device'")
    device = mapping["device"]
    if device not in DEVICES:
        raise _fail(path, f"unknown 'mapping.device' {device!r}; expected one of {', '.join(DEVICES)}")

    mode: MappingMode | None = None
    template: tuple[str | None, str | None] = (None, None)
    if device == "flash":
        raw_mode = mapping.get("mode", MappingMode.SPLIT.value)
        try:
            mode = MappingMode(raw_mode)
        except ValueError:
            known = ", ".join(m.value for m in MappingMode)
            raise _fail(path, f"unknown 'mapping.mode' {raw_mode!r}; expected one of {known}") from None
        exe_path, exe_format = _file(mapping, "executable", path)
        if mode is MappingMode.SPLIT:
            if "nvram-template" not in mapping:
                raise _fail(path, "split flash mapping without 'mapping.nvram-template'")
            template = _file(mapping, "nvram-template", path)
    else:
        exe_path = _str(mapping, "filename", path, "'mapping'")
        if "\0" in exe_path:
            raise _fail(path, "'mapping.filename' contains a NUL byte, which no file name can hold")
        exe_format = None

    features = _str_list(doc, "features", path, "the document")
    return Descriptor(
        path=path,
        description=description,
        interface_types=interfaces,
        device=str(device),
        mode=mode,
        executable_path=exe_path,
        executable_format=exe_format,
        template_path=template[0],
        template_format=template[1],
        features=frozenset(features),
        targets=_targets(doc, path),
    )


def ordered_descriptor_paths(listings: Mapping[str, Sequence[tuple[str, int]]], dirs: Sequence[str]) -> list[str]:
    """Effective descriptor paths, first match first (pure; see the module rules).

    `dirs` is lowest precedence first; `listings[dir]` holds (file name, size) pairs
    and a directory absent from `listings` has no files.
    """
    winner: dict[str, tuple[str, int]] = {}
    for d in dirs:
        for name, size in listings.get(d, ()):
            if name.endswith(".json") and not name.startswith("."):
                winner[name] = (d, size)
    return [
        os.path.join(winner[name][0], name)
        for name in sorted(winner, key=lambda n: n.encode("utf-8", "surrogateescape"))
        if winner[name][1] != 0
    ]

