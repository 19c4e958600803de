"""Reconciler on libvirt's in-process `test:///default` driver with the real Debian catalog.

The test driver's state is shared by every connection of this process while one stays
open, so each test defines uniquely named domains and undefines them afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest
from aavmf_files import x86_only
from ovmf_files import UNIFIED as UNIFIED_2M_IMAGE  # Debian 12's unified image, release-aware
from support.clock import FixedClock
from support.domains import domain_xml

from varsd.adapters.libvirt_api import DomainRef, Hypervisor
from varsd.clock import parse_stamp, stamp
from varsd.config import Config
from varsd.engine import reconciler as reconciler_mod
from varsd.engine import transaction
from varsd.engine.reconciler import Reconciler
from varsd.errors import HypervisorError
from varsd.firmware.catalog import load_catalog
from varsd.model.domain import FirmwareConfig, Status
from varsd.model.firmware import Catalog

URI = "test:///default"
CODE_4M = "/usr/share/OVMF/OVMF_CODE_4M.fd"
VARS_4M = "/usr/share/OVMF/OVMF_VARS_4M.fd"
NOW = parse_stamp("2025-06-01T12:00:00Z")  # the clock's aware datetime


ROM = f"<loader type='rom'>{UNIFIED_2M_IMAGE}</loader>"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    cat = x86_only(load_catalog(["/usr/share/qemu/firmware"]))
    assert len(cat.builds) == 3 and cat.problems == ()
    return cat


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    """A second, independent connection: "someone else" (virsh, an admin)."""
    c = libvirt.open(URI)
    yield c
    c.close()


@pytest.fixture
def hv(conn) -> Iterator[Hypervisor]:
    with Hypervisor(URI) as h:
        yield h


@pytest.fixture
def cfg(tmp_path) -> Config:
    c = Config(
        uri=URI,
        nvram_dir=str(tmp_path / "nvram"),
        state_dir=str(tmp_path / "state"),
        firmware_dirs=("/usr/share/qemu/firmware",),
    )
    os.makedirs(c.nvram_dir)
    return c


@pytest.fixture
def rec(cfg, hv, catalog, journal) -> Reconciler:
    return Reconciler(cfg, hv, catalog, journal, (os.getuid(), os.getgid()), actor="test", clock=FixedClock(NOW))


@pytest.fixture
def define(hv) -> Iterator:
    """define(label, os_inner, **kw) -> DomainRef of a fresh uniquely named domain; undefined afterwards."""
    made: list[str] = []

    def make(label: str, os_inner: str, **kw) -> DomainRef:
        ref = hv.define(domain_xml(f"rec-{uuidlib.uuid4().hex[:8]}-{label}", os_inner, **kw))
        made.append(ref.uuid)
        return ref

    yield make
    for u in made:
        try:
            hv.undefine(u, remove_nvram=False)
        except Exception:
            pass


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _os(xml: str) -> tuple[tuple[str | None, dict], tuple[str | None, dict] | None]:
    root = ET.fromstring(xml)
    loader = root.find("os/loader")
    nvram = root.find("os/nvram")
    assert loader is not None
    return (loader.text, dict(loader.attrib)), (None if nvram is None else (nvram.text, dict(nvram.attrib)))


def test_bios_rom_domain_gets_a_varstore_and_a_journaled_redefinition(rec, define, hv, cfg, journal):
    ref = define("rom", ROM)
    before = hv.persistent_xml(ref.uuid)
    out = rec.reconcile(ref)

    target = os.path.join(cfg.nvram_dir, f"{ref.name}_VARS.fd")
    assert out.plan.config is FirmwareConfig.BIOS_ROM
    assert out.status is Status.OK
    assert out.changed
    assert out.done[0] == f"created varstore {target}"
    assert out.done[1].startswith("redefined: bios-rom -> split (")
    assert (out.plan.code, out.plan.varstore) == (CODE_4M, target)

    # the varstore: a private copy of the matching template, 0600, owned as asked
    st = os.stat(target)
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert _sha(target) == _sha(VARS_4M)

    # the definition: central code read-only in pflash + the private varstore
    after = hv.persistent_xml(ref.uuid)
    (code, code_attrs), nvram = _os(after)
    assert code == CODE_4M
    assert code_attrs["type"] == "pflash" and code_attrs["readonly"] == "yes"
    assert nvram is not None and nvram[0] == target and nvram[1].get("template") == VARS_4M

    # journaled with the previous XML before libvirt was asked
    (change,) = journal.changes(ref.uuid)
    assert (change.uuid, change.name, change.actor, change.at) == (ref.uuid, ref.name, "test", NOW)
    assert change.outcome == "applied"
    assert change.old_xml == before
    assert _os(change.new_xml) == _os(after)
    assert change.reason == out.done[1].removeprefix("redefined: ")
    assert out.as_dict()["changes"] == list(out.done)


def test_second_reconcile_does_nothing(rec, define, hv, cfg, journal):
    ref = define("rom", ROM)
    assert rec.reconcile(ref).changed
    xml = hv.persistent_xml(ref.uuid)
    target = os.path.join(cfg.nvram_dir, f"{ref.name}_VARS.fd")
    mtime = os.stat(target).st_mtime_ns

    again = rec.reconcile(hv.lookup(ref.uuid))
    assert again.done == () and again.plan.actions == ()
    assert again.plan.config is FirmwareConfig.SPLIT and again.status is Status.OK
    assert hv.persistent_xml(ref.uuid) == xml
    assert os.stat(target).st_mtime_ns == mtime
    assert len(journal.changes(ref.uuid)) == 1

    # a fresh Reconciler (no memo, new inspector) agrees
    fresh = Reconciler(rec.cfg, rec.hv, rec.catalog, journal, rec.owner, clock=FixedClock(NOW))
    assert fresh.reconcile(hv.lookup(ref.uuid)).done == ()
    assert len(journal.changes(ref.uuid)) == 1


def test_dry_run_changes_nothing(rec, define, hv, cfg, journal):
    ref = define("rom", ROM)
    before = hv.persistent_xml(ref.uuid)
    out = rec.reconcile(ref, apply=False)
    assert out.done == () and not out.changed
    assert out.plan.config is FirmwareConfig.BIOS_ROM
    assert [type(a).__name__ for a in out.plan.actions] == ["CreateVarstore", "Redefine"]
    assert hv.persistent_xml(ref.uuid) == before
    assert os.listdir(cfg.nvram_dir) == []
    assert journal.changes() == []


def test_seabios_domain_untouched(rec, define, hv, cfg, journal):
    ref = define("seabios", "", machine="pc-i440fx-7.2")
    before = hv.persistent_xml(ref.uuid)
    out = rec.reconcile(ref)
    assert out.plan.config is FirmwareConfig.NONE and out.status is Status.UNMANAGED
    assert out.done == () and out.plan.actions == ()
    assert hv.persistent_xml(ref.uuid) == before
    assert os.listdir(cfg.nvram_dir) == [] and journal.changes() == []


def test_builtin_test_domain_is_unmanaged(rec, hv):
    out = rec.reconcile(hv.lookup("test"))
    assert out.status is Status.UNMANAGED and out.done == ()


def test_excluded_domain_untouched(cfg, hv, catalog, journal, define):
    ref = define("rom", ROM)
    excluded = dataclasses.replace(cfg, exclude=(ref.name,))
    rec = Reconciler(excluded, hv, catalog, journal, (os.getuid(), os.getgid()), clock=FixedClock(NOW))
    before = hv.persistent_xml(ref.uuid)
    out = rec.reconcile(ref)
    assert out.status is Status.UNMANAGED and "excluded" in out.plan.detail
    assert hv.persistent_xml(ref.uuid) == before and journal.changes() == []


def _foreign_redefine(conn: libvirt.virConnect, uuid: str) -> str:
    """What `virsh edit` does: a new persistent definition (here: more memory)."""
    dom = conn.lookupByUUIDString(uuid)
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    mem = root.find("memory")
    mem.text = str(int(mem.text) + 1024)
    root.find("currentMemory").text = mem.text
    conn.defineXML(ET.tostring(root, encoding="unicode"))
    return mem.text


def test_redefined_by_someone_else_between_read_and_write(rec, define, hv, conn, journal, monkeypatch):
    """Every time varsd reads the domain, an admin redefines it right after: varsd must never
    write over that definition. The result is an `error` outcome, nothing applied."""
    ref = define("rom", ROM)
    real_examine = Reconciler.examine
    foreign: list[str] = []

    def examine_then_someone_redefines(self, r):
        result = real_examine(self, r)
        foreign.append(_foreign_redefine(conn, r.uuid))
        return result

    monkeypatch.setattr(Reconciler, "examine", examine_then_someone_redefines)
    out = rec.reconcile(ref)

    assert out.status is Status.ERROR
    assert "redefined meanwhile" in out.detail
    assert out.done == ()
    now = hv.persistent_xml(ref.uuid)
    root = ET.fromstring(now)
    assert root.findtext("memory") == foreign[-1]  # the admin's definition stands
    assert root.find("os/loader").get("type") == "rom"
    assert all(c.outcome != "applied" for c in journal.changes(ref.uuid))


def test_redefined_by_someone_else_while_provisioning(rec, define, hv, conn, cfg, journal, monkeypatch):
    """The window between the last look and defineXML includes writing the varstore."""
    ref = define("rom", ROM)
    real_provision = reconciler_mod.provision_varstore
    foreign: list[str] = []

    def provision_while_admin_edits(*a, **kw):
        result = real_provision(*a, **kw)
        foreign.append(_foreign_redefine(conn, ref.uuid))
        return result

    monkeypatch.setattr(reconciler_mod, "provision_varstore", provision_while_admin_edits)
    out = rec.reconcile(ref)

    assert out.status is Status.ERROR and "redefined meanwhile" in out.detail
    root = ET.fromstring(hv.persistent_xml(ref.uuid))
    assert root.findtext("memory") == foreign[-1]
    assert root.find("os/loader").get("type") == "rom"
    assert all(c.outcome != "applied" for c in journal.changes(ref.uuid))

    # the next pass (nobody interfering now) repairs it, keeping the admin's change
    monkeypatch.setattr(reconciler_mod, "provision_varstore", real_provision)
    again = rec.reconcile(hv.lookup(ref.uuid))
    assert again.status is Status.OK and any(d.startswith("redefined") for d in again.done)
    root = ET.fromstring(hv.persistent_xml(ref.uuid))
    assert root.findtext("memory") == foreign[-1]
    assert root.find("os/loader").get("type") == "pflash"


def test_stale_undo_style_redefine_raises(rec, define, hv, conn, journal):
    """A write with an old XML that is no longer current refuses and journals nothing."""
    ref = define("rom", ROM)
    old = hv.persistent_xml(ref.uuid)
    _foreign_redefine(conn, ref.uuid)
    with pytest.raises(transaction.StaleDefinition, match=f"domain '{ref.name}' was redefined meanwhile"):
        rec.writer.write(ref, old, old.replace("262144", "131072"), "test")
    assert journal.changes(ref.uuid) == []


def test_failed_define_is_journaled_as_failed(rec, define, hv, journal):
    ref = define("rom", ROM)
    old = hv.persistent_xml(ref.uuid)
    broken = old.replace("<memory unit='KiB'>", "<memory unit='parsecs'>")
    assert broken != old
    with pytest.raises(HypervisorError, match=f"domain '{ref.name}': cannot define"):
        rec.writer.write(ref, old, broken, "deliberately invalid")
    (change,) = journal.changes(ref.uuid)
    assert change.outcome.startswith("failed: ")
    assert hv.persistent_xml(ref.uuid) == old


def test_reconcile_all_goes_on_after_a_domain_error(rec, define, hv, journal, monkeypatch):
    """A failure in one domain is that domain's error outcome; the pass continues."""
    bad = define("rom-bad", ROM)
    good = define("rom-good", ROM)
    real_define = Hypervisor.define

    def refuse_bad(self, xml):
        if bad.name in xml:
            raise HypervisorError(f"domain '{bad.name}': cannot define: refused", retryable=False)
        return real_define(self, xml)

    monkeypatch.setattr(Hypervisor, "define", refuse_bad)
    outs = {o.ref.name: o for o in rec.reconcile_all([bad, good])}
    assert outs[bad.name].status is Status.ERROR and "refused" in outs[bad.name].detail
    assert outs[good.name].status is Status.OK and outs[good.name].changed
    assert journal.changes(bad.uuid)[0].outcome.startswith("failed: ")
    assert journal.changes(good.uuid)[0].outcome == "applied"


