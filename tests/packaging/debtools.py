"""Building and installing minimal real .deb packages for the dpkg trigger tests.

(This directory has no `__init__.py` on purpose: as a package it would be called
`packaging` and shadow the PyPI `packaging` module that pytest itself imports.)

The trigger package is built from the project's own `packaging/debian/varsd.triggers`
and `varsd.postinst`, with only the postinst's settings lines (`VARSCTL=`,
`VARSD_CONFIG=`) replaced, so what the tests install is what distributions ship.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEBIAN_DIR = REPO / "packaging" / "debian"
LOCK_WAIT = 300.0  # another dpkg/apt run (a parallel test session) may hold the lock
_LOCKED = re.compile(r"lock was locked by another process|status database is locked|Could not get lock", re.I)


def _control(name: str, version: str, description: str) -> str:
    return (
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: varsd tests <tests@varsd.org>\n"
        f"Priority: optional\nSection: admin\nDescription: {description}\n"
        " Built by varsd's test suite; safe to purge.\n"
    )


def postinst_with(varsctl: str, config: str | None = None) -> str:
    """The project's postinst with its settings lines pointing at `varsctl` and `config`."""
    text = (DEBIAN_DIR / "varsd.postinst").read_text()
    text, n = re.subn(r"^VARSCTL=.*$", f"VARSCTL={varsctl}", text, count=1, flags=re.M)
    assert n == 1, "varsd.postinst lost its VARSCTL= line"
    if config is not None:
        text, n = re.subn(r"^VARSD_CONFIG=.*$", f"VARSD_CONFIG={config}", text, count=1, flags=re.M)
        assert n == 1, "varsd.postinst lost its VARSD_CONFIG= line"
    return text


def build_deb(workdir: Path, name: str, *, version: str = "1.0", files: dict[str, bytes] | None = None,
              triggers: str | None = None, postinst: str | None = None) -> Path:
    """A real .deb built with dpkg-deb: `files` (absolute path -> content), control scripts as given."""
    root = workdir / f"{name}-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(_control(name, version, f"varsd test package {name}"))
    if triggers is not None:
        (root / "DEBIAN" / "triggers").write_text(triggers)
    if postinst is not None:
        script = root / "DEBIAN" / "postinst"
        script.write_text(postinst)
        script.chmod(0o755)
    for path, content in (files or {}).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(0o644)
    out = workdir / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(out)], check=True,
                   capture_output=True, text=True)
    return out


def trigger_package(workdir: Path, name: str, *, varsctl: str, config: str | None = None) -> Path:
    """varsd's trigger + postinst in a package of their own."""
    return build_deb(workdir, name, triggers=(DEBIAN_DIR / "varsd.triggers").read_text(),
                     postinst=postinst_with(varsctl, config))


def dpkg(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run dpkg, waiting (up to LOCK_WAIT) while someone else holds its lock."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        r = subprocess.run(["dpkg", *args], capture_output=True, text=True, timeout=timeout,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"})
        if r.returncode == 0 or not _LOCKED.search(r.stderr) or time.monotonic() >= deadline:
            return r
        time.sleep(0.5)


def status(name: str) -> str | None:
    """dpkg's status of a package ("install ok installed", ...), None if dpkg does not know it."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 and r.stdout else None


def version(name: str) -> str | None:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 and r.stdout else None


def purge(*names: str) -> None:
    """Remove test packages completely; packages dpkg does not know are fine."""
    known = [n for n in names if status(n) is not None]
    if known:
        r = dpkg("--purge", *known)
        assert r.returncode == 0, f"dpkg --purge {' '.join(known)} failed:\n{r.stdout}\n{r.stderr}"

