"""Domain XML: the one module that knows the xpaths of firmware elements.

Reading turns libvirt domain XML into a `DomainFirmware` record. Writing applies a
`FirmwareEdit` and touches only the firmware elements: `<os>/<loader>`, `<os>/<nvram>`,
`<features>/<smm>`, a `-bios` pair inside `<qemu:commandline>`, and varsd's own
element inside `<metadata>`. Everything else is carried over untouched, so an
admin's hand edits and other tools' metadata survive every repair.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from varsd.errors import DomainXMLError
from varsd.model.domain import DomainFirmware, VarsdMetadata

VARSD_NS = "https://varsd.org/xmlns/firmware/1"
VARSD_PREFIX = "varsd"
VARSD_KEY = "firmware"  # local name of our element in <metadata>
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

_PARSER = etree.XMLParser(remove_blank_text=False, resolve_entities=False, no_network=True)


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


def _cmdline_bios(root: etree._Element) -> str | None:
    args = [a.get("value", "") for a in root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    for i, arg in enumerate(args):
        if arg == "-bios" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("-bios="):
            return arg[len("-bios=") :]
    return None


def parse_metadata(el: etree._Element | None) -> VarsdMetadata:
    """Read varsd's <metadata> element; unknown children are ignored (forward compat)."""
    if el is None:
        return VarsdMetadata()

    def attr(child: str, name: str) -> str | None:
        c = el.find(f"{{{VARSD_NS}}}{child}")
        return None if c is None else c.get(name)

    return VarsdMetadata(
        opt_out=_yesno(el.get("manage")) is False,
        build_code_path=attr("build", "code"),
        build_code_sha256=attr("build", "sha256"),
        template_path=attr("varstore", "template"),
        template_sha256=attr("varstore", "template-sha256"),
        varstore_source=attr("varstore", "source"),
        provisioned_at=attr("varstore", "created"),
        pinned_sha256=attr("pin", "sha256"),
        booted_sha256=attr("booted", "sha256"),
    )


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
    smm = root.find("features/smm")
    ls = root.find("launchSecurity")
    md = root.find(f"metadata/{{{VARSD_NS}}}{VARSD_KEY}")
    return DomainFirmware(
        name=name,
        uuid=_text(root.find("uuid")) or "",
        arch=type_el.get("arch") if type_el is not None else None,
        machine=type_el.get("machine") if type_el is not None else None,
        domain_type=root.get("type"),
        os_firmware=os_el.get("firmware") if os_el is not None else None,
        loader_path=_text(loader),
        loader_type=loader.get("type") if loader is not None else None,
        loader_readonly=_yesno(loader.get("readonly")) if loader is not None else None,
        loader_secure=_yesno(loader.get("secure")) if loader is not None else None,
        loader_stateless=_yesno(loader.get("stateless")) if loader is not None else None,
        nvram_path=_text(nvram),
        nvram_template=nvram.get("template") if nvram is not None else None,
        smm=smm is not None and (_yesno(smm.get("state")) is not False),
        launch_security=(ls.get("type") or "unknown") if ls is not None else None,
        cmdline_bios=_cmdline_bios(root),
        metadata=parse_metadata(md),
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
        created=md.provisioned_at,
    )
    child("pin", sha256=md.pinned_sha256)
    return el


def metadata_fragment(md: VarsdMetadata) -> str:
    return etree.tostring(metadata_element(md), encoding="unicode")


def _set_metadata(root: etree._Element, md: VarsdMetadata) -> None:
    meta = root.find("metadata")
    if meta is None:
        meta = etree.SubElement(root, "metadata")
        _fix_tail(root, meta)
    old = meta.find(f"{{{VARSD_NS}}}{VARSD_KEY}")
    new = metadata_element(md)
    if old is not None:
        new.tail = old.tail
        meta.replace(old, new)
    else:
        meta.append(new)


def _fix_tail(parent: etree._Element, el: etree._Element) -> None:
    """Keep libvirt-style indentation for an element we appended."""
    siblings = list(parent)
    if len(siblings) >= 2:
        prev = siblings[-2]
        el.tail = prev.tail
        prev.tail = parent.text if parent.text else "\n"


