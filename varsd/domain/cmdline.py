"""Firmware handed to QEMU through `<qemu:commandline>`: what QEMU will map (pure).

Theory of operation: the arguments are read the way QEMU's x86 machine reads them,
and the result says which images pflash unit 0 and unit 1 hold (or the `-bios` ROM),
which arguments carry that firmware, and whether anything there is beyond what
varsd fully understands. A repair removes exactly the arguments listed and moves
their meaning into libvirt's own `<loader>`/`<nvram>`; every other argument is kept,
in order. Anything not fully understood is a `problem`: the domain is reported and
never half-rewritten.

QEMU rules this follows (QEMU 7.2 to 11.1, `hw/i386/pc_sysfw.c`, `softmmu/vl.c`):
- Options are `-name VALUE` or `--name VALUE`; values are `key=value,...` lists in
  which `,,` is a literal comma (`-blockdev` also takes JSON).
- `-bios FILE`: the last one wins. It is ignored when pflash unit 0 is set: a pflash
  drive or `-machine pflash0=` makes the machine boot from flash.
- `-pflash FILE` is `-drive if=pflash,file=FILE`. A pflash `-drive` without `unit=` /
  `index=` takes the lowest free unit, in command-line order; a unit used twice is an
  error QEMU refuses to start with.
- `-blockdev` nodes (a `raw` format node over a `file` node, or a `file` node alone)
  wired with `-machine pflash0=NODE,pflash1=NODE` (or `-M`). A `-drive if=pflash`
  together with `-machine pflash0=` is refused by QEMU ("clashes with -machine").
- `-global driver=cfi.pflash01,property=secure,value=on` (or
  `-global cfi.pflash01.secure=on`) is what libvirt's `<loader secure='yes'>` emits:
  SMM-protected flash.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

# Options whose value is the next argument (only those this module reads).
_VALUED = frozenset({"bios", "pflash", "drive", "blockdev", "machine", "M", "global", "set", "device", "L"})
# -drive keys a pflash drive may carry that do not change what the guest sees.
_DRIVE_KEYS = frozenset({"if", "file", "format", "readonly", "read-only", "unit", "index", "bus", "id",
                         "cache", "aio", "discard", "media", "auto-read-only", "werror", "rerror"})
_BLOCKDEV_KEYS = frozenset({"driver", "node-name", "file", "filename", "read-only", "auto-read-only",
                            "discard", "cache.direct", "cache.no-flush", "locking", "aio", "force-share"})
_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})


@dataclass(frozen=True)
class CmdlineFirmware:
    """What `<qemu:commandline>` hands QEMU as firmware.

    `code`/`varstore` are pflash units 0 and 1 (`bios` the ROM when no pflash is
    set); `remove` the indexes of the arguments that carry them (option and value),
    `rewrite` arguments that stay but lose firmware properties (a `-machine` value
    without `pflash0=`/`pflash1=`). `problem` says what is not understood.
    """

    bios: str | None = None
    code: str | None = None
    code_readonly: bool = False
    varstore: str | None = None
    secure: bool = False
    remove: frozenset[int] = frozenset()
    rewrite: tuple[tuple[int, str], ...] = ()
    problem: str | None = None
    ignored_bios: tuple[str, ...] = field(default=())  # -bios values QEMU will not use

    @property
    def pflash(self) -> bool:
        return self.code is not None

    @property
    def present(self) -> bool:
        """Whether any firmware argument is there (something a repair removes or a problem)."""
        return bool(self.remove or self.rewrite or self.problem)


def split_options(text: str) -> list[tuple[str, str | None]]:
    """QEMU's `key=value,key2=value2` list, `,,` unescaped; an element without `=` has value None."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    out: list[tuple[str, str | None]] = []
    for p in parts:
        key, eq, value = p.partition("=")
        out.append((key, value if eq else None))
    return out


def join_options(items: Sequence[tuple[str, str | None]]) -> str:
    return ",".join(k if v is None else f"{k}={v.replace(',', ',,')}" for k, v in items)


class _NotUnderstood(Exception):
    pass


def _bool(value: str | None, what: str) -> bool:
    v = (value or "on").lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise _NotUnderstood(f"{what}={value!r} is not a boolean QEMU reads")


