"""The RPM spec's firmware file triggers: same paths and command as dpkg's, never failing.

rpm itself is not on a Debian host, so the triggers' scriptlets are cut out of the
spec, their rpm macros expanded the way rpm expands them, and run under dash (what
`/bin/sh` is here, and the strictest common sh) against a stand-in varsctl that
succeeds, fails, or is missing.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from debtools import DEBIAN_DIR, REPO

SPEC = REPO / "packaging" / "rpm" / "varsd.spec"
_SECTION = re.compile(
    r"^%(package|description|prep|generate_buildrequires|build|install|check|files|changelog|pre|post|preun|postun|"
    r"pretrans|posttrans|(?:trans)?filetrigger(?:in|un|postun)|trigger\w*)\b(.*)$"
)
MACROS = {"%{_bindir}": "/usr/bin"}


def _sections() -> dict[str, tuple[str, str]]:
    """Section name -> (header arguments, body) of the spec."""
    out: dict[str, tuple[str, str]] = {}
    name, args, body = None, "", []
    for line in SPEC.read_text().splitlines():
        m = _SECTION.match(line)
        if m:
            if name:
                out[name] = (args, "\n".join(body))
            name, args, body = m.group(1), m.group(2).strip(), []
        elif name:
            body.append(line)
    if name:
        out[name] = (args, "\n".join(body))
    return out


def _watched_by_dpkg() -> list[str]:
    lines = (DEBIAN_DIR / "varsd.triggers").read_text().splitlines()
    return [line.split()[1] for line in lines if line.startswith("interest-noawait ")]


def test_dpkg_watches_the_four_firmware_paths() -> None:
    assert _watched_by_dpkg() == ["/usr/share/OVMF", "/usr/share/qemu/firmware", "/usr/share/AAVMF",
                                  "/usr/share/edk2"]
    assert not [line for line in (DEBIAN_DIR / "varsd.triggers").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "interest-noawait "))]


@pytest.mark.parametrize("section", ["transfiletriggerin", "transfiletriggerpostun"])
def test_rpm_triggers_watch_the_same_paths(section: str) -> None:
    args, body = _sections()[section]
    assert args.startswith("-- ")
    assert args[3:].split() == _watched_by_dpkg()
    assert "%{_bindir}/varsctl firmware sync" in body and "set -e" not in body
    assert body.strip().endswith("exit 0")


def _run(section: str, varsctl: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    _, body = _sections()[section]
    for macro, value in MACROS.items():
        body = body.replace(macro, value)
    body = body.replace("/usr/bin/varsctl", str(varsctl))
    assert "%{" not in body, "unexpanded rpm macro in a trigger scriptlet"
    syntax = subprocess.run(["dash", "-n", "-c", body], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    return subprocess.run(["dash", "-c", body], input=stdin, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("section", ["transfiletriggerin", "transfiletriggerpostun"])
@pytest.mark.parametrize("rc", [0, 3, None], ids=["succeeds", "fails", "missing"])
def test_rpm_trigger_scriptlets_run_the_sync_and_never_fail(tmp_path: Path, section: str, rc: int | None) -> None:
    calls = tmp_path / "calls"
    fake = tmp_path / "varsctl"
    if rc is not None:
        fake.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexit {rc}\n")
        fake.chmod(0o755)
    # rpm feeds %transfiletriggerin the matching file names on stdin
    r = _run(section, fake, stdin="/usr/share/OVMF/OVMF_CODE_4M.fd\n/usr/share/qemu/firmware/60-edk2-x86_64.json\n")
    assert r.returncode == 0, r.stderr
    got = calls.read_text().splitlines() if calls.exists() else []
    assert got == ([] if rc is None else ["firmware sync"])
    if rc == 3:
        assert "'varsctl firmware sync' exited with status 3" in r.stderr
