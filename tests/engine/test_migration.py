"""`varsd.engine.migration`: the pure planner as a table, then the shell on `test:///default`.

The planner gets the facts the shell would read (Debian 12's real catalog and images,
varstore facts written out); the shell tests run real migrations of real varstores in
a temp nvram dir, with libvirt's in-process test driver holding the domain XML, and
check what is on disk and in the journal afterwards, including every failure path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import uuid as uuidlib
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest
from aavmf_files import x86_only
from support.clock import FixedClock
from support.domains import domain_xml, split_os, varsd_metadata
from support.varstores import read_variables

from varsd.adapters import fsio, virtfw
from varsd.adapters.backup_index import BackupIndex
from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.clock import parse_stamp, stamp
from varsd.config import Config, ExtraFirmware
from varsd.domain.xml import parse_domain
from varsd.engine import migration
from varsd.engine.inspect import FileInspector
from varsd.engine.migration import MigrationFailed, Migrator, replace_file
from varsd.engine.reconciler import Reconciler
from varsd.errors import HypervisorError
from varsd.firmware.catalog import load_catalog
from varsd.model.domain import FirmwareConfig, Status
from varsd.model.firmware import Catalog, VarstoreLayout
from varsd.planning import migration as planned
from varsd.planning.migration import (
    MigrationFacts,
    MigrationRefused,
    NothingToMigrate,
    VarstoreFacts,
    compare_variables,
    enrolled_keys,
    plan_migration,
    resolve_build,
)

OVMF = "/usr/share/OVMF"
FW_DIR = "/usr/share/qemu/firmware"
CODE_2M, VARS_2M = f"{OVMF}/OVMF_CODE.fd", f"{OVMF}/OVMF_VARS.fd"
SB_CODE_2M, VARS_2M_MS = f"{OVMF}/OVMF_CODE.secboot.fd", f"{OVMF}/OVMF_VARS.ms.fd"
CODE_4M, VARS_4M = f"{OVMF}/OVMF_CODE_4M.fd", f"{OVMF}/OVMF_VARS_4M.fd"
SB_CODE_4M, VARS_4M_MS = f"{OVMF}/OVMF_CODE_4M.secboot.fd", f"{OVMF}/OVMF_VARS_4M.ms.fd"
UNIFIED_2M = "/usr/share/ovmf/OVMF.fd"
LAYOUT_2M = VarstoreLayout(size=131072, start=100, end=57344)
LAYOUT_4M = VarstoreLayout(size=540672, start=100, end=262144)
NVRAM = "/var/lib/libvirt/qemu/nvram"
NOW = parse_stamp("2025-06-01T12:00:00Z")  # the clock's aware datetime; XML holds its stamp
VENDOR = "5b3c9c5e-1f6a-4b8e-9d2a-7a1f0e6d4c21"
EFI_GLOBAL = planned.EFI_GLOBAL
ENROLLED = "40-edk2-x86_64-secure-enrolled.json"
SECURE = "50-edk2-x86_64-secure.json"
PLAIN = "60-edk2-x86_64.json"
EXTRA_2M = "config:extra_firmware[0]"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    """Debian's three 4 MiB descriptors plus the plain 2 MiB pair from the config."""
    cat = x86_only(load_catalog([FW_DIR], [ExtraFirmware(code=CODE_2M, template=VARS_2M)]))
    assert len(cat.builds) == 4 and cat.problems == ()
    return cat


# every migration case has SMM (the Secure Boot builds need it)
_xml = partial(domain_xml, features="<smm state='on'/>")


def _facts(xml: str, *, state: str = "shut off", active: bool = False, persistent: bool = True,
           excluded: bool = False, source: VarstoreFacts | None | str = "default") -> MigrationFacts:
    fw = parse_domain(xml)
    image = FileInspector().inspect(fw.loader_path, digest=True) if fw.loader_path else None
    if source == "default":
        source = VarstoreFacts(path=fw.nvram_path or "", size=131072, layout=LAYOUT_2M, variables=30,
                               enrolled_keys=True)
    return MigrationFacts(xml=xml, firmware=fw, state=state, active=active, persistent=persistent,
                          excluded=excluded, image=image, source=source)  # type: ignore[arg-type]


def _src(path: str, *, keys: bool, layout: VarstoreLayout = LAYOUT_2M, size: int | None = None,
         **kw) -> VarstoreFacts:
    return VarstoreFacts(path=path, size=size or layout.size, layout=layout, variables=5, enrolled_keys=keys, **kw)


