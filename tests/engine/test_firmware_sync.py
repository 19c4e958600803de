"""Firmware sync on libvirt's in-process `test:///default` driver with a temp firmware tree.

The tree is a descriptor plus `CODE.fd` (bytes of our own: only digests matter here)
and `VARS.fd` (Debian's real 2 MiB template, so layouts are read for real). It is
changed the way dpkg changes files: written aside and renamed over, or removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from ovmf_files import (
    DEBIAN12_OVMF,  # Debian 12's files, release-aware
    fit_code,
)
from support.clock import FixedClock
from support.domains import domain_xml, split_os
from support.firmware import BuildPaths, descriptor, install_like_dpkg

from varsd.adapters.libvirt_api import Hypervisor
from varsd.config import Config
from varsd.domain.xml import parse_domain
from varsd.engine import firmware_sync
from varsd.engine.boots import booted
from varsd.errors import HypervisorError
from varsd.firmware.archive import Archive
from varsd.firmware.catalog import load_catalog

URI = "test:///default"
VARS_2M = f"{DEBIAN12_OVMF}/OVMF_VARS.fd"
VARS_4M = "/usr/share/OVMF/OVMF_VARS_4M.fd"
CODE_A = fit_code(b"\x90" * 8192 + b"build A", VARS_2M)  # 2 MiB builds' code size
CODE_B = fit_code(b"\x90" * 8192 + b"build B", VARS_2M)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tree(BuildPaths):
    def __init__(self, root: Path) -> None:
        self.fw = root / "fw"
        self.desc_dir = root / "descriptors"
        self.fw.mkdir()
        self.desc_dir.mkdir()

    @property
    def descriptor(self) -> Path:
        return self.desc_dir / "60-test.json"

    def descriptor_text(self) -> str:
        return descriptor(self.code, self.vars, mode="split", description="test build")

    def install(self, code: bytes, template: str = VARS_2M) -> None:
        install_like_dpkg(fit_code(code, template), self.code)
        install_like_dpkg(Path(template).read_bytes(), self.vars)
        self.descriptor.write_text(self.descriptor_text())


@pytest.fixture
def tree(tmp_path) -> Tree:
    t = Tree(tmp_path)
    t.install(CODE_A)
    return t


@pytest.fixture
def cfg(tmp_path, tree) -> Config:
    c = Config(uri=URI, nvram_dir=str(tmp_path / "nvram"), state_dir=str(tmp_path / "state"),
               firmware_dirs=(str(tree.desc_dir),), firmware_search_dirs=(), qemu_user="root", qemu_group="root")
    os.makedirs(c.nvram_dir)
    return c


# A test driver of its own (a node file: every connection gets a private instance), for a test
# whose full sync must see no domain another test left on the process-wide test:///default.
PRIVATE_NODE = ("<node><domain type='test'><name>test</name><memory>8192</memory>"
                "<os><type>hvm</type></os></domain></node>")


@pytest.fixture
def hv(request, tmp_path) -> Iterator[Hypervisor]:
    uri = URI
    if getattr(request, "param", None) == "private":
        node = tmp_path / "node.xml"
        node.write_text(PRIVATE_NODE)
        uri = f"test://{node}"
    with Hypervisor(uri) as h:
        yield h


@pytest.fixture
def domain(hv, cfg, tree) -> Iterator[str]:
    """A shut-off split domain on the tree's code with a varstore of the tree's layout."""
    name = f"sync-{uuidlib.uuid4().hex[:8]}"
    varstore = os.path.join(cfg.nvram_dir, f"{name}_VARS.fd")
    shutil.copyfile(VARS_2M, varstore)
    ref = hv.define(domain_xml(name, split_os(tree.code, varstore, template=tree.vars)))
    yield ref.uuid
    try:
        if hv.lookup(ref.uuid).active:
            hv.destroy(ref.uuid)
        hv.undefine(ref.uuid, remove_nvram=False)
    except HypervisorError:
        pass


def run_sync(cfg, journal, hv, *names: str, **kw) -> firmware_sync.SyncReport:
    return firmware_sync.sync(cfg, journal, connect=lambda: hv, owner=lambda: (0, 0), domains=names, **kw)


def events(report: firmware_sync.SyncReport) -> set[tuple[str, str]]:
    return {(c.code_path, c.event) for c in report.refresh.changes}


def test_refresh_records_changes_and_archives_without_libvirt(cfg, journal, tree) -> None:
    archive = Archive(cfg.archive_dir, state_dir=cfg.state_dir)
    first = firmware_sync.refresh(cfg, journal, archive)
    assert {(c.code_path, c.event, c.sha256) for c in first.changes} == {(tree.code, "appeared", sha(CODE_A))}
    assert archive.index().verified == {sha(CODE_A)} and first.problems == ()

    assert firmware_sync.refresh(cfg, journal, archive).changes == ()  # idempotent

    tree.install(CODE_B)
    changed = firmware_sync.refresh(cfg, journal, archive)
    assert [(c.event, c.previous, c.sha256) for c in changed.changes] == [("changed", sha(CODE_A), sha(CODE_B))]
    assert archive.index().verified == {sha(CODE_A), sha(CODE_B)}  # the old build stays archived

    for path in (tree.code, tree.vars, str(tree.descriptor)):
        os.unlink(path)
    removed = firmware_sync.refresh(cfg, journal, archive)
    assert [(c.code_path, c.event) for c in removed.changes] == [(tree.code, "removed")]
    assert firmware_sync.refresh(cfg, journal, archive).changes == ()
    assert [e.event for e in journal.firmware_history()] == ["removed", "changed", "appeared"]


def test_sync_rebinds_a_fitting_upgrade_once(cfg, journal, hv, tree, domain) -> None:
    first = run_sync(cfg, journal, hv, domain)
    (o,) = first.outcomes
    assert (first.exit_code, o.status.value, o.plan.build.code_sha256) == (0, "ok", sha(CODE_A))
    assert o.done, "the domain was bound"

    tree.install(CODE_B)
    upgraded = run_sync(cfg, journal, hv, domain)
    (o,) = upgraded.outcomes
    assert (tree.code, "changed") in events(upgraded)
    assert (upgraded.exit_code, o.status.value) == (0, "ok") and o.done
    md = parse_domain(hv.persistent_xml(domain)).metadata
    assert (md.build_code_sha256, md.pinned_sha256) == (sha(CODE_B), None)

    again = run_sync(cfg, journal, hv, domain)  # idempotent
    assert again.refresh.changes == () and again.archived == () and not again.outcomes[0].done
    assert again.exit_code == 0


def test_half_written_descriptor_is_reported_and_moves_no_domain(cfg, journal, hv, tree, domain) -> None:
    run_sync(cfg, journal, hv, domain)
    before = hv.persistent_xml(domain)

    tree.descriptor.write_text(tree.descriptor_text()[:40])  # dpkg or an editor caught mid-write
    report = run_sync(cfg, journal, hv, domain)
    assert report.exit_code == 1
    assert any("60-test.json" in p and "not valid JSON" in p for p in report.all_problems), report.all_problems
    assert report.refresh.changes == ()  # its code file is still watched: not "removed"
    (o,) = report.outcomes
    assert o.status.value == "ok" and not o.done and "no firmware descriptor lists it" in o.detail
    assert hv.persistent_xml(domain) == before

    # Worse: the code changed too while its descriptor is unreadable. Nothing can be checked: nothing moves.
    tree.install(CODE_B)
    tree.descriptor.write_text("{")
    report = run_sync(cfg, journal, hv, domain)
    (o,) = report.outcomes
    assert (report.exit_code, o.status.value, o.done) == (1, "error", ())
    assert "which no firmware descriptor describes yet" in o.detail
    assert hv.persistent_xml(domain) == before

    tree.descriptor.write_text(tree.descriptor_text())  # the package finished installing
    report = run_sync(cfg, journal, hv, domain)
    assert report.exit_code == 0 and report.outcomes[0].done
    assert parse_domain(hv.persistent_xml(domain)).metadata.build_code_sha256 == sha(CODE_B)


def test_layout_change_holds_the_domain_on_its_archived_build(cfg, journal, hv, tree, domain) -> None:
    run_sync(cfg, journal, hv, domain)
    tree.install(CODE_B, template=VARS_4M)
    report = run_sync(cfg, journal, hv, domain)
    (o,) = report.outcomes
    assert (report.exit_code, o.status.value) == (1, "needs-migration")
    fw = parse_domain(hv.persistent_xml(domain))
    assert fw.loader_path == Archive(cfg.archive_dir).path_for(sha(CODE_A))
    assert (fw.metadata.pinned_sha256, fw.metadata.pin_by) == (sha(CODE_A), "incompatible")
    again = run_sync(cfg, journal, hv, domain)
    assert not again.outcomes[0].done and again.outcomes[0].status.value == "needs-migration"


def test_a_corrupt_archived_copy_is_never_used(cfg, journal, hv, tree, domain) -> None:
    run_sync(cfg, journal, hv, domain)
    archived = Path(Archive(cfg.archive_dir).path_for(sha(CODE_A)))
    os.chmod(archived, 0o644)
    archived.write_bytes(b"not the build")
    for path in (tree.code, tree.vars, str(tree.descriptor)):
        os.unlink(path)
    before = hv.persistent_xml(domain)
    report = run_sync(cfg, journal, hv, domain)
    (o,) = report.outcomes
    assert (o.status.value, o.done) == ("needs-migration", ())
    assert "corrupt" in o.detail and "not used" in o.detail
    assert hv.persistent_xml(domain) == before


def test_sync_without_libvirt_still_archives_and_records(cfg, journal, tree) -> None:
    def down() -> Hypervisor:
        raise HypervisorError("cannot connect to qemu:///system: no socket", retryable=True)

    report = firmware_sync.sync(cfg, journal, connect=down, owner=lambda: (0, 0))
    assert report.exit_code == 2 and "firmware was archived and recorded" in report.error
    assert Archive(cfg.archive_dir).index().verified == {sha(CODE_A)}
    assert journal.firmware_state() == {tree.code: sha(CODE_A)}


def test_sync_records_the_boot_of_a_running_domain(cfg, journal, hv, tree, domain) -> None:
    hv.start(domain)
    assert booted(hv, domain) is None
    report = run_sync(cfg, journal, hv, domain)
    assert booted(hv, domain).sha256 == sha(CODE_A)
    assert report.outcomes[0].status.value in ("ok", "pending-cold-boot")


@pytest.mark.parametrize("hv", ["private"], indirect=True)
def test_prune_keeps_what_domains_use_and_what_is_recent(cfg, journal, hv, tree, domain) -> None:
    run_sync(cfg, journal, hv, domain)
    tree.install(CODE_B)
    run_sync(cfg, journal, hv, domain)  # rebound to B; A is archived, used by nobody now
    archive = Archive(cfg.archive_dir)
    assert archive.index().verified == {sha(CODE_A), sha(CODE_B)}

    # A partial sync (named domains) never prunes: other domains may use anything.
    later = FixedClock("2099-01-01T00:00:00Z")
    assert run_sync(cfg, journal, hv, domain, clock=later).pruned == ()

    refs_all = hv.list_domains()
    names = [r.name for r in refs_all]
    assert names  # the test driver always has its own `test` domain
    report = firmware_sync.sync(replace(cfg, archive_retention_days=1), journal, connect=lambda: hv,
                                owner=lambda: (0, 0), clock=later)
    # A domain that cannot be read, or fails to plan, suppresses pruning (by design): this test's
    # driver is its own (see PRIVATE_NODE), so only its domains count; say which one if not
    assert report.pruned == (sha(CODE_A),), (names, report.error, report.problems)
    assert archive.index().verified == {sha(CODE_B)}  # the catalog's and the domain's build stays


def test_watch_signature_sees_a_rename_and_a_descriptor_edit(cfg, tree) -> None:
    catalog = load_catalog(cfg.firmware_dirs)
    first = firmware_sync.watch_signature(cfg, catalog)
    assert firmware_sync.watch_signature(cfg, catalog) == first
    tree.install(CODE_A)  # same bytes, new inode: dpkg's rename
    second = firmware_sync.watch_signature(cfg, catalog)
    assert second != first
    (tree.desc_dir / "70-new.json").write_text("{}")
    assert firmware_sync.watch_signature(cfg, catalog) != second


def test_report_as_json(cfg, journal, hv, tree, domain) -> None:
    data = run_sync(cfg, journal, hv, domain).as_dict()
    assert data["exit_code"] == 0 and data["error"] is None
    assert data["firmware"]["changes"] == [
        {"path": tree.code, "event": "appeared", "sha256": sha(CODE_A), "previous": None}]
    assert data["domains"][0]["status"] == "ok" and data["domains"][0]["code_sha256"] == sha(CODE_A)


@pytest.fixture
def domains(hv, cfg, tree) -> Iterator[list[str]]:
    """Five shut-off split domains like `domain`'s."""
    made = []
    for _ in range(5):
        name = f"sync-{uuidlib.uuid4().hex[:8]}"
        varstore = os.path.join(cfg.nvram_dir, f"{name}_VARS.fd")
        shutil.copyfile(VARS_2M, varstore)
        made.append(hv.define(domain_xml(name, split_os(tree.code, varstore, template=tree.vars))).uuid)
    yield made
    for uuid in made:
        try:
            hv.undefine(uuid, remove_nvram=False)
        except HypervisorError:
            pass


