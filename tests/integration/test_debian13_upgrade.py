"""Debian 12 -> 13 on a real host: the 2 MiB guests keep booting (issue 7 item 1).

A real `dpkg -i` of Debian 12's `ovmf` (2022.11-6+deb12u2), then of Debian 13's (from
Debian's archive, with apt), into a private root (`dpkg --root`): the host's own
/usr/share/OVMF is shared with other tests and must not lose its 2 MiB files. varsd's
configuration is the default one with its directories under that root: descriptors
from `<root>/usr/share/qemu/firmware`, builds no descriptor lists from
`<root>/usr/share/OVMF` (no `extra_firmware`). Debian 13's descriptors name the
4 MiB files by their /usr/share/OVMF paths, which are the host's.

Two guests from before 2023: plain 2 MiB `OVMF_CODE.fd` with its own `OVMF_VARS.fd`
copy, and 2 MiB Secure Boot `OVMF_CODE.ms.fd` (a symlink) with Microsoft's keys from
`OVMF_VARS.ms.fd`, each with a boot entry. varsd binds and archives both, Debian 13
removes their code; both still start, held on the archived build (`needs-migration`,
saying what to run), then `varsctl migrate` moves them keeping boot entries and
PK/KEK/db/dbx, and they boot the central 4 MiB code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from debian_debs import ovmf_debs
from support.domains import guest_xml, split_os
from support.varstores import read_variables

from varsd.adapters import virtfw
from varsd.adapters.libvirt_api import Hypervisor
from varsd.domain.xml import parse_domain

from .guests import NVRAM_DIR, open_paths, qemu_pid, varsctl, wait_for_serial
from .test_migrate import BOOT_LINE, EFI_GLOBAL, IMAGE_SECURITY_DB, NO_S3, SECURE_FEATURES, _load_option

KEYS = (f"{EFI_GLOBAL}:PK", f"{EFI_GLOBAL}:KEK", f"{IMAGE_SECURITY_DB}:db", f"{IMAGE_SECURITY_DB}:dbx")
ENTRY = (f"{EFI_GLOBAL}:Boot0007",)


@pytest.fixture(scope="session")
def debs() -> dict[str, Path]:
    """Debian 12's and Debian 13's ovmf .deb, downloaded once (cached across runs)."""
    return ovmf_debs()


@pytest.fixture
def root() -> Iterator[Path]:
    """A private root with its own dpkg database, which QEMU (the qemu user) can traverse."""
    base = Path(tempfile.mkdtemp(prefix="varsd-deb13-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    for sub in ("info", "updates", "triggers"):
        (base / "var/lib/dpkg" / sub).mkdir(parents=True)
    (base / "var/lib/dpkg/status").touch()
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _dpkg_i(root: Path, deb: Path) -> str:
    r = subprocess.run(["dpkg", f"--root={root}", "--log=/dev/null", "--force-depends", "-i", str(deb)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _statuses(config: Path, names: list[str]) -> dict[str, dict]:
    r = varsctl(config, "status", "--json", *names)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return {d["name"]: d for d in json.loads(r.stdout)["domains"]}


def _started(hv: Hypervisor, guests, code_of: dict[str, str], *, serial: set[str]) -> None:
    """Start every guest; each must run with its expected code file open (and print BdsDxe if in `serial`)."""
    for g in guests:
        Path(g.serial_log).unlink(missing_ok=True)
        hv.start(g.uuid)
    try:
        for g in guests:
            if g.name in serial:
                wait_for_serial(g.serial_log, BOOT_LINE, timeout=240)
            else:  # Debian 12's 2 MiB Secure Boot build prints nothing: judge by QEMU still running with it
                time.sleep(15)
                assert hv.lookup(g.uuid).active, f"{g.name} stopped"
            files = open_paths(qemu_pid(g.name))
            assert code_of[g.name] in files, f"{g.name}: expected {code_of[g.name]}, QEMU has {sorted(files)}"
    finally:
        for g in guests:
            hv.destroy(g.uuid)


def test_2mib_guests_survive_the_debian13_upgrade_and_migrate(hv: Hypervisor, guest_factory, tmp_path, root,
                                                               debs) -> None:
    _dpkg_i(root, debs["12"])
    ovmf = root / "usr/share/OVMF"
    config = tmp_path / "varsd.toml"
    state = root / "var/lib/varsd"  # QEMU opens archived builds in it: not under pytest's 0700 tmp
    config.write_text(f'state_dir = "{state}"\nnvram_dir = "{NVRAM_DIR}"\n'
                      f'firmware_dirs = ["{root}/usr/share/qemu/firmware", "{root}/etc/qemu/firmware"]\n'
                      f'firmware_search_dirs = ["{ovmf}", "{root}/usr/share/ovmf", "{root}/usr/share/qemu"]\n')

    def store(name: str, template: Path) -> str:
        path = guest_factory.track(f"{NVRAM_DIR}/{name}_VARS.fd")
        path.write_bytes(virtfw.with_variables(str(template), [
            virtfw.EfiVariable("Boot0007", EFI_GLOBAL, 7, _load_option("installer", r"\EFI\debian\shimx64.efi")),
            virtfw.EfiVariable("BootOrder", EFI_GLOBAL, 7, b"\x07\x00"),
        ]))
        os.chmod(path, 0o600)
        shutil.chown(path, "libvirt-qemu", "libvirt-qemu")
        return str(path)

    plain_name, sb_name = guest_factory.name("plain2m"), guest_factory.name("sb2m")
    plain_os = split_os(str(ovmf / "OVMF_CODE.fd"), store(plain_name, ovmf / "OVMF_VARS.fd"),
                        template=str(ovmf / "OVMF_VARS.fd"))
    plain = guest_factory.define(plain_name, plain_os)
    sb_os = split_os(str(ovmf / "OVMF_CODE.ms.fd"), store(sb_name, ovmf / "OVMF_VARS.ms.fd"),
                     template=str(ovmf / "OVMF_VARS.ms.fd"), secure=True)
    sb_xml = guest_xml(sb_name, sb_os, serial_log="{serial_log}", features=SECURE_FEATURES)
    sb_xml = sb_xml.replace("</features>", "</features>" + NO_S3)
    sb = guest_factory.define(sb_name, xml=sb_xml)
    names = [plain.name, sb.name]

    # Debian 12, default configuration: both are known builds, bound and archived.
    r = varsctl(config, "reconcile", "--json", *names)
    assert r.returncode == 0, r.stdout + r.stderr
    before = _statuses(config, names)
    assert {n: (d["status"], d["config"]) for n, d in before.items()} == dict.fromkeys(names, ("ok", "split")), before
    archived = {n: str(state / "archive" / f"{d['build']}.fd") for n, d in before.items()}
    assert all(Path(p).exists() for p in archived.values()), archived

    # The upgrade: a real dpkg -i of Debian 13's ovmf removes the 2 MiB files.
    _dpkg_i(root, debs["13"])
    assert not (ovmf / "OVMF_CODE.fd").exists() and not (ovmf / "OVMF_CODE.secboot.fd").exists()
    # What the package hook runs; restricted to this test's domains (the host's libvirtd is shared).
    sync = varsctl(config, "firmware", "sync", *names)
    assert sync.returncode == 1, sync.stdout + sync.stderr  # attention: domains need migration
    held = _statuses(config, names)
    for n, d in held.items():
        assert d["status"] == "needs-migration" and "varsctl migrate" in d["detail"], d
        assert d["code"] == archived[n], d["detail"]
    _started(hv, [plain, sb], {plain.name: archived[plain.name], sb.name: archived[sb.name]}, serial={plain.name})

    nvram = {n: parse_domain(hv.persistent_xml(g.uuid)).nvram_path for n, g in ((plain.name, plain), (sb.name, sb))}
    old = {n: read_variables(p) for n, p in nvram.items()}
    assert all(k in old[sb.name] for k in KEYS + ENTRY) and all(k in old[plain.name] for k in ENTRY)

    for n in names:  # as `migrate --all` would, but never touching other tests' domains
        m = varsctl(config, "migrate", n)
        assert m.returncode == 0, m.stdout + m.stderr
    for n, p in nvram.items():
        new = read_variables(p)
        for key in (KEYS if n == sb.name else ()) + ENTRY + (f"{EFI_GLOBAL}:BootOrder",):
            assert new[key] == old[n][key], f"{n}: {key} changed in the migration"
        assert virtfw.read_layout(p).size == 540672
    after = _statuses(config, names)
    assert {n: d["status"] for n, d in after.items()} == dict.fromkeys(names, "ok"), after
    codes = {n: os.path.realpath(d["code"]) for n, d in after.items()}
    assert all(c.startswith("/usr/share/OVMF/OVMF_CODE_4M") for c in codes.values()), codes
    _started(hv, [plain, sb], codes, serial={plain.name, sb.name})
