"""Domain XML: the one module that knows the xpaths of firmware elements.

Reading turns libvirt domain XML into a `DomainFirmware` record. Writing applies a
`FirmwareEdit` and touches only the firmware elements: `<os firmware>` and
`<os>/<firmware>`, `<os>/<loader>`, `<os>/<nvram>`, `<os>/<varstore>` (read only), `<features>/<smm>`
and `<acpi>` (what libvirt requires beside UEFI), the firmware arguments inside `<qemu:commandline>`
(`varsd.domain.cmdline` says which), and varsd's own element inside `<metadata>`. Everything
else is carried over untouched, so an admin's hand edits and other tools' metadata
survive every repair (`outside_firmware` is the test of that promise).

libvirt facts this module relies on (checked against libvirt 9.0's QEMU driver):
- `<loader>` without `type` is passed to QEMU as `-bios` (libvirt canonicalises it to
  `type='rom'`), whatever its other attributes or an `<nvram>` beside it say.
- `<nvram>` names its file either as text or, since 8.5, as
  `<nvram type='file'><source file='...'/></nvram>`; `type='block'` and
  `type='network'` put the varstore on a device or a remote server.
- `format` on `<loader>` and `<nvram>` exists since libvirt 9.2 (9.0's schema refuses it),
  `templateFormat` on `<nvram>` since 10.10; libvirt >= 9.2 fills both in itself at define
  time. varsd writes them explicitly where the connected libvirt has them
  (`firmware_formats`, `with_raw_formats`): its builds and varstores are raw.
- libvirt < 9.2 refuses `<os firmware='efi'>` next to loader attributes; 9.2 and later
  keep it beside the paths they resolved. Writing explicit paths therefore drops the
  autoselection request (`firmware='efi'` and its `<firmware>` feature list).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from lxml import etree

from varsd.clock import parse_stamp, stamp
from varsd.domain.cmdline import CmdlineFirmware, parse_cmdline_firmware
from varsd.errors import DomainXMLError
from varsd.model.domain import DomainFirmware, VarsdMetadata

VARSD_NS = "https://varsd.org/xmlns/firmware/1"
VARSD_PREFIX = "varsd"
VARSD_KEY = "firmware"  # local name of our element in <metadata>
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# varsd's *live* record of what a running QEMU process booted (varsd.engine.boots writes it).
BOOT_NS = "https://varsd.org/xmlns/boot/1"
BOOT_KEY = "boot"

_PARSER = etree.XMLParser(remove_blank_text=False, resolve_entities=False, no_network=True)

# Children of our metadata element that this version writes; others are kept as found.
_KNOWN_METADATA_CHILDREN = frozenset({"build", "varstore", "pin", "booted"})
# Elements libvirt puts before <metadata>: a new <metadata> goes right after the last one.
_BEFORE_METADATA = ("name", "uuid", "genid", "title", "description")


def _root(xml: str, what: str = "domain XML") -> etree._Element:
    try:
        root = etree.fromstring(xml.encode("utf-8"), _PARSER)
    except etree.XMLSyntaxError as exc:
        raise DomainXMLError(f"{what}: malformed XML: {exc}") from None
    if root.tag != "domain":
        raise DomainXMLError(f"{what}: root element is <{root.tag}>, expected <domain>")
    return root


def _yesno(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.strip().lower() in ("yes", "on", "true", "1")


def _text(el: etree._Element | None) -> str | None:
    if el is None or el.text is None:
        return None
    t = el.text.strip()
    return t or None


def _cmdline_args(root: etree._Element) -> list[str]:
    return [a.get("value", "") for a in root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]


# What makes a guest confidential when libvirt has no element for it yet (libvirt 9.0
# knows <launchSecurity type='sev'> only: SNP and TDX guests pass QEMU objects directly).
_CONFIDENTIAL_ARGS = ("confidential-guest-support", "sev-guest", "sev-snp-guest", "tdx-guest")


def _cmdline_confidential(root: etree._Element) -> str | None:
    for arg in _cmdline_args(root):
        for word in _CONFIDENTIAL_ARGS:
            if word in arg:
                return f"qemu:commandline {word}"
    return None


def cmdline_firmware(root: etree._Element) -> CmdlineFirmware:
    """The firmware `<qemu:commandline>` hands QEMU, read against the domain's own `<loader>`."""
    loader = root.find("os/loader")
    xml_loader = None if loader is None else (loader.get("type") or "rom")
    return parse_cmdline_firmware(_cmdline_args(root), xml_loader=xml_loader)