SB2 = split_os(SB_CODE_2M, f"{NVRAM}/g_VARS.fd", secure=True)
PLAIN2 = split_os(CODE_2M, f"{NVRAM}/g_VARS.fd")
PLAIN4 = split_os(CODE_4M, f"{NVRAM}/g_VARS.fd")
G = f"{NVRAM}/g_VARS.fd"

# (case, xml, facts overrides, --to, expected descriptor file name)
TARGETS = [
    ("secure-boot 2 MiB with enrolled keys -> enrolled build", _xml("g", SB2), {"source": _src(G, keys=True)},
     None, ENROLLED),
    ("secure-boot 2 MiB without keys -> unenrolled build", _xml("g", SB2), {"source": _src(G, keys=False)},
     None, SECURE),
    ("plain 2 MiB -> plain 4 MiB (keys do not matter)", _xml("g", PLAIN2), {"source": _src(G, keys=True)},
     None, PLAIN),
    ("plain on i440fx -> plain 4 MiB", _xml("g", PLAIN2, machine="pc-i440fx-7.2"), {"source": _src(G, keys=False)},
     None, PLAIN),
    ("tracked central build wins over the first match",
     _xml("g", SB2, metadata=varsd_metadata(f"><varsd:build code='{SB_CODE_4M}' sha256='00'/>")),
     {"source": _src(G, keys=True)}, None, SECURE),
    ("--to descriptor file name", _xml("g", PLAIN2), {}, PLAIN, PLAIN),
    ("--to descriptor stem", _xml("g", PLAIN2), {}, "60-edk2-x86_64", PLAIN),
    ("--to descriptor path", _xml("g", PLAIN2), {}, f"{FW_DIR}/{PLAIN}", PLAIN),
    ("--to code path", _xml("g", PLAIN2), {}, CODE_4M, PLAIN),
    ("--to code file name", _xml("g", PLAIN2), {}, "OVMF_CODE_4M.fd", PLAIN),
    ("--to code digest shared by two builds: the enrolled one for a store with keys",
     _xml("g", SB2), {"source": _src(G, keys=True)}, "sha:" + SB_CODE_4M, ENROLLED),
    ("--to code digest shared by two builds: the plain-keyed one for a store without",
     _xml("g", SB2), {"source": _src(G, keys=False)}, "sha:" + SB_CODE_4M, SECURE),
    ("--to plain for unknown code whose XML alone says secure='yes' (may be SMM-protected plain flash)",
     _xml("g", SB2), {"source": _src(G, keys=False)}, PLAIN, PLAIN),
    ("--to the 2 MiB extra pair for a 4 MiB store (fit is checked by virt-firmware later)",
     _xml("g", PLAIN4), {"source": _src(G, keys=False, layout=LAYOUT_4M)}, CODE_2M, EXTRA_2M),
]


def _sha_spec(spec: str | None) -> str | None:
    if spec and spec.startswith("sha:"):
        return fsio.sha256_file(spec[4:])[:10]
    return spec


@pytest.mark.parametrize(("case", "xml", "over", "to", "expected"), TARGETS, ids=[t[0] for t in TARGETS])
def test_target_choice(catalog, case, xml, over, to, expected) -> None:
    plan = plan_migration(_facts(xml, **over), catalog, to=_sha_spec(to), nvram_dir=NVRAM, now=NOW)
    assert os.path.basename(plan.target.origin) == expected
    assert plan.template == plan.target.template_path and plan.target_layout == plan.target.layout
    new = parse_domain(plan.new_xml)
    assert (new.loader_path, new.loader_readonly, new.loader_type) == (plan.target.code_path, True, "pflash")
    assert new.loader_secure is (True if plan.target.secure_boot else None)
    assert new.nvram_path == G and new.nvram_template == plan.target.template_path
    assert new.smm is True
    md = new.metadata
    assert (md.build_code_path, md.build_code_sha256) == (plan.target.code_path, plan.target.code_sha256)
    assert (md.template_path, md.varstore_source, md.provisioned_at) == (plan.template, f"migrated:{G}", NOW)
    assert plan.in_place and plan.varstore == plan.source == G


