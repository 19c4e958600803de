"""The hostile-input suite: one row per class of bad input or fault (see conftest.py).

Each row: the class, how the bad input is made, the varsctl command an admin would run,
the exit code, and what the admin sees (fragments; `{nvram}`, `{images}`, `{etc}`,
`{state}`, `{config}`, `{name}` stand for the bed's paths and its last domain). After
every row, nothing in the bed and no domain definition has changed, and no traceback
was printed. README ("Hostile input") lists the classes; the issue note has the table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from varsd.adapters import fsio
from varsd.domain.xml import parse_domain
from varsd.engine import lock
from varsd.errors import DomainXMLError

from .conftest import CODE_2M, CODE_4M, OVMF, SB_CODE_4M, UNIFIED, VARS_2M, VARS_4M, VARSD_NS, Bed

OK, ATTENTION, USAGE = 0, 1, 2


@dataclass(frozen=True)
class Row:
    cls: str
    make: Callable[..., list[str]]  # (bed, env) -> varsctl arguments
    rc: int
    says: tuple[str, ...]
    defect: int | None = None  # issue 12's defect number, where the row is one


def desc(code: str, template: str | None = None, **over) -> str:
    mapping: dict = {"device": "flash", "executable": {"filename": code, "format": "raw"}}
    if template:
        mapping["nvram-template"] = {"filename": template, "format": "raw"}
    doc = {
        "description": "hostile",
        "interface-types": ["uefi"],
        "mapping": mapping,
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*", "pc-i440fx-*"]}],
        "features": [],
    }
    doc.update(over)
    return json.dumps(doc)


# -- builders -----------------------------------------------------------------------


def config(text: str, cmd: tuple[str, ...] = ("status",)):
    def make(bed: Bed, env) -> list[str]:
        bed.config.write_text(text.format(nvram=bed.nvram, state=bed.state, images=bed.images))
        return list(cmd)

    return make


def descriptor(name: str, text: str | bytes | Callable[[Bed], str | bytes]):
    def make(bed: Bed, env) -> list[str]:
        bed.descriptor(name, text(bed) if callable(text) else text)
        return ["firmware", "list"]

    return make


def domain(os_inner: Callable[[Bed], str] | str, cmd: str = "reconcile", **kw):
    def make(bed: Bed, env) -> list[str]:
        inner = os_inner(bed) if callable(os_inner) else os_inner
        extra = {k: (v(bed) if callable(v) else v) for k, v in kw.items()}
        name = bed.domain(inner, **extra)
        return [cmd, name]

    return make


def state_file(cmd: tuple[str, ...]):
    def make(bed: Bed, env) -> list[str]:
        bed.state.write_text("not a directory\n")
        bed.domain(f"<loader type='rom'>{UNIFIED}</loader>")
        return list(cmd)

    return make


def pin_xml(sha_of: str, bound: str | None = None) -> str:
    build = f"<varsd:build code='{bound}' sha256='{fsio.sha256_file(bound)}'/>" if bound else ""
    return f">{build}<varsd:pin sha256='{fsio.sha256_file(sha_of)}' by='admin'/></varsd:firmware>"


def _readonly_state(bed: Bed, env) -> list[str]:
    ro = env["mount"]("size=1m,ro")
    bed.write_config(state=ro)
    bed.domain(bed.split(bed.varstore("rostate")), name=f"rostate-{os.path.basename(bed.root.parent)[-8:]}")
    return ["status"]


def _readonly_state_write(bed: Bed, env) -> list[str]:
    ro = env["mount"]("size=1m,ro")
    bed.write_config(state=ro)
    return ["reconcile", bed.domain(f"<loader type='rom'>{UNIFIED}</loader>")]


def _full_state(bed: Bed, env) -> list[str]:
    full = env["mount"]("size=256k")
    bed.write_config(state=full)
    name = bed.domain(f"<loader type='rom'>{UNIFIED}</loader>")
    # the journal exists, then the disk fills up
    assert bed.run(env["capsys"], "journal")[0] == OK
    with open(os.path.join(full, "filler"), "wb") as f:
        try:
            f.write(b"\0" * (1 << 20))
        except OSError:
            pass
    return ["reconcile", name]


def _locks_file(bed: Bed, env) -> list[str]:
    bed.state.mkdir()
    (bed.state / "locks").write_text("")
    return ["reconcile", bed.domain(f"<loader type='rom'>{UNIFIED}</loader>")]


def _journal_garbage(bed: Bed, env) -> list[str]:
    bed.state.mkdir()
    (bed.state / "state.sqlite3").write_bytes(b"this is not SQLite" * 100)
    return ["journal"]


def _lock_symlink(bed: Bed, env) -> list[str]:
    name = bed.domain(f"<loader type='rom'>{UNIFIED}</loader>")
    uuid = bed.conn.lookupByName(name).UUIDString()
    (bed.state / "locks").mkdir(parents=True)
    (bed.state / "locks" / f"{uuid}.lock").symlink_to(bed.images / "elsewhere")
    return ["reconcile", name]


FROZEN = textwrap.dedent("""
    import sys, time
    from varsd.engine.lock import host_lock
    with host_lock(sys.argv[1], doing="varsctl: reconciling domain 'x'"):
        print("held", flush=True)
        time.sleep(120)