def test_an_upgrade_rebinds_in_batches_a_domain_changed_meanwhile_is_looked_at_again(
        cfg, journal, hv, tree, domains, monkeypatch) -> None:
    run_sync(cfg, journal, hv, *domains)
    tree.install(CODE_B)
    middle = domains[2]
    original = firmware_sync.Reconciler.reconcile_batch

    def edit_after_planning(rec, refs, seen=None, parsed=None):
        # an admin's virsh edit between the lock-free plan and the batch's fresh read
        real_write = rec.writer.write_batch

        def write_batch(writes, *a, **kw):
            hv.define(hv.persistent_xml(middle).replace("<memory unit='KiB'>", "<memory unit='KiB'>1"))
            return real_write(writes, *a, **kw)

        rec.writer.write_batch = write_batch
        return original(rec, refs, seen, parsed)

    monkeypatch.setattr(firmware_sync.Reconciler, "reconcile_batch", edit_after_planning)
    report = run_sync(cfg, journal, hv, *domains)
    assert report.exit_code == 0, report.as_dict()
    assert all(o.done and o.status.value == "ok" for o in report.outcomes)
    for uuid in domains:  # every domain rebound once, the edited one by the one-domain way, its edit kept
        md = parse_domain(hv.persistent_xml(uuid)).metadata
        assert md.build_code_sha256 == sha(CODE_B)
        rebinds = [c for c in journal.changes(uuid) if c.outcome == "applied" and sha(CODE_B) in c.new_xml]
        assert len(rebinds) == 1
    (edited,) = [c for c in journal.changes(middle) if sha(CODE_B) in c.new_xml]
    assert "<memory unit='KiB'>1" in edited.old_xml