# -- the firmware archive -------------------------------------------------------------


def test_binding_a_domain_archives_its_build_and_records_it(rec, define, cfg, journal):
    from varsd.firmware.archive import Archive

    ref = define("rom", ROM)
    out = rec.reconcile(ref)
    sha = out.plan.build.code_sha256
    assert Archive(cfg.archive_dir).index().verified == {sha}
    assert journal.firmware_state() == {CODE_4M: sha}
    assert journal.archived_builds()[sha].layout == out.plan.build.layout
    assert [e.event for e in journal.firmware_history()] == ["appeared"]
    rec.reconcile(ref)  # nothing more to store or record
    assert len(journal.firmware_history()) == 1


def test_memoised_plans_survive_a_re_listed_unchanged_archive(rec, define, monkeypatch):
    ref = define("rom", ROM)
    rec.reconcile(ref)
    rec.reconcile(ref)  # compliant now: memoised
    first = rec.upgrade_context()
    monkeypatch.setattr(reconciler_mod, "ARCHIVE_RECHECK", 0.0)
    assert rec.upgrade_context() is first  # same content: the same object, so memo identity holds
    calls = []
    original = reconciler_mod.plan_repair
    monkeypatch.setattr(reconciler_mod, "plan_repair", lambda *a, **k: calls.append(1) or original(*a, **k))
    rec.examine(ref)
    assert calls == []