""")


def _held_lock(frozen: bool):
    def make(bed: Bed, env) -> list[str]:
        name = bed.domain(bed.split(bed.varstore("held")))
        assert bed.run(env["capsys"], "reconcile", name)[0] == OK  # bound: the next look has nothing to do
        uuid = bed.conn.lookupByName(name).UUIDString()
        path = str(bed.state / "locks" / f"{uuid}.lock")
        proc = subprocess.Popen(
            [sys.executable, "-c", FROZEN.replace("120", "120" if frozen else "3"), path],
            stdout=subprocess.PIPE,
            text=True,
        )
        env["procs"].append(proc)
        assert proc.stdout.readline().strip() == "held"
        if frozen:
            os.kill(proc.pid, signal.SIGSTOP)
        env["monkeypatch"].setattr(lock, "STALE", 2.0)
        return ["reconcile", name]

    return make


def _undo(kind: str):
    def make(bed: Bed, env) -> list[str]:
        name = bed.domain(f"<loader type='rom'>{UNIFIED}</loader>")
        assert bed.run(env["capsys"], "reconcile", name)[0] == OK
        cid = json.loads(bed.run(env["capsys"], "journal", "--json", name)[1])["changes"][0]["id"]
        if kind == "edited":
            dom = bed.conn.lookupByName(name)
            bed.conn.defineXML(dom.XMLDesc(0).replace("</name>", "</name><description>admin</description>", 1))
        return ["undo", str(cid)]

    return make


def _bad_uri(bed: Bed, env) -> list[str]:
    bed.write_config('uri = "qemu+unix:///system?socket=/nonexistent/varsd-hostile.sock"\n')
    return ["--connect", "qemu+unix:///system?socket=/nonexistent/varsd-hostile.sock", "status"]


def _huge_xml(bed: Bed) -> str:
    return bed.split(bed.varstore("huge"))


def _clone(bed: Bed, env) -> list[str]:
    """Someone redefines the domain between varsd's plan and its write."""
    name = bed.domain(f"<loader type='rom'>{UNIFIED}</loader>")
    from varsd.engine import transaction

    real = transaction.Writer.write

    def racing(self, ref, old_xml, new_xml, reason, *args, **kwargs):
        dom = bed.conn.lookupByName(ref.name)
        bed.conn.defineXML(dom.XMLDesc(0).replace("</name>", "</name><description>racer</description>", 1))
        # The racer's definition is what must survive; the varstore just made from the
        # template for the refused change is removed again (never orphaned: issue 7).
        env["after"].update({p: v for p, v in bed.snapshot().items() if not p.startswith(str(bed.nvram))})
        return real(self, ref, old_xml, new_xml, reason, *args, **kwargs)

    env["monkeypatch"].setattr(transaction.Writer, "write", racing)
    return ["reconcile", name]


# -- the table ----------------------------------------------------------------------

