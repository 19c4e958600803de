"""Firmware upgrades on a real host: what each cold boot maps, shown by QEMU itself.

Each test builds its own firmware tree (a descriptor + `CODE.fd`/`VARS.fd`) from
Debian 12's real OVMF packages, `2022.11-6+deb12u1` and `+deb12u2` (downloaded once
from bookworm explicitly, cached, extracted: tests/debian_archive.py): the system's /usr/share/OVMF may be
changed under us by the dpkg upgrade test. The tree is then changed the way dpkg
does (rename over, or removal) and `varsctl firmware sync` runs, as a package hook
would. The proof is on the host: which code file the QEMU process has open (and
the digest of that open file, which a rename cannot change), OVMF's serial output,
and the varstore's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import debian_archive
import pytest
from support.firmware import BuildPaths, descriptor, install_like_dpkg
from support.varstores import read_variables

from varsd.adapters import virtfw
from varsd.adapters.libvirt_api import Hypervisor
from varsd.domain.xml import parse_domain
from varsd.engine.boots import record_boot

from .conftest import Guest, GuestFactory
from .guests import NVRAM_DIR, clean_serial, qemu_pid, wait_for_varstore_write

DEBS = {"u1": debian_archive.OVMF_DEB12U1, "u2": debian_archive.OVMF_DEB12U2}
BDS = r"BdsDxe: starting Boot"


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def ovmf() -> dict[str, Path]:
    """version key -> extracted /usr/share/OVMF of that Debian package (cached across runs)."""
    trees = {}
    for key, version in DEBS.items():
        tree = debian_archive.extracted("ovmf", version, "bookworm") / "usr/share/OVMF"
        trees[key] = tree
    # The two builds the tests tell apart: same 2 MiB varstore layout, different code.
    assert _sha(trees["u1"] / "OVMF_CODE.fd") != _sha(trees["u2"] / "OVMF_CODE.fd")
    assert _sha(trees["u1"] / "OVMF_VARS.fd") == _sha(trees["u2"] / "OVMF_VARS.fd")
    return trees


@dataclass
class Host(BuildPaths):
    """A firmware tree + config in a directory QEMU (the qemu user) can reach."""

    base: Path
    ovmf: dict[str, Path]
    policy: str = "auto"

    @property
    def fw(self) -> Path:
        return self.base / "fw"

    @property
    def descriptor(self) -> Path:
        return self.base / "descriptors" / "60-varsd-test.json"

    @property
    def config(self) -> Path:
        return self.base / "varsd.toml"

    @property
    def archive(self) -> Path:
        return self.base / "state" / "archive"

    def write_config(self) -> None:
        self.config.write_text(
            f'state_dir = "{self.base / "state"}"\nnvram_dir = "{NVRAM_DIR}"\n'
            # This tree is the host's whole firmware: the real /usr/share/OVMF is not searched.
            f'firmware_dirs = ["{self.descriptor.parent}"]\nfirmware_search_dirs = []\n'
            f'upgrade_policy = "{self.policy}"\n'
        )

    def install(self, version: str, *, four_mib: bool = False) -> tuple[str, str]:
        """Put a build's pair at CODE.fd/VARS.fd the way dpkg does (write aside, rename over).

        Returns the (code, template) digests now installed.
        """
        self.fw.mkdir(mode=0o755, exist_ok=True)
        self.descriptor.parent.mkdir(mode=0o755, exist_ok=True)
        suffix = "_4M" if four_mib else ""
        for src, dst in ((f"OVMF_CODE{suffix}.fd", self.code), (f"OVMF_VARS{suffix}.fd", self.vars)):
            install_like_dpkg((self.ovmf[version] / src).read_bytes(), dst)
        self.descriptor.write_text(descriptor(
            self.code, self.vars, mode="split", machines=("pc-i440fx-*", "pc-q35-*"),
            features=("acpi-s3", "verbose-dynamic"), description=f"varsd test build (ovmf {DEBS[version]}{suffix})"))
        return _sha(self.code), _sha(self.vars)

    def remove_build(self) -> None:
        """The package dropped the build: files and descriptor are gone."""
        for path in (self.code, self.vars, self.descriptor):
            os.unlink(path)

    def varsctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "varsd.cli.varsctl", "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=300)

    def status(self, guest: Guest) -> dict:
        out = self.varsctl("status", "--json", guest.name)
        assert out.returncode in (0, 1), out.stderr
        return json.loads(out.stdout)["domains"][0]

    def sync(self, guest: Guest, expect_rc: int) -> dict:
        out = self.varsctl("firmware", "sync", "--json", guest.name)
        assert out.returncode == expect_rc, out.stdout + out.stderr
        return json.loads(out.stdout)


@pytest.fixture
def host(ovmf) -> Iterator[Host]:
    base = Path(tempfile.mkdtemp(prefix="varsd-upgrade-", dir="/var/tmp"))
    os.chmod(base, 0o711)  # QEMU (the qemu user) opens firmware and archived images below it by path
    h = Host(base, ovmf)
    h.write_config()
    yield h
    shutil.rmtree(base, ignore_errors=True)


def _provision(h: Host, guest_factory: GuestFactory, label: str) -> tuple[Guest, str]:
    """A domain on the tree's central code whose varstore varsd creates from the tree's template."""
    name = guest_factory.name(label)
    varstore = f"{NVRAM_DIR}/{name}_VARS.fd"
    guest_factory.track(varstore)
    g = guest_factory.define(
        name, f"<loader readonly='yes' type='pflash'>{h.code}</loader><nvram template='{h.vars}'>{varstore}</nvram>"
    )
    out = h.varsctl("reconcile", "--json", g.name)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)["domains"][0]
    assert (report["status"], report["varstore"]) == ("ok", varstore), report
    return g, varstore


def _serial_count(guest: Guest, pattern: str = BDS) -> int:
    """How often OVMF's boot manager started a boot option in this log (one or more per boot)."""
    try:
        text = clean_serial(Path(guest.serial_log).read_bytes())
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.splitlines() if re.search(pattern, line))


