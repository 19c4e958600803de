"""Debian packages of a *named* release, fetched for tests: never through the host's own apt.

A test that needs Debian 12's `ovmf` (its 2 MiB images, or the deb12u1 -> u2 upgrade) on a
Debian 13 host, or Debian 13's on a Debian 12 host, gets it here: `apt-get download` with a
private state directory and a sources list that names only that release's suites, so what
the host's apt happens to know never decides what a test runs on. Downloads are cached
under $VARSD_TEST_CACHE (default /var/cache/varsd-tests), and a cached file is used without
any network access: the test beds have no network, so their trees are given the files
when they are built (tests/testbed.py calls `prefetch` with the tree's cache directory).

Only the standard library: tests/testbed.py imports this, and it runs before any venv exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("VARSD_TEST_CACHE", "/var/cache/varsd-tests"))
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Debian 12's two consecutive ovmf builds: their OVMF_CODE*.fd differ, OVMF_VARS*.fd are
# identical (domain brief §2). u1 is in bookworm-security, u2 in bookworm.
OVMF_DEB12U1 = "2022.11-6+deb12u1"
OVMF_DEB12U2 = "2022.11-6+deb12u2"
# What every tier uses as "Debian 12's files" where the host is not Debian 12.
DEBIAN12_OVMF = OVMF_DEB12U2


class ArchiveError(RuntimeError):
    """A package could not be fetched or unpacked; the message names it and the suites tried."""


def _host_uris() -> list[str]:
    uris: list[str] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        uris += [m.group(1).rstrip("/") for m in re.finditer(r"^URIs:\s*(\S+)", path.read_text(), re.M)]
    return uris


def host_mirror() -> str:
    """The Debian mirror the host's apt uses (so a local mirror or proxy is used for tests too)."""
    return next((u for u in _host_uris() if u.endswith("/debian")), DEFAULT_MIRROR)


def security_mirror() -> str:
    return next((u for u in _host_uris() if u.endswith("/debian-security")), DEFAULT_SECURITY)


def sources(codename: str) -> str:
    """A deb822 sources list naming only `codename`'s own suites (plus its security suite)."""
    main = f"Types: deb\nURIs: {host_mirror()}\nSuites: {codename} {codename}-updates\nComponents: main\n" \
           f"Signed-By: {KEYRING}\n"
    if codename in ("sid", "unstable"):
        return main.replace(f" {codename}-updates", "")
    return main + f"\nTypes: deb\nURIs: {security_mirror()}\nSuites: {codename}-security\nComponents: main\n" \
                  f"Signed-By: {KEYRING}\n"


def _apt(codename: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    state = CACHE / f"apt-{codename}"  # apt's own state stays in the host's cache, never in a bed's tree
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "sources.sources").write_text(sources(codename))
    # A sources.list.d-style file is read from SourceParts only: point that at the state dir.
    opts = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={state}",
            "-o", f"Dir::State::Lists={state}/lists", "-o", f"Dir::Cache={state}/cache",
            "-o", "APT::Get::List-Cleanup=0", "-o", "Acquire::Check-Valid-Until=false", "-q"]
    return subprocess.run(["apt-get", *opts, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={"PATH": PATH, "LANG": "C.UTF-8"})


def _cached(dest: Path, package: str, version: str | None) -> Path | None:
    pattern = f"{package}_{version.split(':')[-1].replace('+', '*')}_*.deb" if version else f"{package}_*.deb"
    found = sorted(dest.glob(pattern))
    return found[-1] if found else None


def deb(package: str, version: str | None, codename: str, *, cache: Path = CACHE) -> Path:
    """`package` (=`version`, or the newest in `codename`) as a .deb from `codename`'s suites."""
    dest = cache / "debs" / codename
    dest.mkdir(parents=True, exist_ok=True)
    found = _cached(dest, package, version)
    if found:
        return found
    update = _apt(codename, "update")
    if update.returncode != 0:
        raise ArchiveError(f"apt-get update for {codename} failed:\n{update.stdout[-2000:]}{update.stderr[-2000:]}")
    spec = f"{package}={version}" if version else package
    got = _apt(codename, "download", spec, cwd=dest)
    found = _cached(dest, package, version)
    if got.returncode != 0 or found is None:
        raise ArchiveError(f"apt-get download {spec} from {codename} failed:\n{got.stdout[-2000:]}"
                           f"{got.stderr[-2000:]}")
    return found


def extracted(package: str, version: str, codename: str, *, cache: Path = CACHE) -> Path:
    """The root into which `package`=`version` of `codename` is unpacked (dpkg-deb -x), cached.

    Directories are 0755 and files world-readable, so QEMU (the qemu user) can open the
    images there as firmware."""
    root = cache / f"{package}_{version}"
    done = root / ".extracted"
    if not done.exists():
        path = deb(package, version, codename, cache=cache)
        root.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["dpkg-deb", "-x", str(path), str(root)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise ArchiveError(f"dpkg-deb -x {path} failed: {r.stderr.strip()}")
        for d in [cache, root, *(p for p in root.rglob("*") if p.is_dir())]:
            d.chmod(0o755)
        done.write_text(f"{path.name}\n")
    return root


# What a bed's tree is given when it is built (it has no network later): Debian 12's ovmf builds.
BED_PREFETCH: tuple[tuple[str, str | None, str, bool], ...] = (
    # (package, version, codename, extract)
    ("ovmf", OVMF_DEB12U1, "bookworm", True),
    ("ovmf", OVMF_DEB12U2, "bookworm", True),
)


def prefetch(cache: Path, items=BED_PREFETCH) -> None:
    """Fetch (and unpack) `items` into `cache`, a test cache directory (e.g. inside a bed's tree)."""
    for package, version, codename, unpack in items:
        dest = cache / "debs" / codename
        dest.mkdir(parents=True, exist_ok=True)
        path = deb(package, version, codename)  # the host's cache: downloaded once for host and beds
        if not (dest / path.name).exists():
            shutil.copyfile(path, dest / path.name)
        if unpack and version:
            extracted(package, version, codename, cache=cache)


def ovmf_debs() -> dict[str, Path]:
    """{"12": Debian 12's last ovmf .deb (deb12u2, the last with the 2 MiB images), "13":
    Debian 13's}, each fetched from its own release (cached across runs)."""
    return {"12": deb("ovmf", OVMF_DEB12U2, "bookworm"), "13": deb("ovmf", None, "trixie")}
