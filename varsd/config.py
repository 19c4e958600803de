"""varsd configuration: one TOML file, every key optional, unknown keys rejected.

Lookup order for the file: `--config PATH`, then `$VARSD_CONFIG`, then
`/etc/varsd/varsd.toml`. A missing default file means "all defaults"; a file named
explicitly must exist. Example::

    uri = "qemu:///system"
    nvram_dir = "/var/lib/libvirt/qemu/nvram"
    state_dir = "/var/lib/varsd"
    firmware_dirs = ["/usr/share/qemu/firmware", "/etc/qemu/firmware"]
    exclude = ["build-*", "3f2a...uuid"]
    reconcile_interval = 300
    upgrade_policy = "auto"
    qemu_user = "libvirt-qemu"
    qemu_group = "libvirt-qemu"

    [[extra_firmware]]          # pairs no descriptor lists (like qemu.conf's nvram list)
    code = "/usr/share/OVMF/OVMF_CODE.fd"
    template = "/usr/share/OVMF/OVMF_VARS.fd"
    machines = ["pc-i440fx-*", "pc-q35-*"]   # optional
    features = []                               # optional, e.g. ["secure-boot", "requires-smm"]
"""

from __future__ import annotations

import fnmatch
import functools
import grp
import os
import pwd
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TypeVar

from varsd.errors import ConfigError
from varsd.model.backup import BackupKeep, BackupRunning
from varsd.model.firmware import UpgradePolicy

DEFAULT_CONFIG_PATH = "/etc/varsd/varsd.toml"
QEMU_CONF = "/etc/libvirt/qemu.conf"

# QEMU's descriptor search path (docs/interop/firmware.json), lowest precedence
# first: a same-named file in a later directory overrides (varsd.firmware.descriptors).
DEFAULT_FIRMWARE_DIRS: tuple[str, ...] = (
    "/usr/share/qemu/firmware",
    "/etc/qemu/firmware",
)
# Where distros put firmware images, with or without descriptors (varsd.firmware.discovery).
DEFAULT_SEARCH_DIRS: tuple[str, ...] = (
    "/usr/share/OVMF", "/usr/share/ovmf", "/usr/share/edk2", "/usr/share/AAVMF", "/usr/share/qemu",
)

UPGRADE_POLICIES = tuple(p.value for p in UpgradePolicy)
SECUREBOOT_TEMPLATES = ("shipped", "2023")
BACKUP_RUNNING_MODES = tuple(m.value for m in BackupRunning)

DEFAULT_OFFLINE_DIR = "/run/varsd/offline"
"""Where offline varstore writes are announced to the libvirt QEMU hook (its fixed path)."""


# Upper bounds keep every value inside what the scheduler and date arithmetic accept
# (99999999999999 s overflows APScheduler's timedelta; 10**9 days overflows datetime).
INT_LIMITS: dict[str, tuple[int, str]] = {
    "reconcile_interval": (30 * 86400, "seconds"),  # 30 days
    "archive_retention_days": (36500, "days"),  # 100 years
}

T = TypeVar("T")


@dataclass(frozen=True)
class ExtraFirmware:
    """A code+template pair no descriptor lists, treated as a split build."""

    code: str
    template: str
    machines: tuple[str, ...] = ("pc-i440fx-*", "pc-q35-*")
    architecture: str = "x86_64"
    features: tuple[str, ...] = ()


@functools.lru_cache(maxsize=8)
def _exclusion(patterns: tuple[str, ...]) -> tuple[frozenset[str], re.Pattern[str]]:
    """`exclude` compiled once: the lower-cased patterns (as UUIDs) and one regex matching a
    name any pattern matches (fnmatchcase), asked for every domain of every pass."""
    return frozenset(p.lower() for p in patterns), re.compile("|".join(fnmatch.translate(p) for p in patterns))