# (case, xml, facts overrides, --to, message fragments)
REFUSALS = [
    ("running", _xml("g", SB2), {"state": "running", "active": True}, None, ["domain 'g'", "is running", "shut"]),
    ("paused", _xml("g", SB2), {"state": "paused", "active": True}, None, ["domain 'g'", "is paused"]),
    ("transient", _xml("g", SB2), {"persistent": False}, None, ["transient"]),
    ("opted out", _xml("g", SB2, metadata=varsd_metadata(" manage='no'>")), {}, None, ["opted out"]),
    ("excluded", _xml("g", SB2), {"excluded": True}, None, ["excluded"]),
    ("confidential", _xml("g", f"<loader type='pflash'>{UNIFIED_2M}</loader>",
                          extra="<launchSecurity type='sev'/>"), {}, None, ["confidential"]),
    ("bios-rom has no variables", _xml("g", f"<loader type='rom'>{UNIFIED_2M}</loader>"), {}, None,
     ["no variables to migrate", "varsctl reconcile"]),
    ("seabios", _xml("g", ""), {}, None, ["'none'"]),
    ("varstore is a symlink", _xml("g", SB2), {"source": VarstoreFacts(path=G, size=10, symlink=True)}, None,
     ["symbolic link"]),
    ("varstore is garbage", _xml("g", SB2),
     {"source": VarstoreFacts(path=G, size=4096, error="no NvData firmware volume")}, None,
     ["not a usable edk2 varstore", "no NvData"]),
    ("varstore is the package's template", _xml("g", split_os(SB_CODE_2M, VARS_2M_MS, secure=True)),
     {"source": _src(VARS_2M_MS, keys=True)}, None, ["not private"]),
    ("varstore larger than its store (a unified copy as nvram)", _xml("g", SB2),
     {"source": _src(G, keys=True, size=2097152)}, None, ["not private"]),
    ("pinned by an admin", _xml("g", SB2, metadata=varsd_metadata("><varsd:pin sha256='abcdef0123456789'/>")), {}, None,
     ["pinned to build abcdef012345", "varsctl unpin g"]),
    ("held back by the manual upgrade policy",
     _xml("g", SB2, metadata=varsd_metadata("><varsd:pin sha256='abcdef0123456789' by='policy'/>")), {}, None,
     ["upgrade_policy", "varsctl upgrade approve g"]),
    ("secure boot on i440fx: no build may have SMM there", _xml("g", SB2, machine="pc-i440fx-7.2"), {}, None,
     ["no catalog build to migrate to", "not requiring SMM"]),
    ("--to unknown", _xml("g", SB2), {}, "99-nothing.json", ["--to 99-nothing.json", "no catalog build", ENROLLED]),
    ("--to digest prefix too short", _xml("g", SB2), {}, "sha:" + SB_CODE_4M + ":4", ["no catalog build"]),
    ("--to plain build for a domain on a known Secure Boot build",
     _xml("g", split_os(SB_CODE_4M, G, secure=True)), {}, PLAIN, ["what the guest trusts"]),
    ("--to Secure Boot build for a plain domain", _xml("g", PLAIN2), {}, SECURE, ["what the guest trusts"]),
    ("--to blank", _xml("g", SB2), {}, "", ["no catalog build"]),
]


