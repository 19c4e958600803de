"""Tier 4: a second real platform, booted by the tests themselves (tests/testbed.py).

Contract of this tier:

- The bed is a Debian system of the *other* release (Debian 13 with libvirt 12.9 and QEMU
  11.1 from trixie-backports on a Debian 12 host; see testbed.second_platform) debootstrapped
  into a cache directory, booted with `systemd-nspawn --boot`: libvirtd, virtlogd and varsd
  run there as real systemd services. The package tests need Debian 13 (varsd Depends on
  python3-virt-firmware), so they always use a Debian 13 bed.
- Missing host tools (debootstrap, systemd-nspawn) or a bed that does not build or boot FAIL
  the tests; nothing here skips. `scripts/host-setup` installs the tools.
- One bed per session; it is stopped by the PIDs it was started with at session end, also
  when tests failed. Nothing here touches the host's libvirtd: the bed has its own, in its
  own network namespace.
- Every test here is marked `distro` and `integration`.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import packaging_tools
import pytest
import testbed

REPO = Path(__file__).resolve().parents[2]
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.distro)
            item.add_marker(pytest.mark.integration)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _require_tools() -> None:
    missing = [t for t in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"the platform tier needs {', '.join(missing)}: run scripts/host-setup", pytrace=False)


@pytest.fixture(scope="session")
def debian13() -> Iterator[testbed.Bed]:
    """A booted Debian 13 bed with this repository bound read-only at /srv/varsd."""
    _require_tools()
    # A SIGTERM (CI timeout, a killed run) becomes KeyboardInterrupt, so pytest still runs the
    # finalizer that stops the bed; a SIGKILLed run's bed is reaped by the next start.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    bed = testbed.Bed(testbed.TRIXIE, repo=REPO)
    with bed:
        print(f"\n[distro] Debian 13 bed: tree {testbed.describe_build(bed.build_seconds)}, "
              f"booted in {bed.boot_seconds:.1f} s")
        yield bed
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def deb(debian13: testbed.Bed) -> str:
    """varsd's .deb, built with dpkg-buildpackage in the Debian 13 bed; its path inside."""
    built = testbed.build_deb_in(debian13, REPO)
    debs = [p for p in built if p.endswith("_all.deb")]
    assert len(debs) == 1, built
    return debs[0]



@pytest.fixture(scope="session")
def argparse_docs():
    """packaging/argparse_docs.py, the build-time generator of man pages and completion."""
    return packaging_tools.argparse_docs()


def install_deb(bed: testbed.Bed, deb: Path) -> str:
    """`apt install ./varsd_*.deb` into `bed` (the .deb is a host path); apt's output."""
    shutil.copyfile(deb, bed.share / deb.name)
    r = bed.run("apt-get", "install", "-y", "-q", f"{testbed.SHARE}/{deb.name}", timeout=600,
                env={"DEBIAN_FRONTEND": "noninteractive"})
    assert "Setting up varsd" in r.stdout, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="session")
def deb_file(debian13: testbed.Bed, deb: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built .deb, copied out of the session's bed."""
    out = tmp_path_factory.mktemp("deb") / Path(deb).name
    shutil.copyfile(debian13.path(deb), out)
    return out
