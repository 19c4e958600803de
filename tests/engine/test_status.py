"""`varsctl status` over the persisted plan memo (varsd.engine.status, varsd.engine.plan_memo)
on libvirt's `test:///default` driver, with real files: a row is reused only while every
input is what it was, and each thing that can change without changing the XML is seen.

Each test makes its own firmware directory (one descriptor, a copy of Debian's 4 MiB code)
so the host's descriptors do not matter; the test driver is shared within the process, so
domains are uniquely named and undefined afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from support.clock import FixedClock
from support.domains import domain_xml as support_domain_xml
from support.domains import rom_os, split_os

from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.adapters.plan_memo_store import PlanMemoStore
from varsd.clock import parse_stamp
from varsd.config import Config
from varsd.engine import plan_memo, status
from varsd.engine.backups import backup_status, open_store
from varsd.engine.reconciler import Reconciler
from varsd.firmware.catalog import load_configured
from varsd.model.domain import DomainRef, Status

URI = "test:///default"
CODE_4M = "/usr/share/OVMF/OVMF_CODE_4M.fd"
VARS_4M = "/usr/share/OVMF/OVMF_VARS_4M.fd"
NOW = parse_stamp("2026-12-01T12:00:00Z")
DESCRIPTOR = """{{"description": "test build", "interface-types": ["uefi"],
  "mapping": {{"device": "flash", "executable": {{"filename": "{code}", "format": "raw"}},
              "nvram-template": {{"filename": "{vars}", "format": "raw"}}}},
  "targets": [{{"architecture": "x86_64", "machines": ["pc-i440fx-*", "pc-q35-*"]}}],
  "features": ["acpi-s3"], "tags": []}}