@pytest.mark.parametrize(("case", "xml", "over", "to", "fragments"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(catalog, case, xml, over, to, fragments) -> None:
    if to and to.startswith("sha:"):
        path, _, length = to[4:].partition(":")
        to = fsio.sha256_file(path)[: int(length)]
    with pytest.raises(MigrationRefused) as info:
        plan_migration(_facts(xml, **over), catalog, to=to if to != "" else "  ", nvram_dir=NVRAM, now=NOW)
    assert not isinstance(info.value, NothingToMigrate)
    for fragment in fragments:
        assert fragment in str(info.value), case


def test_already_on_the_target_is_nothing_to_migrate(catalog) -> None:
    xml = _xml("g", split_os(SB_CODE_4M, G, secure=True))
    with pytest.raises(NothingToMigrate, match="already uses"):
        plan_migration(_facts(xml, source=_src(G, keys=False, layout=LAYOUT_4M)), catalog, to=None,
                       nvram_dir=NVRAM, now=NOW)


def test_a_varstore_not_created_yet_is_nothing_to_migrate(catalog) -> None:
    """#12: nothing to do is exit 0 (README), so it is NothingToMigrate, not a refusal."""
    with pytest.raises(NothingToMigrate, match="does not exist yet"):
        plan_migration(_facts(_xml("g", SB2), source=None), catalog, to=None, nvram_dir=NVRAM, now=NOW)


def test_varsds_own_incompatible_pin_is_lifted(catalog) -> None:
    """The pin varsd set because the central build no longer fits is what migrating resolves."""
    pin = "><varsd:pin sha256='abcdef0123456789' by='incompatible' reason='layout' at='2025-05-01T00:00:00Z'/>"
    xml = _xml("g", SB2, metadata=varsd_metadata(pin))
    plan = plan_migration(_facts(xml), catalog, to=None, nvram_dir=NVRAM, now=NOW)
    md = parse_domain(plan.new_xml).metadata
    assert (md.pinned_sha256, md.pin_by, md.pin_reason, md.pinned_at, md.pin_kind) == (None,) * 5
    assert "<varsd:pin" not in plan.new_xml
    assert md.build_code_path == plan.target.code_path


def test_unified_image_goes_to_a_new_private_varstore(catalog) -> None:
    """A private unified 2 MiB image: read only; the variables go to <nvram_dir>/<name>_VARS.fd."""
    xml = _xml("u", "<loader readonly='no' type='pflash'>/srv/vm/u-OVMF.fd</loader>")
    facts = dataclasses.replace(
        _facts(xml, source=_src("/srv/vm/u-OVMF.fd", keys=False, size=2097152)),
        image=dataclasses.replace(FileInspector().inspect(UNIFIED_2M, digest=True), path="/srv/vm/u-OVMF.fd"),
    )
    plan = plan_migration(facts, catalog, to=None, nvram_dir=NVRAM, now=NOW)
    assert plan.config is FirmwareConfig.UNIFIED and not plan.in_place
    assert plan.varstore == f"{NVRAM}/u_VARS.fd" and plan.source == "/srv/vm/u-OVMF.fd"
    assert os.path.basename(plan.target.origin) == PLAIN
    new = parse_domain(plan.new_xml)
    assert (new.loader_path, new.nvram_path, new.loader_readonly) == (CODE_4M, f"{NVRAM}/u_VARS.fd", True)


def test_resolve_build(catalog) -> None:
    sb_sha = fsio.sha256_file(SB_CODE_4M)
    assert [os.path.basename(b.origin) for b in resolve_build(catalog, sb_sha[:8])] == [ENROLLED, SECURE]
    assert [b.origin for b in resolve_build(catalog, "OVMF_CODE.fd")] == [EXTRA_2M]
    assert resolve_build(catalog, sb_sha[:5]) == []  # shorter than MIN_SHA_PREFIX
    assert resolve_build(catalog, "OVMF_CODE_4M.ms.fd")[0].code_path == f"{OVMF}/OVMF_CODE_4M.ms.fd"
    assert resolve_build(catalog, "/nowhere/x.json") == []


def test_enrolled_keys_needs_pk_kek_and_db() -> None:
    ms = read_variables(VARS_2M_MS)
    assert enrolled_keys(ms)
    assert not enrolled_keys(read_variables(VARS_2M))
    assert not enrolled_keys({k: v for k, v in ms.items() if not k.endswith(":KEK")})


def test_compare_variables_names_what_differs() -> None:
    old = read_variables(VARS_2M_MS)
    assert compare_variables(old, dict(old)) is None
    changed = dict(old)
    key = f"{EFI_GLOBAL}:BootOrder"
    changed[f"{EFI_GLOBAL}:PK"] = dataclasses.replace(old[f"{EFI_GLOBAL}:PK"], data=b"x")
    changed[key] = virtfw.EfiVariable("BootOrder", EFI_GLOBAL, 7, b"\x01\x00")
    del changed[f"{planned.EFI_IMAGE_SECURITY_DATABASE}:dbx"]
    report = compare_variables(old, changed)
    assert report is not None
    assert "missing: d719b2cb-3d3a-4596-a3bc-dad00e67656f:dbx" in report
    assert f"changed: {EFI_GLOBAL}:PK" in report and f"unexpected: {key}" in report


# -- replace_file --------------------------------------------------------------------------


def test_replace_file_is_atomic_and_keeps_owner_and_mode(tmp_path, qemu_owner) -> None:
    path = tmp_path / "d_VARS.fd"
    path.write_bytes(b"old")
    os.chown(path, *qemu_owner)
    os.chmod(path, 0o640)
    before = path.stat()
    replace_file(str(path), b"new content", expect=b"old")
    after = path.stat()
    assert path.read_bytes() == b"new content"
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (*qemu_owner, 0o640)
    assert after.st_ino != before.st_ino  # renamed into place, not rewritten
    assert sorted(os.listdir(tmp_path)) == ["d_VARS.fd"]


def test_replace_file_refuses_symlinks_and_changed_content(tmp_path) -> None:
    target = tmp_path / "real.fd"
    target.write_bytes(b"real")
    link = tmp_path / "link.fd"
    link.symlink_to(target)
    with pytest.raises(MigrationFailed, match="symbolic link"):
        replace_file(str(link), b"x")
    with pytest.raises(MigrationFailed, match="changed while"):
        replace_file(str(target), b"x", expect=b"something else")
    assert target.read_bytes() == b"real" and link.is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["link.fd", "real.fd"]


def test_replace_file_on_a_full_disk_leaves_the_old_file(mount_tmpfs) -> None:
    mnt = mount_tmpfs("size=600k")
    path = Path(mnt) / "d_VARS.fd"
    old = Path(VARS_2M).read_bytes()
    path.write_bytes(old)
    with pytest.raises(MigrationFailed, match="no space left"):
        replace_file(str(path), Path(VARS_4M).read_bytes())
    assert path.read_bytes() == old
    assert os.listdir(mnt) == ["d_VARS.fd"]


# -- the shell on test:///default ----------------------------------------------------------

URI = "test:///default"
T0 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)


@dataclasses.dataclass
class Bed:
    cfg: Config
    hv: Hypervisor
    rec: Reconciler
    journal: Journal
    nvram: Path
    state: Path

    def migrator(self) -> Migrator:
        return Migrator(self.rec, clock=FixedClock(T0))

    def varstore(self, name: str, data: bytes, mode: int = 0o600) -> Path:
        path = self.nvram / f"{name}_VARS.fd"
        path.write_bytes(data)
        os.chmod(path, mode)
        return path

    def define(self, name: str, os_inner: str, **kw) -> str:
        return self.hv.define(_xml(name, os_inner, **kw)).uuid


@pytest.fixture
def bed(tmp_path, catalog, qemu_owner) -> Iterator[Bed]:
    cfg = Config(uri=URI, nvram_dir=str(tmp_path / "nvram"), state_dir=str(tmp_path / "state"),
                 firmware_dirs=(FW_DIR,), extra_firmware=(ExtraFirmware(code=CODE_2M, template=VARS_2M),))
    os.makedirs(cfg.nvram_dir)
    journal = Journal(cfg.journal_path)
    with Hypervisor(URI) as hv:
        before = {r.uuid for r in hv.list_domains()}
        rec = Reconciler(cfg, hv, catalog, journal, qemu_owner, clock=FixedClock(NOW))
        yield Bed(cfg, hv, rec, journal, tmp_path / "nvram", tmp_path / "state")
        for ref in hv.list_domains():
            if ref.uuid not in before:
                if ref.active:
                    hv.destroy(ref.uuid)
                # the test driver knows no NVRAM flags: plain undefine (the files are in tmp_path)
                hv.connection.lookupByUUIDString(ref.uuid).undefine()
    journal.close()


def _guest_store(template: str) -> bytes:
    """The template plus what a used guest has: a boot entry, BootOrder, a vendor variable, MokList."""
    boot = (1).to_bytes(4, "little") + (4).to_bytes(2, "little") + "varsd\0".encode("utf-16-le") + b"\x7f\xff\x04\x00"
    return virtfw.with_variables(template, [
        virtfw.EfiVariable("Boot0007", EFI_GLOBAL, 7, boot),
        virtfw.EfiVariable("BootOrder", EFI_GLOBAL, 7, b"\x07\x00"),
        virtfw.EfiVariable("VarsdProof", VENDOR, 7, b"kept across the migration"),
        virtfw.EfiVariable("MokList", "605dab50-e046-4300-abb6-3dd810dd8b23", 3, b"\x01" * 300),
    ])


def test_migrate_moves_every_variable_backs_up_and_rebinds(bed: Bed, qemu_owner) -> None:
    old = _guest_store(VARS_2M_MS)
    store = bed.varstore("sb2", old, mode=0o640)
    os.chown(store, *qemu_owner)
    uuid = bed.define("sb2", split_os(SB_CODE_2M, str(store), secure=True))
    ref = bed.hv.lookup(uuid)
    assert bed.rec.examine(ref)[1].status is Status.NEEDS_MIGRATION
    old_xml = bed.hv.persistent_xml(uuid)
    inode = store.stat().st_ino

    result = bed.migrator().migrate(ref)

    assert os.path.basename(result.plan.target.origin) == ENROLLED
    # every variable moved, byte-equal, into the 4 MiB layout, at the same path
    old_vars = virtfw.variables_of_bytes(old, "old")
    new_vars = read_variables(str(store))
    assert new_vars == old_vars and result.variables == len(old_vars)
    for key in ("Boot0007", "BootOrder", "PK", "KEK"):
        assert f"{EFI_GLOBAL}:{key}" in new_vars
    assert f"{VENDOR}:VarsdProof" in new_vars
    assert virtfw.read_layout(str(store)) == LAYOUT_4M and store.stat().st_size == LAYOUT_4M.size
    st = store.stat()
    assert st.st_ino != inode and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*qemu_owner, 0o640)
    # the backup: in the backup store, indexed, 0600, equal to the old store
    backup = Path(result.backup or "")
    [record] = BackupIndex(str(bed.state / "state.sqlite3")).records(uuid)
    assert record.reason == "before-write:migrate" and stamp(record.taken) == "2025-06-01T12:00:00Z"
    assert backup == bed.state / "backups" / "objects" / f"{record.sha256}.fd"
    assert backup.read_bytes() == old and stat.S_IMODE(backup.stat().st_mode) == 0o600
    # the XML, journaled with the old one
    new = parse_domain(bed.hv.persistent_xml(uuid))
    assert (new.loader_path, new.loader_secure, new.smm, new.nvram_path, new.nvram_template) == (
        f"{OVMF}/OVMF_CODE_4M.ms.fd", True, True, str(store), VARS_4M_MS)
    assert new.metadata.build_code_sha256 == fsio.sha256_file(SB_CODE_4M)
    changes = bed.journal.changes(uuid)
    assert len(changes) == 1 and changes[0].old_xml == old_xml and changes[0].outcome == "applied"
    assert bed.rec.examine(bed.hv.lookup(uuid))[1].status is Status.OK
    # the build it is bound to now is archived, like every binding
    archived = Path(bed.cfg.archive_dir) / f"{result.plan.target.code_sha256}.fd"
    assert archived.read_bytes() == Path(SB_CODE_4M).read_bytes()
    # a second run has nothing to do
    with pytest.raises(NothingToMigrate):
        bed.migrator().migrate(bed.hv.lookup(uuid))


