"""The README's two set-up commands on a fresh machine of the other Debian release.

CI runs them on this host (`.ci/run` is `scripts/run-tests`); here they run on a fresh
Debian 13 machine when the host is Debian 12 (and on a fresh Debian 12 one on a Debian 13
host): a tree as debootstrap leaves it plus systemd (testbed.FRESH), booted with
systemd-nspawn, where `scripts/host-setup` installs everything from that release's own
archive and PyPI, starts libvirt through systemd, and puts the QEMU hook in place.

- `scripts/run-tests` runs host-setup, ruff and pytest; pytest gets the pure tiers only
  (tests/domain, tests/planning and the architecture test). The whole suite runs on that
  release in the platform tier (test_integration_tier.py) on Debian's own python3
  packages; what this adds is the newcomer's path: host-setup and the venv.
- `scripts/run-varsd` runs varsd in the foreground against the machine's libvirt: it
  reaches its first full reconcile and repairs a `-bios` domain defined with virsh.

The machine shares the host's network namespace to reach the archive and PyPI (a bed
otherwise never does, testbed.py). Its libvirt defines no network (host-setup installs no
libvirt-daemon-config-network), and the test checks that the host's network interfaces
are the same afterwards.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import testbed

from .guests import wait_for

REPO = Path(__file__).resolve().parents[2]
INSIDE = "/root/varsd"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"


def _host_links() -> list[str]:
    return sorted(p.name for p in Path("/sys/class/net").iterdir())


@pytest.fixture(scope="module")
def fresh() -> Iterator[testbed.Bed]:
    release = testbed.second_fresh_machine()
    links = _host_links()
    with testbed.Bed(release, host_network=True, boot_timeout=300) as bed:
        print(f"\n[distro] fresh Debian {release.version} machine: tree "
              f"{testbed.describe_build(bed.build_seconds)}, booted in {bed.boot_seconds:.1f} s")
        testbed.source_tree(REPO, bed.path(INSIDE))
        # The host's CA bundle: PyPI may be reached through a TLS proxy only the host trusts
        # (the machine's network, not something a newcomer's host-setup is about).
        shutil.copyfile(HOST_CA, bed.share / "host-ca.crt")
        yield bed
        if bed.run("systemctl", "is-active", "libvirtd", check=False).stdout.strip() == "active":
            bed.run("systemctl", "stop", "libvirtd", check=False)
    assert _host_links() == links, "the fresh machine's libvirt changed the host's network interfaces"


def _env() -> dict[str, str]:
    return {"PIP_CERT": f"{testbed.SHARE}/host-ca.crt", "DEBIAN_FRONTEND": "noninteractive", "TERM": "dumb"}


def test_run_tests_sets_up_a_fresh_machine_and_passes(fresh: testbed.Bed) -> None:
    bed = fresh
    t0 = time.monotonic()
    r = bed.run("bash", f"{INSIDE}/scripts/run-tests", "tests/domain", "tests/planning", "tests/test_architecture.py",
                check=False, timeout=1800, env=_env())
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    (bed.share / "run-tests.log").write_text(out)
    assert r.returncode == 0, out[-6000:]
    assert "host-setup: ready: qemu:///system answers" in out, out[-3000:]
    assert re.search(r"\d+ passed", out) and "All checks passed!" in out, out[-3000:]
    assert bed.run("systemctl", "is-active", "libvirtd", "virtlogd").stdout.split() == ["active", "active"]
    assert bed.run("test", "-x", "/etc/libvirt/hooks/qemu.d/varsd", check=False).returncode == 0
    version = bed.run(f"{INSIDE}/.venv/bin/python", "-c", "import sys; print(sys.version.split()[0])").stdout
    passed = re.search(r"\d+ passed[^\n]*", out).group(0)
    print(f"\n[distro] scripts/run-tests on a fresh Debian {bed.release.version} machine: {took:.0f} s "
          f"(python {version.strip()}); {passed}")


def test_run_varsd_repairs_a_bios_domain(fresh: testbed.Bed) -> None:
    bed = fresh
    code = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    name = "varsd-test-fresh-bios"
    bed.run("systemd-run", "--unit=varsd-readme", "--collect", "--setenv=PIP_CERT=/srv/share/host-ca.crt",
            "bash", f"{INSIDE}/scripts/run-varsd")
    try:
        def said() -> str:
            return bed.run("journalctl", "-u", "varsd-readme", "--no-pager", "-o", "cat").stdout

        wait_for(lambda: "first full reconcile done" in said(), 300, "varsd's first full reconcile")
        xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>"
               f"<os><type arch='x86_64' machine='q35'>hvm</type><loader type='rom'>{code}</loader></os>"
               "<features><acpi/></features></domain>")
        bed.run("virsh", "-q", "define", "/dev/stdin", input=xml)
        def repaired_xml() -> str | None:
            x = bed.run("virsh", "dumpxml", "--inactive", name).stdout
            return x if "type='pflash'" in x and "<nvram" in x else None

        repaired = wait_for(repaired_xml, 60, f"{name} repaired")
        assert re.search(rf"<loader[^>]*readonly='yes'[^>]*type='pflash'[^>]*>{re.escape(code)}</loader>", repaired)
        varstore = re.search(r"<nvram[^>]*>([^<]+)</nvram>", repaired).group(1)
        st = bed.run("stat", "-c", "%U %a", varstore).stdout.split()
        assert st[1] == "600" and st[0] in ("libvirt-qemu", "qemu"), st
        assert f"domain '{name}': bios-rom -> split" in said()
        print(f"\n[distro] scripts/run-varsd on the fresh machine repaired {name}: {varstore}")
    finally:
        bed.run("systemctl", "stop", "varsd-readme", check=False)
        bed.run("virsh", "-q", "undefine", "--nvram", name, check=False)
