"""Debian's `ovmf` packages of two releases, downloaded from Debian's archive once and cached.

Debian 12's (2022.11-6+deb12u2, the last with the 2 MiB images) and Debian 13's, each
fetched for its own suite explicitly with an apt whose state lives under the cache
(the host's apt is untouched), so either host release can fetch both.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("VARSD_TEST_CACHE", "/var/cache/varsd-tests"))
DEB12 = "2022.11-6+deb12u2"


def apt(root: Path, suite: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """apt-get against Debian `suite` with all of its state under `root`."""
    (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    sources = root / "sources.list"
    sources.write_text("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                       f"http://deb.debian.org/debian {suite} main\n")
    opts = [f"-oDir::Etc::sourcelist={sources}", "-oDir::Etc::sourceparts=-", f"-oDir::State::Lists={root}/lists",
            f"-oDir::Cache={root}/cache", "-oAPT::Get::List-Cleanup=0", "-q"]
    return subprocess.run(["apt-get", *opts, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def _fetch(suite: str, spec: str, pattern: str, state: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    found = sorted(into.glob(pattern))
    if not found:
        update = apt(state, suite, "update")
        assert update.returncode == 0, update.stdout + update.stderr
        got = apt(state, suite, "download", spec, cwd=into)
        found = sorted(into.glob(pattern))
        assert found, f"apt-get download {spec} ({suite}) failed:\n{got.stdout}{got.stderr}"
    return found[-1]


def ovmf_debs() -> dict[str, Path]:
    """{"12": Debian 12's ovmf .deb, "13": Debian 13's}, downloaded once (cached across runs)."""
    return {
        "12": _fetch("bookworm", f"ovmf={DEB12}", f"ovmf_{DEB12}_all.deb", CACHE / "apt-bookworm-ovmf", CACHE / "debs"),
        "13": _fetch("trixie", "ovmf", "ovmf_*_all.deb", CACHE / "apt-trixie", CACHE / "apt-trixie" / "debs"),
    }