def test_a_libvirt_failure_mid_batch_is_that_domains_recorded_failure(cfg, journal, hv, tree, domains) -> None:
    run_sync(cfg, journal, hv, *domains)
    tree.install(CODE_B)
    broken = domains[3]
    original = hv.set_metadata

    def set_metadata(uuid, *a, **kw):
        if uuid == broken:
            raise HypervisorError("cannot set metadata: operation failed: cannot save the definition")
        return original(uuid, *a, **kw)

    hv.set_metadata = set_metadata
    try:
        report = run_sync(cfg, journal, hv, *domains)
    finally:
        hv.set_metadata = original
    by_uuid = {o.ref.uuid: o for o in report.outcomes}
    assert report.exit_code == 1
    failed = by_uuid[broken]
    assert failed.status.value == "error" and "cannot save the definition" in failed.detail and not failed.done
    assert journal.failure(broken) is not None
    assert parse_domain(hv.persistent_xml(broken)).metadata.build_code_sha256 == sha(CODE_A)
    assert all(by_uuid[u].done and by_uuid[u].status.value == "ok" for u in domains if u != broken)

    again = run_sync(cfg, journal, hv, *domains)  # the next sync writes it, and the failure is over
    assert again.exit_code == 0 and [o.ref.uuid for o in again.outcomes if o.done] == [broken]
    assert journal.failure(broken) is None
