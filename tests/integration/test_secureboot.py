"""Secure Boot certificate rollout on real boots: the host's Microsoft-keyed 4 MiB build.

Each guest runs Debian's `OVMF_CODE_4M.secboot.fd` (SMM, `secure='yes'`) with a
varstore libvirt makes from `OVMF_VARS_4M.ms.fd` at its first start. Debian 12's
(2022.11) and Debian 13's (2025.02-8+deb13u1) both carry the 2011 Microsoft CAs only
(KEK: Debian's PK/KEK key + KEK CA 2011; db: Windows Production PCA 2011 + UEFI CA 2011;
one dbx hash), so the rollout is the same on both; the serial line of a boot differs
(ovmf_files.SECURE_BOOT_LINE), and so does what Debian 13's own virt-firmware can add
(FULL_SET). The tests boot it, stop it, audit and update it with varsctl, and boot
it again: OVMF then rewrites its store (so the layout and the keys are what the code
reads), and the keys are read back with virt-firmware.
"""

from __future__ import annotations

import calendar
import json
import os
import pwd
import shutil
import threading
import time
from pathlib import Path

from metrics_check import assert_matches
from metrics_check import samples as parse_samples
from ovmf_files import SECURE_BOOT_LINE
from prometheus_client.parser import text_string_to_metric_families
from support.domains import guest_xml, split_os

from varsd.adapters import virtfw
from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.config import load_config, qemu_owner
from varsd.domain.xml import parse_domain
from varsd.engine.backups import open_store
from varsd.engine.reconciler import Reconciler
from varsd.engine.secureboot import for_reconciler
from varsd.firmware.catalog import load_configured

from .guests import NVRAM_DIR, open_files, qemu_pid, wait_for_serial, wait_for_varstore_write
from .test_daemon_live import Daemon
from .test_dpkg_upgrade import _exclude_all_but
from .test_migrate import _config, varsctl

OVMF = "/usr/share/OVMF"
SB_CODE_4M = f"{OVMF}/OVMF_CODE_4M.secboot.fd"
VARS_4M_MS = f"{OVMF}/OVMF_VARS_4M.ms.fd"
BOOT_LINE = SECURE_BOOT_LINE  # what this release's Secure Boot build prints once its boot manager ran
SECURE_FEATURES = "<acpi/><smm state='on'/>"
TPM = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
NEW_KEK = "Microsoft Corporation KEK 2K CA 2023"
NEW_DB = ["Windows UEFI CA 2023", "Microsoft UEFI CA 2023", "Microsoft Option ROM UEFI CA 2023"]
OLD_KEK = "Microsoft Corporation KEK CA 2011"
OLD_DB = ["Microsoft Windows Production PCA 2011", "Microsoft Corporation UEFI CA 2011"]
# Debian 13's own python3-virt-firmware (24.11, the Debian 13 bed's) ships no Option ROM CA: an update
# adds the other three and says so, and the store stays update-available (varsd cannot add what the
# library lacks). With virt-firmware 26.x (the host venvs, Debian 12 or 13) all four, then ok.
FULL_SET = not virtfw.library_version().startswith("24.")
ADDED_DB = NEW_DB if FULL_SET else NEW_DB[:2]
UPDATED = "ok" if FULL_SET else "update-available"


def _swtpm_localca_for_tss() -> None:
    """swtpm's local CA state must belong to tss (domain brief §7); on this host kind the first vTPM
    start creates files there as root, and every later one then fails ("Need read/write rights on
    /var/lib/swtpm-localca/.lock.swtpm-localca for user tss"). scripts/host-setup does the same."""
    for root, dirs, files in os.walk("/var/lib/swtpm-localca"):
        for entry in [root] + [os.path.join(root, f) for f in dirs + files]:
            shutil.chown(entry, "tss", "root")


def _sb_guest(factory, label: str, *, tpm: bool = False):
    name = factory.name(label)
    store = f"{NVRAM_DIR}/{name}_VARS.fd"
    factory.track(store)
    xml = guest_xml(name, split_os(SB_CODE_4M, store, template=VARS_4M_MS, secure=True),
                     serial_log="{serial_log}", features=SECURE_FEATURES, extra_devices=TPM if tpm else "")
    return factory.define(name, xml=xml), Path(store)


def _boot(hv: Hypervisor, guest, store: Path, before: bytes | None = None) -> bytes:
    """Start, wait until OVMF has booted and written its store, then power off; returns the store."""
    hv.start(guest.uuid)
    try:
        wait_for_serial(guest.serial_log, BOOT_LINE, timeout=240)
        if before is not None:
            wait_for_varstore_write(str(store), before, timeout=120)
    finally:
        hv.destroy(guest.uuid)
    return store.read_bytes()