ROWS = [
    # configuration file
    Row("config: not valid TOML", config("uri = [\n"), USAGE, ("{config}: not valid TOML",)),
    Row(
        "config: unknown key",
        config("reconcile_intervall = 5\n"),
        USAGE,
        ("{config}: unknown key(s) reconcile_intervall; known:",),
    ),
    Row(
        "config: reconcile_interval = 99999999999999",
        config("reconcile_interval = 99999999999999\n"),
        USAGE,
        ("{config}: 'reconcile_interval' must be a whole number of seconds from 1 to 2592000",),
        9,
    ),
    Row(
        "config: archive_retention_days = 1000000000",
        config("archive_retention_days = 1000000000\n", ("firmware", "sync")),
        USAGE,
        ("'archive_retention_days' must be a whole number of days from 1 to 36500",),
        9,
    ),
    Row("config: negative interval", config("reconcile_interval = -5\n"), USAGE, ("'reconcile_interval'",)),
    Row("config: interval as a string", config("reconcile_interval = '300'\n"), USAGE, ("'reconcile_interval'",)),
    Row("config: relative nvram_dir", config("nvram_dir = 'nvram'\n"), USAGE, ("'nvram_dir' must be an absolute",)),
    Row("config: relative state_dir", config("state_dir = 'state'\n"), USAGE, ("'state_dir' must be an absolute",)),
    Row(
        "config: firmware_dirs not a list",
        config("firmware_dirs = '/etc'\n"),
        USAGE,
        ("'firmware_dirs' must be a list of strings",),
    ),
    Row(
        "config: unknown upgrade_policy",
        config("upgrade_policy = 'sometimes'\n"),
        USAGE,
        ("'upgrade_policy' must be one of auto, manual",),
    ),
    Row(
        "config: extra_firmware not tables",
        config("extra_firmware = ['/a']\n"),
        USAGE,
        ("extra_firmware[0]: must be a table",),
    ),
    Row(
        "config: extra_firmware without code",
        config("[[extra_firmware]]\ntemplate = '/b'\n"),
        USAGE,
        ("extra_firmware[0]: 'code' must be an absolute path",),
    ),
    Row(
        "config: not UTF-8",
        lambda bed, env: (bed.config.write_bytes(b"uri = '\xff'\n"), ["status"])[1],
        USAGE,
        ("{config}: not valid UTF-8",),
    ),
    Row(
        "config: named file missing",
        lambda bed, env: (bed.config.unlink(), ["status"])[1],
        USAGE,
        ("{config}: config file not found",),
    ),
    Row(
        "config: is a directory",
        lambda bed, env: (bed.config.unlink(), bed.config.mkdir(), ["status"])[2],
        USAGE,
        ("{config}: cannot read config",),
    ),
    Row("config: exclude not a list", config("exclude = 'web-*'\n"), USAGE, ("'exclude' must be a list",)),
    Row(
        "config: qemu_user that does not exist",
        config("state_dir = '{state}'\nnvram_dir = '{nvram}'\nqemu_user = 'no-such-user-varsd'\n"),
        USAGE,
        ("qemu user 'no-such-user-varsd' does not exist; set qemu_user",),
    ),
    Row("config: empty uri", config("uri = ''\n"), USAGE, ("'uri' must be a non-empty string",)),
    Row(
        "varsd start: reconcile_interval = 99999999999999",
        config("reconcile_interval = 99999999999999\n", ("varsd",)),
        USAGE,
        ("varsd: {config}: 'reconcile_interval' must be a whole number of seconds",),
        9,
    ),
    Row(
        "varsd start: state_dir is a file",
        state_file(("varsd",)),
        USAGE,
        ("varsd: cannot use the varsd state directory: {state} is not a directory",),
        11,
    ),
    # state directory, journal, locks
    Row(
        "state_dir is a file: status",
        state_file(("status",)),
        USAGE,
        ("{state} is not a directory (a file is in the way); move it away",),
        11,
    ),
    Row("state_dir is a file: journal", state_file(("journal",)), USAGE, ("{state} is not a directory",), 11),
    Row(
        "state_dir is a file: firmware list",
        state_file(("firmware", "list")),
        USAGE,
        ("{state} is not a directory",),
        11,
    ),
    Row("state_dir is a file: reconcile", state_file(("reconcile",)), USAGE, ("{state} is not a directory",), 11),
    Row("state_dir read-only: status still answers", _readonly_state, OK, ("rostate-", "ok"), 11),
    Row(
        "state_dir read-only: reconcile",
        _readonly_state_write,
        USAGE,
        ("is on a read-only file system; make it writable",),
        11,
    ),
    Row("state_dir on a full disk", _full_state, USAGE, ("no space left on device; free space there",)),
    Row(
        "locks path is a file",
        _locks_file,
        USAGE,
        ("{state}/locks is not a directory (a file is in the way); move it away (varsd recreates",),
        12,
    ),
    Row(
        "journal is not SQLite",
        _journal_garbage,
        USAGE,
        ("{state}/state.sqlite3: cannot read the varsd journal", "move it away"),
    ),
    Row("lock file is a symlink", _lock_symlink, ATTENTION, ("the varsd lock file is not a plain file",)),
    Row(
        "lock held by a frozen process",
        _held_lock(frozen=True),
        ATTENTION,
        ("has shown no sign of life", "check that process"),
        14,
    ),
    Row("lock held by a slow live process: waited for", _held_lock(frozen=False), OK, ("waiting for pid",), 14),
    # firmware descriptors
    Row(
        "descriptor nested 1000 deep",
        descriptor("10-deep.json", "[" * 1000 + "]" * 1000),
        OK,
        ("{etc}/10-deep.json: nested too deeply",),
        3,
    ),
    Row(
        "descriptor with NUL in filename",
        descriptor("10-nul.json", desc(CODE_4M + "\0x", VARS_4M)),
        OK,
        ("{etc}/10-nul.json: 'mapping.executable.filename' contains a NUL byte",),
        10,
    ),
    Row(
        "descriptor pairs 4 MiB code with 2 MiB vars",
        descriptor("10-pair.json", desc(CODE_4M, VARS_2M)),
        OK,
        ("{etc}/10-pair.json: code", "are not one build's pair", "fix the descriptor"),
        4,
    ),
    Row(
        "descriptor pairs 2 MiB code with 4 MiB vars",
        descriptor("10-pair2.json", desc(CODE_2M, VARS_4M)),
        OK,
        ("are not one build's pair",),
        4,
    ),
    Row("descriptor not JSON", descriptor("10-bad.json", "{ nope"), OK, ("10-bad.json: not valid JSON",)),
    Row(
        "descriptor not UTF-8",
        descriptor("10-latin.json", b'{"description": "\xe9"}'),
        OK,
        ("10-latin.json: not valid",),
    ),
    Row("descriptor is a JSON array", descriptor("10-array.json", "[]"), OK, ("the document must be a JSON object",)),
    Row(
        "descriptor without mapping",
        descriptor("10-nomap.json", json.dumps({"interface-types": ["uefi"], "targets": [], "features": []})),
        OK,
        ("missing 'mapping'",),
    ),
    Row(
        "descriptor with unknown device",
        descriptor("10-dev.json", desc(CODE_4M, VARS_4M, mapping={"device": "floppy"})),
        OK,
        ("unknown 'mapping.device' 'floppy'",),
    ),
    Row(
        "descriptor with unknown mode",
        descriptor(
            "10-mode.json",
            lambda bed: desc(CODE_4M, VARS_4M).replace('"device": "flash"', '"device": "flash", "mode": "sideways"'),
        ),
        OK,
        ("unknown 'mapping.mode' 'sideways'",),
    ),
    Row(
        "descriptor with relative filename",
        descriptor("10-rel.json", desc("OVMF_CODE_4M.fd", VARS_4M)),
        OK,
        ("must be an absolute path, got 'OVMF_CODE_4M.fd'",),
    ),
    Row(
        "descriptor naming missing code",
        descriptor("10-gone.json", lambda bed: desc(f"{bed.images}/gone.fd", VARS_4M)),
        OK,
        ("code image {images}/gone.fd does not exist",),
    ),
    Row(
        "descriptor template is code",
        descriptor("10-tc.json", desc(CODE_4M, CODE_4M)),
        OK,
        ("not usable as a varstore template",),
    ),
    Row(
        "descriptor template is a unified image",
        descriptor("10-tu.json", desc(CODE_2M, UNIFIED)),
        OK,
        ("a template must be a varstore file only",),
    ),
    Row(
        "descriptor template is a directory",
        descriptor("10-td.json", desc(CODE_4M, OVMF)),
        OK,
        ("is not a regular file",),
    ),
    Row(
        "descriptor is a dangling symlink",
        lambda bed, env: ((bed.etc / "10-dangle.json").symlink_to(bed.images / "none.json"), ["firmware", "list"])[1],
        OK,
        ("10-dangle.json: cannot read descriptor",),
    ),
    Row(
        "descriptor larger than 1 MiB",
        descriptor("10-big.json", " " * (2 << 20)),
        OK,
        ("10-big.json: cannot read descriptor", "more than the 1048576"),
    ),
    Row(
        "descriptor with a 5000-digit number",
        descriptor("10-num.json", "[" + "9" * 5000 + "]"),
        OK,
        ("10-num.json: not a usable JSON document",),
        3,
    ),
    Row(
        "descriptor without targets",
        descriptor(
            "10-notgt.json",
            lambda bed: json.dumps({k: v for k, v in json.loads(desc(CODE_4M, VARS_4M)).items() if k != "targets"}),
        ),
        OK,
        ("missing 'targets'",),
    ),
    Row(
        "descriptor features not a list",
        descriptor("10-feat.json", desc(CODE_4M, VARS_4M, features="smm")),
        OK,
        ("'features' in the document must be a list of strings",),
    ),
    Row(
        "descriptor name in /usr and /etc: /etc wins",
        descriptor("60-edk2-x86_64.json", desc(CODE_2M, VARS_2M)),
        OK,
        ("{etc}/60-edk2-x86_64.json",),
    ),
    Row(
        "zero-length descriptor hides the distro's",
        descriptor("60-edk2-x86_64.json", ""),
        OK,
        ("/usr/share/qemu/firmware/50-edk2-x86_64-secure.json",),
    ),
    Row(
        "descriptor is a FIFO: skipped, never blocks",
        lambda bed, env: (os.mkfifo(bed.etc / "10-fifo.json"), ["firmware", "list"])[1],
        OK,
        ("/usr/share/qemu/firmware/60-edk2-x86_64.json",),
    ),
    # domains and their files
    Row(
        "varstore is a symlink to the package's template",
        lambda bed, env: (
            os.symlink(VARS_4M, bed.nvram / "link_VARS.fd"),
            ["status", bed.domain(bed.split(str(bed.nvram / "link_VARS.fd")))],
        )[1],
        ATTENTION,
        ("is a firmware package's file, not the domain's own",),
    ),
    Row(
        "nvram_dir does not exist",
        lambda bed, env: (
            bed.write_config(extra=""),
            bed.config.write_text(bed.config.read_text().replace(str(bed.nvram), str(bed.root / "no-nvram"))),
            ["reconcile", bed.domain(f"<loader type='rom'>{UNIFIED}</loader>")],
        )[2],
        ATTENTION,
        ("no-nvram: directory does not exist",),
    ),
    Row(
        "writable pflash holding SeaBIOS",
        domain("<loader readonly='no' type='pflash'>/usr/share/seabios/bios-256k.bin</loader>"),
        OK,
        ("bios-256k.bin is not OVMF", "unmanaged"),
        2,
    ),
    Row(
        "writable pflash holding random bytes",
        domain(lambda bed: f"<loader readonly='no' type='pflash'>{bed.file('flash.bin', os.urandom(65536))}</loader>"),
        OK,
        ("{images}/flash.bin is not OVMF",),
        2,
    ),
    Row(
        "plain non-SMM domain pinned to the Secure Boot build",
        domain(lambda bed: bed.split(bed.varstore("pinsb")), metadata=pin_xml(SB_CODE_4M, CODE_4M)),
        ATTENTION,
        ("needs SMM", "varsctl unpin"),
        6,
    ),
    Row(
        "pin to a build this host does not know",
        domain(lambda bed: bed.split(bed.varstore("pin2m")), metadata=pin_xml(CODE_2M, CODE_4M)),
        ATTENTION,
        ("is not that build", "is not in the firmware archive", "re-pin or unpin"),
        6,
    ),
    Row(
        "varstore path in /etc, not created yet",
        lambda bed, env: (
            bed.watch.append(__import__("pathlib").Path("/etc/varsd-hostile-test_VARS.fd")),
            domain(
                f"<loader readonly='yes' type='pflash'>{CODE_4M}</loader><nvram>/etc/varsd-hostile-test_VARS.fd</nvram>"
            )(bed, env),
        )[1],
        OK,
        ("warning: varstore /etc/varsd-hostile-test_VARS.fd does not exist yet and is outside nvram_dir",),
        15,
    ),
    Row(
        "existing varstore outside nvram_dir",
        domain(lambda bed: bed.split(bed.file("out_VARS.fd", like=VARS_4M)), cmd="status"),
        OK,
        ("warning: varstore {images}/out_VARS.fd is outside nvram_dir",),
        15,
    ),
    Row(
        "oversized varstore (template + 100000 junk bytes)",
        domain(lambda bed: bed.split(bed.varstore("fat", data=b"\0" * 100000)), cmd="status"),
        ATTENTION,
        ("is oversized: 640672 bytes",),
        16,
    ),
    Row(
        "manage='maybe'",
        domain(f"<loader type='rom'>{UNIFIED}</loader>", metadata=" manage='maybe'/>"),
        OK,
        ("manage='maybe' is neither 'yes' nor 'no'",),
        16,
    ),
    Row(
        "200 MB varstore",
        domain(lambda bed: bed.split(_sparse(bed, 200 * 1000 * 1000)), cmd="status"),
        ATTENTION,
        ("is 200000000 bytes, more than the 67108864 any firmware file or varstore is; not read",),
        17,
    ),
    Row(
        "varstore is not a varstore",
        domain(
            lambda bed: bed.split(
                bed.varstore("junk", like=None)
                if False
                else bed.file("junk_VARS.fd", b"\x00" * 540672, where=bed.nvram)
            )
        ),
        ATTENTION,
        ("is not an edk2 varstore", "left untouched"),
    ),
    Row("varstore is a FIFO", domain(lambda bed: bed.split(_fifo(bed))), ATTENTION, ("not a regular file",)),
    Row("varstore is a directory", domain(lambda bed: bed.split(str(_mkdir(bed)))), ATTENTION, ("not a regular file",)),
    Row(
        "code-only loader missing (may be a unified image)",
        domain(lambda bed: f"<loader readonly='no' type='pflash'>{bed.images}/lost-OVMF.fd</loader>"),
        ATTENTION,
        ("cannot be read", "may be a unified image holding the guest's variables; left untouched"),
    ),
    Row(
        "loader is /dev/zero",
        domain("<loader readonly='no' type='pflash'>/dev/zero</loader>"),
        ATTENTION,
        ("/dev/zero", "left untouched"),
    ),
    Row(
        "Secure Boot code on i440fx",
        domain(f"<loader type='pflash'>{SB_CODE_4M}</loader>", machine="pc-i440fx-7.2"),
        ATTENTION,
        ("with Secure Boot", "not requiring SMM"),
    ),
    Row(
        "confidential guest (SEV)",
        domain(
            f"<loader type='pflash'>{UNIFIED}</loader>",
            extra=(
                "<launchSecurity type='sev'><cbitpos>47</cbitpos><reducedPhysBits>1</reducedPhysBits>"
                "<policy>0x0003</policy></launchSecurity>"
            ),
        ),
        OK,
        ("never split",),
    ),
    Row(
        "stateless firmware",
        domain(f"<loader type='pflash' stateless='yes'>{UNIFIED}</loader>"),
        OK,
        ("stateless firmware",),
    ),
    Row(
        "SeaBIOS as -bios rom",
        domain("<loader type='rom'>/usr/share/seabios/bios-256k.bin</loader>", machine="pc-i440fx-7.2"),
        OK,
        ("is not OVMF",),
    ),
    Row(
        "opted out domain",
        domain(f"<loader type='rom'>{UNIFIED}</loader>", metadata=" manage='no'/>"),
        OK,
        ("opted out (varsd metadata manage='no')",),
    ),
    Row(
        "unified image while running",
        domain(
            lambda bed: (
                "<loader readonly='no' type='pflash'>"
                f"{bed.file('u-OVMF.fd', open(CODE_4M, 'rb').read(), like=VARS_4M)}</loader>"
            ),
            start=True,
        ),
        OK,
        ("will be split once the domain is shut off",),
    ),
    Row(
        "package template as varstore while running",
        domain(
            bed_split_template := (
                lambda bed: f"<loader readonly='yes' type='pflash'>{CODE_4M}</loader><nvram>{VARS_4M}</nvram>"
            ),
            start=True,
        ),
        OK,
        ("is a firmware package's file", "once the domain is shut off"),
    ),
    Row(
        "domain XML of 5 MB",
        domain(_huge_xml, extra="<description>" + "x" * (5 << 20) + "</description>", cmd="status"),
        OK,
        ("{name}", " ok "),
    ),
    Row(
        "domain name with path characters",
        domain(f"<loader type='rom'>{UNIFIED}</loader>", cmd="status", name="evil $(reboot);`x` *?"),
        ATTENTION,
        ("needs repair",),
    ),
    Row("domain redefined between plan and write", _clone, ATTENTION, ("was redefined meanwhile; will look again",)),
    Row(
        "libvirt fails for one domain of the listing",
        lambda bed, env: _one_domain_fails(bed, env),
        ATTENTION,
        ("cannot read persistent XML: internal error: unable to format this domain's XML", "opted out"),
    ),
    Row(
        "template replaced between plan and provisioning",
        lambda bed, env: _template_swapped(bed, env),
        ATTENTION,
        ("{images}/VARS.fd: varstore layout", "does not match the layout the firmware code expects"),
    ),
    Row(
        "an error outcome's class (full disk, missing nvram_dir) is its real one, never none",
        lambda bed, env: (
            bed.config.write_text(bed.config.read_text().replace(str(bed.nvram), str(bed.root / "no-nvram"))),
            ["reconcile", "--json", bed.domain(f"<loader type='rom'>{UNIFIED}</loader>")],
        )[1],
        ATTENTION,
        ('"config": "bios-rom"', '"status": "error"', "directory does not exist"),
        13,
    ),
    # command line and undo
    Row(
        "undo 99999999999999999999999",
        lambda bed, env: ["undo", "99999999999999999999999"],
        USAGE,
        ("out of range",),
        9,
    ),
    Row("journal --limit 10**20", lambda bed, env: ["journal", "--limit", "1" + "0" * 20], USAGE, ("out of range",), 9),
    Row(
        "firmware history --limit -1",
        lambda bed, env: ["firmware", "history", "--limit", "-1"],
        USAGE,
        ("out of range",),
        9,
    ),
    Row("undo of an entry that does not exist", lambda bed, env: ["undo", "4242"], USAGE, ("no journal entry #4242",)),
    Row(
        "undo while varsd would redo the repair",
        _undo("plain"),
        ATTENTION,
        ("would change it again at its next look. Nothing was changed", "--opt-out"),
        8,
    ),
    Row("undo after an admin's edit", _undo("edited"), ATTENTION, ("changed after journal", "--force")),
    Row(
        "domain that does not exist",
        lambda bed, env: ["status", "no-such-domain-varsd"],
        USAGE,
        ("no-such-domain-varsd",),
    ),
    Row(
        "migrate a never-started domain",
        domain(
            lambda bed: (
                f"<loader readonly='yes' type='pflash'>{CODE_4M}</loader><nvram>{bed.nvram}/never_VARS.fd</nvram>"
            ),
            cmd="migrate",
        ),
        OK,
        ("does not exist yet", "nothing to migrate"),
        None,
    ),
    Row(
        "migrate a running domain",
        domain(lambda bed: bed.split(bed.varstore("runmig")), cmd="migrate", start=True),
        ATTENTION,
        ("is running", "Shut it down"),
    ),
    Row(
        "migrate DOMAIN and --all",
        lambda bed, env: ["migrate", "x", "--all"],
        USAGE,
        ("argument --all: not allowed with argument DOMAIN",),
    ),
    Row(
        "pin --build with a 3-digit prefix",
        lambda bed, env: ["pin", _bound(bed, env), "--build", "abc"],
        ATTENTION,
        ("prefix of at least 6",),
    ),
    Row("libvirt unreachable", _bad_uri, USAGE, ("varsd-hostile.sock",)),
]


