"""Test beds: a whole Debian system (another release than the host's) booted with systemd-nspawn.

One module owns the bed's life: create (debootstrap minbase into a cache directory,
reused when complete and rebuilt when not), start (`systemd-nspawn --boot` on a
throw-away overlay of the cached tree, so every run starts from the same pristine
system), run a command inside (`nsenter` into the container's systemd), stop (by the
PIDs this module started, bounded, SIGKILL as the last resort) and clean up (overlay
unmounted, run directory removed). Facts it relies on are in the domain brief §7.

Only the standard library is used: `scripts/build-deb` runs this file with the
host's python3 (`python3 tests/testbed.py ...`), before any venv exists.

Rules kept here because breaking them hurts the host:
- The host's /dev is never bound into a tree while packages are installed (qemu's
  postinst would chgrp the host's /dev/kvm and make the host libvirt re-probe QEMU on
  every call). Packages are installed in a chroot with only /proc mounted.
- An executable /usr/sbin/policy-rc.d exiting 101 is in the tree while installing,
  so nothing starts at install time; it is removed before the tree is marked complete.
- The container gets its own network namespace (`--private-network`): the bed's
  libvirt can never touch the host's bridges or addresses. The one exception is a fresh
  machine (`FRESH`, `host_network=True`), whose set-up must reach the archive and PyPI:
  its libvirt defines no network, and its test checks the host's interfaces afterwards.
- A bed is stopped by the PIDs recorded when it started; a crashed earlier run's bed
  is found through its pid file (PID + start time, so a reused PID is never hit).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import debian_archive

CACHE = Path(os.environ.get("VARSD_TEST_CACHE", "/var/cache/varsd-tests")) / "beds"
KEYRING = debian_archive.KEYRING
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHARE = "/srv/share"  # bind-mounted host directory: the bed's /tmp is a private tmpfs
SOURCE = "/srv/varsd"  # the repository, bound read-only
RECIPE_VERSION = 6  # bump when the steps below change in a way the package lists do not show

# Packages every bed gets: a virt host with systemd as PID 1, Debian's python3 stack for varsd,
# pytest for the integration tier, and the tools to build and check varsd's Debian package.
_BASE = ("systemd", "systemd-sysv", "dbus", "libvirt-daemon-system", "libvirt-clients", "qemu-system-x86",
         "qemu-utils", "python3-libvirt", "python3-lxml", "python3-apscheduler", "python3-prometheus-client",
         "python3-pytest", "python3-hypothesis",
         "procps", "iproute2", "less", "swtpm", "swtpm-tools")
_BUILD = ("debhelper", "dh-python", "pybuild-plugin-pyproject", "python3-all", "python3-setuptools", "lintian",
          "fakeroot", "build-essential")


@dataclass(frozen=True)
class Release:
    """A Debian release as a test bed: what to install, from where.

    `backports` are installed from `<codename>-backports` (with their dependencies
    from there where needed); `pinned` name their suite explicitly (`ovmf/trixie`),
    so a newer version elsewhere is never picked by accident. `downloads` are .debs
    of *other* suites (each named explicitly) fetched into /var/cache/varsd-bed/debs.
    `pip` are PyPI packages for what the release does not package (Debian 12 has no
    python3-virt-firmware).
    """

    codename: str
    version: str
    packages: tuple[str, ...]
    # "fresh": the release as a newcomer's machine is before the README's set-up commands
    # (debootstrap minbase + systemd), its own cached tree beside the bed's
    flavour: str = ""
    backports: tuple[str, ...] = ()
    pinned: tuple[str, ...] = ()
    downloads: tuple[tuple[str, str], ...] = ()  # (suite, package)
    pip: tuple[str, ...] = ()
    # other releases' packages the tests inside need, placed in the tree's test cache
    # (/var/cache/varsd-tests, see tests/debian_archive.py): the running bed has no network
    test_debs: tuple[tuple[str, str | None, str, bool], ...] = ()

    @property
    def label(self) -> str:
        """The tree's name: the codename, plus the flavour if any (`trixie-fresh`)."""
        return f"{self.codename}-{self.flavour}" if self.flavour else self.codename

    @property
    def suites(self) -> tuple[str, ...]:
        extra = (f"{self.codename}-backports",) if self.backports else ()
        return (self.codename, f"{self.codename}-updates", *extra)

    def recipe(self, mirror: str) -> str:
        """What the cached tree was built from: a different recipe means a rebuild."""
        return json.dumps({"v": RECIPE_VERSION, "release": self.codename, "flavour": self.flavour, "mirror": mirror,
                           "packages": self.packages, "backports": self.backports, "pinned": self.pinned,
                           "downloads": self.downloads, "pip": self.pip,
                           "test_debs": self.test_debs}, sort_keys=True)