def _nvram_path(nvram: etree._Element | None) -> str | None:
    """The varstore file or device an <nvram> names; None for none or a network source."""
    if nvram is None:
        return None
    kind = nvram.get("type")
    if kind is None:
        return _text(nvram)
    source = nvram.find("source")
    if source is None:
        return None
    if kind == "file":
        return source.get("file")
    if kind == "block":
        return source.get("dev")
    return None


def nvram_storage(xml: str) -> str | None:
    """How the varstore is stored: 'file', 'block', 'network', ...; None without <nvram>.

    The planner manages file-backed varstores only; a device or a remote varstore is
    left to whoever set it up.
    """
    nvram = _root(xml).find("os/nvram")
    if nvram is None:
        return None
    return nvram.get("type") or "file"


def parse_metadata(el: etree._Element | None) -> VarsdMetadata:
    """Read varsd's <metadata> element; unknown children are ignored (forward compat)."""
    if el is None:
        return VarsdMetadata()

    first: dict[str, etree._Element] = {}  # each child's first element (what find() gives), in one pass
    for c in el:
        if isinstance(c.tag, str):
            first.setdefault(c.tag, c)

    def attr(child: str, name: str) -> str | None:
        c = first.get(f"{{{VARSD_NS}}}{child}")
        return None if c is None else c.get(name)

    return VarsdMetadata(
        opt_out=_yesno(el.get("manage")) is False,
        manage=el.get("manage"),
        build_code_path=attr("build", "code"),
        build_code_sha256=attr("build", "sha256"),
        template_path=attr("varstore", "template"),
        template_sha256=attr("varstore", "template-sha256"),
        varstore_source=attr("varstore", "source"),
        provisioned_at=_time(attr("varstore", "created")),
        pinned_sha256=attr("pin", "sha256"),
        pin_by=attr("pin", "by"),
        pin_reason=attr("pin", "reason"),
        pinned_at=_time(attr("pin", "at")),
        booted_sha256=attr("booted", "sha256"),
    )