def _one_domain_fails(bed: Bed, env) -> list[str]:
    """libvirt answers every call but one domain's XMLDesc with an error (e.g. its QEMU
    driver state is stuck): that domain's row says so, the others are reported."""
    import libvirt

    bad = bed.domain(f"<loader type='rom'>{UNIFIED}</loader>")
    good = bed.domain(bed.split(bed.varstore("good")), metadata=" manage='no'/>")
    real = libvirt.virDomain.XMLDesc

    def xmldesc(self, flags=0):
        if self.name() == bad:
            raise libvirt.libvirtError("internal error: unable to format this domain's XML")
        return real(self, flags)

    env["before"] = bed.snapshot()
    env["monkeypatch"].setattr(libvirt.virDomain, "XMLDesc", xmldesc)
    return ["status", bad, good]


def _template_swapped(bed: Bed, env) -> list[str]:
    """A package upgrade replaces the template (by rename) after varsd planned from it."""
    code = bed.file("CODE.fd", like=CODE_4M)
    template = bed.file("VARS.fd", like=VARS_4M)
    bed.write_config(f'[[extra_firmware]]\ncode = "{code}"\ntemplate = "{template}"\n')
    bed.config.write_text(bed.config.read_text().replace('"/usr/share/qemu/firmware", ', ""))  # the only build
    name = bed.domain(f"<loader type='rom'>{UNIFIED}</loader>", machine="pc-i440fx-7.2")
    from varsd.engine import reconciler

    real = reconciler.Reconciler._execute

    def swapped(self, *args, **kwargs):
        new = bed.file("VARS.fd.dpkg-new", like=VARS_2M)
        os.rename(new, template)
        env["after"].update(bed.snapshot())
        return real(self, *args, **kwargs)

    env["monkeypatch"].setattr(reconciler.Reconciler, "_execute", swapped)
    return ["reconcile", name]


