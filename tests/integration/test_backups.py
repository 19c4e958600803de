"""Varstore backups on the real libvirtd, with real OVMF boots under TCG.

Each guest's varstore starts as Debian's 4 MiB template plus a vendor variable of our
own (`VarsdProof`, unique per test), so a test can tell *its* variables from what OVMF
recreates on any boot. What is checked is what an admin would see: the file QEMU has
open, OVMF's serial output, the variables virt-firmware reads, and varsctl's output.

varsd (daemon or varsctl) is restricted to the test's own domain names by `exclude`,
so it never touches other test sessions' domains on the shared libvirtd.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.domains import split_os

from varsd.adapters import fsio, virtfw
from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.config import load_config, qemu_owner
from varsd.domain.xml import parse_domain
from varsd.engine.backups import open_store
from varsd.engine.lifecycle import Lifecycle
from varsd.engine.offline_write import StartBegan, VarstoreWriter
from varsd.engine.reconciler import Reconciler
from varsd.engine.restore import Restorer
from varsd.firmware.catalog import load_configured

from .guests import CODE_4M, NVRAM_DIR, VARS_4M, open_files, qemu_pid, wait_for_serial
from .test_daemon_live import Daemon, wait_until
from .test_dpkg_upgrade import _exclude_all_but
from .test_migrate import _place_varstore

VENDOR = "5b3c9c5e-1f6a-4b8e-9d2a-7a1f0e6d4c21"
BOOT_LINE = r"BdsDxe: (loading|starting|failed to load) Boot"
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"


def varsctl(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "varsd.cli.varsctl", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path: Path, prefix: str, extra: str = "") -> Path:
    cfg = tmp_path / "backups.toml"  # not varsd.toml: test_daemon_live.Daemon writes that one
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\nnvram_dir = "{NVRAM_DIR}"\n'
                   f'firmware_dirs = ["/usr/share/qemu/firmware"]\nreconcile_interval = 3600\n'
                   f"exclude = {json.dumps(_exclude_all_but(prefix))}\n{extra}")
    return cfg


def proof_store(tag: str) -> bytes:
    return virtfw.with_variable(VARS_4M, "VarsdProof", VENDOR, tag.encode())


def variables(data: bytes) -> dict:
    return virtfw.variables_of_bytes(data, "varstore")


def boot_entries(data: bytes) -> dict[str, bytes]:
    return {v.name: v.data for v in variables(data).values()
            if v.name == "BootOrder" or (v.name.startswith("Boot") and len(v.name) == 8)}


def define_guest(factory, name: str, tag: str):
    """A split 4 MiB guest whose varstore holds our proof variable."""
    path = _place_varstore(factory, name, proof_store(tag))
    g = factory.define(name, split_os(CODE_4M, str(path), template=VARS_4M))
    return g, path


def boot_and_stop(hv: Hypervisor, g, path: Path) -> bytes:
    """Cold-boot until OVMF has written its boot entries, then power off; the varstore after."""
    before = path.read_bytes()
    hv.start(g.uuid)
    wait_for_serial(g.serial_log, BOOT_LINE, timeout=180)
    deadline = time.monotonic() + 120
    while boot_entries(path.read_bytes()) == boot_entries(before) and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(1.0)  # OVMF writes BootOrder right after the entries
    hv.destroy(g.uuid)
    after = path.read_bytes()
    assert boot_entries(after) != boot_entries(before), "OVMF wrote no boot entries"
    return after


def backups_of(config: Path, name: str) -> list[dict]:
    r = varsctl(config, "backup", "list", "--json", name)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["backups"]


def opened_varstore(name: str, path: Path) -> os.stat_result:
    files = open_files(qemu_pid(name))
    assert str(path) in files, f"QEMU does not have {path} open: {sorted(files)}"
    return files[str(path)]


# -- stop-time backup, undefine --nvram, restore --------------------------------------------


def test_undefine_nvram_loses_nothing_restore_brings_the_boot_entries_back(hv, guest_factory, tmp_path):
    name = guest_factory.name("undef")
    config = write_config(tmp_path, name)
    daemon = Daemon(tmp_path)
    daemon.config = config
    g, path = define_guest(guest_factory, name, "undefine")
    daemon.start()
    try:
        daemon.wait_ready()
        used = boot_and_stop(hv, g, path)
        sha = fsio.sha256_bytes(used)
        wait_until(lambda: any(b["sha256"] == sha and b["reason"] == "stop" for b in backups_of(config, name)),
                   60, "a backup of the stopped guest's varstore appears")
        status = json.loads(varsctl(config, "status", "--json", name).stdout)["domains"][0]["backup"]
        assert status["current_in_backup"] and status["sha256"] == sha
        xml = hv.persistent_xml(g.uuid)
        r = subprocess.run(["virsh", "-c", "qemu:///system", "undefine", "--nvram", name], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        assert not path.exists()
        assert hv.define(xml).uuid == g.uuid
    finally:
        daemon.stop()
    listed = backups_of(config, name)
    assert listed and all(b["domain"] == name for b in listed)

    r = varsctl(config, "backup", "restore", name)
    assert r.returncode == 0, r.stderr + r.stdout
    assert path.read_bytes() == used, r.stdout + json.dumps(backups_of(config, name))
    st = path.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, pwd.getpwnam("libvirt-qemu").pw_uid)
    hv.start(g.uuid)
    try:
        wait_for_serial(g.serial_log, BOOT_LINE, timeout=180)
        assert opened_varstore(name, path).st_ino == st.st_ino
        now = variables(path.read_bytes())
        assert now[f"{VENDOR}:VarsdProof"].data == b"undefine"
        for entry, data in boot_entries(used).items():
            assert boot_entries(path.read_bytes()).get(entry) == data, f"{entry} not restored"
    finally:
        hv.destroy(g.uuid)


def test_reset_keeps_the_previous_store_in_a_backup_and_diff_shows_what_was_lost(hv, guest_factory, tmp_path):
    name = guest_factory.name("reset")
    config = write_config(tmp_path, name)
    g, path = define_guest(guest_factory, name, "reset")
    used = boot_and_stop(hv, g, path)

    r = varsctl(config, "reset", name, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["result"]
    assert path.read_bytes() == Path(VARS_4M).read_bytes()
    prev = out["previous_backup"]
    assert prev["sha256"] == fsio.sha256_bytes(used) and prev["reason"] == "before-write:reset"
    lost = {d["variable"]: d for d in out["lost"]}
    assert lost["VarsdProof"]["change"] == "removed"
    assert lost["BootOrder"]["old"].startswith("[Boot")

    r = varsctl(config, "backup", "diff", name, str(prev["id"]))
    assert r.returncode == 0, r.stderr
    assert "- BootOrder: [Boot" in r.stdout and "- VarsdProof" in r.stdout
    assert "title='UiApp'" in r.stdout  # boot entries decoded: title and device path

    # A backup with one byte flipped is detected and never restored.
    obj = Path(tmp_path / "state" / "backups" / "objects" / f"{prev['sha256']}.fd")
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x40
    obj.write_bytes(bytes(data))
    r = varsctl(config, "backup", "restore", name, "--id", str(prev["id"]))
    assert r.returncode == 1 and "damaged" in r.stderr, r.stderr + r.stdout
    assert path.read_bytes() == Path(VARS_4M).read_bytes()

    # The guest still boots its reset store (OVMF recreates its defaults).
    hv.start(g.uuid)
    try:
        wait_for_serial(g.serial_log, BOOT_LINE, timeout=180)
    finally:
        hv.destroy(g.uuid)


# -- running guests ----------------------------------------------------------------------


def _reconciler(config: Path) -> Reconciler:
    cfg = load_config(str(config))
    hv = Hypervisor(cfg.uri).open()
    return Reconciler(cfg, hv, load_configured(cfg), Journal(cfg.journal_path), qemu_owner(cfg), actor="test")


def _lifecycle(config: Path) -> tuple[Lifecycle, Hypervisor]:
    rec = _reconciler(config)
    return Lifecycle(rec.cfg, rec, open_store(rec.cfg)), rec.hv


def test_running_guests_scheduled_backup_is_whole_and_suspend_pauses_only_for_the_copy(hv, guest_factory, tmp_path):
    name = guest_factory.name("running")
    g, path = define_guest(guest_factory, name, "running")
    hv.start(g.uuid)
    try:
        wait_for_serial(g.serial_log, BOOT_LINE, timeout=180)
        life, own = _lifecycle(write_config(tmp_path, name))
        [result] = [r for r in life.scheduled_pass() if r.target.uuid == g.uuid]
        assert result.record is not None, result
        copy = life.store.load(result.record)
        assert virtfw.layout_of_bytes(copy, "backup").size == len(copy) == 540672
        assert variables(copy)[f"{VENDOR}:VarsdProof"].data == b"running"

        (tmp_path / "s").mkdir()
        life2, _ = _lifecycle(write_config(tmp_path / "s", name, 'backup_running = "suspend"\n'))
        states = []
        sampler_stop = threading.Event()

        def sample():
            while not sampler_stop.is_set():
                states.append(own.lookup(g.uuid).state)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        time.sleep(0.2)
        [r2] = [r for r in life2.scheduled_pass() if r.target.uuid == g.uuid]
        time.sleep(0.2)
        sampler_stop.set()
        sampler.join()
        assert r2.record is not None and r2.paused_ms is not None and r2.paused_ms < 1000, r2
        assert own.lookup(g.uuid).state == "running"
        assert states[0] == "running" and states[-1] == "running"
        paused = sum(1 for s in states if s == "paused")
        assert paused <= max(3, len(states) // 10), f"paused for {paused} of {len(states)} samples"
    finally:
        hv.destroy(g.uuid)


# -- starts serialised with offline writes -------------------------------------------------


def _restorer(config: Path) -> Restorer:
    rec = _reconciler(config)
    return Restorer(rec, VarstoreWriter.for_host(rec.cfg, rec.hv))


def _virsh_start(name: str, out: dict) -> threading.Thread:
    def run():
        began = time.monotonic()
        r = subprocess.run(["virsh", "-c", "qemu:///system", "start", name], capture_output=True, text=True)
        out.update(rc=r.returncode, err=r.stderr, took=time.monotonic() - began)

    th = threading.Thread(target=run)
    th.start()
    return th


def test_start_during_restore_waits_and_boots_the_restored_store(hv, guest_factory, tmp_path):
    name = guest_factory.name("race")
    config = write_config(tmp_path, name)
    g, path = define_guest(guest_factory, name, "race-old")
    restorer = _restorer(config)
    good = restorer.store.add(uuid=g.uuid, name=name, data=proof_store("race-restored"), reason="manual",
                              source=str(path))
    start: dict = {}
    threads = []

    def on_stage(stage: str) -> None:
        if stage == "before-commit":
            threads.append(_virsh_start(name, start))
            time.sleep(4)
            assert threads[0].is_alive(), f"virsh start did not wait for the restore: {start}"

    result = restorer.restore(hv.lookup(g.uuid), backup_id=good.id, on_stage=on_stage)
    threads[0].join(120)
    try:
        assert start["rc"] == 0, start
        assert start["took"] >= 3.5, start
        assert result.write.changed
        st = path.stat()
        assert opened_varstore(name, path).st_ino == st.st_ino  # the restored file, not the old one
        _booted_with_proof(g, name, path, b"race-restored")
    finally:
        hv.destroy(g.uuid)


def _booted_with_proof(g, name: str, path: Path, proof: bytes) -> None:
    """The running guest booted, from the file at `path` (QEMU holds that inode), with our variable in it."""
    wait_for_serial(g.serial_log, BOOT_LINE, timeout=180)
    assert opened_varstore(name, path).st_ino == path.stat().st_ino
    assert variables(path.read_bytes())[f"{VENDOR}:VarsdProof"].data == proof


def test_restore_requested_while_a_start_is_in_progress_is_refused(hv, guest_factory, tmp_path):
    name = guest_factory.name("race2")
    config = write_config(tmp_path, name)
    g, path = define_guest(guest_factory, name, "race2")
    restorer = _restorer(config)
    restorer.store.add(uuid=g.uuid, name=name, data=proof_store("race2-backup"), reason="manual", source=str(path))
    start: dict = {}
    threads: list[threading.Thread] = []
    second: list[subprocess.Popen] = []

    def on_stage(stage: str) -> None:
        if stage == "before-commit":  # a reset in hand; a start begins and waits for it
            threads.append(_virsh_start(name, start))
            time.sleep(2)
            assert threads[0].is_alive()
            second.append(subprocess.Popen(  # the restore is requested while that start is in progress
                [sys.executable, "-m", "varsd.cli.varsctl", "--config", str(config), "backup", "restore", name],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            time.sleep(1)

    reset = restorer.reset(hv.lookup(g.uuid), on_stage=on_stage)
    threads[0].join(120)
    try:
        out, err = second[0].communicate(timeout=120)
        assert start["rc"] == 0, start
        assert second[0].returncode == 1, out + err
        assert "(or starting)" in err and "shut it down" in err, err  # libvirt shows a start as paused
        assert reset.write.changed
        opened = opened_varstore(name, path)
        assert opened.st_ino == path.stat().st_ino
        assert f"{VENDOR}:VarsdProof" not in variables(path.read_bytes())  # the reset store, not the backup
    finally:
        hv.destroy(g.uuid)


def test_a_start_that_waits_too_long_goes_on_and_the_write_is_refused(hv, guest_factory, tmp_path):
    name = guest_factory.name("race3")
    config = write_config(tmp_path, name, "start_wait = 2\n")
    g, path = define_guest(guest_factory, name, "race3-old")
    old_ino = path.stat().st_ino
    restorer = _restorer(config)
    good = restorer.store.add(uuid=g.uuid, name=name, data=proof_store("race3-new"), reason="manual",
                              source=str(path))
    start: dict = {}
    threads: list[threading.Thread] = []

    def on_stage(stage: str) -> None:
        if stage == "before-commit":
            threads.append(_virsh_start(name, start))
            threads[0].join(60)  # the hook gives up after start_wait and libvirt starts the guest

    with pytest.raises(StartBegan, match="nothing was written"):
        restorer.restore(hv.lookup(g.uuid), backup_id=good.id, on_stage=on_stage)
    try:
        assert start["rc"] == 0 and start["took"] < 30, start
        assert opened_varstore(name, path).st_ino == old_ino
        assert path.stat().st_ino == old_ino
        wait_for_serial(g.serial_log, BOOT_LINE, timeout=180)
        assert variables(path.read_bytes())[f"{VENDOR}:VarsdProof"].data == b"race3-old"
    finally:
        hv.destroy(g.uuid)


# -- the lifecycle libvirt leaves open -----------------------------------------------------


def _nvram(xml: str) -> tuple[str | None, str | None]:
    fw = parse_domain(xml)
    return fw.nvram_template, fw.nvram_path


def test_domrename_moves_the_varstore_and_the_guest_boots_with_its_variables(hv, guest_factory, tmp_path):
    name = guest_factory.name("ren")
    config = write_config(tmp_path, name)
    g, path = define_guest(guest_factory, name, "rename")
    used = boot_and_stop(hv, g, path)
    daemon = Daemon(tmp_path)
    daemon.config = config
    daemon.start()
    new = f"{name}-b"
    new_path = Path(NVRAM_DIR, f"{new}_VARS.fd")
    guest_factory.track(new_path)
    try:
        daemon.wait_ready()
        r = subprocess.run(["virsh", "-c", "qemu:///system", "domrename", name, new], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        # the element, not its spelling: libvirt >= 9.2 (12.9) also stores templateFormat/format='raw'
        wait_until(lambda: _nvram(hv.persistent_xml(g.uuid)) == (VARS_4M, str(new_path)), 60,
                   "varsd points the renamed domain at <new>_VARS.fd")
    finally:
        daemon.stop()
    assert not path.exists() and new_path.read_bytes() == used
    r = varsctl(config, "journal", new, "--json")
    assert any("varstore follows domrename" in c["reason"] for c in json.loads(r.stdout)["changes"]), r.stdout
    hv.start(g.uuid)
    try:
        _booted_with_proof(g, new, new_path, b"rename")
    finally:
        hv.destroy(g.uuid)


def test_start_with_reset_nvram_is_reported_with_the_backup_that_holds_the_variables(hv, guest_factory, tmp_path):
    name = guest_factory.name("rnv")
    config = write_config(tmp_path, name)
    g, path = define_guest(guest_factory, name, "reset-nvram")
    daemon = Daemon(tmp_path)
    daemon.config = config
    daemon.start()
    try:
        daemon.wait_ready()
        used = boot_and_stop(hv, g, path)
        sha = fsio.sha256_bytes(used)
        wait_until(lambda: any(b["sha256"] == sha for b in backups_of(config, name)), 60, "stop-time backup")
        [backup] = [b for b in backups_of(config, name) if b["sha256"] == sha]
        r = subprocess.run(["virsh", "-c", "qemu:///system", "start", "--reset-nvram", name], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr

        def reported():
            r = varsctl(config, "status", "--json", name)
            assert r.returncode in (0, 1), r.stderr
            return json.loads(r.stdout)["domains"][0]["backup"].get("last_event")

        wait_until(reported, 60, "varsd notices the reset")
        event = reported()
        assert event["backup_id"] == backup["id"], event
        assert "reset to its template" in event["detail"] and f"--id {backup['id']}" in event["detail"], event
    finally:
        daemon.stop()
        hv.destroy(g.uuid)
    r = varsctl(config, "backup", "restore", name, "--id", str(backup["id"]))
    assert r.returncode == 0, r.stderr
    assert variables(path.read_bytes())[f"{VENDOR}:VarsdProof"].data == b"reset-nvram"


def test_fresh_varstores_of_200_guests_are_stored_once(hv, guest_factory, tmp_path):
    prefix = guest_factory.name("dedup")
    config = write_config(tmp_path, prefix)
    template = Path(VARS_4M).read_bytes()
    for i in range(200):
        name = f"{prefix}-{i:03d}"
        path = _place_varstore(guest_factory, name, template)
        guest_factory.define(name, split_os(CODE_4M, str(path), template=VARS_4M))
    r = varsctl(config, "backup", "create", "--all", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    made = [x for x in json.loads(r.stdout)["results"] if "backup" in x]
    assert len(made) == 200, r.stdout[-3000:]
    objects = os.listdir(tmp_path / "state" / "backups" / "objects")
    assert objects == [f"{fsio.sha256_bytes(template)}.fd"]
    r = varsctl(config, "backup", "create", "--all", "--json", timeout=600)
    assert all(x.get("unchanged") for x in json.loads(r.stdout)["results"])
