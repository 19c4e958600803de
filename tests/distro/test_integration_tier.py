"""The integration tier (tests/integration) run inside the beds.

pytest runs there on Debian 13's own python3 packages (python3-pytest, python3-libvirt,
python3-lxml, python3-apscheduler, python3-virt-firmware 24.11), from this checkout bound
read-only, against the bed's libvirtd 12.9 and QEMU 11.1.

Only the tests that are not tied to Debian 12 run here: the others use Debian 12's
2 MiB images (gone in Debian 13) or download Debian 12's ovmf deb12u1/u2 packages; their
Debian 13 counterparts are this directory's own tests (test_firmware_upgrade.py for the
dpkg upgrade, test_libvirt12.py for libvirt's frozen autoselection).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import testbed

from .conftest import REPO

PORTABLE = (
    "tests/integration/test_testbed.py",
    "tests/integration/test_daemon_live.py::test_bios_domain_defined_while_varsd_runs_is_repaired_and_boots",
    "tests/integration/test_daemon_live.py::test_sigterm_during_a_burst_leaves_nothing_half_written",
)
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


def test_integration_tier_passes_inside_the_bed(platform: testbed.Bed) -> None:
    r = platform.run("sh", "-c", f"cd {testbed.SOURCE} && python3 -m pytest -q -p no:cacheprovider -rA "
                     + " ".join(PORTABLE), check=False, timeout=1200,
                     env={"PYTHONPATH": testbed.SOURCE, "PYTHONDONTWRITEBYTECODE": "1"})
    print(f"\n[distro] integration tier in the Debian {platform.release.version} bed:\n"
          + "\n".join(r.stdout.splitlines()[-8:]))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    passed = [ln for ln in r.stdout.splitlines() if ln.startswith("PASSED ")]
    assert len(passed) == 3, r.stdout[-3000:]
