"""The unit tiers and the integration tier (tests/integration) run inside the beds.

pytest runs there on Debian 13's own python3 packages (python3-pytest, python3-hypothesis,
python3-libvirt, python3-lxml, python3-apscheduler, python3-virt-firmware 24.11, Python
3.13), from this checkout bound read-only, against the bed's libvirtd 12.9 and QEMU 11.1:
Debian 13 as a host. Debian 12's 2 MiB images come from Debian 12's ovmf .deb, which the
bed's tree was given when it was built (tests/debian_archive.py; the bed has no network).
The beds have qemu-efi-aarch64 and qemu-system-arm like a host (scripts/host-setup), so the
tests of Debian's real AAVMF files and the aarch64 TCG boot run on the bed release's own set.

What does not run there, and why, is listed here (never silently):
- HOST_ONLY: tests of the host's own venvs (their Debian 13 counterparts run here anyway);
- KNOWN_DEBIAN13: tests that fail on Debian 13 today, each with what differs. Any other
  failure fails the test; a listed one that passes is printed (take it off the list).
- tests marked `debian12_host` report themselves as not applicable (they change the Debian
  12 host's own ovmf; their Debian 13 counterpart is tests/distro/test_firmware_upgrade.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
import testbed

from .conftest import REPO

HOST_ONLY = {
    "tests/systemd/test_unit.py": "checks the unit against the host venv's entry points; the installed unit "
                                  "runs under systemd in tests/distro/test_systemd.py",
    "tests/adapters/test_virtfw_2411.py": "runs the Secure Boot tests in the host's 24.11 venv; here Debian's own "
                                          "24.11 runs them directly",
}
KNOWN_DEBIAN13: dict[str, str] = {
    # Empty: what was listed here were test assumptions (Debian 12's files and XML spellings), two
    # test races and one varsd bug (format='raw' added to the admin's XML by undo/opt-out), all fixed.
}
UNIT = ("tests", "--ignore=tests/integration", "--ignore=tests/distro")
# Debian 13 always (the package tests need it); on a Debian 13 host also Debian 12, the
# second platform there (checked here: libvirt 9.0 + QEMU 7.2 under nspawn pass the same tests).
RELEASES = tuple(dict.fromkeys((testbed.TRIXIE, testbed.second_platform())))


@pytest.fixture(params=RELEASES, ids=lambda r: f"debian{r.version}")
def platform(request: pytest.FixtureRequest) -> Iterator[testbed.Bed]:
    if request.param == testbed.TRIXIE:
        yield request.getfixturevalue("debian13")
        return
    with testbed.Bed(request.param, repo=REPO) as bed:
        yield bed


def _pytest_in(bed: testbed.Bed, *args: str, timeout: float) -> tuple[set[str], set[str], str, float]:
    """pytest inside `bed`: (passed, failed) node ids, the output's tail, wall seconds."""
    deselect = [f"--deselect={t}" for t in HOST_ONLY]
    t0 = time.monotonic()
    r = bed.run("sh", "-c", f"cd {testbed.SOURCE} && python3 -m pytest -q -p no:cacheprovider -rA "
                + " ".join([*args, *deselect]), check=False, timeout=timeout,
                env={"PYTHONPATH": testbed.SOURCE, "PYTHONDONTWRITEBYTECODE": "1"})
    took = time.monotonic() - t0
    out = r.stdout + r.stderr

    def ids(word: str) -> set[str]:
        return {re.sub(r"\[.*$", "", m) for m in re.findall(rf"^{word} (\S+)", out, re.M)}

    return ids("PASSED"), ids("FAILED") | ids("ERROR"), out, took


def _prepare_as_host_setup(bed: testbed.Bed) -> None:
    """What scripts/host-setup does on a host for the tests, done in the (throw-away) bed:
    the non-root admin of tests/cli/test_admin_reads.py."""
    bed.sh("getent passwd varsd-test-admin >/dev/null || useradd --system --no-create-home --home-dir /nonexistent "
           "--shell /usr/sbin/nologin --gid libvirt varsd-test-admin")


def test_unit_tiers_pass_inside_the_debian13_bed(debian13: testbed.Bed) -> None:
    """Every pure test on Debian 13's Python 3.13 and python3 packages, virt-firmware 24.11."""
    _prepare_as_host_setup(debian13)
    passed, failed, out, took = _pytest_in(debian13, *UNIT, timeout=1200)
    count = len(re.findall(r"^PASSED ", out, re.M))
    print(f"\n[distro] unit tiers in the Debian 13 bed: {count} passed, {len(failed)} failed "
          f"(known: {len(KNOWN_DEBIAN13)}), {took:.0f} s")
    known = {k for k in KNOWN_DEBIAN13 if not k.startswith("tests/integration/")}
    if known - failed:
        print(f"[distro] passing again, take off KNOWN_DEBIAN13: {sorted(known - failed)}")
    assert not failed - known, f"new failures on Debian 13: {sorted(failed - known)}\n" + out[-6000:]
    assert count > 1000, out[-3000:]


# The integration tier inside the bed: every module that is portable, within the CI budget.
# Not here, and why: see INTEGRATION_NOT_HERE.
INTEGRATION = (
    "tests/integration",
)
HOOK = "/etc/libvirt/hooks/qemu.d/varsd"
INTEGRATION_NOT_HERE: dict[str, str] = {
    # Empty: test_secureboot runs here too (it waits for the release's own Secure Boot serial line,
    # ovmf_files.SECURE_BOOT_LINE, and knows what Debian 13's virt-firmware 24.11 can add).
}


def test_integration_tier_passes_inside_the_bed(platform: testbed.Bed) -> None:
    """The real libvirtd of the bed (12.9 / QEMU 11.1 on Debian 13; 9.0 / 7.2 on Debian 12)."""
    args = [*INTEGRATION, *(f"--deselect={t}" for t in INTEGRATION_NOT_HERE)]
    # What scripts/host-setup does on a host: varsd's QEMU hook in place before libvirtd starts
    # (libvirt looks for hooks when it starts). Removed afterwards: the package tests install theirs.
    _prepare_as_host_setup(platform)
    platform.sh(f"install -D -m 0755 {testbed.SOURCE}/packaging/libvirt/varsd-qemu-hook {HOOK} "
                "&& systemctl restart libvirtd")
    try:
        passed, failed, out, took = _pytest_in(platform, *args, timeout=2400)
    finally:
        platform.run("rm", "-f", HOOK)
    print(f"\n[distro] integration tier in the Debian {platform.release.version} bed: {len(passed)} passed, "
          f"{len(failed)} failed, {took:.0f} s\n" + "\n".join(out.splitlines()[-6:]))
    known = {k for k in KNOWN_DEBIAN13 if k.startswith("tests/integration/")} \
        if platform.release == testbed.TRIXIE else set()
    assert not failed - known, f"failures in the Debian {platform.release.version} bed: {sorted(failed - known)}\n" \
        + out[-8000:]
    assert len(passed) >= 3, out[-3000:]
