"""Generated domain configurations: one builder, fed by hypothesis (tests/planning) and
by a seeded random pick (tests/integration), so a sample that fails on the real host
reproduces from its seed.

A `Shape` says which firmware form a domain uses (in its XML or in `<qemu:commandline>`),
which unrelated arguments surround it and in what order, and how the XML is written
(namespace prefix, attribute order, comments, whitespace, `<features>`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ovmf_files import UNIFIED as UNIFIED_2M_IMAGE  # Debian 12's files, release-aware
from support.domains import QEMU_NS, commandline, domain_xml

CODE_4M = "/usr/share/OVMF/OVMF_CODE_4M.fd"
VARS_4M = "/usr/share/OVMF/OVMF_VARS_4M.fd"
OVMF_2M = UNIFIED_2M_IMAGE

# form -> (<os> content after <type>, firmware args, file the form needs: (path, kind) or None)
# Paths may use {name}, {nvram_dir} and {images}; kinds: 'varstore' (a used 4 MiB varstore),
# 'unified' (a used 4 MiB varstore followed by the 4 MiB code).
FORMS: dict[str, tuple[str, tuple[str, ...], tuple[str, str] | None]] = {
    "seabios": ("", (), None),
    "rom": (f"<loader type='rom'>{OVMF_2M}</loader>", (), None),
    "code-only": (f"<loader readonly='no' type='pflash'>{CODE_4M}</loader>", (), None),
    "split": (f"<loader readonly='yes' type='pflash'>{CODE_4M}</loader><nvram>{{nvram_dir}}/{{name}}_VARS.fd</nvram>",
              (), ("{nvram_dir}/{name}_VARS.fd", "varstore")),
    "unified": ("<loader readonly='no' type='pflash'>{images}/{name}-OVMF.fd</loader>", (),
                ("{images}/{name}-OVMF.fd", "unified")),
    "cmd-bios": ("", ("-bios", OVMF_2M), None),
    "cmd-two-bios": ("", ("-bios", "/usr/share/seabios/bios-256k.bin", "-bios", OVMF_2M), None),
    "cmd-pflash": ("", ("-pflash", CODE_4M), None),
    "cmd-drive": ("", ("-drive", f"if=pflash,format=raw,readonly=on,file={CODE_4M}"), None),
    "cmd-bios-and-drive": ("", ("-bios", OVMF_2M, "-drive", f"if=pflash,format=raw,readonly=on,file={CODE_4M}"),
                           None),
    "cmd-pair": ("", ("-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={CODE_4M}",
                      "-drive", "if=pflash,format=raw,unit=1,file={nvram_dir}/{name}_VARS.fd"),
                 ("{nvram_dir}/{name}_VARS.fd", "varstore")),
    "cmd-blockdev": ("", ("-blockdev", f"driver=file,filename={CODE_4M},node-name=fwc,read-only=on",
                          "-blockdev", "driver=file,filename={nvram_dir}/{name}_VARS.fd,node-name=fwv",
                          "-machine", "pflash0=fwc,pflash1=fwv"),
                     ("{nvram_dir}/{name}_VARS.fd", "varstore")),
    "cmd-unified": ("", ("-drive", "if=pflash,format=raw,file={images}/{name}-OVMF.fd"),
                    ("{images}/{name}-OVMF.fd", "unified")),
    "cmd-unknown": ("", ("-drive", f"if=pflash,format=qcow2,file={CODE_4M}"), None),
}
OTHER_ARGS: tuple[tuple[str, ...], ...] = (
    ("-global", "ICH9-LPC.disable_s3=1"),
    ("-smbios", "type=1,serial=gen-42"),
    ("-msg", "timestamp=on"),
    ("-no-user-config",),
)
FEATURES = ("", "<acpi/>", "<acpi/><apic/>")
# Forms whose guests the integration tier can boot (and whose XML libvirt accepts as is).
BOOTABLE = tuple(f for f in FORMS if f not in ("seabios", "cmd-unknown", "cmd-two-bios"))


@dataclass(frozen=True)
class Shape:
    form: str
    others: tuple[int, ...] = ()  # indexes into OTHER_ARGS, in command-line order
    at: int = 0  # where among them the firmware arguments go
    prefix: str = "qemu"
    ns_first: bool = False  # xmlns before type= on <domain>
    comments: bool = False
    pretty: bool = True
    features: str = "<acpi/>"
    machine: str = "pc-q35-7.2"

    def args(self) -> list[str]:
        blocks = [list(OTHER_ARGS[i]) for i in self.others]
        blocks.insert(min(self.at, len(blocks)), list(FORMS[self.form][1]))
        return [a for b in blocks for a in b]

    def file(self, name: str, nvram_dir: str, images: str) -> tuple[str, str] | None:
        need = FORMS[self.form][2]
        return None if need is None else (_fill(need[0], name, nvram_dir, images), need[1])

    def xml(self, name: str, *, nvram_dir: str, images: str, serial_log: str | None = None,
            domain_type: str = "kvm") -> str:
        os_inner = _fill(FORMS[self.form][0], name, nvram_dir, images)
        args = [_fill(a, name, nvram_dir, images) for a in self.args()]
        serial = f"<serial type='file'><source path='{serial_log}'/></serial>" if serial_log else ""
        return domain_xml(
            name, os_inner, domain_type=domain_type, uuid=None, namespaces={self.prefix: QEMU_NS} if args else None,
            ns_first=self.ns_first, vcpu=1, machine=self.machine, features=self.features or None,
            on_crash="destroy", devices=f"<emulator>/usr/bin/qemu-system-x86_64</emulator>{serial}",
            tail=commandline(args, self.prefix) if args else "", comment="<!-- generated -->" if self.comments else "",
            pretty=self.pretty)


def _fill(text: str, name: str, nvram_dir: str, images: str) -> str:
    return text.replace("{name}", name).replace("{nvram_dir}", nvram_dir).replace("{images}", images)


def random_shape(rng: random.Random, forms: tuple[str, ...] = tuple(FORMS)) -> Shape:
    """The integration tier's pick: the same space as the hypothesis strategy, from a seed."""
    others = tuple(rng.sample(range(len(OTHER_ARGS)), rng.randint(0, len(OTHER_ARGS))))
    return Shape(form=rng.choice(forms), others=others, at=rng.randint(0, len(others)),
                 prefix=rng.choice(("qemu", "q", "qemucmd")), ns_first=rng.random() < 0.5,
                 comments=rng.random() < 0.5, pretty=rng.random() < 0.5, features=rng.choice(FEATURES),
                 machine=rng.choice(("pc-q35-7.2", "q35", "pc-i440fx-7.2")))
