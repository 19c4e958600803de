"""varsd's Debian package as dpkg-buildpackage builds it in the Debian 13 bed.

Lintian (Debian 13's, `--pedantic -I`) is clean apart from the overrides shipped in
packaging/debian/varsd.lintian-overrides; the package holds what a distro ships.
"""

from __future__ import annotations

import re
from pathlib import Path

import testbed

from .conftest import REPO

OVERRIDES = REPO / "packaging" / "debian" / "varsd.lintian-overrides"
EXPECTED = {
    "/usr/bin/varsd", "/usr/bin/varsctl",
    "/usr/lib/systemd/system/varsd.service",
    "/etc/varsd/varsd.toml",
    "/usr/share/man/man8/varsd.8.gz", "/usr/share/man/man8/varsctl.8.gz",
    "/usr/share/bash-completion/completions/varsctl", "/usr/share/bash-completion/completions/varsd",
    "/usr/lib/python3/dist-packages/varsd/__init__.py",
    "/usr/lib/python3/dist-packages/varsd/daemon/service.py",
    "/usr/share/doc/varsd/copyright", "/usr/share/doc/varsd/changelog.gz", "/usr/share/doc/varsd/README.md.gz",
}


def _field(control: str, name: str) -> str:
    m = re.search(rf"^{name}: (.*)$", control, re.M)
    assert m, f"no {name}: in\n{control}"
    return m.group(1)


def test_lintian_is_clean_apart_from_justified_overrides(debian13: testbed.Bed, deb: str) -> None:
    changes = deb.replace("_all.deb", "_amd64.changes")
    r = debian13.run("lintian", "-I", "--pedantic", "--show-overrides", "--no-tag-display-limit", changes,
                     check=False, timeout=600)
    tags = [ln for ln in r.stdout.splitlines() if re.match(r"^[EWIPX]: ", ln)]
    assert not tags, r.stdout + r.stderr
    overridden = [ln for ln in r.stdout.splitlines() if ln.startswith("O: ")]
    declared = [ln for ln in OVERRIDES.read_text().splitlines() if ln and not ln.startswith("#")]
    assert [ln.removeprefix("O: ") for ln in overridden] == declared, r.stdout  # each override is needed
    assert r.returncode == 0, r.stdout + r.stderr


def test_package_contents_control_and_conffiles(debian13: testbed.Bed, deb: str) -> None:
    listing = debian13.run("dpkg-deb", "-c", deb).stdout
    paths = {re.sub(r" -> .*$", "", ln.split(None, 5)[5]).removeprefix(".").rstrip("/")
             for ln in listing.splitlines()}
    files = sorted(re.sub(r" -> .*$", "", ln.split(None, 5)[5]).removeprefix(".")
                   for ln in listing.splitlines() if not ln.startswith("d"))
    print("\n[distro] varsd package files:\n" + "\n".join(files))
    assert EXPECTED <= paths, EXPECTED - paths
    assert not any("__pycache__" in p or p.startswith("/usr/local") for p in paths)
    info = debian13.run("dpkg-deb", "-I", deb).stdout
    assert Path(deb).name == f"varsd_{_field(info, ' Version')}_all.deb"
    depends = _field(info, " Depends")
    for pkg in ("python3-libvirt", "python3-lxml", "python3-apscheduler", "python3-prometheus-client",
                "python3-virt-firmware"):
        assert re.search(rf"(^|, ){pkg}\b", depends), depends
    control = debian13.sh(f"rm -rf /tmp/ctl && dpkg-deb -e {deb} /tmp/ctl && cd /tmp/ctl && "
                          "for f in conffiles triggers postinst postrm; do echo \"== $f\"; cat $f; done").stdout
    sections = dict(part.split("\n", 1) for part in control.split("== ")[1:])
    assert sections["conffiles"].split() == ["/etc/varsd/varsd.toml"]
    ours = (REPO / "packaging" / "debian" / "varsd.triggers").read_text()
    assert [ln for ln in sections["triggers"].splitlines() if ln.startswith("interest")] == \
        [ln for ln in ours.splitlines() if ln.startswith("interest")]
    assert "firmware_sync" in sections["postinst"] and "deb-systemd-helper" in sections["postinst"]  # ours + debhelper
    assert "its state is kept" in sections["postrm"]


def test_man_pages_come_from_the_parsers(debian13: testbed.Bed, deb: str, argparse_docs) -> None:
    text = debian13.sh(f"rm -rf /tmp/pkg && dpkg-deb -x {deb} /tmp/pkg && "
                       "zcat /tmp/pkg/usr/share/man/man8/varsctl.8.gz").stdout
    for path, _, _ in argparse_docs.commands(argparse_docs._varsctl_parser()):
        assert f".SS {' '.join(path)}".replace("-", "\\-") in text, path
    # man renders both pages without a warning
    for page in ("varsd", "varsctl"):
        r = debian13.run("sh", "-c", f"MANWIDTH=80 man --warnings -l /tmp/pkg/usr/share/man/man8/{page}.8.gz "
                         ">/dev/null", check=False)
        assert r.returncode == 0 and not r.stderr.strip(), (page, r.stderr)