def test_a_corrupt_archived_image_is_never_written_into_a_definition(rec, define, cfg):
    from varsd.errors import VarsdError
    from varsd.firmware.archive import Archive

    ref = define("rom", ROM)
    rec.reconcile(ref)
    archive = Archive(cfg.archive_dir)
    (sha,) = archive.index().verified
    path = archive.path_for(sha)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"rot")
    xml = rec.hv.persistent_xml(ref.uuid).replace(CODE_4M, path)
    with pytest.raises(VarsdError, match="corrupt"):
        rec.writer.verify_archived_loader(ref, xml)


def test_every_write_verifies_an_archived_loader_first(rec, define, cfg, journal):
    """The one write path checks what undo would restore: a loader at an archived image that
    was pruned since is refused before the journal or libvirt see anything."""
    from varsd.errors import VarsdError
    from varsd.firmware.archive import Archive

    ref = define("rom", ROM)
    rec.reconcile(ref)
    before = journal.changes(ref.uuid)
    archive = Archive(cfg.archive_dir)
    (sha,) = archive.index().verified
    os.unlink(archive.path_for(sha))
    with rec.writer.transaction(ref) as tx:
        pruned = tx.xml.replace(CODE_4M, archive.path_for(sha))
        with pytest.raises(VarsdError, match="not archived"):
            tx.write(pruned, "undo-like restore")
    assert journal.changes(ref.uuid) == before
    assert CODE_4M in rec.hv.persistent_xml(ref.uuid)