def _bound(bed: Bed, env) -> str:
    name = bed.domain(bed.split(bed.varstore("pfx")))
    assert bed.run(env["capsys"], "reconcile", name)[0] == OK
    return name


def _sparse(bed: Bed, size: int) -> str:
    path = bed.varstore("sparse")
    with open(path, "r+b") as f:
        f.truncate(size)
    return path


def _fifo(bed: Bed) -> str:
    path = bed.nvram / "fifo_VARS.fd"
    os.mkfifo(path)
    return str(path)


def _mkdir(bed: Bed):
    path = bed.nvram / "dir_VARS.fd"
    path.mkdir()
    return path


@pytest.mark.parametrize("row", ROWS, ids=[r.cls for r in ROWS])
def test_hostile(row: Row, bed: Bed, capsys, monkeypatch, mount_tmpfs) -> None:
    env = {"mount": mount_tmpfs, "capsys": capsys, "monkeypatch": monkeypatch, "procs": [], "after": {}}
    try:
        args = row.make(bed, env)
        capsys.readouterr()
        before = env.get("before") or bed.snapshot()
        rc, seen = bed.run(capsys, *args)
        if "before" in env:
            monkeypatch.undo()  # the snapshot reads XML through the real libvirt call
        after = bed.snapshot()
    finally:
        for proc in env["procs"]:
            proc.kill()
            proc.wait(10)
    fmt = {
        "nvram": bed.nvram,
        "images": bed.images,
        "etc": bed.etc,
        "state": bed.state,
        "config": bed.config,
        "name": bed.names[-1] if bed.names else "",
    }
    assert "Traceback" not in seen, seen
    assert rc == row.rc, seen
    for fragment in row.says:
        assert fragment.format(**fmt) in seen, seen
    expected = {**before, **env["after"]}
    changed = sorted(k for k in set(expected) | set(after) if expected.get(k) != after.get(k))
    assert not changed, f"changed or lost: {changed}"