TRIXIE = Release(
    codename="trixie", version="13",
    packages=(*_BASE, *_BUILD, "python3-virt-firmware"),
    backports=("libvirt-daemon-system", "libvirt-clients", "libvirt-daemon", "qemu-system-x86", "qemu-utils",
               "qemu-system-modules-spice", "libxml2-utils", "qemu-system-arm"),
    # qemu-efi-aarch64 + qemu-system-arm, as scripts/host-setup installs them on a host: the AAVMF
    # tests and test_aarch64_boot (a real TCG boot) run on the release's own AAVMF set in the bed
    pinned=("ovmf/trixie", "qemu-efi-aarch64/trixie"),
    downloads=(("unstable", "ovmf"), ("unstable", "ovmf-generic"), ("unstable", "ovmf-amdsev"),
               ("unstable", "ovmf-inteltdx")),
    # Debian 12's ovmf builds (its 2 MiB images; deb12u1 -> u2) and Debian 13's own .deb
    test_debs=(*debian_archive.BED_PREFETCH, ("ovmf", None, "trixie", False)),
)
BOOKWORM = Release(
    codename="bookworm", version="12",
    packages=(*_BASE, "python3-pip", "qemu-system-arm"),
    pinned=("ovmf/bookworm", "qemu-efi-aarch64/bookworm"),
    pip=("virt-firmware",),
    # Debian 12's ovmf deb12u1 and u2 (the upgrade tests dpkg -i them) and Debian 13's own .deb
    test_debs=(*debian_archive.BED_PREFETCH, ("ovmf", None, "trixie", False)),
)
RELEASES = {r.codename: r for r in (TRIXIE, BOOKWORM)}
# A newcomer's fresh machine of each release: what debootstrap leaves, plus systemd to boot it.
# scripts/host-setup installs everything else from the release's own archive.
FRESH = {c: Release(codename=c, version=r.version, flavour="fresh", packages=("systemd", "systemd-sysv", "dbus"))
         for c, r in RELEASES.items()}


def host_release() -> str:
    """The host's Debian codename (from /etc/os-release)."""
    text = Path("/etc/os-release").read_text()
    m = re.search(r"^VERSION_CODENAME=(\w+)", text, re.M)
    if not m:
        raise BedError("cannot tell the host's Debian release from /etc/os-release")
    return m.group(1)


def second_platform() -> Release:
    """The release the suite runs on besides the host: Debian 13 on a Debian 12 host, else Debian 12."""
    return BOOKWORM if host_release() == "trixie" else TRIXIE


def second_fresh_machine() -> Release:
    """A fresh machine of the second platform's release (for the README's set-up commands)."""
    return FRESH[second_platform().codename]


host_mirror = debian_archive.host_mirror  # one place for "the mirror the host uses"


class BedError(RuntimeError):
    """The bed could not be built, started, entered or stopped; the message says which step."""


def describe_build(seconds: float) -> str:
    """What Tree.ensure() did, for logs: 'built in 112 s' or 'reused'."""
    return f"built in {seconds:.0f} s" if seconds else "reused"


