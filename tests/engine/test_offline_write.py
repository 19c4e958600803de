"""Offline varstore writes and the libvirt QEMU hook's side of the protocol.

The hook is the real packaged script (run with its directory pointed at the test's);
the domain is libvirt's test driver: state and managed-save checks are real libvirt
calls, no QEMU needed. The real-boot races are in tests/integration/test_backups.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from ovmf_files import EFI_GLOBAL, VARS_2M, VARS_4M
from support.domains import domain_xml, split_os

from varsd.adapters import fsio, virtfw
from varsd.adapters.backup_index import BackupIndex
from varsd.adapters.libvirt_api import Hypervisor
from varsd.config import Config
from varsd.engine.backups import BackupStore
from varsd.engine.offline_write import InHand, StartBegan, VarstoreWriter, WriteRefused

HOOK = Path(__file__).resolve().parents[2] / "packaging" / "libvirt" / "varsd-qemu-hook"
UUID = "0b000000-0000-4000-8000-000000000001"


def _node(tmp_path, nvram: str, runstate: int) -> str:
    node = tmp_path / "node.xml"
    guest = domain_xml("guest", split_os("/usr/share/OVMF/OVMF_CODE_4M.fd", nvram), uuid=UUID, runstate=runstate)
    node.write_text(f"<node>{guest}</node>")
    return f"test://{node}"


@pytest.fixture
def host(tmp_path):
    nvram = tmp_path / "nvram"
    nvram.mkdir()
    path = str(nvram / "guest_VARS.fd")
    shutil.copyfile(VARS_4M, path)
    cfg = Config(state_dir=str(tmp_path / "state"), nvram_dir=str(nvram), offline_dir=str(tmp_path / "run"),
                 start_wait=5)
    os.makedirs(cfg.state_dir)

    def writer(runstate: int = 5) -> VarstoreWriter:
        hv = Hypervisor(_node(tmp_path, path, runstate)).open()
        store = BackupStore(cfg.backup_dir, BackupIndex(cfg.journal_path))
        return VarstoreWriter(cfg, hv, store, (os.getuid(), os.getgid()))

    return cfg, path, writer


def _hook(tmp_path, cfg: Config) -> str:
    script = tmp_path / "hook"
    script.write_text(HOOK.read_text().replace("DIR=/run/varsd/offline", f"DIR={cfg.offline_dir}"))
    return str(script)


def _start(hook: str, uuid: str = UUID) -> subprocess.Popen:
    p = subprocess.Popen(["sh", hook, "guest", "prepare", "begin", "-"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdin.write(f"<domain type='kvm'>\n  <name>guest</name>\n  <uuid>{uuid}</uuid>\n</domain>\n")
    p.stdin.close()
    return p


def _with_var(path: str) -> bytes:
    return virtfw.with_variable(path, "VarsdTest", EFI_GLOBAL, b"restored")


def test_write_backs_up_replaces_verifies_and_journals(host):
    cfg, path, writer = host
    w = writer()
    old = open(path, "rb").read()
    st = os.stat(path)
    new = _with_var(path)
    result = w.write(w.hv.lookup(UUID), lambda cur: new, op="restore")
    assert result.changed and open(path, "rb").read() == new
    assert w.store.load(result.backup) == old and result.backup.reason == "before-write:restore"
    after = os.stat(path)
    assert after.st_ino != st.st_ino and after.st_mode == st.st_mode and after.st_uid == st.st_uid
    [entry] = w.store.index.writes(UUID)
    assert (entry.op, entry.outcome, entry.backup_id) == ("restore", "applied", result.backup.id)
    assert os.listdir(cfg.offline_dir) == []  # nothing left for the hook to wait on


def test_running_domain_is_refused_and_nothing_changes(host):
    _cfg, path, writer = host
    w = writer(runstate=1)
    old = open(path, "rb").read()
    with pytest.raises(WriteRefused, match="domain 'guest' is running.*shut it down"):
        w.write(w.hv.lookup(UUID), lambda cur: _with_var(path), op="restore")
    assert open(path, "rb").read() == old and w.store.index.records() == []


def test_content_of_another_layout_is_refused_before_anything_is_written(host):
    _cfg, path, writer = host
    w = writer()
    old = open(path, "rb").read()
    two_mib = open(VARS_2M, "rb").read()
    with pytest.raises(WriteRefused, match="layout"):
        w.write(w.hv.lookup(UUID), lambda cur: two_mib, op="restore")
    assert open(path, "rb").read() == old
    assert w.store.index.writes(UUID) == []


def test_a_missing_varstore_is_created_owned_by_the_qemu_user(host):
    _cfg, path, writer = host
    w = writer()
    os.unlink(path)  # virsh undefine --nvram, then the same XML defined again
    data = open(VARS_4M, "rb").read()
    result = w.write(w.hv.lookup(UUID), lambda cur: data, op="restore")
    assert result.backup is None and open(path, "rb").read() == data
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_failing_after_step_puts_the_old_store_back(host):
    _cfg, path, writer = host
    w = writer()
    old = open(path, "rb").read()

    def after():
        raise fsio.ReadError("XML change refused")

    with pytest.raises(Exception, match="old varstore was put back"):
        w.write(w.hv.lookup(UUID), lambda cur: _with_var(path), op="migrate", after=after)
    assert open(path, "rb").read() == old
    assert w.store.index.writes(UUID)[0].outcome.startswith("failed")


def test_hook_without_any_write_in_hand_returns_at_once(tmp_path, host):
    cfg, _path, _writer = host
    hook = _hook(tmp_path, cfg)
    began = time.monotonic()
    p = _start(hook)
    assert p.wait(timeout=10) == 0 and time.monotonic() - began < 1
    # a write in hand for another domain does not hold this one's start
    with InHand(cfg.offline_dir, "0b000000-0000-4000-8000-0000000000ff", op="reset", wait=5):
        p = _start(hook)
        assert p.wait(timeout=3) == 0
    assert not os.path.exists(os.path.join(cfg.offline_dir, f"{UUID}.write"))  # the hook never creates it


def test_a_start_waits_for_the_write_in_hand_then_goes_on(tmp_path, host):
    cfg, _path, _writer = host
    hook = _hook(tmp_path, cfg)
    with InHand(cfg.offline_dir, UUID, op="restore", wait=20) as hand:
        p = _start(hook)
        time.sleep(1.0)
        assert p.poll() is None  # waiting
        with hand.commit():
            pass  # no start gave up: the commit goes ahead
    assert p.wait(timeout=5) == 0


def test_a_start_that_times_out_goes_on_and_the_write_is_refused(tmp_path, host):
    cfg, _path, _writer = host
    hook = _hook(tmp_path, cfg)
    with InHand(cfg.offline_dir, UUID, op="restore", wait=1) as hand:
        p = _start(hook)
        assert p.wait(timeout=10) == 0  # bounded: libvirt goes on
        assert "letting it go on" in p.stderr.read()
        with pytest.raises(StartBegan, match="nothing was written"):
            with hand.commit():
                raise AssertionError("must not commit")
    assert os.listdir(cfg.offline_dir) == []


def test_a_start_that_gave_up_makes_the_writer_refuse_and_keep_the_file(tmp_path, host):
    cfg, path, writer = host
    cfg2 = replace(cfg, start_wait=1)
    w = writer()
    w.cfg = cfg2
    hook = _hook(tmp_path, cfg2)
    old = open(path, "rb").read()
    seen: list[subprocess.Popen] = []

    def on_stage(stage: str) -> None:
        if stage == "before-commit":
            seen.append(_start(hook))
            seen[0].wait(timeout=10)  # the start gives up after 1 s

    with pytest.raises(StartBegan):
        w.write(w.hv.lookup(UUID), lambda cur: _with_var(path), op="restore", on_stage=on_stage)
    assert open(path, "rb").read() == old
    assert w.store.index.writes(UUID)[0].outcome.startswith("refused")


def test_two_writers_of_one_domain_never_overlap(host):
    cfg, _path, _writer = host
    with InHand(cfg.offline_dir, UUID, op="restore", wait=5):
        with pytest.raises(WriteRefused, match="in progress"):
            with InHand(cfg.offline_dir, UUID, op="reset", wait=5):
                pass


def test_concurrent_writes_are_serialised_by_the_domain_lock(host):
    _cfg, path, writer = host
    results, errors = [], []

    writers = [writer() for _ in range(3)]  # each its own connection, made before the threads

    def go(tag: bytes):
        w = writers[tag[0]]
        try:
            results.append(w.write(w.hv.lookup(UUID), lambda cur: virtfw.with_variable(
                path, "VarsdTest", EFI_GLOBAL, tag), op="restore"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(bytes([i]),)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and len(results) == 3


@pytest.mark.parametrize("op", ["prepare begin", "start begin", "started begin", "stopped end", "release end",
                                "migrate begin", "restore begin", "reconnect begin", "attach begin"])
def test_hook_never_fails_a_libvirt_operation(tmp_path, host, op):
    """Fail-open: every operation, with garbage on stdin or a write in hand, exits 0."""
    cfg, _path, _writer = host
    hook = _hook(tmp_path, cfg)
    with InHand(cfg.offline_dir, UUID, op="reset", wait=1):
        for stdin in (f"<domain><uuid>{UUID}</uuid></domain>", "not xml at all", ""):
            r = subprocess.run(["sh", hook, "guest", *op.split(), "-"], input=stdin, capture_output=True, text=True,
                               timeout=10)
            assert r.returncode == 0, r.stderr


def test_hook_is_plain_posix_sh():
    assert subprocess.run(["dash", "-n", str(HOOK)]).returncode == 0
    assert os.access(HOOK, os.X_OK)