def _audit(config: Path, name: str) -> dict:
    r = varsctl(config, "secureboot", "status", "--json", name)
    assert r.returncode in (0, 1), r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"domains", "templates"}
    [entry] = doc["domains"]
    return entry


def _subjects(data: bytes) -> tuple[list[str], list[str]]:
    keys = virtfw.secure_boot_vars_of_bytes(data, "store")
    return [c.subject for c in keys.kek], [c.subject for c in keys.db]


def test_update_a_shut_off_guest_boot_it_and_roll_back(hv: Hypervisor, guest_factory, tmp_path) -> None:
    config = _config(tmp_path)
    guest, store = _sb_guest(guest_factory, "sbupd")
    used = _boot(hv, guest, store)  # libvirt makes the store from the template; OVMF writes it
    entry = _audit(config, guest.name)
    assert (entry["ms2023"], entry["tpm"], entry["secure_boot"]["build"]) == ("update-available", False, True), entry
    assert entry["secure_boot"]["enforcing"] is True and entry["secure_boot"]["SecureBootEnable"] is True
    assert entry["pk"]["subject"] == "Debian UEFI Secure Boot (PK/KEK key)"
    assert [k["subject"] for k in entry["kek"]][-1] == OLD_KEK and entry["dbx_entries"] == 1
    assert entry["kek"][-1]["not_after"] == "2026-06-24T20:51:29Z"

    dry = varsctl(config, "secureboot", "update", "--dry-run", guest.name)
    assert dry.returncode == 0 and "would back up and add" in dry.stdout, dry.stdout + dry.stderr
    assert store.read_bytes() == used

    r = varsctl(config, "secureboot", "update", "--json", guest.name)
    assert r.returncode == 0, r.stdout + r.stderr
    [result] = json.loads(r.stdout)["results"]
    assert result["outcome"] == "updated" and result["added"] == [NEW_KEK, *ADDED_DB], result
    kek, db = _subjects(store.read_bytes())
    assert OLD_KEK in kek and NEW_KEK in kek and db == OLD_DB + ADDED_DB  # the 2011 ones stay
    cfg = load_config(str(config))
    backups = open_store(cfg)
    record = backups.index.get(int(result["backup"].lstrip("#")))
    assert record.reason == "before-write:secureboot-update" and record.uuid == guest.uuid
    assert backups.load(record) == used  # verified against its digest on load
    st = store.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, pwd.getpwnam("libvirt-qemu").pw_uid)  # kept as libvirt made it
    assert FULL_SET or "NOT added: Microsoft Option ROM UEFI CA 2023" in result["detail"], result
    assert _audit(config, guest.name)["ms2023"] == UPDATED
    again = varsctl(config, "secureboot", "update", guest.name)
    assert again.returncode == 0 and "unchanged" in again.stdout

    # It boots with the new keys: OVMF rewrites the store (MTC, boot entries) and keeps them.
    updated = store.read_bytes()
    after_boot = _boot(hv, guest, store, before=updated)
    keys = virtfw.secure_boot_vars_of_bytes(after_boot, str(store))
    assert [c.subject for c in keys.db] == OLD_DB + ADDED_DB and NEW_KEK in [c.subject for c in keys.kek]
    assert keys.enforcing and keys.secure_boot_enable is True and not keys.setup_mode and not keys.custom_mode

    # Roll back: `varsctl backup restore` puts the update's backup back (and backs up what it replaces).
    r = varsctl(config, "backup", "restore", guest.name, "--id", str(record.id))
    assert r.returncode == 0, r.stdout + r.stderr
    assert store.read_bytes() == used and _audit(config, guest.name)["ms2023"] == "update-available"


def test_vtpm_guest_is_refused_without_ack_and_shows_pcr7(hv: Hypervisor, guest_factory, tmp_path) -> None:
    config = _config(tmp_path)
    guest, store = _sb_guest(guest_factory, "sbtpm", tpm=True)
    _swtpm_localca_for_tss()
    used = _boot(hv, guest, store)  # boots with a real swtpm
    entry = _audit(config, guest.name)
    assert (entry["ms2023"], entry["tpm"], entry["tpm_model"]) == ("update-available", True, "tpm-crb/emulator")

    refused = varsctl(config, "secureboot", "update", "--json", guest.name)
    assert refused.returncode == 1
    [result] = json.loads(refused.stdout)["results"]
    assert result["outcome"] == "refused" and "has a vTPM" in result["detail"] and "--tpm-ack" in result["detail"]
    assert "BitLocker" in result["detail"]
    pcr = result["pcr7"]
    if virtfw.library_version().startswith("24."):
        assert pcr["changes"] is None and "no measurement module" in pcr["unavailable"]
    else:
        assert pcr["changes"] is True and pcr["before"] != pcr["after"] and len(pcr["before"]) == 64
        assert pcr["before"] in result["detail"] and pcr["after"] in result["detail"]
    assert store.read_bytes() == used

    acked = varsctl(config, "secureboot", "update", "--tpm-ack", guest.name)
    assert acked.returncode == 0, acked.stdout + acked.stderr
    assert _subjects(store.read_bytes())[1] == OLD_DB + ADDED_DB
    _swtpm_localca_for_tss()
    _boot(hv, guest, store, before=store.read_bytes())  # and it boots, TPM and all