def test_unified_image_is_read_and_left_alone(bed: Bed, tmp_path) -> None:
    image = tmp_path / "u-OVMF.fd"
    whole = Path(UNIFIED_2M).read_bytes()
    image.write_bytes(_guest_store_prefix(whole))
    before = image.read_bytes()
    uuid = bed.define("uni", f"<loader readonly='no' type='pflash'>{image}</loader>")
    result = bed.migrator().migrate(bed.hv.lookup(uuid))
    assert image.read_bytes() == before
    new_store = bed.nvram / "uni_VARS.fd"
    assert result.plan.varstore == str(new_store) and not result.plan.in_place
    assert read_variables(str(new_store)) == virtfw.variables_of_bytes(before[: LAYOUT_2M.size], "u")
    assert Path(result.backup or "").read_bytes() == before[: LAYOUT_2M.size]
    assert parse_domain(bed.hv.persistent_xml(uuid)).loader_path == CODE_4M


def _guest_store_prefix(unified: bytes) -> bytes:
    head = Path(os.environ.get("TMPDIR", "/tmp")) / f"varsd-head-{uuidlib.uuid4()}.fd"
    head.write_bytes(unified[: LAYOUT_2M.size])
    try:
        return virtfw.with_variable(str(head), "VarsdProof", VENDOR, b"in the unified image") + unified[
            LAYOUT_2M.size:]
    finally:
        head.unlink()