"""


def domain_xml(name: str, os_inner: str | None = None) -> str:
    return support_domain_xml(name, rom_os() if os_inner is None else os_inner, features="<acpi/>")


def install_build(fw_dir: Path, generation: int = 0) -> None:
    data = bytearray(Path(CODE_4M).read_bytes())
    if generation:
        data[-16:] = generation.to_bytes(16, "little")
    (fw_dir / ".CODE.new").write_bytes(bytes(data))
    os.replace(fw_dir / ".CODE.new", fw_dir / "CODE.fd")
    (fw_dir / "50-test.json").write_text(DESCRIPTOR.format(code=fw_dir / "CODE.fd", vars=VARS_4M))


@pytest.fixture
def cfg(tmp_path) -> Config:
    fw = tmp_path / "firmware"
    fw.mkdir()
    install_build(fw)
    c = Config(uri=URI, nvram_dir=str(tmp_path / "nvram"), state_dir=str(tmp_path / "state"),
               firmware_dirs=(str(fw),), firmware_search_dirs=())
    os.makedirs(c.nvram_dir)
    return c


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    with Hypervisor(URI) as h:
        yield h


@pytest.fixture
def define(hv) -> Iterator:
    made: list[str] = []

    def make(label: str, xml: str | None = None) -> DomainRef:
        ref = hv.define(xml or domain_xml(f"st-{uuidlib.uuid4().hex[:8]}-{label}"))
        made.append(ref.uuid)
        return ref

    yield make
    for u in made:
        try:
            if hv.is_running(u):
                hv.destroy(u)
            hv.undefine(u, remove_nvram=False)
        except Exception:
            pass


def daemon_pass(cfg: Config, hv: Hypervisor, ref: DomainRef) -> None:
    """What the daemon does: repair, then (at the event of its own change) find it
    compliant and persist the memo."""
    with closing(Journal(cfg.journal_path)) as journal, closing(PlanMemoStore(cfg.journal_path)) as store:
        rec = Reconciler(cfg, hv, load_configured(cfg), journal, (os.getuid(), os.getgid()), actor="varsd",
                         clock=FixedClock(NOW), memo_store=store)
        rec.reconcile(hv.lookup(ref.uuid))
        assert not rec.reconcile(hv.lookup(ref.uuid)).changed


class Looked:
    def __init__(self, cfg: Config, hv: Hypervisor, monkeypatch) -> None:
        self.cfg, self.hv, self.planned = cfg, hv, set()
        original = Reconciler.reconcile

        def spy(rec, ref, *a, **kw):
            self.planned.add(ref.uuid)
            return original(rec, ref, *a, **kw)

        monkeypatch.setattr(Reconciler, "reconcile", spy)

    def __call__(self, ref: DomainRef, *, read_only: bool = True) -> status.Look:
        """A fresh varsctl status over every domain; the look at `ref`."""
        self.planned.clear()
        journal = Journal(self.cfg.journal_path, read_only=read_only)
        store = PlanMemoStore(self.cfg.journal_path, read_only=read_only)
        try:
            rec = Reconciler(self.cfg, self.hv, load_configured(self.cfg), journal, (os.getuid(), os.getgid()),
                             clock=FixedClock(NOW), memo_store=store)
            looks = status.look(rec, self.hv.list_domains(), store, complete=True)
        finally:
            journal.close()
            store.close()
        return next(lk for lk in looks if lk.outcome.ref.uuid == ref.uuid)

    def truth(self, ref: DomainRef) -> dict:
        """What planning from scratch says (no memo)."""
        with closing(Journal(self.cfg.journal_path, read_only=True)) as journal:
            rec = Reconciler(self.cfg, self.hv, load_configured(self.cfg), journal, (os.getuid(), os.getgid()),
                             clock=FixedClock(NOW))
            return rec.reconcile(self.hv.lookup(ref.uuid), apply=False).as_dict()


@pytest.fixture
def look(cfg, hv, monkeypatch) -> Looked:
    return Looked(cfg, hv, monkeypatch)


def test_an_unchanged_domain_reuses_its_row_and_says_what_planning_says(define, cfg, hv, look):
    ref = define("same")
    daemon_pass(cfg, hv, ref)
    lk = look(ref)
    assert ref.uuid not in look.planned
    assert lk.outcome.as_dict() == look.truth(ref)
    assert lk.outcome.status is Status.OK
    assert lk.target is not None and lk.target.path == lk.outcome.plan.varstore
    with open(lk.target.path, "rb") as f:
        assert lk.varstore is not None and lk.varstore.sha256 == hashlib.sha256(f.read()).hexdigest()


def test_without_a_daemon_or_a_database_status_plans_and_creates_nothing(define, cfg, hv, look):
    ref = define("nodb")
    lk = look(ref)
    assert ref.uuid in look.planned
    assert lk.outcome.status is Status.ERROR and "needs repair" in lk.outcome.detail
    assert not os.path.exists(cfg.state_dir)


def _edit_xml(hv: Hypervisor, ref: DomainRef) -> None:
    xml = hv.persistent_xml(ref.uuid)
    hv.define(xml.replace("<memory unit='KiB'>262144</memory>", "<memory unit='KiB'>524288</memory>"))


def _touch_varstore(hv: Hypervisor, ref: DomainRef) -> None:
    from varsd.domain.xml import parse_domain

    nvram = parse_domain(hv.persistent_xml(ref.uuid)).nvram_path
    assert nvram
    data = bytearray(Path(nvram).read_bytes())
    data[-1] ^= 0xFF  # a guest writing a variable: same size, new content, new mtime
    with open(nvram, "r+b") as f:
        f.write(bytes(data))
    st = os.stat(nvram)
    os.utime(nvram, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def _chmod_varstore(hv: Hypervisor, ref: DomainRef) -> None:
    from varsd.domain.xml import parse_domain

    nvram = parse_domain(hv.persistent_xml(ref.uuid)).nvram_path
    st = os.stat(nvram)
    os.chmod(nvram, 0o644)
    os.utime(nvram, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: only ctime says so


def _start(hv: Hypervisor, ref: DomainRef) -> None:
    hv.start(ref.uuid)


def _upgrade(hv: Hypervisor, ref: DomainRef, cfg: Config) -> None:
    install_build(Path(cfg.firmware_dirs[0]), generation=1)


CHANGES = {
    "the persistent XML": lambda hv, ref, cfg: _edit_xml(hv, ref),
    "the varstore's content": lambda hv, ref, cfg: _touch_varstore(hv, ref),
    "the varstore's mode (ctime only)": lambda hv, ref, cfg: _chmod_varstore(hv, ref),
    "the domain started (live XML)": lambda hv, ref, cfg: _start(hv, ref),
    "a firmware upgrade (catalog and loader)": lambda hv, ref, cfg: _upgrade(hv, ref, cfg),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_of_any_input_plans_again(define, cfg, hv, look, change):
    ref = define("chg")
    daemon_pass(cfg, hv, ref)
    look(ref)
    assert ref.uuid not in look.planned
    CHANGES[change](hv, ref, cfg)
    lk = look(ref)
    assert ref.uuid in look.planned
    assert lk.outcome.as_dict() == look.truth(ref)


def test_a_start_shows_the_running_state_and_a_stop_reuses_the_row_again(define, cfg, hv, look):
    ref = define("run")
    daemon_pass(cfg, hv, ref)
    hv.start(ref.uuid)
    running = look(ref)
    assert running.outcome.ref.state == "running" and ref.uuid in look.planned
    hv.destroy(ref.uuid)
    stopped = look(ref)
    assert stopped.outcome.ref.state == "shut off" and ref.uuid not in look.planned


def test_the_configuration_is_part_of_the_key(define, cfg, hv, look):
    ref = define("excl")
    daemon_pass(cfg, hv, ref)
    look.cfg = Config(**{**cfg.__dict__, "exclude": (ref.name,)})
    lk = look(ref)
    assert ref.uuid in look.planned and lk.outcome.status is Status.UNMANAGED


def test_another_version_of_varsd_plans_again(define, cfg, hv, look, monkeypatch):
    ref = define("ver")
    daemon_pass(cfg, hv, ref)
    monkeypatch.setattr(plan_memo, "__version__", "99.0")
    monkeypatch.setattr(plan_memo, "_context", None)
    look(ref)
    assert ref.uuid in look.planned


def test_a_newcomer_sharing_a_reused_domains_varstore_is_seen_by_both(define, cfg, hv, look):
    ref = define("orig")
    daemon_pass(cfg, hv, ref)
    alone = look(ref)
    nvram = alone.outcome.plan.varstore
    code = alone.outcome.plan.code
    clone = define("clone", domain_xml(f"st-{uuidlib.uuid4().hex[:8]}-clone", split_os(code, nvram)))
    shared = look(ref)
    assert ref.uuid in look.planned  # its row's key still matches: the index found the sharer
    assert shared.outcome.as_dict() == look.truth(ref)
    assert look(clone).outcome.as_dict() == look.truth(clone)


def test_a_recorded_failure_is_shown_for_a_domain_that_needs_repair(define, cfg, hv, look):
    ref = define("fail")
    with closing(Journal(cfg.journal_path)) as journal:
        journal.note_failure(uuid=ref.uuid, name=ref.name, at=NOW, action="create varstore", error="disk full",
                             definition_sha256=hashlib.sha256(hv.persistent_xml(ref.uuid).encode()).hexdigest())
    lk = look(ref)
    assert lk.outcome.as_dict()["last_error"]["error"] == "disk full"


def test_the_backup_report_hashes_a_varstore_that_changed_since_its_row(define, cfg, hv, look):
    ref = define("bk")
    daemon_pass(cfg, hv, ref)
    first = look(ref)
    _touch_varstore(hv, ref)
    again = look(ref)
    assert again.varstore is None  # planned again: no digest from a row
    store = open_store(cfg, read_only=True)
    try:
        report = backup_status(store, [first.target], {ref.uuid: first.varstore})  # a row from before the write
    finally:
        store.index.close()
    with open(first.target.path, "rb") as f:
        assert report[ref.uuid]["current_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert report[ref.uuid]["current_sha256"] != first.varstore.sha256


def test_a_read_only_database_is_read_and_never_written(define, cfg, hv, look):
    ref = define("ro")
    daemon_pass(cfg, hv, ref)
    with closing(PlanMemoStore(cfg.journal_path, read_only=True)) as store:
        assert store.all() and not store.writable
        before = store.all()
        store.put(ref.uuid, plan_memo.stored("x", [], "{}"))
        assert store.all() == before


def test_the_context_digest_is_the_same_in_every_process(cfg):
    """Sets iterate in hash-seed order: the digest must not depend on it."""
    code = ("import sys; from varsd.config import Config; from varsd.firmware.catalog import load_catalog; "
            "from varsd.engine.plan_memo import context_digest; from varsd.planning.upgrade import UpgradeContext; "
            f"c = load_catalog([{cfg.firmware_dirs[0]!r}]); "
            "u = UpgradeContext(features={'a': frozenset({'secure-boot', 'requires-smm', 'acpi-s3', 'x', 'y'})}); "
            "print(context_digest(c, u, '/n'))")
    out = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                          check=True, capture_output=True, text=True).stdout for seed in (1, 2, 3)}
    assert len(out) == 1


def test_the_catalog_cache_follows_its_files(cfg, tmp_path):
    from varsd.firmware import catalog_cache

    os.makedirs(cfg.state_dir)  # the cache lives there; a load never creates it
    first = load_configured(cfg)
    assert os.path.exists(os.path.join(cfg.state_dir, catalog_cache.NAME))
    assert catalog_cache.load(cfg, catalog_cache.key(cfg)) == first
    fw = Path(cfg.firmware_dirs[0])
    install_build(fw, generation=2)  # an upgrade: replaced by rename
    assert catalog_cache.load(cfg, catalog_cache.key(cfg)) is None
    second = load_configured(cfg)
    assert second.builds[0].code_sha256 != first.builds[0].code_sha256
    shutil.copy(fw / "50-test.json", fw / "60-more.json")  # a new descriptor
    assert catalog_cache.load(cfg, catalog_cache.key(cfg)) is None
    assert len(load_configured(cfg).builds) == 2
    os.chmod(os.path.join(cfg.state_dir, catalog_cache.NAME), 0o666)  # writable by others: never loaded
    assert catalog_cache.load(cfg, catalog_cache.key(cfg)) is None


def test_status_json_is_one_object_with_one_domain_per_line(capsys):
    import json

    from varsd.cli.output import emit_json

    doc = {"domains": [{"name": "a", "backup": {"id": None}}, {"name": "é"}], "error": None}
    emit_json(doc)
    text = capsys.readouterr().out
    assert json.loads(text) == doc
    assert [line.strip().rstrip(",") for line in text.splitlines()[2:4]] == [
        json.dumps(doc["domains"][0]), json.dumps(doc["domains"][1])]