def test_templates_2023_reach_new_guests(hv: Hypervisor, guest_factory, tmp_path) -> None:
    """With secureboot_templates = "2023" a new Secure Boot guest (virt-install/virt-manager style: Debian's
    Microsoft-keys code and template named, never started) is provisioned from the derived template.

    (A `-bios` Secure Boot guest gets the build without enrolled keys: its RAM variables never had any, and
    enrolling Microsoft's would switch Secure Boot on under it. So that case keeps its setup-mode store.)"""
    config = _config(tmp_path, 'secureboot_templates = "2023"\n')
    status = varsctl(config, "secureboot", "status", "--json", "--keys")
    templates = {t["varstore"]: t for t in json.loads(status.stdout)["templates"]}
    derived = [t for t in templates.values() if t["origin"].startswith("derived by varsd from " + VARS_4M_MS)]
    assert len(derived) == 1 and derived[0]["ms2023"] == UPDATED, templates
    assert derived[0]["varstore"].startswith(str(tmp_path / "state" / "templates"))
    assert "new guests get the derived copy" in templates[VARS_4M_MS]["detail"]

    name = guest_factory.name("sbnew")
    store = f"{NVRAM_DIR}/{name}_VARS.fd"
    guest_factory.track(store)
    xml = guest_xml(name, split_os(f"{OVMF}/OVMF_CODE_4M.ms.fd", store, template=VARS_4M_MS, secure=True),
                     serial_log="{serial_log}", features=SECURE_FEATURES)
    guest = guest_factory.define(name, xml=xml)
    r = varsctl(config, "reconcile", guest.name)
    assert r.returncode == 0, r.stdout + r.stderr
    fw = parse_domain(hv.persistent_xml(guest.uuid))
    assert fw.metadata.template_path == derived[0]["varstore"]  # provenance names the derived template
    assert fw.metadata.template_sha256 == derived[0]["sha256"]
    kek, db = _subjects(Path(store).read_bytes())
    assert NEW_KEK in kek and OLD_KEK in kek and set(OLD_DB + NEW_DB[:2]) <= set(db)
    assert _audit(config, guest.name)["ms2023"] == UPDATED
    _boot(hv, guest, Path(store), before=Path(store).read_bytes())  # the derived store boots


def test_metrics_parse_and_match_status(hv: Hypervisor, guest_factory, tmp_path) -> None:
    config = _config(tmp_path)
    guest, store = _sb_guest(guest_factory, "sbmet")
    _boot(hv, guest, store)
    # A SeaBIOS guest beside it: nothing any varsd running on this shared host could repair meanwhile.
    other = guest_factory.define("sbmetseabios", "")
    mine = [guest.name, other.name]  # the host is shared: other sessions' domains come and go meanwhile
    r = varsctl(config, "metrics", *mine)
    assert r.returncode == 0, r.stderr
    samples = parse_samples(r.stdout)
    status = json.loads(varsctl(config, "status", "--json", *mine).stdout)["domains"]
    sb = json.loads(varsctl(config, "secureboot", "status", "--json").stdout)
    sb["domains"] = [d for d in sb["domains"] if d["name"] in mine]
    assert_matches(samples, status, sb)
    assert samples[("varsd_domains_by_config", (("config", "none"),))] == 1
    assert samples[("varsd_domains_ms2023", (("ms2023", "update-available"),))] == 1
    assert samples[("varsd_backups_missing", ())] == 1  # the booted guest's store was never backed up here
    earliest = calendar.timegm(time.strptime("2026-06-24T20:51:29Z", "%Y-%m-%dT%H:%M:%SZ"))  # KEK CA 2011
    assert samples[("varsd_secureboot_cert_not_after_min_seconds", (("domain", guest.name),))] == earliest