def _options(args: Sequence[str]) -> list[tuple[int, str, str | None]]:
    """(index of the option, its name without dashes, value) for every option argument."""
    out: list[tuple[int, str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and len(arg) > 1:
            name = arg[2:] if arg.startswith("--") else arg[1:]
            if name.startswith("bios="):  # not QEMU syntax, but seen in the wild; varsd always read it
                out.append((i, "bios", name[len("bios="):]))
            elif name in _VALUED:
                value = args[i + 1] if i + 1 < len(args) else None
                out.append((i, name, value))
                i += 1
            else:
                out.append((i, name, None))
        i += 1
    return out


def _span(i: int, name: str, args: Sequence[str]) -> set[int]:
    if args[i].startswith(("-bios=", "--bios=")):
        return {i}
    return {i, i + 1} if name in _VALUED and i + 1 < len(args) else {i}


@dataclass
class _Node:
    index: int
    props: dict[str, object]


def _blockdev(value: str) -> dict[str, object]:
    if value.lstrip().startswith("{"):
        try:
            obj = json.loads(value)
        except ValueError as exc:
            raise _NotUnderstood(f"-blockdev JSON does not parse: {exc}") from None
        if not isinstance(obj, dict):
            raise _NotUnderstood("-blockdev JSON is not an object")
        return obj
    props: dict[str, object] = {}
    for key, val in split_options(value):
        if val is None:
            raise _NotUnderstood(f"-blockdev {value!r}: element {key!r} has no value")
        if key.startswith("file."):  # dotted child: file.driver=file,file.filename=...
            child = props.setdefault("file", {})
            if not isinstance(child, dict):
                raise _NotUnderstood(f"-blockdev {value!r}: 'file' given twice")
            child[key[len("file."):]] = val
        else:
            props[key] = val
    return props


def _resolve_node(ref: object, nodes: dict[str, _Node], used: set[int], what: str) -> tuple[str, bool]:
    """The file a pflash node reads, and whether it is read-only; records the -blockdev args used."""
    if isinstance(ref, str):
        node = nodes.get(ref)
        if node is None:
            raise _NotUnderstood(f"{what} names block node {ref!r}, which no -blockdev defines")
        used.add(node.index)
        props = node.props
    elif isinstance(ref, dict):
        props = ref
    else:
        raise _NotUnderstood(f"{what}: a block node varsd cannot read")
    unknown = set(props) - _BLOCKDEV_KEYS
    if unknown:
        raise _NotUnderstood(f"{what}: block node option(s) {', '.join(sorted(unknown))} not understood")
    ro = _bool(str(props.get("read-only", "off")), "read-only") if "read-only" in props else False
    driver = props.get("driver")
    if driver == "file":
        filename = props.get("filename")
        if not isinstance(filename, str) or not filename:
            raise _NotUnderstood(f"{what}: file node without a filename")
        return filename, ro
    if driver == "raw":
        path, child_ro = _resolve_node(props.get("file"), nodes, used, what)
        return path, ro or child_ro
    raise _NotUnderstood(f"{what}: block driver {driver!r} (varsd manages raw flash images only)")


def parse_cmdline_firmware(args: Sequence[str], *, xml_loader: str | None = None) -> CmdlineFirmware:
    """What QEMU maps as firmware from these arguments (module rules); never raises.

    `xml_loader` is the domain's own `<loader type>` (`'pflash'` makes libvirt set
    `-machine pflash0=` itself, so a pflash passed here as well cannot start).
    """
    try:
        return _parse(list(args), xml_loader)
    except _NotUnderstood as exc:
        return CmdlineFirmware(problem=str(exc))


def _parse(args: list[str], xml_loader: str | None) -> CmdlineFirmware:
    opts = _options(args)
    remove: set[int] = set()
    bios: list[str] = []
    units: dict[int, tuple[str, bool, str]] = {}  # unit -> (path, read-only, how it was given)
    nodes: dict[str, _Node] = {}
    machine_flash: dict[str, tuple[int, str]] = {}  # pflash0/1 -> (option index, node name)
    rewrite: list[tuple[int, str]] = []
    secure = False
    drive_ids: set[str] = set()
    for i, name, value in opts:
        if value is None:  # every option below takes a value (_VALUED); a bare one changes nothing here
            if name in ("bios", "pflash", "drive", "blockdev"):
                raise _NotUnderstood(f"-{name} without a value")
            continue
        if name == "bios":
            bios.append(value)
            remove |= _span(i, name, args)
        elif name in ("pflash", "drive"):
            items = [("if", "pflash"), ("file", value)] if name == "pflash" else split_options(value)
            props = dict(items)
            if props.get("if") != "pflash":
                continue
            unknown = set(props) - _DRIVE_KEYS
            if unknown:
                raise _NotUnderstood(f"-drive {value!r}: option(s) {', '.join(sorted(unknown))} not understood")
            if props.get("format", "raw") != "raw":
                raise _NotUnderstood(f"-drive {value!r}: format {props['format']!r} (varsd manages raw images)")
            if props.get("bus", "0") != "0":
                raise _NotUnderstood(f"-drive {value!r}: pflash bus {props['bus']!r}")
            path = props.get("file")
            if not path:
                raise _NotUnderstood(f"-drive {value!r}: pflash drive without a file")
            if props.get("id"):
                drive_ids.add(str(props["id"]))
            ro_key = "readonly" if "readonly" in props else "read-only"
            ro = _bool(props.get(ro_key), ro_key) if ro_key in props else False
            given = props.get("unit", props.get("index"))
            if given is not None:
                if not given.isdigit():
                    raise _NotUnderstood(f"-drive {value!r}: unit {given!r}")
                unit = int(given)
                if unit in units:
                    raise _NotUnderstood(f"pflash unit {unit} is given twice (QEMU refuses to start)")
            else:
                unit = 0
                while unit in units:
                    unit += 1
            if unit > 1:
                raise _NotUnderstood(f"pflash unit {unit}: x86 machines map units 0 and 1 only")
            units[unit] = (path, ro, f"-{name}")
            remove |= _span(i, name, args)
        elif name == "blockdev":
            props_b = _blockdev(value)
            node_name = props_b.get("node-name")
            if isinstance(node_name, str):
                nodes[node_name] = _Node(i, props_b)
        elif name in ("machine", "M"):
            items = split_options(value)
            flash = [(k, v) for k, v in items if k in ("pflash0", "pflash1")]
            if not flash:
                continue
            for k, v in flash:
                if not v:
                    raise _NotUnderstood(f"-{name} {value!r}: {k} without a node name")
                machine_flash[k] = (i, v)
            rest = [(k, v) for k, v in items if k not in ("pflash0", "pflash1")]
            if rest and rest != [("", None)]:
                rewrite.append((i + 1, join_options(rest)))
            else:
                remove |= _span(i, name, args)
        elif name == "global":
            if _is_pflash_secure(value):
                secure = True
                remove |= _span(i, name, args)
            elif "cfi.pflash01" in value:
                raise _NotUnderstood(f"-global {value!r}: a pflash property varsd does not manage")
        elif name == "device" and "cfi.pflash01" in value:
            raise _NotUnderstood(f"-device {value!r}: a flash device varsd does not manage")
    # Nodes used by the machine's flash properties.
    if machine_flash:
        if units:
            raise _NotUnderstood("pflash given both as -drive/-pflash and as -machine pflash0/pflash1 "
                                 "(QEMU refuses to start: 'clashes with -machine')")
        used_nodes: set[int] = set()
        for k, (_i, node) in machine_flash.items():
            used: set[int] = set()
            path, ro = _resolve_node(node, nodes, used, f"-machine {k}={node}")
            units[int(k[-1])] = (path, ro, "-machine")
            used_nodes |= used
        # A node also used by something else (e.g. a -device drive=) cannot be removed.
        used_names = {n for n, node in nodes.items() if node.index in used_nodes}
        claimed = remove | used_nodes | {ix + 1 for ix in used_nodes} | {ix + 1 for ix, _v in machine_flash.values()}
        for j, other in enumerate(args):
            if j not in claimed and any(_mentions(other, n) for n in used_names):
                raise _NotUnderstood(f"block node(s) {', '.join(sorted(used_names))} used by argument {other!r} too")
        for ix in used_nodes:
            remove |= {ix, ix + 1}
    for j, other in enumerate(args):
        if other.startswith(("-set", "--set")) and j + 1 < len(args):
            target = args[j + 1]
            if any(target.startswith(f"drive.{d}.") for d in drive_ids):
                raise _NotUnderstood(f"-set {target!r} changes a pflash drive")
    if units and xml_loader == "pflash":
        raise _NotUnderstood("pflash given both in <loader> and in <qemu:commandline> (QEMU refuses to start)")
    if 1 in units and 0 not in units:
        raise _NotUnderstood("pflash unit 1 without unit 0")
    for b in bios:
        if not b.startswith("/") and not units and xml_loader != "pflash":
            raise _NotUnderstood(f"-bios {b!r} is a relative name: QEMU searches its data directories for it; "
                                 "give an absolute path")
    if not units and not bios:
        return CmdlineFirmware(secure=secure, remove=frozenset(remove), rewrite=tuple(rewrite))
    if not units and xml_loader == "pflash":  # libvirt's own pflash0 wins over every -bios
        return CmdlineFirmware(secure=secure, remove=frozenset(remove), rewrite=tuple(rewrite),
                               ignored_bios=tuple(bios))
    if not units:
        return CmdlineFirmware(bios=bios[-1], secure=secure, remove=frozenset(remove), rewrite=tuple(rewrite),
                               ignored_bios=tuple(bios[:-1]))
    for path, _ro, _how in units.values():
        if not path.startswith("/"):
            raise _NotUnderstood(f"pflash image {path!r} is a relative path")
    code, code_ro, _ = units[0]
    return CmdlineFirmware(
        code=code, code_readonly=code_ro, varstore=units[1][0] if 1 in units else None, secure=secure,
        remove=frozenset(remove), rewrite=tuple(rewrite), ignored_bios=tuple(bios),
    )


def _mentions(arg: str, node: str) -> bool:
    if arg.lstrip().startswith("{"):
        return f'"{node}"' in arg
    return any(v == node for _k, v in split_options(arg))


def _is_pflash_secure(value: str) -> bool:
    if value.lower() in ("cfi.pflash01.secure=on", "cfi.pflash01.secure=true", "cfi.pflash01.secure=yes"):
        return True
    props = dict(split_options(value))
    return (props.get("driver") == "cfi.pflash01" and props.get("property") == "secure"
            and (props.get("value") or "").lower() in _TRUE)