def test_the_table_has_the_classes_the_issue_asks_for() -> None:
    """Issue 12: every class of the issue plus at least 20 more, at least 86 in all."""
    assert len({r.cls for r in ROWS}) == len(ROWS) >= 86
    assert {r.defect for r in ROWS} >= {2, 3, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17}


def test_billion_laughs_does_not_expand() -> None:
    """A domain XML with nested entities: never expanded (libvirt refuses it too)."""
    laughs = (
        "<!DOCTYPE d [<!ENTITY a 'haha'>"
        + "".join(f"<!ENTITY {chr(98 + i)} '{('&' + chr(97 + i) + ';') * 10}'>" for i in range(9))
        + "]>"
    )
    xml = laughs + "<domain><name>&j;</name><uuid>u</uuid><os><type arch='x86_64'>hvm</type></os></domain>"
    try:
        fw = parse_domain(xml)
    except DomainXMLError as exc:
        assert "domain XML" in str(exc) or str(exc)
    else:
        assert len(fw.name or "") < 1000


def test_non_xml_domain_is_a_domain_xml_error() -> None:
    with pytest.raises(DomainXMLError):
        parse_domain("this is not XML <")


def test_readme_lists_every_class() -> None:
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    missing = [r.cls for r in ROWS if f"| {r.cls} |" not in readme]
    assert not missing, f"README 'Hostile input' lacks: {missing}"


_ = (VARSD_NS, CODE_4M)