def _log(msg: str) -> None:
    print(f"testbed: {msg}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], *, timeout: float = 900, env: dict[str, str] | None = None,
         what: str | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                       env=env or {"PATH": PATH, "LANG": "C.UTF-8"})
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-30:])
        raise BedError(f"{what or cmd[0]} failed (exit {r.returncode}): {' '.join(cmd)}\n{tail}")
    return r


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _is_mount(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def _umount_below(path: Path) -> None:
    """Unmount everything at or below `path` (deepest first)."""
    prefix = str(path.resolve())
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _rmtree(path: Path) -> None:
    """Remove a tree that may have had mounts, never crossing into another file system."""
    if not path.exists():
        return
    _umount_below(path)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


# -- the cached tree ------------------------------------------------------------------


@dataclass
class Tree:
    """A release's cached root file system under CACHE/<codename>/root."""

    release: Release
    mirror: str = field(default_factory=host_mirror)
    cache: Path = CACHE

    @property
    def base(self) -> Path:
        """One directory per recipe version: worktrees of branches with an older recipe keep
        using their tree while a newer one is built, instead of rebuilding it back and forth."""
        return self.cache / f"{self.release.label}.r{RECIPE_VERSION}"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def marker(self) -> Path:
        return self.base / "complete.json"

    def complete(self) -> bool:
        """True when the tree was built to the end from today's recipe."""
        try:
            return self.marker.read_text() == self.release.recipe(self.mirror) and (self.root / "usr/bin").is_dir()
        except OSError:
            return False

    @contextlib.contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        """Builders hold it exclusively, running beds shared: no rebuild under a running bed."""
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.base / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield

    def ensure(self) -> float:
        """Build the tree unless it is complete; the seconds it took (0.0 when reused)."""
        with self.lock(exclusive=False):  # running beds hold it shared: never wait for them to reuse
            if self.complete():
                return 0.0
        with self.lock(exclusive=True):
            if self.complete():  # someone else built it meanwhile
                return 0.0
            started = time.monotonic()
            self._build()
            return time.monotonic() - started

    def _chroot(self, root: Path, *cmd: str, timeout: float = 900, what: str | None = None) -> str:
        env = {"PATH": PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
        return _run(["chroot", str(root), *cmd], timeout=timeout, env=env, what=what).stdout

    def _build(self) -> None:
        rel, new = self.release, self.base / "root.new"
        _log(f"building Debian {rel.version} ({rel.codename}) tree in {self.root} from {self.mirror}")
        self.marker.unlink(missing_ok=True)
        _rmtree(new)
        _rmtree(self.root)
        t0 = time.monotonic()
        _run(["debootstrap", "--variant=minbase", f"--keyring={KEYRING}", rel.codename, str(new), self.mirror],
             what="debootstrap")
        _log(f"debootstrap: {time.monotonic() - t0:.0f} s")
        (new / "etc/apt/sources.list").unlink(missing_ok=True)
        (new / "etc/apt/sources.list.d/debian.sources").write_text(
            f"Types: deb\nURIs: {self.mirror}\nSuites: {' '.join(rel.suites)}\nComponents: main\n"
            f"Signed-By: {KEYRING}\n")
        policy = new / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\n# varsd test bed: no service starts at install time\nexit 101\n")
        policy.chmod(0o755)
        (new / "etc/dpkg/dpkg.cfg.d/varsd-bed").write_text("force-unsafe-io\n")
        proc = new / "proc"
        subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
        try:
            t0 = time.monotonic()
            self._chroot(new, "apt-get", "update", "-q", what="apt-get update")
            install = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
            if rel.backports:
                self._chroot(new, *install, "-t", f"{rel.codename}-backports", *rel.backports,
                             what=f"installing from {rel.codename}-backports")
            self._chroot(new, *install, *rel.packages, *rel.pinned, what="installing packages")
            if rel.pip:
                # the host's CA bundle: PyPI may be reached through a TLS proxy only the host trusts
                shutil.copyfile(HOST_CA_BUNDLE, new / "tmp/host-ca.crt")
                self._chroot(new, "python3", "-m", "pip", "install", "--break-system-packages", "--no-cache-dir",
                             "--cert", "/tmp/host-ca.crt", *rel.pip, what="pip install")
                (new / "tmp/host-ca.crt").unlink()
            self._download(new)
            debian_archive.prefetch(new / debian_archive.CACHE.relative_to("/"), self.release.test_debs)
            self._chroot(new, "apt-get", "clean")
            _log(f"packages: {time.monotonic() - t0:.0f} s")
        finally:
            _umount_below(proc)
        self._configure(new)
        policy.unlink()
        new.rename(self.root)
        self.marker.write_text(rel.recipe(self.mirror))

    def _download(self, root: Path) -> None:
        """Other suites' .debs, fetched with a sources list naming that suite alone."""
        by_suite: dict[str, list[str]] = {}
        for suite, pkg in self.release.downloads:
            by_suite.setdefault(suite, []).append(pkg)
        for suite, pkgs in by_suite.items():
            lists = f"/var/lib/varsd-bed/lists-{suite}"
            dest = f"/var/cache/varsd-bed/debs/{suite}"
            (root / lists.lstrip("/") / "partial").mkdir(parents=True, exist_ok=True)
            (root / dest.lstrip("/")).mkdir(parents=True, exist_ok=True)
            src = root / f"etc/apt/varsd-bed-{suite}.sources"
            src.write_text(f"Types: deb\nURIs: {self.mirror}\nSuites: {suite}\nComponents: main\n"
                           f"Signed-By: {KEYRING}\n")
            opts = ["-o", f"Dir::Etc::SourceList=/etc/apt/varsd-bed-{suite}.sources", "-o", "Dir::Etc::SourceParts=-",
                    "-o", f"Dir::State::Lists={lists}",
                    # unstable's Release file is valid for a week only; a mirror snapshot older
                    # than the clock (as on this machine kind) would be refused as expired.
                    "-o", "Acquire::Check-Valid-Until=false"]
            self._chroot(root, "apt-get", *opts, "update", "-q", what=f"apt-get update ({suite})")
            self._chroot(root, "sh", "-c", f"cd {dest} && apt-get " + " ".join(opts) + " download "
                         + " ".join(f"{p}/{suite}" for p in pkgs), what=f"apt-get download from {suite}")

    def _configure(self, root: Path) -> None:
        """Make the tree a virt host that boots under nspawn on this machine kind (§7)."""
        qemu_conf = root / "etc/libvirt/qemu.conf"
        if qemu_conf.exists():  # a fresh machine has no libvirt yet
            # cgroup v1 host, read-only cgroup fs inside the container: QEMU gets no controllers.
            qemu_conf.write_text(qemu_conf.read_text()
                                 + "\n# varsd test bed (nspawn on cgroup v1)\ncgroup_controllers = [ ]\n")
        # libvirt-guests would wait up to 5 minutes at shutdown for firmware-only guests to
        # power off; the tests end their guests themselves.
        (root / "etc/systemd/system/libvirt-guests.service").unlink(missing_ok=True)
        (root / "etc/systemd/system/libvirt-guests.service").symlink_to("/dev/null")
        for unit in ("systemd-networkd-wait-online.service", "getty@tty1.service", "console-getty.service"):
            link = root / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        (root / "etc/hostname").write_text(f"varsd-bed-{self.release.label}\n")
        (root / SHARE.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / SOURCE.lstrip("/")).mkdir(parents=True, exist_ok=True)


# -- a running bed --------------------------------------------------------------------


@dataclass
class Bed:
    """One booted container over a throw-away overlay of a release's tree.

    Use as a context manager (or call start()/stop()); stop() always runs on exit, also
    when the body raised, and leaves nothing behind but the cached tree.
    """

    release: Release
    repo: Path | None = None  # bound read-only at SOURCE
    # The host's network namespace instead of a private one: only for a fresh machine, whose
    # set-up needs the archive and PyPI (its libvirt then has no network defined: host-setup
    # installs no libvirt-daemon-config-network).
    host_network: bool = False
    boot_timeout: float = 180.0
    stop_timeout: float = 60.0
    tree: Tree = field(init=False)
    run_dir: Path = field(init=False)
    nspawn_pid: int | None = field(default=None, init=False)
    init_pid: int | None = field(default=None, init=False)
    build_seconds: float = field(default=0.0, init=False)
    boot_seconds: float = field(default=0.0, init=False)
    stop_seconds: float = field(default=0.0, init=False)
    _lock: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, init=False)

    def __post_init__(self) -> None:
        self.tree = Tree(self.release)
        self.run_dir = self.tree.base / "runs" / f"{os.getpid()}-{int(time.time())}"

    # paths seen from the host
    @property
    def merged(self) -> Path:
        return self.run_dir / "merged"

    @property
    def share(self) -> Path:
        """Host side of SHARE: files placed here are at /srv/share inside."""
        return self.run_dir / "share"

    def path(self, inside: str) -> Path:
        """A path inside the running bed, seen from the host (through the overlay)."""
        return self.merged / inside.lstrip("/")

    @property
    def name(self) -> str:
        """Machine name (and hostname): unique per run, so two beds never share nspawn's /run state."""
        return f"varsd-bed-{self.release.label}-{self.run_dir.name.split('-', 1)[0]}"

    BOOT_ATTEMPTS = 2  # seen once on this machine kind: a container whose systemd never came up
    # (console silent after "Spawning container", 180 s), right after another bed stopped; the
    # same tree booted in 1.7 s a minute later. A second failure is the test's failure.

    def __enter__(self) -> Bed:
        for attempt in range(1, self.BOOT_ATTEMPTS + 1):
            try:
                self.start()
                return self
            except BedError as exc:
                self.stop()
                if attempt == self.BOOT_ATTEMPTS:
                    raise
                _log(f"{self.name} did not boot (attempt {attempt}), starting it once more: "
                     f"{str(exc).splitlines()[0]}")
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        reap_stale(self.release)
        self.build_seconds = self.tree.ensure()
        self._lock.enter_context(self.tree.lock(exclusive=False))
        t0 = time.monotonic()
        for sub in ("upper", "work", "merged", "share"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={self.tree.root},upperdir={self.run_dir / 'upper'},workdir={self.run_dir / 'work'}",
              str(self.merged)], what="mounting the bed's overlay")
        # Debian's libvirtd.service runs `--timeout 120`: idle, it exits and socket activation
        # starts it again, and a client connecting at that moment gets a closed socket (seen
        # here). The bed's libvirtd stays up for the whole run.
        defaults = self.merged / "etc/default/libvirtd"
        if (self.merged / "usr/sbin/libvirtd").exists():  # not on a fresh machine: host-setup installs it
            defaults.write_text((defaults.read_text() if defaults.exists() else "")
                                + '\n# varsd test bed: no idle exit\nLIBVIRTD_ARGS=""\n')
        cmd = ["systemd-nspawn", "-D", str(self.merged), "--boot", "--register=no", "--keep-unit",
               "--console=passive", "-M", self.name, *(() if self.host_network else ("--private-network",)),
               f"--bind={self.share}:{SHARE}", "--setenv=SYSTEMD_CGROUP_ENABLE_LEGACY_FORCE=1"]
        if self.repo is not None:
            cmd.append(f"--bind-ro={self.repo}:{SOURCE}")
        cmd.append("systemd.unified_cgroup_hierarchy=0")
        console = open(self.run_dir / "console.log", "w")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                start_new_session=True, env={"PATH": PATH, "LANG": "C.UTF-8"})
        console.close()
        self.nspawn_pid = proc.pid
        self._proc = proc
        self.init_pid = self._wait_for_init(proc)
        (self.run_dir / "pids.json").write_text(json.dumps(
            {str(p): _start_time(p) for p in (self.nspawn_pid, self.init_pid)}))
        self._wait_until_running()
        self.boot_seconds = time.monotonic() - t0

    def _wait_for_init(self, proc: subprocess.Popen) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BedError(f"systemd-nspawn exited with {proc.returncode}:\n{self.console_tail()}")
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        stat = (entry / "stat").read_text()
                    except OSError:
                        continue
                    if int(stat.rsplit(")", 1)[1].split()[1]) == proc.pid:
                        return int(entry.name)
            time.sleep(0.1)
        raise BedError(f"systemd-nspawn started no init within 60 s:\n{self.console_tail()}")

    def _wait_until_running(self) -> None:
        deadline = time.monotonic() + self.boot_timeout
        state = ""
        while time.monotonic() < deadline:
            r = self.run("systemctl", "is-system-running", check=False, timeout=30)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = self.run("systemctl", "--failed", "--no-legend", "--plain", check=False).stdout
                    _log(f"{self.name} booted degraded: {failed.strip()}")
                return
            time.sleep(0.5)
        raise BedError(f"{self.name} not running after {self.boot_timeout:.0f} s (state {state!r}):\n"
                       f"{self.console_tail()}")

    def console_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.run_dir / "console.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no console log)"

    def run(self, *cmd: str, check: bool = True, timeout: float = 600, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside the bed (all its namespaces, its root) with a clean environment."""
        if self.init_pid is None:
            raise BedError(f"{self.name} is not running")
        environment = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root", **(env or {})}
        full = ["nsenter", "-t", str(self.init_pid), "-a", "-r", "-w", "--", "env", "-i",
                *(f"{k}={v}" for k, v in environment.items()), *cmd]
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise BedError(f"in {self.name}: {' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}"
                           f"{r.stderr[-3000:]}")
        return r

    def sh(self, script: str, **kwargs) -> subprocess.CompletedProcess[str]:
        """A shell script inside the bed (`set -e`)."""
        return self.run("sh", "-ec", script, **kwargs)

    def stop(self) -> None:
        """Shut the container down (bounded), kill what is left by its PIDs, remove the run."""
        if self.nspawn_pid is not None:
            self.stop_seconds = _stop_pids(self.nspawn_pid, self.init_pid, self.stop_timeout)
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)
        self.nspawn_pid = self.init_pid = None
        _rmtree(self.run_dir)
        _rmtree(Path("/run/systemd/nspawn/propagate") / self.name)
        self._lock.close()


def _alive(pid: int, started: str | None) -> bool:
    return started is not None and _start_time(pid) == started


def _stop_pids(nspawn_pid: int, init_pid: int | None, timeout: float) -> float:
    """SIGTERM to systemd-nspawn (it asks the container's systemd to power off), then SIGKILL.

    On this machine kind nspawn lingers after its container has powered off (its cleanup
    of /run/systemd/nspawn/propagate fails), so once the container's init is gone nspawn
    gets a few seconds and is then killed. Returns how long the container took to go.
    """
    started = {p: _start_time(p) for p in (nspawn_pid, init_pid) if p}
    t0 = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.kill(nspawn_pid, signal.SIGTERM)
    watched = init_pid if init_pid else nspawn_pid
    deadline = t0 + timeout
    while time.monotonic() < deadline and _alive(watched, started.get(watched)):
        time.sleep(0.2)
    took = time.monotonic() - t0
    grace = time.monotonic() + 5
    while time.monotonic() < grace and _alive(nspawn_pid, started.get(nspawn_pid)):
        time.sleep(0.2)
    for pid in (init_pid, nspawn_pid):  # init first: SIGKILL to a PID namespace's init ends all of it
        if pid and _alive(pid, started.get(pid)):
            if pid == init_pid:
                _log(f"container init {pid} still alive after {timeout:.0f} s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return took


def reap_stale(release: Release) -> None:
    """Stop and remove beds of this release left by runs whose pytest/script process died."""
    runs = Tree(release).base / "runs"
    if not runs.is_dir():
        return
    for run in runs.iterdir():
        owner = run.name.split("-", 1)[0]
        if owner.isdigit() and Path(f"/proc/{owner}").exists():
            continue  # its owner (maybe this very process) is alive and stops it itself
        try:
            pids = {int(k): v for k, v in json.loads((run / "pids.json").read_text()).items()}
        except (OSError, ValueError):
            pids = {}
        live = [p for p, st in pids.items() if _alive(p, st)]
        if live:
            _log(f"stopping stale bed {run.name} (pids {live})")
            nspawn, init = (list(pids) + [None])[:2]
            _stop_pids(nspawn, init, timeout=30)
        _rmtree(run)


# -- command line (scripts/build-deb, and by hand) --------------------------------------


def build_deb(repo: Path, out: Path, release: Release = TRIXIE) -> list[Path]:
    """Build varsd's .deb with dpkg-buildpackage inside a booted `release` bed; copy it to `out`."""
    with Bed(release, repo=repo) as bed:
        produced = build_deb_in(bed, repo)
        out.mkdir(parents=True, exist_ok=True)
        copies = []
        for inside in produced:
            target = out / Path(inside).name
            shutil.copyfile(bed.path(inside), target)
            copies.append(target)
        return copies


def source_tree(repo: Path, dest: Path) -> Path:
    """The source package: the repository's files (tracked, or new and not ignored) plus
    packaging/debian as debian/. Uncommitted edits are included, so a build shows them."""
    listed = _run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                  what="git ls-files").stdout.split("\0")
    _rmtree(dest)
    for rel in filter(None, listed):
        src = repo / rel
        if not src.is_file() or rel.startswith("packaging/debian/"):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    shutil.copytree(repo / "packaging" / "debian", dest / "debian")
    return dest


def build_deb_in(bed: Bed, repo: Path) -> list[str]:
    """Build the package in a running bed; the paths (inside) of the .deb, .changes, .buildinfo."""
    source_tree(repo, bed.path("/build/varsd"))
    r = bed.sh("cd /build/varsd && dpkg-buildpackage -us -uc -b 2>&1", check=False, timeout=900)
    (bed.share / "build.log").write_text(r.stdout)
    if r.returncode != 0:
        raise BedError("dpkg-buildpackage failed:\n" + "\n".join(r.stdout.splitlines()[-40:]))
    return bed.sh("ls /build/*.deb /build/*.changes /build/*.buildinfo").stdout.split()


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="testbed", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-deb", help="build varsd's .deb in a Debian 13 bed")
    b.add_argument("--out", type=Path, default=Path.cwd() / "dist")
    t = sub.add_parser("tree", help="create the release's cached tree (or reuse it when complete)")
    t.add_argument("release", choices=sorted(RELEASES))
    args = p.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    try:
        if args.cmd == "build-deb":
            for path in build_deb(repo, args.out):
                print(path)
        else:
            tree = Tree(RELEASES[args.release])
            print(f"{tree.root} ({describe_build(tree.ensure())})")
    except BedError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
