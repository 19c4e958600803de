"""The one builder of domain XML for every test tier.

Pure tables (`parse_domain`, the planner), the `test:///` driver (defined, or in a node
file with `runstate`), real TCG guests on libvirtd and guests inside a bed all describe
a domain with `domain_xml`; what differs between them is arguments, not builders.
Real-world XML used as golden input (tests/planning/cases, FULL in test_xml) stays
literal: it is data, not a builder.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Mapping

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
VARSD_NS = "https://varsd.org/xmlns/firmware/1"
FRESH = "fresh"  # uuid=FRESH: a new random UUID per call

# test driver run states (virDomainState) for node files
RUNNING = 1
SHUTOFF = 5


def domain_xml(
    name: str,
    os_inner: str = "",
    *,
    domain_type: str = "test",
    uuid: str | None = FRESH,
    namespaces: Mapping[str, str] | None = None,
    ns_first: bool = False,
    metadata: str = "",
    memory_kib: int | None = 262144,
    vcpu: int | None = None,
    arch: str = "x86_64",
    machine: str | None = "pc-q35-7.2",
    os_firmware: str | None = None,
    features: str | None = None,
    extra: str = "",
    on_crash: str | None = None,
    devices: str = "",
    tail: str = "",
    runstate: int | None = None,
    comment: str = "",
    pretty: bool = True,
) -> str:
    """A domain's XML, element order as libvirt writes it.

    `os_inner` follows `<type>` inside `<os>`; `metadata`, `features` and `devices` are
    the inner text of their elements (`features=None`: no `<features>`); `extra` goes
    between `<features>` and `<devices>`, `tail` after `<devices>` (`<qemu:commandline>`,
    `<launchSecurity>`). `uuid=None` leaves `<uuid>` out. `runstate` writes the test
    driver's `<test:runstate>` (node files). `comment` is put after `<name>`, after
    `<type>` and at the end of `<devices>` (readers must skip comments); `ns_first` writes
    the namespace declarations before `type=`; `pretty=False` writes one line.
    """
    ns = dict(namespaces or {})
    if runstate is not None:
        ns.setdefault("test", TEST_NS)
    decls = [f"xmlns:{prefix}='{uri}'" for prefix, uri in ns.items()]
    attrs = [*decls, f"type='{domain_type}'"] if ns_first else [f"type='{domain_type}'", *decls]
    machine_attr = f" machine='{machine}'" if machine else ""
    firmware_attr = f" firmware='{os_firmware}'" if os_firmware else ""
    os_type = f"<type arch='{arch}'{machine_attr}>hvm</type>{comment}{os_inner}"
    parts = [
        f"<name>{name}</name>",
        comment,
        f"<uuid>{uuidlib.uuid4() if uuid == FRESH else uuid}</uuid>" if uuid else "",
        f"<metadata>{metadata}</metadata>" if metadata else "",
        f"<memory unit='KiB'>{memory_kib}</memory>" if memory_kib else "",
        f"<vcpu>{vcpu}</vcpu>" if vcpu else "",
        f"<os{firmware_attr}>\n    {os_type}\n  </os>" if pretty else f"<os{firmware_attr}>{os_type}</os>",
        f"<features>{features}</features>" if features is not None else "",
        extra,
        f"<on_crash>{on_crash}</on_crash>" if on_crash else "",
        f"<devices>{devices}{comment}</devices>" if devices or comment else "<devices/>",
        tail,
        f"<test:runstate>{runstate}</test:runstate>" if runstate is not None else "",
    ]
    body = [p for p in parts if p]
    root = f"<domain {' '.join(attrs)}>"
    if not pretty:
        return root + "".join(body) + "</domain>"
    return root + "".join(f"\n  {p}" for p in body) + "\n</domain>\n"


def split_os(code: str, varstore: str, *, template: str | None = None, secure: bool = False) -> str:
    """`<os>` content for the normal case: read-only central code + private varstore."""
    template_attr = f" template='{template}'" if template else ""
    secure_attr = " secure='yes'" if secure else ""
    return f"<loader readonly='yes'{secure_attr} type='pflash'>{code}</loader><nvram{template_attr}>{varstore}</nvram>"


def rom_os(image: str = "/usr/share/ovmf/OVMF.fd") -> str:
    """`<os>` content of the `-bios` spelling libvirt knows: a rom loader."""
    return f"<loader type='rom'>{image}</loader>"


def commandline(args: list[str] | tuple[str, ...], prefix: str = "qemu") -> str:
    """A `<qemu:commandline>` element (for `tail=`) carrying `args` in order."""
    inner = "".join(f"<{prefix}:arg value='{a}'/>" for a in args)
    return f"<{prefix}:commandline>{inner}</{prefix}:commandline>"


def varsd_metadata(inner: str) -> str:
    """Our `<varsd:firmware>` metadata element (for `metadata=`); `inner` starts after the
    element's namespace declaration: attributes, then `>` and children."""
    return f"<varsd:firmware xmlns:varsd='{VARSD_NS}'{inner}</varsd:firmware>"


def guest_xml(name: str, os_inner: str, *, serial_log: str, machine: str = "q35", features: str = "<acpi/>",
                  extra_devices: str = "", metadata: str = "", **kwargs) -> str:
    """A real TCG x86_64 guest for libvirtd (tiers 3 and the beds).

    libvirt 9.0 wants <acpi/> for UEFI guests; there is no disk, so OVMF falls through to
    its built-in EFI shell, which is enough to exercise the varstore. OVMF's lines go to
    `serial_log`.
    """
    devices = (f"\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
               f"    <serial type='file'><source path='{serial_log}'/></serial>\n    {extra_devices}\n  ")
    return domain_xml(name, os_inner, domain_type="qemu", uuid=None, memory_kib=262144, vcpu=1, machine=machine,
                      features=features, on_crash="destroy", devices=devices, metadata=metadata, **kwargs)


def with_cmdline(xml: str, args: list[str]) -> str:
    """`xml` (a `guest_xml`) with a `<qemu:commandline>` carrying `args` (in order)."""
    return xml.replace("<domain type='qemu'>", f"<domain type='qemu' xmlns:qemu='{QEMU_NS}'>").replace(
        "</devices>", f"</devices>\n  {commandline(args)}")