def _big_store() -> bytes:
    """A 4 MiB store holding 160 KiB of variables: more than a 2 MiB store's 56 KiB of room."""
    return virtfw.with_variables(VARS_4M, [
        virtfw.EfiVariable(f"Big{i}", VENDOR, 7, bytes([i]) * 16384) for i in range(10)
    ])


def test_too_small_template_changes_nothing(bed: Bed) -> None:
    old = _big_store()
    store = bed.varstore("big", old)
    uuid = bed.define("big", split_os(CODE_4M, str(store)))
    xml = bed.hv.persistent_xml(uuid)
    inode = store.stat().st_ino
    with pytest.raises(MigrationFailed) as info:
        bed.migrator().migrate(bed.hv.lookup(uuid), to=CODE_2M)
    message = str(info.value)
    assert "domain 'big'" in message and "room for only" in message and "nothing was changed" in message
    assert store.read_bytes() == old and store.stat().st_ino == inode
    assert bed.hv.persistent_xml(uuid) == xml
    assert not (bed.state / "backups").exists()
    assert bed.journal.changes(uuid) == []


def test_failed_define_restores_the_backup(bed: Bed, monkeypatch) -> None:
    old = _guest_store(VARS_2M)
    store = bed.varstore("fd", old)
    uuid = bed.define("fd", split_os(CODE_2M, str(store)))
    xml = bed.hv.persistent_xml(uuid)

    def refuse(_xml: str):
        raise HypervisorError("domain 'fd': cannot define: injected failure")

    monkeypatch.setattr(bed.hv, "define", refuse)
    with pytest.raises(MigrationFailed) as info:
        bed.migrator().migrate(bed.hv.lookup(uuid), to=PLAIN)
    assert "injected failure" in str(info.value) and "restored from the backup" in str(info.value)
    assert store.read_bytes() == old
    assert bed.hv.persistent_xml(uuid) == xml
    assert [c.outcome for c in bed.journal.changes(uuid)] == ["failed: domain 'fd': cannot define: injected failure"]
    [record] = BackupIndex(str(bed.state / "state.sqlite3")).records(uuid)
    assert (bed.state / "backups" / "objects" / f"{record.sha256}.fd").read_bytes() == old