@pytest.mark.parametrize("clone_first", [False, True])
def test_a_clone_sharing_its_originals_varstore_gets_its_own_copy(rec, hv, cfg, clone_first) -> None:
    """`virsh dumpxml base | sed s/base/clone/ | virsh define` keeps base's <nvram>: two guests
    writing one varstore corrupt each other's boot entries. The clone gets a private copy
    (every variable kept), whichever of the two is seen first; the original is untouched."""
    from varsd.adapters import virtfw

    tag = uuidlib.uuid4().hex[:6]
    base_name, clone_name = f"rec-{tag}-base", f"rec-{tag}-clone"
    base_vars = os.path.join(cfg.nvram_dir, f"{base_name}_VARS.fd")
    with open(base_vars, "wb") as f:
        f.write(virtfw.with_variable(VARS_4M, "VarsdProof", "5b3c9c5e-1f6a-4b8e-9d2a-7a1f0e6d4c21", b"base", 7))
    os_inner = f"<loader readonly='yes' type='pflash'>{CODE_4M}</loader><nvram template='{VARS_4M}'>{base_vars}</nvram>"
    refs = {}
    for name in ([clone_name, base_name] if clone_first else [base_name, clone_name]):
        refs[name] = hv.define(domain_xml(name, os_inner))
    try:
        before = open(base_vars, "rb").read()
        ordered = [refs[clone_name], refs[base_name]] if clone_first else [refs[base_name], refs[clone_name]]
        outcomes = {o.ref.name: o for o in rec.reconcile_all(ordered)}
        clone_vars = os.path.join(cfg.nvram_dir, f"{clone_name}_VARS.fd")
        assert outcomes[clone_name].plan.varstore == clone_vars, outcomes[clone_name].plan.detail
        assert f"domain '{base_name}'" in outcomes[clone_name].plan.detail
        assert ET.fromstring(hv.persistent_xml(refs[clone_name].uuid)).find("os/nvram").text == clone_vars
        assert ET.fromstring(hv.persistent_xml(refs[base_name].uuid)).find("os/nvram").text == base_vars
        assert open(clone_vars, "rb").read() == before and open(base_vars, "rb").read() == before
        assert all(not o.done for o in rec.reconcile_all(ordered)), "not idempotent"
    finally:
        for ref in refs.values():
            hv.connection.lookupByUUIDString(ref.uuid).undefine()