def _wait_serial(guest: Guest, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _serial_count(guest) < count:
        if time.monotonic() >= deadline:
            tail = Path(guest.serial_log).read_bytes()[-2000:] if Path(guest.serial_log).exists() else b""
            raise AssertionError(f"{guest.name}: no boot #{count} ({BDS}) after {timeout:.0f}s; tail:\n"
                                 f"{clean_serial(tail)}")
        time.sleep(0.2)


@dataclass(frozen=True)
class Booted:
    pid: int
    code: str  # what QEMU's fd points at (" (deleted)" when the path was replaced since)
    sha256: str  # digest of the open file itself


def _open_code(pid: int, varstore: str) -> Booted:
    """The code image QEMU has open: the *.fd that is not the varstore."""
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            continue
        if (target.endswith(".fd") or target.endswith(".fd (deleted)")) and not target.startswith(varstore):
            fds.append((target, hashlib.sha256(Path(link).read_bytes()).hexdigest()))
    assert len(fds) == 1, f"QEMU {pid} has these code images open: {fds}"
    return Booted(pid, *fds[0])


def _cold_boot(hv: Hypervisor, g: Guest, varstore: str) -> Booted:
    """Start (a new QEMU process), record the boot as the daemon would, wait for OVMF's boot manager."""
    Path(g.serial_log).unlink(missing_ok=True)  # this boot's output only
    hv.start(g.uuid)
    record_boot(hv, g.uuid, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _wait_serial(g, 1)
    return _open_code(qemu_pid(g.name), varstore)


def _loader(hv: Hypervisor, g: Guest) -> str | None:
    return parse_domain(hv.persistent_xml(g.uuid)).loader_path


@pytest.mark.parametrize("change", ["layout-change", "central-removed"])
def test_unfitting_or_removed_build_keeps_the_domain_on_its_archived_build(
    hv: Hypervisor, guest_factory, host: Host, change: str
) -> None:
    old_code, _ = host.install("u2")
    g, varstore = _provision(host, guest_factory, "layout")
    assert (host.archive / f"{old_code}.fd").exists(), "the bound build was not archived when the domain was bound"

    first = _cold_boot(hv, g, varstore)
    assert (first.code, first.sha256) == (host.code, old_code)
    wait_for_varstore_write(varstore, Path(host.vars).read_bytes(), timeout=120)  # OVMF wrote its variables
    hv.destroy(g.uuid)
    before = Path(varstore).read_bytes()

    if change == "layout-change":
        new_code, _ = host.install("u2", four_mib=True)  # same path, now the 4 MiB build
    else:
        host.remove_build()

    report = host.sync(g, expect_rc=1)
    events = {(c["path"], c["event"]) for c in report["firmware"]["changes"]}
    assert (host.code, "changed" if change == "layout-change" else "removed") in events, report
    dom = report["domains"][0]
    archived = str(host.archive / f"{old_code}.fd")
    assert (dom["status"], dom["code"], dom["code_sha256"]) == ("needs-migration", archived, old_code), dom
    assert f"varsctl migrate {g.name}" in dom["detail"]
    fw = parse_domain(hv.persistent_xml(g.uuid))
    assert fw.loader_path == archived and fw.nvram_path == varstore
    assert (fw.metadata.pinned_sha256, fw.metadata.pin_by) == (old_code, "incompatible")
    assert Path(varstore).read_bytes() == before, "the varstore was touched"

    again = host.sync(g, expect_rc=1)  # idempotent: nothing new, nothing to do
    assert again["firmware"]["changes"] == [] and again["domains"][0]["changes"] == []

    booted = _cold_boot(hv, g, varstore)  # it still boots, on the archived copy of its build
    assert (booted.code, booted.sha256) == (archived, old_code)
    hv.destroy(g.uuid)
    assert host.status(g)["status"] == "needs-migration"
    if change == "central-removed":
        return

    # The admin migrates it: every variable moves into the new layout, then the next cold
    # boot maps the central 4 MiB code with the migrated varstore.
    held = read_variables(varstore)
    assert any(k.endswith(":BootOrder") for k in held) and any(":Boot0" in k for k in held), sorted(held)
    out = host.varsctl("migrate", g.name)
    assert out.returncode == 0, out.stdout + out.stderr
    migrated = read_variables(varstore)
    assert {k: migrated.get(k) for k in held} == held, "a variable was lost or changed by the migration"
    assert virtfw.read_layout(varstore) == virtfw.read_layout(host.vars)  # now the 4 MiB layout
    fw = parse_domain(hv.persistent_xml(g.uuid))
    assert (fw.loader_path, fw.metadata.pinned_sha256) == (host.code, None)
    after = _cold_boot(hv, g, varstore)
    assert (after.code, after.sha256) == (host.code, new_code)
    hv.destroy(g.uuid)
    assert host.status(g)["status"] == "ok"


def test_running_domain_keeps_its_build_until_a_cold_boot(hv: Hypervisor, guest_factory, host: Host) -> None:
    old_code, _ = host.install("u1")
    g, varstore = _provision(host, guest_factory, "running")
    first = _cold_boot(hv, g, varstore)
    assert (first.code, first.sha256) == (host.code, old_code)
    before_vars = Path(varstore).read_bytes()

    new_code, _ = host.install("u2")  # the upgrade: same layout, new code, renamed over the old file
    report = host.sync(g, expect_rc=0)
    assert (host.code, "changed") in {(c["path"], c["event"]) for c in report["firmware"]["changes"]}
    dom = report["domains"][0]
    assert (dom["status"], dom["code"], dom["code_sha256"]) == ("pending-cold-boot", host.code, new_code), dom
    fw = parse_domain(hv.persistent_xml(g.uuid))
    assert (fw.loader_path, fw.metadata.build_code_sha256, fw.metadata.pinned_sha256) == (host.code, new_code, None)
    still = _open_code(qemu_pid(g.name), varstore)
    assert (still.pid, still.code, still.sha256) == (first.pid, f"{host.code} (deleted)", old_code)

    # A guest reset is a reboot inside the same QEMU process: the old build stays mapped.
    # (The firmware runs again from the start, so its boot manager starts a boot option again.)
    boots = _serial_count(g)
    hv.connection.lookupByUUIDString(g.uuid).reset(0)
    _wait_serial(g, boots + 1)
    after_reset = _open_code(qemu_pid(g.name), varstore)
    assert (after_reset.pid, after_reset.sha256) == (first.pid, old_code)
    assert host.status(g)["status"] == "pending-cold-boot"

    hv.destroy(g.uuid)
    cold = _cold_boot(hv, g, varstore)
    assert cold.pid != first.pid and (cold.code, cold.sha256) == (host.code, new_code)
    status = host.status(g)
    assert (status["status"], status["code_sha256"]) == ("ok", new_code), status
    hv.destroy(g.uuid)
    assert len(Path(varstore).read_bytes()) == len(before_vars)


def test_manual_policy_pin_unpin_and_approve_decide_the_next_cold_boot(
    hv: Hypervisor, guest_factory, host: Host
) -> None:
    host.policy = "manual"
    host.write_config()
    old_code, _ = host.install("u1")
    g, varstore = _provision(host, guest_factory, "manual")
    assert _cold_boot(hv, g, varstore).sha256 == old_code
    hv.destroy(g.uuid)
    archived_old = str(host.archive / f"{old_code}.fd")

    new_code, _ = host.install("u2")
    dom = host.sync(g, expect_rc=0)["domains"][0]
    assert (dom["status"], dom["code"]) == ("pinned", archived_old), dom
    assert f"varsctl upgrade approve {g.name}" in dom["detail"]
    assert (parse_domain(hv.persistent_xml(g.uuid)).metadata.pin_by) == "policy"
    refused = host.varsctl("unpin", g.name)  # an admin unpin does not lift the policy's hold
    assert refused.returncode == 1 and "upgrade approve" in refused.stderr
    booted = _cold_boot(hv, g, varstore)
    assert (booted.code, booted.sha256) == (archived_old, old_code)
    hv.destroy(g.uuid)

    approved = host.varsctl("upgrade", "approve", g.name)
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert _loader(hv, g) == host.code and host.status(g)["status"] == "ok"
    booted = _cold_boot(hv, g, varstore)
    assert (booted.code, booted.sha256) == (host.code, new_code)
    hv.destroy(g.uuid)

    pinned = host.varsctl("pin", g.name, "--build", old_code[:12], "--reason", "regression in the new build")
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    md = parse_domain(hv.persistent_xml(g.uuid)).metadata
    assert (md.pinned_sha256, md.pin_by, md.pin_reason) == (old_code, "admin", "regression in the new build")
    assert host.status(g)["status"] == "pinned"
    booted = _cold_boot(hv, g, varstore)
    assert (booted.code, booted.sha256) == (archived_old, old_code)
    hv.destroy(g.uuid)

    unpinned = host.varsctl("unpin", g.name)
    assert unpinned.returncode == 0, unpinned.stdout + unpinned.stderr
    assert _loader(hv, g) == host.code and host.status(g)["status"] == "ok"
    booted = _cold_boot(hv, g, varstore)
    assert (booted.code, booted.sha256) == (host.code, new_code)

    # Pinned while running, to what it runs: held on that build's archived copy at once,
    # so no later package upgrade of the central path can change its next cold boot.
    assert host.varsctl("pin", g.name).returncode == 0
    assert _loader(hv, g) == str(host.archive / f"{new_code}.fd") and host.status(g)["status"] == "pinned"
    hv.destroy(g.uuid)
    booted = _cold_boot(hv, g, varstore)
    assert (booted.code, booted.sha256) == (str(host.archive / f"{new_code}.fd"), new_code)
    hv.destroy(g.uuid)