def test_a_write_that_does_not_read_back_is_undone(bed: Bed, monkeypatch) -> None:
    """A disk that returns something else than was written: the old store goes back."""
    old = _guest_store(VARS_2M)
    store = bed.varstore("rb", old)
    uuid = bed.define("rb", split_os(CODE_2M, str(store)))
    xml = bed.hv.persistent_xml(uuid)
    real = migration.replace_file
    calls: list[int] = []

    def flaky(path: str, data: bytes, *, expect: bytes | None = None) -> None:
        calls.append(len(data))
        real(path, data[:-1] + b"\x00" if len(calls) == 1 else data, expect=expect)

    monkeypatch.setattr(migration, "replace_file", flaky)
    with pytest.raises(MigrationFailed, match="does not read back as written.*restored from the backup"):
        bed.migrator().migrate(bed.hv.lookup(uuid), to=PLAIN)
    assert calls == [LAYOUT_4M.size, LAYOUT_2M.size]
    assert store.read_bytes() == old and bed.hv.persistent_xml(uuid) == xml
    assert bed.journal.changes(uuid) == []


def test_a_full_disk_leaves_the_varstore_and_xml_as_they_were(bed: Bed, mount_tmpfs) -> None:
    """No room for the 4 MiB store beside the 2 MiB one: the write fails before the rename."""
    mnt = Path(mount_tmpfs("size=600k"))
    old = _guest_store(VARS_2M)
    store = mnt / "full_VARS.fd"
    store.write_bytes(old)
    uuid = bed.define("full", split_os(CODE_2M, str(store)))
    xml = bed.hv.persistent_xml(uuid)
    with pytest.raises(MigrationFailed) as info:
        bed.migrator().migrate(bed.hv.lookup(uuid), to=PLAIN)
    message = str(info.value)
    assert "no space left on device" in message and "the varstore is unchanged" in message
    assert store.read_bytes() == old and os.listdir(mnt) == ["full_VARS.fd"]
    assert bed.hv.persistent_xml(uuid) == xml and bed.journal.changes(uuid) == []


def test_running_domain_is_refused_without_a_trace(bed: Bed) -> None:
    old = _guest_store(VARS_2M)
    store = bed.varstore("run", old)
    uuid = bed.define("run", split_os(CODE_2M, str(store)))
    bed.hv.start(uuid)
    with pytest.raises(MigrationRefused, match="domain 'run': is running"):
        bed.migrator().migrate(bed.hv.lookup(uuid))
    assert store.read_bytes() == old and not (bed.state / "backups").exists()


def test_symlinked_varstore_is_refused(bed: Bed, tmp_path) -> None:
    real = tmp_path / "elsewhere_VARS.fd"
    real.write_bytes(Path(VARS_2M).read_bytes())
    link = bed.nvram / "ln_VARS.fd"
    link.symlink_to(real)
    uuid = bed.define("ln", split_os(CODE_2M, str(link)))
    with pytest.raises(MigrationRefused, match="symbolic link"):
        bed.migrator().migrate(bed.hv.lookup(uuid))
    assert link.is_symlink() and real.read_bytes() == Path(VARS_2M).read_bytes()