def test_a_refused_define_leaves_no_varstore_behind(rec, define, hv, cfg, journal, monkeypatch):
    """libvirt refusing the repaired XML (issue 7: 'UEFI requires ACPI') must not orphan the new varstore."""
    ref = define("rom-refused", ROM)
    before = set(os.listdir(cfg.nvram_dir))

    def refuse(xml: str):
        raise HypervisorError(f"domain '{ref.name}': cannot define: unsupported configuration: refused")

    monkeypatch.setattr(hv, "define", refuse)
    out = rec.reconcile(ref)
    assert out.status is Status.ERROR and "refused" in out.detail
    assert set(os.listdir(cfg.nvram_dir)) == before
    (change,) = journal.changes(ref.uuid)
    assert change.outcome.startswith("failed: ")


def test_status_tells_the_truth_about_a_failed_repair_until_it_succeeds(rec, define, hv, cfg, journal):
    """issue 7 item 4: a symlink where the new varstore goes. status says why before any attempt,
    each failed attempt is kept (when, what, why, how often), and a success clears it."""
    ref = define("rom-link", ROM)
    target = os.path.join(cfg.nvram_dir, f"{ref.name}_VARS.fd")
    os.symlink("/nonexistent/elsewhere_VARS.fd", target)

    looked = rec.reconcile(ref, apply=False)
    assert looked.status is Status.ERROR and looked.failure is None
    assert looked.detail.startswith("cannot be repaired: ") and "symbolic link" in looked.detail
    assert "the daemon does" not in looked.detail

    first = rec.reconcile(ref)
    assert first.status is Status.ERROR and first.failure is not None and first.failure.count == 1
    assert first.failure.action.startswith(f"create varstore {target}")
    assert "symbolic link" in first.failure.error
    assert first.as_dict()["last_error"] == {"at": stamp(first.failure.at), "first_at": stamp(first.failure.at),
                                             "action": first.failure.action, "error": first.failure.error,
                                             "count": 1}
    second = rec.reconcile(hv.lookup(ref.uuid))
    assert second.failure is not None and second.failure.count == 2
    status = rec.reconcile(hv.lookup(ref.uuid), apply=False)
    assert status.status is Status.ERROR and status.failure == second.failure
    assert status.detail.startswith("last attempt failed at ") and "2 attempts since" in status.detail
    assert journal.failure(ref.uuid) == second.failure  # in the state database, for every varsctl

    os.unlink(target)
    fixed = rec.reconcile(hv.lookup(ref.uuid))
    assert fixed.status is Status.OK and fixed.cleared is not None and fixed.cleared.count == 2
    assert journal.failure(ref.uuid) is None
    assert rec.reconcile(hv.lookup(ref.uuid), apply=False).as_dict()["last_error"] is None