@dataclass(frozen=True)
class Config:
    uri: str = "qemu:///system"
    nvram_dir: str = "/var/lib/libvirt/qemu/nvram"
    state_dir: str = "/var/lib/varsd"
    firmware_dirs: tuple[str, ...] = DEFAULT_FIRMWARE_DIRS
    # Where code images no descriptor lists are looked for (varsd.firmware.discovery); [] turns it off.
    firmware_search_dirs: tuple[str, ...] = DEFAULT_SEARCH_DIRS
    extra_firmware: tuple[ExtraFirmware, ...] = ()
    qemu_user: str | None = None  # None: read qemu.conf, then distro default
    qemu_group: str | None = None
    # Group that may read the state database (status, journal, firmware list/history without
    # root). libvirt's own admin group: its members can read every domain's XML, secure parts
    # included, from libvirt already. "root" keeps the database root-only.
    admin_group: str = "libvirt"
    exclude: tuple[str, ...] = ()  # domain name globs or UUIDs
    reconcile_interval: int = 300  # seconds between safety-net full passes
    upgrade_policy: UpgradePolicy = UpgradePolicy.AUTO
    archive_retention_days: int = 30
    secureboot_templates: str = "shipped"  # or "2023": derive 2023-ready templates (varsd.firmware.derived)
    metrics_textfile: str | None = None  # node_exporter textfile the daemon rewrites after each pass
    metrics_listen: str | None = None  # "127.0.0.1:9397": serve /metrics there (loopback only)
    backup_schedule: str = "0 3 * * *"  # cron (minute hour day month weekday), local time
    backup_jitter: int = 3600  # seconds of random delay per run, so hosts do not all copy at once
    backup_keep: BackupKeep = BackupKeep()
    backup_running: BackupRunning = BackupRunning.COHERENT
    start_wait: int = 30  # seconds a domain start waits for an offline varstore write (hook; cap 60)
    offline_dir: str = DEFAULT_OFFLINE_DIR
    source: str | None = field(default=None, compare=False)  # file it came from

    def is_excluded(self, name: str, uuid: str) -> bool:
        # UUIDs compare case-insensitively (libvirt prints lower case, admins paste either).
        if not self.exclude:
            return False
        uuids, names = _exclusion(tuple(self.exclude))
        return uuid.lower() in uuids or names.match(name) is not None

    @property
    def journal_path(self) -> str:
        return os.path.join(self.state_dir, "state.sqlite3")

    def domain_lock_path(self, uuid: str) -> str:
        """One lock per domain: varsd and varsctl never act on the same domain at once."""
        return os.path.join(self.state_dir, "locks", f"{uuid}.lock")

    @property
    def archive_dir(self) -> str:
        return os.path.join(self.state_dir, "archive")

    @property
    def backup_dir(self) -> str:
        """Content-addressed varstore backups (`objects/<sha256>.fd`); the index is in the journal."""
        return os.path.join(self.state_dir, "backups")

    @property
    def firmware_lock_path(self) -> str:
        """Serialises archive and firmware-history writes between varsd and varsctl."""
        return os.path.join(self.state_dir, "locks", "firmware.lock")


_TOP_KEYS = {f.name for f in fields(Config)} - {"source"}
_EXTRA_KEYS = {f.name for f in fields(ExtraFirmware)}
_KEEP_KEYS = {f.name for f in fields(BackupKeep)}
START_WAIT_CAP = 60  # the hook's own cap (packaging/libvirt/varsd-qemu-hook)