def test_domain_held_on_its_archived_build_migrates_to_the_central_path_it_tracks(tmp_path, qemu_owner) -> None:
    """The layout-change story: the central path now holds 4 MiB code, varsd pinned the domain
    to the archived 2 MiB copy (`incompatible`); migrating brings it back to the central path."""
    tree = tmp_path / "fw"
    (tree / "firmware").mkdir(parents=True)
    code, template = tree / "CODE.fd", tree / "VARS.fd"
    code.write_bytes(Path(CODE_4M).read_bytes())  # the upgrade put 4 MiB code at the old path
    template.write_bytes(Path(VARS_4M).read_bytes())
    desc = json.loads(Path(FW_DIR, PLAIN).read_text())
    desc["mapping"]["executable"]["filename"] = str(code)
    desc["mapping"]["nvram-template"]["filename"] = str(template)
    (tree / "firmware" / "50-test.json").write_text(json.dumps(desc))
    archived = tmp_path / "archive" / f"{fsio.sha256_file(CODE_2M)}.fd"
    archived.parent.mkdir()
    archived.write_bytes(Path(CODE_2M).read_bytes())
    cfg = Config(uri=URI, nvram_dir=str(tmp_path / "nvram"), state_dir=str(tmp_path / "state"),
                 firmware_dirs=(str(tree / "firmware"),))
    os.makedirs(cfg.nvram_dir)
    store = Path(cfg.nvram_dir) / "held_VARS.fd"
    old = _guest_store(VARS_2M)
    store.write_bytes(old)
    pin = (f"><varsd:build code='{code}' sha256='{fsio.sha256_file(CODE_2M)}'/>"
           f"<varsd:pin sha256='{fsio.sha256_file(CODE_2M)}' by='incompatible' reason='layout'/>")
    catalog = load_catalog(cfg.firmware_dirs)
    assert [b.code_path for b in catalog.builds] == [str(code)]
    journal = Journal(cfg.journal_path)
    try:
        with Hypervisor(URI) as hv:
            uuid = hv.define(_xml("held", split_os(str(archived), str(store)), metadata=varsd_metadata(pin))).uuid
            try:
                rec = Reconciler(cfg, hv, catalog, journal, qemu_owner, clock=FixedClock(NOW))
                result = Migrator(rec, clock=FixedClock(T0)).migrate(hv.lookup(uuid))
                fw = parse_domain(hv.persistent_xml(uuid))
            finally:
                hv.connection.lookupByUUIDString(uuid).undefine()
    finally:
        journal.close()
    assert result.plan.target.code_path == str(code)
    assert (fw.loader_path, fw.nvram_path, fw.nvram_template) == (str(code), str(store), str(template))
    assert (fw.metadata.pinned_sha256, fw.metadata.pin_by, fw.metadata.build_code_sha256) == (
        None, None, fsio.sha256_file(str(code)))
    assert read_variables(str(store)) == virtfw.variables_of_bytes(old, "old")
    assert virtfw.read_layout(str(store)) == LAYOUT_4M


def test_a_guest_started_mid_migration_keeps_what_it_wrote(bed: Bed, monkeypatch) -> None:
    """The write went through, then the guest was started and wrote its varstore before the
    redefine failed: the restore must not put the older backup over the guest's variables."""
    old = _guest_store(VARS_2M)
    store = bed.varstore("race", old)
    uuid = bed.define("race", split_os(CODE_2M, str(store)))
    guest_wrote = b""

    def define_fails_after_a_start(xml: str):
        nonlocal guest_wrote
        bed.hv.start(uuid)  # someone ran `virsh start` meanwhile ...
        guest_wrote = store.read_bytes()[:-1] + b"\x01"  # ... and OVMF wrote a variable
        store.write_bytes(guest_wrote)
        raise migration.VarsdError("define refused")

    monkeypatch.setattr(bed.hv, "define", define_fails_after_a_start)
    with pytest.raises(MigrationFailed, match="started meanwhile.*left as it is"):
        bed.migrator().migrate(bed.hv.lookup(uuid), to=PLAIN)
    assert store.read_bytes() == guest_wrote, "the guest's newer varstore was overwritten by the backup"
    bed.hv.destroy(uuid)