def test_a_changed_definition_retires_the_last_failure(rec, define, hv, conn, cfg, journal):
    ref = define("rom-link2", ROM)
    target = os.path.join(cfg.nvram_dir, f"{ref.name}_VARS.fd")
    os.symlink("/nonexistent/x", target)
    assert rec.reconcile(ref).failure is not None
    _foreign_redefine(conn, ref.uuid)  # an admin edits the domain
    os.unlink(target)
    after = rec.reconcile(hv.lookup(ref.uuid), apply=False)
    assert after.failure is None and after.as_dict()["last_error"] is None


def _proof_varstore(path: str, tag: bytes) -> bytes:
    from varsd.adapters import virtfw

    data = virtfw.with_variable(VARS_4M, "VarsdProof", "5b3c9c5e-1f6a-4b8e-9d2a-7a1f0e6d4c21", tag, 7)
    with open(path, "wb") as f:
        f.write(data)
    return data


def _split(nvram: str) -> str:
    return f"<loader readonly='yes' type='pflash'>{CODE_4M}</loader><nvram template='{VARS_4M}'>{nvram}</nvram>"


def _nvram_of(hv, ref) -> str:
    return ET.fromstring(hv.persistent_xml(ref.uuid)).find("os/nvram").text


@pytest.mark.parametrize("how", ["same path, named alone", "symlink", "hard link, another name"])
def test_a_shared_varstore_is_found_by_file_identity_whatever_the_order(rec, define, hv, cfg, how) -> None:
    """issue 12 defect 5 / issue 7 item 5: the sharer is looked at alone (`varsctl status CLONE`,
    `varsctl reconcile CLONE`), before the owner was ever seen; its path may be another name
    for the owner's file. It gets its own copy with every variable; the owner keeps its file."""
    tag = uuidlib.uuid4().hex[:6]
    base_vars = os.path.join(cfg.nvram_dir, f"rec-{tag}-base_VARS.fd")
    data = _proof_varstore(base_vars, b"base")
    clone_path = {"same path, named alone": base_vars,
                  "symlink": os.path.join(cfg.nvram_dir, f"rec-{tag}-link.fd"),
                  "hard link, another name": os.path.join(cfg.nvram_dir, f"rec-{tag}-hard.fd")}[how]
    if how == "symlink":
        os.symlink(base_vars, clone_path)
    elif how.startswith("hard"):
        os.link(base_vars, clone_path)
    clone = define("clone", _split(clone_path))  # sorts before base
    base = hv.define(domain_xml(f"rec-{tag}-base", _split(base_vars)))
    try:
        rec.reconcile(base)  # binds base: it keeps its file
        fresh = Reconciler(cfg, hv, rec.catalog, rec.journal, rec.owner)  # a new varsctl: nothing seen yet
        looked = fresh.reconcile(hv.lookup(clone.uuid), apply=False)
        assert looked.status is Status.ERROR and base.name in looked.detail, looked.detail
        done = Reconciler(cfg, hv, rec.catalog, rec.journal, rec.owner).reconcile(hv.lookup(clone.uuid))
        assert done.status is Status.OK and done.done, done.detail
        new = _nvram_of(hv, clone)
        assert new not in (base_vars, clone_path) and open(new, "rb").read() == data
        assert _nvram_of(hv, base) == base_vars and open(base_vars, "rb").read() == data
        again = Reconciler(cfg, hv, rec.catalog, rec.journal, rec.owner)
        assert [again.reconcile(hv.lookup(r.uuid)).done for r in (clone, base)] == [(), ()]
    finally:
        hv.connection.lookupByUUIDString(base.uuid).undefine()