def _expect(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def _str_list(value: object, where: str, key: str) -> tuple[str, ...]:
    _expect(
        isinstance(value, list) and all(isinstance(v, str) for v in value),
        where,
        f"'{key}' must be a list of strings",
    )
    return tuple(value)  # type: ignore[arg-type]


def parse_config(text: str, where: str = "<config>") -> Config:
    """Parse TOML text into a Config; raise ConfigError naming the file and key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - _TOP_KEYS)
    known = ", ".join(sorted(_TOP_KEYS))
    _expect(not unknown, where, f"unknown key(s) {', '.join(unknown)}; known: {known}")
    kw: dict[str, object] = {}
    for key in ("uri", "nvram_dir", "state_dir", "qemu_user", "qemu_group", "admin_group", "upgrade_policy",
                "backup_schedule",
                "backup_running", "offline_dir", "secureboot_templates", "metrics_textfile", "metrics_listen"):
        if key in data:
            _expect(isinstance(data[key], str) and data[key] != "", where, f"'{key}' must be a non-empty string")
            kw[key] = data[key]
    for key in ("nvram_dir", "state_dir", "offline_dir", "metrics_textfile"):
        if key in kw:
            _expect(os.path.isabs(str(kw[key])), where, f"'{key}' must be an absolute path")
    if "firmware_dirs" in data:
        kw["firmware_dirs"] = _str_list(data["firmware_dirs"], where, "firmware_dirs")
        relative = [d for d in kw["firmware_dirs"] if not os.path.isabs(d)]  # type: ignore[union-attr]
        _expect(not relative, where, f"'firmware_dirs' must be absolute paths, not {', '.join(relative)}")
    if "firmware_search_dirs" in data:
        kw["firmware_search_dirs"] = _str_list(data["firmware_search_dirs"], where, "firmware_search_dirs")
        relative = [d for d in kw["firmware_search_dirs"] if not os.path.isabs(d)]  # type: ignore[union-attr]
        _expect(not relative, where, f"'firmware_search_dirs' must be absolute paths, not {', '.join(relative)}")
    if "exclude" in data:
        kw["exclude"] = _str_list(data["exclude"], where, "exclude")
    for key, (limit, unit) in INT_LIMITS.items():
        if key in data:
            v = data[key]
            ok = isinstance(v, int) and not isinstance(v, bool) and 0 < v <= limit
            _expect(ok, where, f"'{key}' must be a whole number of {unit} from 1 to {limit}, not {v!r}")
            kw[key] = v
    if "start_wait" in data:
        v = data["start_wait"]
        _expect(isinstance(v, int) and not isinstance(v, bool) and v > 0, where,
                f"'start_wait' must be a positive integer (seconds), not {v!r}")
        kw["start_wait"] = v
    if "start_wait" in kw:
        _expect(int(kw["start_wait"]) <= START_WAIT_CAP, where,  # type: ignore[call-overload]
                f"'start_wait' must be at most {START_WAIT_CAP} (the hook never holds a start longer)")
    if "backup_jitter" in data:
        v = data["backup_jitter"]
        _expect(isinstance(v, int) and not isinstance(v, bool) and v >= 0, where,
                "'backup_jitter' must be an integer >= 0 (seconds)")
        kw["backup_jitter"] = v
    if "backup_schedule" in kw:
        _expect(_valid_cron(str(kw["backup_schedule"])), where,
                "'backup_schedule' must be a cron expression of five fields (minute hour day month weekday), "
                f"not {kw['backup_schedule']!r}")
    if "backup_running" in kw:
        _expect(kw["backup_running"] in BACKUP_RUNNING_MODES, where,
                f"'backup_running' must be one of {', '.join(BACKUP_RUNNING_MODES)}")
        kw["backup_running"] = BackupRunning(kw["backup_running"])
    if "backup_keep" in data:
        keep = data["backup_keep"]
        _expect(isinstance(keep, dict), where, "'backup_keep' must be a table ([backup_keep] last/daily/weekly)")
        bad = sorted(set(keep) - _KEEP_KEYS)
        _expect(not bad, where, f"backup_keep: unknown key(s) {', '.join(bad)}; known: last, daily, weekly")
        for k, v in keep.items():
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= (1 if k == "last" else 0)
            _expect(ok, where, f"backup_keep.{k} must be an integer >= {1 if k == 'last' else 0}")
        kw["backup_keep"] = BackupKeep(**keep)
    if "upgrade_policy" in kw:
        choices = ", ".join(UPGRADE_POLICIES)
        _expect(kw["upgrade_policy"] in UPGRADE_POLICIES, where, f"'upgrade_policy' must be one of {choices}")
        kw["upgrade_policy"] = UpgradePolicy(kw["upgrade_policy"])
    if "secureboot_templates" in kw:
        choices = ", ".join(SECUREBOOT_TEMPLATES)
        _expect(kw["secureboot_templates"] in SECUREBOOT_TEMPLATES, where,
                f"'secureboot_templates' must be one of {choices}")
    if "metrics_listen" in kw:
        _expect(parse_listen(str(kw["metrics_listen"])) is not None, where,
                "'metrics_listen' must be a loopback HOST:PORT (127.0.0.1:9397, [::1]:9397, localhost:9397)")
    if "extra_firmware" in data:
        items = data["extra_firmware"]
        _expect(isinstance(items, list), where, "'extra_firmware' must be an array of tables ([[extra_firmware]])")
        extras = []
        for i, item in enumerate(items):
            w = f"{where}: extra_firmware[{i}]"
            _expect(isinstance(item, dict), w, "must be a table")
            bad = sorted(set(item) - _EXTRA_KEYS)
            _expect(not bad, w, f"unknown key(s) {', '.join(bad)}")
            for k in ("code", "template"):
                _expect(isinstance(item.get(k), str) and os.path.isabs(item[k]), w, f"'{k}' must be an absolute path")
            ekw: dict[str, object] = {"code": item["code"], "template": item["template"]}
            if "architecture" in item:
                _expect(isinstance(item["architecture"], str), w, "'architecture' must be a string")
                ekw["architecture"] = item["architecture"]
            for k in ("machines", "features"):
                if k in item:
                    ekw[k] = _str_list(item[k], w, k)
            extras.append(ExtraFirmware(**ekw))  # type: ignore[arg-type]
        kw["extra_firmware"] = tuple(extras)
    return Config(source=where, **kw)  # type: ignore[arg-type]


def parse_listen(text: str) -> tuple[str, int] | None:
    """(address, port) of a loopback `HOST:PORT`, else None: /metrics is never served off-host."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127."):
        return None
    return host, int(port)


