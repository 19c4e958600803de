"""A non-root admin in the libvirt group runs the read-only commands, for real.

The commands run as `varsd-test-admin` (scripts/host-setup makes it: a system user whose
only group is libvirt), against a state database root's varsd wrote: once while a writer
holds it open (its -wal and -shm files exist, root's, group-readable) and once after the
writer closed (no -wal: SQLite cannot make a -shm file in a directory the admin may not
write). The libvirt side is the test driver: connecting to the host's libvirtd as a
non-root user is libvirt's polkit policy, not varsd's.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.domains import SHUTOFF, domain_xml, rom_os, split_os

from varsd.adapters.journal import Journal
from varsd.clock import parse_stamp
from varsd.config import load_config

from .common import CODE_4M, U_ROM, U_SEABIOS, U_SPLIT, UNIFIED, VARS_4M, write_host

ADMIN = "varsd-test-admin"
REPO = Path(__file__).resolve().parents[2]
SECRET = "<domain><name>splitguest</name><devices><graphics type='vnc' passwd='hunter2'/></devices></domain>"


def _as_admin(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", ADMIN, "--", *argv], capture_output=True, text=True, timeout=120,
                          env=env, cwd="/")


def _admin_can_read(path: str) -> bool:
    return _as_admin("test", "-r", path, "-a", "-x", path).returncode == 0


@pytest.fixture(scope="module")
def admin_python(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """An interpreter and PYTHONPATH the admin can use: this one if it may run it, else the
    system's of the same version; varsd and its libraries staged where the admin can read
    them if the checkout is not readable to them (a checkout under /root)."""
    if os.getuid() != 0:
        pytest.fail("this test must run as root (it runs commands as another user; CI runs as root)")
    try:
        user = pwd.getpwnam(ADMIN)
    except KeyError:
        pytest.fail(f"no user {ADMIN}: run scripts/host-setup (it creates it in group libvirt)")
    assert grp.getgrgid(user.pw_gid).gr_name == "libvirt", f"{ADMIN} must be in group libvirt"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(sys.executable), f"/usr/bin/python{version}"]
    python = next((p for p in candidates if _as_admin(p, "-c", "pass").returncode == 0), None)
    if python is None:
        pytest.fail(f"{ADMIN} can run none of {candidates}")
    site = sysconfig.get_paths()["purelib"]
    stage = Path(tempfile.mkdtemp(prefix="varsd-admin-"))
    os.chmod(stage, 0o755)
    path = []
    for src, name in ((str(REPO), "repo"), (site, "site")):
        if _admin_can_read(src):
            path.append(src)
            continue
        ignore = shutil.ignore_patterns("__pycache__", "pip", "hypothesis", ".venv*", ".git", "*.dist-info")
        dst = stage / name
        if name == "repo":
            shutil.copytree(REPO / "varsd", dst / "varsd", ignore=ignore)
        else:
            shutil.copytree(src, dst, ignore=ignore)
        path.append(str(dst))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": ":".join(path), "LC_ALL": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    yield python, env
    shutil.rmtree(stage)


@pytest.fixture
def shared_host() -> Iterator[dict[str, str]]:
    """A host laid out as a real one: everything the admin needs to reach searchable (its
    own directory under /tmp: pytest's tmp_path parents are reset to 0700 by any other pytest
    run of root's), varstores 0600 root's, the state directory made by varsd itself, and a
    journal entry whose old XML holds a graphics password."""
    base = Path(tempfile.mkdtemp(prefix="varsd-admin-host-"))
    os.chmod(base, 0o711)
    nvram, state = base / "nvram", base / "state"
    nvram.mkdir(mode=0o755)
    split_vars = nvram / "split_VARS.fd"
    shutil.copyfile(VARS_4M, split_vars)
    os.chmod(split_vars, 0o600)
    domains = [
        domain_xml("romguest", rom_os(UNIFIED), uuid=U_ROM, runstate=SHUTOFF),
        domain_xml("seabiosguest", uuid=U_SEABIOS, machine="pc-i440fx-7.2"),
        domain_xml("splitguest", split_os(CODE_4M, str(split_vars), template=VARS_4M), uuid=U_SPLIT,
                   runstate=SHUTOFF),
    ]
    uri, config = write_host(base, domains, nvram=nvram, state=state)
    for f in (config, uri.removeprefix("test://")):
        os.chmod(f, 0o644)
    cfg = load_config(config)
    assert cfg.admin_group == "libvirt"  # the default
    j = Journal(cfg.journal_path, readers=cfg.admin_group)
    j.record(uuid=U_SPLIT, name="splitguest", reason="test change", old_xml=SECRET,
             new_xml="<domain><name>splitguest</name></domain>", at=parse_stamp("2026-12-01T12:00:00Z"), actor="test")
    yield {"uri": uri, "config": config, "journal": cfg.journal_path, "split_vars": str(split_vars),
           "writer": j}  # type: ignore[misc]
    j.close()
    shutil.rmtree(base)


def _varsctl(admin_python, host, *args: str, as_root: bool = False) -> subprocess.CompletedProcess[str]:
    python, env = admin_python
    argv = [python, "-m", "varsd.cli.varsctl", "--config", host["config"], "--connect", host["uri"], *args]
    if as_root:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd="/")
    return _as_admin(*argv, env=env)


READS = (("journal", "--json"), ("firmware", "history", "--json"), ("firmware", "list", "--json"),
         ("status", "--json", "romguest", "seabiosguest"))


def _ls(host) -> list[tuple[str, str, int]]:
    state = os.path.dirname(host["journal"])
    return [(n, oct(os.stat(os.path.join(state, n)).st_mode), os.stat(os.path.join(state, n)).st_gid)
            for n in sorted(os.listdir(state))]


def _check_reads(admin_python, host) -> None:
    """Each read-only command tells the admin exactly what it tells root, except what only
    root (and the qemu user) may read: a varstore's content, which status says it could not
    see instead of calling it wrong."""
    for args in READS:
        admin = _varsctl(admin_python, host, *args)
        root = _varsctl(admin_python, host, *args, as_root=True)
        assert (admin.returncode, admin.stderr) == (root.returncode, root.stderr), (args, admin.stderr, _ls(host))
        assert admin.returncode in (0, 1), admin.stderr
        assert json.loads(admin.stdout) == json.loads(root.stdout), args
    (split,) = json.loads(_varsctl(admin_python, host, "status", "--json", "splitguest").stdout)["domains"]
    assert split["detail"] == (f"varstore {host['split_vars']} cannot be read by this user, so whether it fits is "
                               "unknown; run as root to see"), split
    r = _varsctl(admin_python, host, "journal", "--json")
    (change,) = json.loads(r.stdout)["changes"]
    assert change["name"] == "splitguest" and "hunter2" not in r.stdout
    (entry,) = json.loads(_varsctl(admin_python, host, "status", "--json", "romguest").stdout)["domains"]
    assert entry["detail"].startswith("needs repair"), entry  # looked at, not failed


def test_a_libvirt_group_admin_reads_while_varsd_writes_and_after(admin_python, shared_host) -> None:
    path = shared_host["journal"]
    writer: Journal = shared_host["writer"]  # type: ignore[assignment]
    for name in (path, path + "-wal", path + "-shm"):
        st = os.stat(name)
        assert (stat.S_IMODE(st.st_mode), grp.getgrgid(st.st_gid).gr_name) == (0o640, "libvirt"), name
    _check_reads(admin_python, shared_host)  # a live writer: WAL and -shm are there
    writer.close()
    assert not os.path.exists(path + "-wal")
    _check_reads(admin_python, shared_host)  # no writer: nothing to share a -shm with
    r = _as_admin("sh", "-c", f"echo x >> {path}")
    assert r.returncode != 0  # reading, never writing
    for name in os.listdir(os.path.dirname(path)):  # what root's readers left is the admin's to read too
        st = os.stat(os.path.join(os.path.dirname(path), name))
        assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_gid) == (0, 0o640, grp.getgrnam("libvirt").gr_gid), name