def test_running_guest_is_queued_and_updated_after_it_stops(hv: Hypervisor, guest_factory, tmp_path) -> None:
    """`update` on a running guest queues; the daemon writes the store once the guest is off, before the
    next start; that start boots the new store (QEMU opens the inode the write put in place).

    The daemon is restricted to this test's guest (exclude every other name). It also writes the metrics
    textfile."""

    guest, store = _sb_guest(guest_factory, "sbrun")
    _boot(hv, guest, store)
    textfile = tmp_path / "varsd.prom"
    daemon = Daemon(tmp_path)
    daemon.config.write_text(
        f'state_dir = "{tmp_path / "state"}"\nnvram_dir = "{NVRAM_DIR}"\nreconcile_interval = 3600\n'
        f'firmware_dirs = ["/usr/share/qemu/firmware"]\nexclude = {json.dumps(_exclude_all_but(guest.name))}\n'
        f'metrics_textfile = "{textfile}"\n')
    config = daemon.config
    hv.start(guest.uuid)
    try:
        wait_for_serial(guest.serial_log, BOOT_LINE, timeout=240)
        r = varsctl(config, "secureboot", "update", guest.name)
        assert r.returncode == 0 and "update-queued" in r.stdout, r.stdout + r.stderr
        assert _audit(config, guest.name)["ms2023"] == "update-queued"
        daemon.start()
        daemon.wait_ready(timeout=120)
        running = store.read_bytes()
        assert _subjects(running)[1] == OLD_DB  # nothing written while it runs
        hv.destroy(guest.uuid)

        deadline = time.monotonic() + 60
        while _audit(config, guest.name)["ms2023"] != UPDATED:  # no longer update-queued
            assert time.monotonic() < deadline, daemon.log.read_text()[-3000:]
            time.sleep(0.2)
        kek, db = _subjects(store.read_bytes())
        assert NEW_KEK in kek and db == OLD_DB + ADDED_DB
        written = os.stat(store).st_ino
        hv.start(guest.uuid)
        wait_for_serial(guest.serial_log, BOOT_LINE, timeout=240)
        opened = {st.st_ino for path, st in open_files(qemu_pid(guest.name)).items() if path == str(store)}
        assert opened == {written}
        deadline = time.monotonic() + 2 * 60 + 10
        while not textfile.exists():
            assert time.monotonic() < deadline, "no metrics textfile"
            time.sleep(0.5)
        names = {f.name for f in text_string_to_metric_families(textfile.read_text())}
        assert {"varsd_domains", "varsd_domains_ms2023", "varsd_templates_ms2023"} <= names
    finally:
        if guest.ref(hv).active:
            hv.destroy(guest.uuid)
        daemon.kill()
    assert "queued Secure Boot update" not in daemon.log.read_text()  # applied, not dropped or failed


def _hook_waiting(name: str) -> bool:
    """Whether varsd's libvirt hook is running for `name`'s start (it waits while a write is in hand)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"qemu.d/varsd") for a in argv) and name.encode() in argv and b"prepare" in argv:
            return True
    return False


def test_a_start_racing_the_queued_write_waits_for_it(hv: Hypervisor, guest_factory, tmp_path) -> None:
    """The queued update is being written when `virsh start` comes: the libvirt hook holds the start until
    the write is done, and the guest boots the updated store (QEMU opens the inode the write put there)."""
    config = _config(tmp_path)
    guest, store = _sb_guest(guest_factory, "sbrace")
    _boot(hv, guest, store)
    hv.start(guest.uuid)
    try:
        wait_for_serial(guest.serial_log, BOOT_LINE, timeout=240)
        r = varsctl(config, "secureboot", "update", guest.name)
        assert r.returncode == 0 and "update-queued" in r.stdout, r.stdout + r.stderr
    finally:
        hv.destroy(guest.uuid)

    cfg = load_config(str(config))
    journal = Journal(cfg.journal_path)
    rec = Reconciler(cfg, hv, load_configured(cfg), journal, qemu_owner(cfg), actor="test")
    sb = for_reconciler(rec)
    started: dict[str, float] = {}
    starter: list[threading.Thread] = []

    def start_now() -> None:
        hv.start(guest.uuid)
        started["returned"] = time.monotonic()

    def on_stage(stage: str) -> None:
        if stage == "before-commit":  # the write is in hand, the file not yet replaced
            starter.append(threading.Thread(target=start_now))
            starter[0].start()
            deadline = time.monotonic() + 60
            while not _hook_waiting(guest.name):  # libvirt runs the hook: `varsd NAME prepare begin -`
                assert time.monotonic() < deadline, "the start never reached varsd's libvirt hook"
                time.sleep(0.05)
            time.sleep(1.0)
            assert "returned" not in started and _hook_waiting(guest.name), "the start did not wait for the write"
            started["commit"] = time.monotonic()

    sb.on_stage = on_stage
    try:
        result = sb.apply_queued(hv.lookup(guest.uuid))
        assert result is not None and result.outcome.value == "updated", result
        starter[0].join(timeout=120)
        assert started["returned"] >= started["commit"]
        ino = os.stat(store).st_ino
        assert {st.st_ino for path, st in open_files(qemu_pid(guest.name)).items() if path == str(store)} == {ino}
        assert _subjects(store.read_bytes())[1] == OLD_DB + ADDED_DB
    finally:
        if starter:
            starter[0].join(timeout=120)
        if guest.ref(hv).active:
            hv.destroy(guest.uuid)
        journal.close()
