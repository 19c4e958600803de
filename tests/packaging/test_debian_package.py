"""The Debian source package's own files, checked on the host in milliseconds.

(The package itself is built, linted and installed in the Debian 13 bed: tests/distro.)
"""

from __future__ import annotations

import subprocess
import tomllib
from dataclasses import fields

from debtools import DEBIAN_DIR, REPO
from packaging_tools import argparse_docs

from varsd.config import Config, parse_config
from varsd.model.backup import BackupKeep

CONFFILE = REPO / "packaging" / "varsd.toml"


def test_conffile_names_every_key_commented_with_its_default() -> None:
    text = CONFFILE.read_text()
    assert all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()), "a key is set"
    assert parse_config(text) == Config()  # as shipped it changes nothing
    top, _, extra = text.partition("#[[extra_firmware]]")
    uncommented = "\n".join(ln[1:] for ln in top.splitlines() if ln.startswith("#") and "=" in ln)
    shown = tomllib.loads(uncommented)
    keys = {f.name for f in fields(Config)} - {"source", "extra_firmware"}
    assert set(shown) == keys, f"documented {sorted(shown)}, Config has {sorted(keys)}"
    defaults = Config()
    for key, value in shown.items():
        want = getattr(defaults, key)
        if key in ("qemu_user", "qemu_group"):
            assert want is None and value == "libvirt-qemu"  # the effective default on Debian
        elif want is None:  # off by default: the line shows an example that parses
            assert getattr(parse_config(f"{key} = {value!r}".replace("'", '"')), key) is not None, key
        elif key == "backup_keep":
            assert BackupKeep(**value) == want
        else:
            assert (tuple(value) if isinstance(value, list) else value) == want, key
    # the extra_firmware example is a valid table once uncommented
    example = "[[extra_firmware]]\n" + "\n".join(ln[1:] for ln in extra.splitlines() if ln.startswith("#"))
    assert parse_config(example).extra_firmware[0].code == "/usr/share/OVMF/OVMF_CODE.fd"


def test_generated_man_pages_cover_every_command_and_option(tmp_path) -> None:
    docs = argparse_docs()
    assert docs.main([str(tmp_path)]) == 0
    page = (tmp_path / "varsctl.8").read_text()
    parser = docs._varsctl_parser()
    for path, _, sub in docs.commands(parser):
        assert f".SS {' '.join(path)}".replace("-", "\\-") in page, path
        for action in sub._actions:
            for option in action.option_strings:
                assert option.replace("-", "\\-") in page, (path, option)
    assert "\\-\\-log\\-level" in (tmp_path / "varsd.8").read_text()
    for name in ("varsd.8", "varsctl.8"):
        r = subprocess.run(["man", "--warnings", "-l", str(tmp_path / name)], capture_output=True, text=True,
                           env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0 and not r.stderr.strip(), (name, r.stderr)


def _complete(script: str, *words: str) -> list[str]:
    line = " ".join(words)
    program = f"""source {script}
COMP_WORDS=({line} ''); COMP_CWORD={len(words)}; _{words[0]}; printf '%s\\n' "${{COMPREPLY[@]}}" """
    r = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return r.stdout.split()


def test_bash_completion_completes_commands_and_options(tmp_path) -> None:
    docs = argparse_docs()
    docs.main([str(tmp_path)])
    script = str(tmp_path / "bash-completion" / "varsctl")
    assert {"status", "reconcile", "firmware", "migrate", "--config"} <= set(_complete(script, "varsctl"))
    assert set(_complete(script, "varsctl", "firmware")) >= {"sync", "list", "history"}
    assert "--dry-run" in _complete(script, "varsctl", "migrate")
    assert "--log-level" in _complete(script, "varsd")


def test_source_package_names_the_files_it_installs() -> None:
    install = (DEBIAN_DIR / "varsd.install").read_text()
    assert "packaging/varsd.toml etc/varsd/" in install
    rules = (DEBIAN_DIR / "rules").read_text()
    assert "packaging/argparse_docs.py debian/generated" in rules
    assert "systemd/varsd.service debian/varsd.service" in rules  # dh_installsystemd enables the real unit