def test_after_domrename_a_newcomer_with_the_old_name_never_gets_that_varstore(rec, define, hv, cfg) -> None:
    """`virsh domrename old new` leaves old_VARS.fd in the XML. A domain defined later as 'old'
    (libvirt names its varstore old_VARS.fd, or varsd would provision it there) gets a file of
    its own; the renamed domain keeps its varstore and every variable in it."""
    tag = uuidlib.uuid4().hex[:6]
    old_name = f"rec-{tag}-old"
    old_vars = os.path.join(cfg.nvram_dir, f"{old_name}_VARS.fd")
    data = _proof_varstore(old_vars, b"renamed")
    renamed = hv.define(domain_xml(old_name, _split(old_vars)))
    extra = []
    try:
        assert rec.reconcile(renamed).status is Status.OK  # bound by varsd, as any managed domain is
        hv.connection.lookupByUUIDString(renamed.uuid).rename(f"rec-{tag}-new", 0)
        newcomer = hv.define(domain_xml(old_name, _split(old_vars)))
        extra.append(newcomer)
        fresh = Reconciler(cfg, hv, rec.catalog, rec.journal, rec.owner)
        out = fresh.reconcile(newcomer)
        assert out.status is Status.OK and f"rec-{tag}-new" in out.detail, out.detail
        assert _nvram_of(hv, newcomer) != old_vars and _nvram_of(hv, renamed) == old_vars
        assert open(old_vars, "rb").read() == data
        # a -bios newcomer would be provisioned at old_VARS.fd: it gets another name
        os.unlink(_nvram_of(hv, newcomer))
        hv.connection.lookupByUUIDString(newcomer.uuid).undefine()
        extra.clear()
        rom = hv.define(domain_xml(old_name, ROM))
        extra.append(rom)
        out = Reconciler(cfg, hv, rec.catalog, rec.journal, rec.owner).reconcile(rom)
        assert out.status is Status.OK and _nvram_of(hv, rom) not in (old_vars, None), out.detail
        assert open(old_vars, "rb").read() == data
    finally:
        for r in [renamed, *extra]:
            hv.connection.lookupByUUIDString(r.uuid).undefine()


def test_no_copy_is_taken_while_another_sharer_runs(rec, define, hv, cfg) -> None:
    tag = uuidlib.uuid4().hex[:6]
    base_vars = os.path.join(cfg.nvram_dir, f"rec-{tag}-base_VARS.fd")
    _proof_varstore(base_vars, b"base")
    base = hv.define(domain_xml(f"rec-{tag}-base", _split(base_vars)))
    clone = define("clone", _split(base_vars))
    try:
        rec.reconcile(base)
        hv.connection.lookupByUUIDString(base.uuid).create()
        out = rec.reconcile(hv.lookup(clone.uuid))
        assert out.status is Status.PENDING_COLD_BOOT and not out.done and base.name in out.detail, out.detail
        assert _nvram_of(hv, clone) == base_vars
        hv.connection.lookupByUUIDString(base.uuid).destroy()
        out = rec.reconcile(hv.lookup(clone.uuid))
        assert out.status is Status.OK and _nvram_of(hv, clone) != base_vars, out.detail
    finally:
        d = hv.connection.lookupByUUIDString(base.uuid)
        if d.isActive():
            d.destroy()
        d.undefine()