def _time(text: str | None) -> datetime | None:
    """A metadata time: varsd's own stamp, or any ISO 8601 time an admin or older tool wrote
    (no zone: UTC). Anything else reads as unknown, which only loses the text of a time."""
    if not text:
        return None
    try:
        return parse_stamp(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def parse_metadata_fragment(fragment: str | None) -> VarsdMetadata:
    """Parse the fragment libvirt's getMetadata returns for our namespace."""
    if not fragment:
        return VarsdMetadata()
    try:
        el = etree.fromstring(fragment.encode("utf-8"), _PARSER)
    except etree.XMLSyntaxError as exc:
        raise DomainXMLError(f"varsd metadata: malformed XML: {exc}") from None
    # libvirt hands the element back with whatever prefix it stored; match on local names.
    for node in el.iter():
        if isinstance(node.tag, str) and node.tag.startswith("{") is False:
            node.tag = f"{{{VARSD_NS}}}{node.tag}"
    return parse_metadata(el)


def _tpm(root: etree._Element) -> str | None:
    """A vTPM: PCR7 measures the Secure Boot keys, so changing them asks BitLocker/LUKS for recovery."""
    tpm = root.find("devices/tpm")
    if tpm is None:
        return None
    backend = tpm.find("backend")
    return f"{tpm.get('model') or 'default'}/{backend.get('type') if backend is not None else 'unknown'}"


def parse_domain(xml: str) -> DomainFirmware:
    """Extract the firmware facts of a domain; raises DomainXMLError on bad XML."""
    root = _root(xml)
    name = _text(root.find("name")) or ""
    what = f"domain '{name}'" if name else "domain XML"
    if not name:
        raise DomainXMLError(f"{what}: has no <name>")
    os_el = root.find("os")
    type_el = os_el.find("type") if os_el is not None else None
    loader = os_el.find("loader") if os_el is not None else None
    nvram = os_el.find("nvram") if os_el is not None else None
    varstore = os_el.find("varstore") if os_el is not None else None
    smm = root.find("features/smm")
    ls = root.find("launchSecurity")
    md = root.find(f"metadata/{{{VARSD_NS}}}{VARSD_KEY}")
    boot = root.find(f"metadata/{{{BOOT_NS}}}{BOOT_KEY}")
    cmd = cmdline_firmware(root)
    loader_fields = dict(
        loader_path=_text(loader),
        loader_type=loader.get("type") if loader is not None else None,
        loader_readonly=_yesno(loader.get("readonly")) if loader is not None else None,
        loader_secure=_yesno(loader.get("secure")) if loader is not None else None,
        nvram_path=_nvram_path(nvram),
    )
    if cmd.pflash:
        # QEMU boots the command line's flash (libvirt's -bios, if any, is ignored): the
        # domain is read as the <loader>/<nvram> pair a repair writes instead.
        loader_fields = dict(loader_path=cmd.code, loader_type="pflash", loader_readonly=cmd.code_readonly,
                             loader_secure=cmd.secure or None, nvram_path=cmd.varstore)
    elif cmd.secure and loader is not None:
        loader_fields["loader_secure"] = True
    return DomainFirmware(
        name=name,
        uuid=_text(root.find("uuid")) or "",
        arch=type_el.get("arch") if type_el is not None else None,
        machine=type_el.get("machine") if type_el is not None else None,
        domain_type=root.get("type"),
        os_firmware=os_el.get("firmware") if os_el is not None else None,
        loader_stateless=_yesno(loader.get("stateless")) if loader is not None else None,
        nvram_template=nvram.get("template") if nvram is not None else None,
        smm=smm is not None and (_yesno(smm.get("state")) is not False),
        acpi=root.find("features/acpi") is not None,
        launch_security=((ls.get("type") or "unknown") if ls is not None else _cmdline_confidential(root)),
        cmdline_bios=cmd.bios,
        cmdline_firmware=cmd.present,
        cmdline_pflash=cmd.pflash,
        cmdline_problem=cmd.problem,
        tpm=_tpm(root),
        host_varstore=varstore is not None,
        host_varstore_path=varstore.get("path") if varstore is not None else None,
        host_varstore_template=varstore.get("template") if varstore is not None else None,
        metadata=parse_metadata(md),
        booted_sha256=(boot.get("sha256") or None) if boot is not None else None,
        **loader_fields,
    )


@dataclass(frozen=True)
class FirmwareEdit:
    """The target firmware configuration: two pflash, central code + private varstore."""

    code_path: str
    nvram_path: str
    template_path: str | None
    secure: bool
    smm: bool
    metadata: VarsdMetadata
    acpi: bool = False  # add <features><acpi/> (libvirt requires ACPI for UEFI on x86)


# -- writing -------------------------------------------------------------------------

# Markup lxml writes: comments, CDATA and PIs are left alone, start tags get libvirt's quotes.
_MARKUP = re.compile(r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>|<[A-Za-z_][^>]*>", re.DOTALL)
_DQ_ATTR = re.compile(r'="([^"]*)"')
_ROOT_ATTR = re.compile(r"[^\s=<>]+='[^']*'")
_LOADER_ATTR_ORDER = ("readonly", "secure", "type", "stateless", "format")


def _single_quote(tag: str) -> str:
    if tag.startswith(("<!", "<?")):
        return tag
    return _DQ_ATTR.sub(lambda m: "='" + m.group(1).replace("'", "&apos;").replace("&quot;", '"') + "'", tag)


def _namespaces_last(tag: str) -> str:
    """libvirt writes the root's attributes before its namespace declarations."""
    attrs = _ROOT_ATTR.findall(tag)
    ordered = [a for a in attrs if not a.startswith("xmlns")] + [a for a in attrs if a.startswith("xmlns")]
    return tag[: tag.index(" ")] + "".join(" " + a for a in ordered) + ">" if attrs else tag


def _serialize(root: etree._Element) -> str:
    """The tree as text in libvirt's own style, so the journal's diff shows only varsd's change.

    `virsh dumpxml` quotes attributes with `'` and puts the root's namespace declarations
    last; lxml writes `"` and declarations first. Inside `<metadata>` libvirt keeps the
    applications' own serialisation (double quotes), so that region is left as lxml wrote it.
    """
    text = etree.tostring(root, encoding="unicode")
    meta_start, meta_end = text.find("<metadata>"), text.rfind("</metadata>")

    def fix(m: re.Match[str]) -> str:
        tag = m.group(0)
        if '"' not in tag or (meta_start != -1 and meta_start < m.start() < meta_end):
            return tag  # no attribute to requote (most tags), or inside <metadata>
        return _single_quote(tag)

    out = _MARKUP.sub(fix, text)
    first = _MARKUP.search(out)
    if first is None:  # no markup at all: nothing to reorder
        return out
    return out[: first.start()] + _namespaces_last(first.group(0)) + out[first.end() :]


def _order_attributes(el: etree._Element, order: tuple[str, ...]) -> None:
    """Put `el`'s attributes in libvirt's order (others keep theirs, after those)."""
    items = list(el.attrib.items())
    rank = {name: i for i, name in enumerate(order)}
    items.sort(key=lambda kv: rank.get(kv[0], len(order)))
    el.attrib.clear()
    for name, value in items:
        el.set(name, value)


def _ws(el: etree._Element, extra: int = 0) -> str | None:
    """Whitespace libvirt puts before an element at `el`'s depth (+extra); None in compact XML."""
    root = el.getroottree().getroot()
    text = root.text
    if not text or not text.startswith("\n") or text.strip():
        return None
    depth = sum(1 for _ in el.iterancestors()) + extra
    return "\n" + text[1:] * depth


def _append(parent: etree._Element, el: etree._Element) -> etree._Element:
    """Append `el` as `parent`'s last child, indented like libvirt's own output."""
    children = list(parent)
    parent.append(el)
    inner, outer = _ws(parent, 1), _ws(parent)
    if inner is not None:
        if children:
            el.tail, children[-1].tail = children[-1].tail, inner
        else:
            parent.text, el.tail = inner, outer
    _pretty(el)
    return el


def _prepend(parent: etree._Element, el: etree._Element) -> etree._Element:
    """Insert `el` as `parent`'s first child, indented like libvirt's own output."""
    if len(parent) == 0:
        return _append(parent, el)
    parent.insert(0, el)
    el.tail = parent.text if parent.text is None or not parent.text.strip() else None
    return el


def _insert_after(anchor: etree._Element, el: etree._Element) -> etree._Element:
    """Insert `el` as `anchor`'s next sibling, indented like it."""
    anchor.addnext(el)
    el.tail = anchor.tail
    if anchor.tail is not None:
        anchor.tail = _ws(anchor)
    _pretty(el)
    return el


def _pretty(el: etree._Element) -> None:
    """Indent the inside of an element we built (it arrives without whitespace)."""
    children = list(el)
    inner, outer = _ws(el, 1), _ws(el)
    if not children or inner is None or (el.text and el.text.strip()):
        return
    el.text = inner
    for child in children:
        child.tail = inner
        _pretty(child)
    children[-1].tail = outer


def metadata_element(md: VarsdMetadata) -> etree._Element:
    """Build varsd's <metadata> child; attributes only, so it diffs cleanly."""
    el = etree.Element(f"{{{VARSD_NS}}}{VARSD_KEY}", nsmap={VARSD_PREFIX: VARSD_NS})
    if md.opt_out:
        el.set("manage", "no")

    def child(tag: str, **attrs: str | None) -> None:
        present = {k.replace("_", "-"): v for k, v in attrs.items() if v is not None}
        if present:
            c = etree.SubElement(el, f"{{{VARSD_NS}}}{tag}")
            for k, v in present.items():
                c.set(k, v)

    child("build", code=md.build_code_path, sha256=md.build_code_sha256)
    child(
        "varstore",
        template=md.template_path,
        template_sha256=md.template_sha256,
        source=md.varstore_source,
        created=stamp(md.provisioned_at) if md.provisioned_at else None,
    )
    if md.pinned_sha256:
        at = stamp(md.pinned_at) if md.pinned_at else None
        child("pin", sha256=md.pinned_sha256, by=md.pin_by, reason=md.pin_reason, at=at)
    child("booted", sha256=md.booted_sha256)
    return el


def metadata_fragment(md: VarsdMetadata) -> str:
    return etree.tostring(metadata_element(md), encoding="unicode")


def _set_metadata(root: etree._Element, md: VarsdMetadata) -> None:
    """Replace varsd's element; what a newer varsd wrote into it and we do not know is kept."""
    meta = root.find("metadata")
    if meta is None:
        meta = etree.Element("metadata")
        anchors = [el for el in root if el.tag in _BEFORE_METADATA]
        if anchors:
            _insert_after(anchors[-1], meta)
        else:
            _append(root, meta)
    old = meta.find(f"{{{VARSD_NS}}}{VARSD_KEY}")
    new = metadata_element(md)
    if old is not None:
        for name, value in old.attrib.items():
            if name != "manage":
                new.set(name, value)
        for child in list(old):  # appending moves the child out of `old`
            if not (isinstance(child.tag, str) and etree.QName(child).localname in _KNOWN_METADATA_CHILDREN
                    and etree.QName(child).namespace == VARSD_NS):
                new.append(child)
        new.tail = old.tail
        meta.replace(old, new)
        _pretty(new)
    else:
        _append(meta, new)


def _drop_cmdline_firmware(root: etree._Element) -> None:
    """Remove the firmware arguments of `<qemu:commandline>` (varsd.domain.cmdline says which),
    keeping every other argument in order; an emptied `<qemu:commandline>` goes too."""
    cmd = root.find(f"{{{QEMU_NS}}}commandline")
    if cmd is None:
        return
    fw = cmdline_firmware(root)
    if fw.problem:
        raise DomainXMLError(f"domain '{_text(root.find('name'))}': <qemu:commandline> firmware not understood "
                             f"({fw.problem}); varsd does not rewrite it")
    args = cmd.findall(f"{{{QEMU_NS}}}arg")
    for i, value in fw.rewrite:
        args[i].set("value", value)
    for i in sorted(fw.remove):
        _remove(args[i])
    if len(cmd) == 0:
        _remove(cmd)


def _remove(el: etree._Element) -> None:
    """Remove `el` and the whitespace before it, keeping its neighbours' layout."""
    parent = el.getparent()
    prev = el.getprevious()
    if prev is not None:
        prev.tail = el.tail if (prev.tail is None or not prev.tail.strip()) else prev.tail + (el.tail or "")
    elif el.tail is not None and (parent.text is None or not parent.text.strip()):
        parent.text = el.tail
    parent.remove(el)


def _set_nvram(os_el: etree._Element, loader: etree._Element, edit: FirmwareEdit) -> None:
    nvram = os_el.find("nvram")
    if nvram is None:
        nvram = _insert_after(loader, etree.Element("nvram"))
    kind = nvram.get("type")
    if kind is None:
        nvram.text = edit.nvram_path
    elif kind == "file":
        source = nvram.find("source")
        if source is None:
            source = _append(nvram, etree.Element("source"))
        source.set("file", edit.nvram_path)
    else:
        raise DomainXMLError(f"<nvram type='{kind}'> is not a file; varsd does not rewrite it")
    nvram.attrib.pop("format", None)  # our varstores are raw copies of raw templates
    if edit.template_path:
        nvram.set("template", edit.template_path)
    else:
        nvram.attrib.pop("template", None)


def apply_edit(xml: str, edit: FirmwareEdit) -> str:
    """Return `xml` rewritten to `edit`'s firmware; nothing outside it changes."""
    root = _root(xml)
    os_el = root.find("os")
    if os_el is None:
        raise DomainXMLError(f"domain '{_text(root.find('name'))}': has no <os> element")
    _drop_cmdline_firmware(root)  # first: read against the <loader> the domain has now
    # Explicit paths replace autoselection (libvirt < 9.2 refuses to have both).
    os_el.attrib.pop("firmware", None)
    for el in os_el.findall("firmware"):
        _remove(el)
    type_el = os_el.find("type")
    loader = os_el.find("loader")
    if loader is None:
        loader = etree.Element("loader")
        if type_el is not None:
            _insert_after(type_el, loader)
        else:
            os_el.insert(0, loader)
    loader.text = edit.code_path
    loader.set("readonly", "yes")
    loader.set("type", "pflash")
    for attr in ("stateless", "format"):  # central builds are raw, split, stateful
        loader.attrib.pop(attr, None)
    if edit.secure:
        loader.set("secure", "yes")
    else:
        loader.attrib.pop("secure", None)
    _order_attributes(loader, _LOADER_ATTR_ORDER)
    _set_nvram(os_el, loader, edit)
    if edit.acpi and root.find("features/acpi") is None:
        features = root.find("features")
        if features is None:
            features = _insert_after(os_el, etree.Element("features"))
        _prepend(features, etree.Element("acpi"))  # libvirt lists <acpi/> first
    if edit.smm:
        features = root.find("features")
        if features is None:
            features = _insert_after(os_el, etree.Element("features"))
        smm = features.find("smm")
        if smm is None:
            smm = _append(features, etree.Element("smm"))
        smm.set("state", "on")
    _set_metadata(root, edit.metadata)
    return _serialize(root)


def set_metadata(xml: str, md: VarsdMetadata) -> str:
    """Return `xml` with varsd's metadata element replaced (used for opt-out, pins)."""
    root = _root(xml)
    _set_metadata(root, md)
    return _serialize(root)


def replace_loader_code(xml: str, code_path: str, md: VarsdMetadata | None = None) -> str:
    """Point the loader at another code image of the same build family (pinning to an
    archived build, or back to the central path); with `md`, varsd's metadata too.

    Nothing else changes: the varstore, its template and the Secure Boot/SMM attributes
    stay as they are, because the build the domain is held on is the one they were made for.
    """
    root = _root(xml)
    loader = root.find("os/loader")
    if loader is None:
        raise DomainXMLError(f"domain '{_text(root.find('name'))}': has no <loader> to repoint")
    loader.text = code_path
    if md is not None:
        _set_metadata(root, md)
    return _serialize(root)


def replace_nvram_path(xml: str, path: str) -> str:
    """Point <nvram> at another file (a varstore moved after `virsh domrename`); nothing else changes."""
    root = _root(xml)
    nvram = root.find("os/nvram")
    if nvram is None:
        raise DomainXMLError(f"domain '{_text(root.find('name'))}': has no <nvram> to repoint")
    if nvram.find("source") is not None:
        raise DomainXMLError(f"domain '{_text(root.find('name'))}': its <nvram> has a <source>, not a plain path")
    nvram.text = path
    return _serialize(root)


def firmware_signature(xml: str) -> tuple:
    """The parts of a domain XML that decide what firmware a cold boot maps."""
    fw = parse_domain(xml)
    return (fw.loader_path, fw.loader_type, fw.loader_readonly, fw.loader_secure, fw.nvram_path, fw.smm,
            fw.cmdline_firmware, fw.acpi)


def outside_firmware(xml: str) -> bytes:
    """Canonical XML with every firmware element removed: equal before and after a repair."""
    root = _root(xml)
    os_el = root.find("os")
    if os_el is not None:
        os_el.attrib.pop("firmware", None)
        for tag in ("loader", "nvram", "firmware"):
            for el in os_el.findall(tag):
                os_el.remove(el)
    for el in root.findall("features/smm") + root.findall("features/acpi"):
        el.getparent().remove(el)
    feats = root.find("features")
    if feats is not None and len(feats) == 0:
        root.remove(feats)
    for el in root.findall(f"metadata/{{{VARSD_NS}}}{VARSD_KEY}"):
        el.getparent().remove(el)
    meta = root.find("metadata")
    if meta is not None and len(meta) == 0:
        root.remove(meta)
    if not cmdline_firmware(root).problem:
        _drop_cmdline_firmware(root)
    for el in root.iter():
        if isinstance(el.tag, str):
            el.tail = None
            if len(el):
                el.text = None
        else:
            el.tail = None
    return etree.tostring(root, method="c14n")


@dataclass(frozen=True)
class FormatSupport:
    """Which firmware format attributes the connected libvirt understands."""

    format: bool = False  # <loader format>, <nvram format>: 9.2
    template_format: bool = False  # <nvram templateFormat>: 10.10


def firmware_formats(libvirt_version: int) -> FormatSupport:
    """From libvirt's version number (major * 1_000_000 + minor * 1000 + micro)."""
    return FormatSupport(format=libvirt_version >= 9_002_000, template_format=libvirt_version >= 10_010_000)


def with_raw_formats(xml: str, support: FormatSupport) -> str:
    """`xml` with an explicit format='raw' on a file `<loader>` and `<nvram>` (and
    templateFormat='raw' beside a template) where libvirt supports them and none is set.

    Only for XML varsd writes, whose code and varstores are raw; an existing format
    (qcow2 on a hand-made domain) is never changed, and block/network varstores have
    theirs in `<source>`.
    """
    if not support.format:
        return xml
    root = _root(xml)
    loader = root.find("os/loader")
    nvram = root.find("os/nvram")
    changed = False
    if loader is not None and (loader.text or "").strip() and loader.get("format") is None:
        loader.set("format", "raw")
        _order_attributes(loader, _LOADER_ATTR_ORDER)
        changed = True
    if nvram is not None and nvram.get("type") in (None, "file"):
        if nvram.get("template") and support.template_format and nvram.get("templateFormat") is None:
            nvram.set("templateFormat", "raw")
            changed = True
        if nvram.get("format") is None:
            nvram.set("format", "raw")
            changed = True
    return _serialize(root) if changed else xml


SECRET_ATTRIBUTES = ("passwd", "password")  # what _SECRET removes
"""Attributes libvirt shows only with VIR_DOMAIN_XML_SECURE (graphics passwords)."""

_SECRET = re.compile(r"""\s(?:passwd|password)=(?:'[^']*'|"[^"]*")""")


def redact_secrets(xml: str) -> str:
    """The XML as libvirt shows it without the SECURE flag: no secret attributes, every
    other byte as it was (so two journaled XMLs still compare equal when they were).

    The journal keeps the secure XML (an undo must restore the password too); what is
    printed goes through this.
    """
    return _SECRET.sub("", xml)


def _without_varsd_metadata(root: etree._Element) -> bytes:
    """Canonical XML without varsd's metadata element (and an emptied <metadata>), layout
    whitespace dropped: what a change of only varsd's record leaves equal."""
    for el in root.findall(f"metadata/{{{VARSD_NS}}}{VARSD_KEY}"):
        el.getparent().remove(el)
    meta = root.find("metadata")
    if meta is not None and len(meta) == 0:
        root.remove(meta)
    for el in root.iter():
        el.tail = None
        if isinstance(el.tag, str) and len(el):
            el.text = None
    return etree.tostring(root, method="c14n")


def metadata_only_change(old_xml: str, new_xml: str) -> str | None:
    """varsd's metadata element of `new_xml` as virDomainSetMetadata takes it (bare: libvirt
    puts it and its children into our namespace), when it is all that differs from
    `old_xml`; else None (then the whole definition is written). A rebind after a firmware
    upgrade changes only the binding; the loader path stays. An element holding anything
    of another namespace (a newer varsd's) is written by a define, which keeps it whole."""
    new_root = _root(new_xml)
    el = new_root.find(f"metadata/{{{VARSD_NS}}}{VARSD_KEY}")
    if el is None:
        return None
    bare = etree.fromstring(etree.tostring(el, with_tail=False))
    for node in bare.iter():
        if not isinstance(node.tag, str) or etree.QName(node).namespace != VARSD_NS \
                or any(name.startswith("{") for name in node.attrib):
            return None
        node.tag = etree.QName(node).localname
    etree.cleanup_namespaces(bare)
    if _without_varsd_metadata(_root(old_xml)) != _without_varsd_metadata(new_root):
        return None
    return etree.tostring(bare, encoding="unicode")
