"""parse_cmdline_firmware(): what QEMU maps from <qemu:commandline>, as a table (pure)."""

from __future__ import annotations

import json

import pytest

from varsd.domain.cmdline import join_options, parse_cmdline_firmware, split_options

CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
VARS = "/var/lib/libvirt/images/vm_VARS.fd"
OVMF = "/usr/share/ovmf/OVMF.fd"
SEABIOS = "/usr/share/seabios/bios-256k.bin"

# (id, args, expected fields: bios, code, code_readonly, varstore, secure, removed indexes, rewrites)
ROWS = [
    ("nothing", ["-smbios", "type=0,uefi=on"], (None, None, False, None, False, set(), ())),
    ("-bios", ["-bios", OVMF], (OVMF, None, False, None, False, {0, 1}, ())),
    ("--bios and other args kept", ["-global", "ICH9-LPC.disable_s3=1", "--bios", OVMF, "-S"],
     (OVMF, None, False, None, False, {2, 3}, ())),
    ("last -bios wins, like QEMU", ["-bios", SEABIOS, "-bios", OVMF],
     (OVMF, None, False, None, False, {0, 1, 2, 3}, ())),
    ("-bios= (not QEMU syntax, read anyway)", ["-bios=" + OVMF], (OVMF, None, False, None, False, {0}, ())),
    ("-pflash", ["-pflash", CODE], (None, CODE, False, None, False, {0, 1}, ())),
    ("-pflash twice: units 0 and 1", ["-pflash", CODE, "-pflash", VARS], (None, CODE, False, VARS, False,
                                                                          {0, 1, 2, 3}, ())),
    ("-drive code only, read-only", ["-drive", f"if=pflash,format=raw,readonly=on,file={CODE}"],
     (None, CODE, True, None, False, {0, 1}, ())),
    ("-drive pair, units given out of order",
     ["-drive", f"if=pflash,unit=1,file={VARS}", "-drive", f"file={CODE},if=pflash,unit=0,readonly=on"],
     (None, CODE, True, VARS, False, {0, 1, 2, 3}, ())),
    ("-bios beside pflash is ignored by QEMU, and removed (issue 12 defect 1)",
     ["-bios", OVMF, "-drive", f"if=pflash,format=raw,readonly=on,file={CODE}"],
     (None, CODE, True, None, False, {0, 1, 2, 3}, ())),
    ("a comma in a file name (,,)", ["-drive", "if=pflash,file=/srv/a,,b.fd"],
     (None, "/srv/a,b.fd", False, None, False, {0, 1}, ())),
    ("non-pflash -drive untouched", ["-drive", "if=virtio,file=/x.qcow2", "-pflash", CODE],
     (None, CODE, False, None, False, {2, 3}, ())),
    ("-blockdev + -machine, other machine props kept",
     ["-blockdev", f"driver=file,filename={CODE},node-name=c,read-only=on",
      "-blockdev", f"driver=file,filename={VARS},node-name=v",
      "-M", "q35,pflash0=c,pflash1=v,smm=on"],
     (None, CODE, True, VARS, False, {0, 1, 2, 3}, ((5, "q35,smm=on"),))),
    ("-blockdev JSON with raw over file; -machine with only pflash removed",
     ["-blockdev", json.dumps({"driver": "raw", "node-name": "c", "read-only": True,
                               "file": {"driver": "file", "filename": CODE}}), "-machine", "pflash0=c"],
     (None, CODE, True, None, False, {0, 1, 2, 3}, ())),
    ("-global secure, both spellings",
     ["-pflash", CODE, "-global", "driver=cfi.pflash01,property=secure,value=on", "-global",
      "cfi.pflash01.secure=on"], (None, CODE, False, None, True, {0, 1, 2, 3, 4, 5}, ())),
]


@pytest.mark.parametrize(("args", "want"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_understood(args: list[str], want: tuple) -> None:
    fw = parse_cmdline_firmware(args)
    assert fw.problem is None
    assert (fw.bios, fw.code, fw.code_readonly, fw.varstore, fw.secure, set(fw.remove), fw.rewrite) == want


PROBLEMS = [
    ("qcow2 flash", ["-drive", f"if=pflash,format=qcow2,file={CODE}"], "format 'qcow2'"),
    ("unit used twice", ["-drive", f"if=pflash,unit=0,file={CODE}", "-drive", f"if=pflash,unit=0,file={VARS}"],
     "given twice"),
    ("unit 2", ["-drive", f"if=pflash,unit=2,file={CODE}"], "unit 2"),
    ("unit 1 alone", ["-drive", f"if=pflash,unit=1,file={VARS}"], "without unit 0"),
    ("snapshot=on", ["-drive", f"if=pflash,snapshot=on,file={CODE}"], "snapshot"),
    ("drive and machine both", ["-pflash", CODE, "-blockdev", f"driver=file,filename={VARS},node-name=v",
                                "-machine", "pflash0=v"], "clashes"),
    ("machine names an undefined node", ["-machine", "pflash0=nope"], "no -blockdev defines"),
    ("node used by a device too", ["-blockdev", f"driver=file,filename={CODE},node-name=c", "-machine",
                                   "pflash0=c", "-device", "virtio-blk-pci,drive=c"], "used by argument"),
    ("qcow2 node", ["-blockdev", f"driver=qcow2,node-name=c,file.driver=file,file.filename={CODE}",
                    "-machine", "pflash0=c"], "block driver 'qcow2'"),
    ("relative -bios", ["-bios", "OVMF.fd"], "relative name"),
    ("-bios without a value", ["-bios"], "without a value"),
    ("a pflash -global varsd does not manage", ["-pflash", CODE, "-global", "cfi.pflash01.width=4"], "width"),
    ("-set on a pflash drive", ["-drive", f"if=pflash,id=fw,file={CODE}", "-set", "drive.fw.file=/other.fd"],
     "-set"),
    ("bad JSON", ["-blockdev", "{not json", "-machine", "pflash0=c"], "JSON"),
]


@pytest.mark.parametrize(("args", "needle"), [r[1:] for r in PROBLEMS], ids=[r[0] for r in PROBLEMS])
def test_not_understood_is_a_problem(args: list[str], needle: str) -> None:
    fw = parse_cmdline_firmware(args)
    assert fw.problem is not None and needle in fw.problem, fw


def test_pflash_beside_a_pflash_loader_cannot_start() -> None:
    assert "both in <loader>" in (parse_cmdline_firmware(["-pflash", CODE], xml_loader="pflash").problem or "")


def test_bios_beside_a_pflash_loader_is_ignored() -> None:
    fw = parse_cmdline_firmware(["-bios", OVMF], xml_loader="pflash")
    assert (fw.bios, fw.ignored_bios, set(fw.remove)) == (None, (OVMF,), {0, 1})


@pytest.mark.parametrize("text", ["q35,smm=on", "a=b,,c,d", "pflash0=x", "", "type=pc,usb=off,dump-guest-core=off"])
def test_options_round_trip(text: str) -> None:
    assert join_options(split_options(text)) == text