def _drop_cmdline_bios(root: etree._Element) -> None:
    cmd = root.find(f"{{{QEMU_NS}}}commandline")
    if cmd is None:
        return
    args = cmd.findall(f"{{{QEMU_NS}}}arg")
    drop = []
    for i, arg in enumerate(args):
        v = arg.get("value", "")
        if v == "-bios" and i + 1 < len(args):
            drop += [arg, args[i + 1]]
        elif v.startswith("-bios="):
            drop.append(arg)
    for el in drop:
        cmd.remove(el)
    if len(cmd) == 0:
        root.remove(cmd)


def apply_edit(xml: str, edit: FirmwareEdit) -> str:
    """Return `xml` rewritten to `edit`'s firmware; nothing outside it changes."""
    root = _root(xml)
    os_el = root.find("os")
    if os_el is None:
        raise DomainXMLError(f"domain '{_text(root.find('name'))}': has no <os> element")
    type_el = os_el.find("type")
    loader = os_el.find("loader")
    if loader is None:
        loader = etree.Element("loader")
        anchor = type_el if type_el is not None else None
        if anchor is not None:
            anchor.addnext(loader)
            loader.tail, anchor.tail = anchor.tail, anchor.tail
        else:
            os_el.insert(0, loader)
    loader.text = edit.code_path
    loader.set("readonly", "yes")
    loader.set("type", "pflash")
    for attr in ("stateless",):
        loader.attrib.pop(attr, None)
    if edit.secure:
        loader.set("secure", "yes")
    else:
        loader.attrib.pop("secure", None)
    nvram = os_el.find("nvram")
    if nvram is None:
        nvram = etree.Element("nvram")
        loader.addnext(nvram)
        nvram.tail = loader.tail
    nvram.text = edit.nvram_path
    if edit.template_path:
        nvram.set("template", edit.template_path)
    else:
        nvram.attrib.pop("template", None)
    if edit.smm:
        features = root.find("features")
        if features is None:
            features = etree.Element("features")
            os_el.addnext(features)
            features.tail = os_el.tail
        smm = features.find("smm")
        if smm is None:
            smm = etree.SubElement(features, "smm")
            _fix_tail(features, smm)
        smm.set("state", "on")
    _drop_cmdline_bios(root)
    _set_metadata(root, edit.metadata)
    return etree.tostring(root, encoding="unicode")


def set_metadata(xml: str, md: VarsdMetadata) -> str:
    """Return `xml` with varsd's metadata element replaced (used for opt-out, pins)."""
    root = _root(xml)
    _set_metadata(root, md)
    return etree.tostring(root, encoding="unicode")


def replace_loader_code(xml: str, code_path: str) -> str:
    """Point the loader at another code image (pinning to an archived build)."""
    root = _root(xml)
    loader = root.find("os/loader")
    if loader is None:
        raise DomainXMLError(f"domain '{_text(root.find('name'))}': has no <loader> to repoint")
    loader.text = code_path
    return etree.tostring(root, encoding="unicode")


def firmware_signature(xml: str) -> tuple:
    """The parts of a domain XML that decide what firmware a cold boot maps."""
    fw = parse_domain(xml)
    return (fw.loader_path, fw.loader_type, fw.loader_readonly, fw.loader_secure, fw.nvram_path, fw.smm)


def outside_firmware(xml: str) -> bytes:
    """Canonical XML with every firmware element removed: equal before and after a repair."""
    root = _root(xml)
    os_el = root.find("os")
    if os_el is not None:
        for tag in ("loader", "nvram"):
            for el in os_el.findall(tag):
                os_el.remove(el)
    for el in root.findall("features/smm"):
        el.getparent().remove(el)
    feats = root.find("features")
    if feats is not None and len(feats) == 0:
        root.remove(feats)
    for el in root.findall(f"metadata/{{{VARSD_NS}}}{VARSD_KEY}"):
        el.getparent().remove(el)
    meta = root.find("metadata")
    if meta is not None and len(meta) == 0:
        root.remove(meta)
    _drop_cmdline_bios(root)
    for el in root.iter():
        if isinstance(el.tag, str):
            el.tail = None
            if len(el):
                el.text = None
    return etree.tostring(root, method="c14n")