def _valid_cron(expr: str) -> bool:
    """Whether APScheduler accepts `expr` as a standard five-field crontab line."""
    from apscheduler.triggers.cron import CronTrigger

    if len(expr.split()) != 5:
        return False
    try:
        CronTrigger.from_crontab(expr, timezone="UTC")
    except ValueError:
        return False
    return True


def config_path(explicit: str | None = None, environ: dict[str, str] | None = None) -> tuple[str, bool]:
    """The config file to read and whether it was asked for explicitly (must exist)."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit, True
    if env.get("VARSD_CONFIG"):
        return env["VARSD_CONFIG"], True
    return DEFAULT_CONFIG_PATH, False


def load_config(explicit: str | None = None, uri: str | None = None) -> Config:
    """Read the config file (see module doc); `uri` (from --connect) overrides `uri`."""
    path, required = config_path(explicit)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: config file not found") from None
        cfg = Config()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start}): {exc.reason}") from None
    else:
        cfg = parse_config(text, path)
    if uri:
        cfg = replace(cfg, uri=uri)
    return cfg


# libvirt's conf parser accepts "..." and '...' strings.
_QEMU_CONF_KEY = re.compile(r"""^[ \t]*(user|group)[ \t]*=[ \t]*(?:"([^"\n]*)"|'([^'\n]*)')""", re.M)


def qemu_owner(cfg: Config, qemu_conf: str = QEMU_CONF) -> tuple[int, int]:
    """uid/gid that must own varstores: config, then qemu.conf, then distro defaults.

    libvirt runs QEMU as this user; a varstore it cannot write is a guest whose
    variable changes silently vanish.
    """
    user, group = cfg.qemu_user, cfg.qemu_group
    if user is None or group is None:
        try:
            text = Path(qemu_conf).read_text(encoding="utf-8", errors="replace")
            found = {key: dq or sq for key, dq, sq in _QEMU_CONF_KEY.findall(text)}
        except OSError:
            found = {}
        user = user or found.get("user")
        group = group or found.get("group")
    if user is None:
        for candidate in ("libvirt-qemu", "qemu"):  # Debian/Ubuntu, Fedora/SUSE
            try:
                pwd.getpwnam(candidate)
            except KeyError:
                continue
            user = candidate
            break
        else:
            user = "root"
    pw = _lookup(pwd.getpwnam, pwd.getpwuid, user)
    if pw is None:
        raise ConfigError(f"qemu user '{user}' does not exist; set qemu_user in the config")
    if group is None:
        try:
            grp.getgrnam(user)
            group = user
        except KeyError:
            return pw.pw_uid, pw.pw_gid
    gr = _lookup(grp.getgrnam, grp.getgrgid, group)
    if gr is None:
        raise ConfigError(f"qemu group '{group}' does not exist; set qemu_group in the config")
    return pw.pw_uid, gr.gr_gid


def _lookup(by_name: Callable[[str], T], by_id: Callable[[int], T], spec: str) -> T | None:
    """qemu.conf semantics: "+N" is id N; "N" is the name N, else id N; None if unknown."""
    try:
        if spec.startswith("+"):
            return by_id(int(spec[1:]))
        try:
            return by_name(spec)
        except KeyError:
            if not spec.isdigit():
                raise
            return by_id(int(spec))
    except (KeyError, ValueError, OverflowError):
        return None
