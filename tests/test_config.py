"""varsd.config: defaults, every key, what is rejected and how, file lookup, qemu owner."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import fields

import pytest

from varsd import config as config_mod
from varsd.config import (
    DEFAULT_FIRMWARE_DIRS,
    Config,
    ExtraFirmware,
    config_path,
    load_config,
    parse_config,
    qemu_owner,
)
from varsd.errors import ConfigError, VarsdError
from varsd.model.backup import BackupKeep

WHERE = "/etc/varsd/test.toml"
UUID = "3f2a1c9e-0b4d-4e8f-9a6b-1c2d3e4f5a6b"


# -- defaults and every key -------------------------------------------------------------


def test_empty_file_gives_defaults():
    cfg = parse_config("", WHERE)
    assert cfg == Config()
    assert cfg.source == WHERE
    assert (cfg.uri, cfg.nvram_dir, cfg.state_dir) == (
        "qemu:///system", "/var/lib/libvirt/qemu/nvram", "/var/lib/varsd",
    )
    assert cfg.firmware_dirs == DEFAULT_FIRMWARE_DIRS == ("/usr/share/qemu/firmware", "/etc/qemu/firmware")
    assert cfg.extra_firmware == () and cfg.exclude == ()
    assert cfg.qemu_user is None and cfg.qemu_group is None
    assert (cfg.reconcile_interval, cfg.upgrade_policy, cfg.archive_retention_days) == (300, "auto", 30)
    assert cfg.journal_path == "/var/lib/varsd/state.sqlite3"
    assert cfg.domain_lock_path(UUID) == f"/var/lib/varsd/locks/{UUID}.lock"
    assert cfg.archive_dir == "/var/lib/varsd/archive"


FULL = """
uri = "qemu+ssh://root@host/system"
nvram_dir = "/srv/nvram"
state_dir = "/srv/varsd"
firmware_dirs = ["/opt/fw", "/etc/qemu/firmware"]
firmware_search_dirs = ["/opt/fw"]
exclude = ["build-*", "3f2a1c9e-0b4d-4e8f-9a6b-1c2d3e4f5a6b"]
reconcile_interval = 60
upgrade_policy = "manual"
archive_retention_days = 7
secureboot_templates = "2023"
metrics_textfile = "/var/lib/prometheus/node-exporter/varsd.prom"
metrics_listen = "127.0.0.1:9397"
qemu_user = "qemu"
qemu_group = "kvm"
admin_group = "adm"
backup_schedule = "30 2 * * 1-5"
backup_jitter = 0
backup_running = "suspend"
start_wait = 10
offline_dir = "/run/varsd-test/offline"

[backup_keep]
last = 3
daily = 7
weekly = 4

[[extra_firmware]]
code = "/usr/share/OVMF/OVMF_CODE.fd"
template = "/usr/share/OVMF/OVMF_VARS.fd"

[[extra_firmware]]
code = "/opt/fw/CODE.secboot.fd"
template = "/opt/fw/VARS.secboot.fd"
machines = ["pc-q35-*"]
features = ["secure-boot", "requires-smm"]
architecture = "aarch64"
"""


def test_every_key():
    cfg = parse_config(FULL, WHERE)
    assert cfg == Config(
        uri="qemu+ssh://root@host/system",
        nvram_dir="/srv/nvram",
        state_dir="/srv/varsd",
        firmware_dirs=("/opt/fw", "/etc/qemu/firmware"),
        firmware_search_dirs=("/opt/fw",),
        extra_firmware=(
            ExtraFirmware("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
            ExtraFirmware(
                "/opt/fw/CODE.secboot.fd",
                "/opt/fw/VARS.secboot.fd",
                machines=("pc-q35-*",),
                architecture="aarch64",
                features=("secure-boot", "requires-smm"),
            ),
        ),
        qemu_user="qemu",
        qemu_group="kvm",
        admin_group="adm",
        exclude=("build-*", UUID),
        reconcile_interval=60,
        upgrade_policy="manual",
        archive_retention_days=7,
        secureboot_templates="2023",
        metrics_textfile="/var/lib/prometheus/node-exporter/varsd.prom",
        metrics_listen="127.0.0.1:9397",
        backup_schedule="30 2 * * 1-5",
        backup_jitter=0,
        backup_running="suspend",
        start_wait=10,
        offline_dir="/run/varsd-test/offline",
        backup_keep=BackupKeep(last=3, daily=7, weekly=4),
    )
    # defaults of an extra pair without the optional keys
    assert cfg.extra_firmware[0].machines == ("pc-i440fx-*", "pc-q35-*")
    assert cfg.extra_firmware[0].architecture == "x86_64"
    assert cfg.extra_firmware[0].features == ()
    assert cfg.journal_path == "/srv/varsd/state.sqlite3"


def test_full_example_sets_every_config_field():
    """FULL must stay complete: every field of Config differs from its default."""
    cfg, default = parse_config(FULL, WHERE), Config()
    same = [f.name for f in fields(Config) if f.name != "source" and getattr(cfg, f.name) == getattr(default, f.name)]
    assert same == []


# -- rejected input --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, needle",
    [
        ("urii = 'qemu:///system'", "unknown key(s) urii"),
        ("source = '/x'", "unknown key(s) source"),
        ("nvram_dir = '/a'\nbogus = 1\nzzz = 2", "unknown key(s) bogus, zzz"),
        ("[[extra_firmware]]\ncode = '/a'\ntemplate = '/b'\nvars = '/c'", "extra_firmware[0]: unknown key(s) vars"),
        (
            "[[extra_firmware]]\ncode = '/a'\ntemplate = '/b'\n[[extra_firmware]]\ncode = '/a'\ntemplate = '/b'\n"
            "machine = 'q35'",
            "extra_firmware[1]: unknown key(s) machine",
        ),
        ("uri = 5", "'uri' must be a non-empty string"),
        ("uri = ''", "'uri' must be a non-empty string"),
        ("qemu_user = 107", "'qemu_user' must be a non-empty string"),
        ("qemu_group = ['kvm']", "'qemu_group' must be a non-empty string"),
        ("upgrade_policy = 'sometimes'", "'upgrade_policy' must be one of auto, manual"),
        ("upgrade_policy = true", "'upgrade_policy' must be a non-empty string"),
        ("nvram_dir = 'nvram'", "'nvram_dir' must be an absolute path"),
        ("state_dir = './state'", "'state_dir' must be an absolute path"),
        ("nvram_dir = 3", "'nvram_dir' must be a non-empty string"),
        ("firmware_dirs = '/usr/share/qemu/firmware'", "'firmware_dirs' must be a list of strings"),
        ("firmware_dirs = ['/ok', 3]", "'firmware_dirs' must be a list of strings"),
        ("firmware_dirs = ['/ok', 'qemu/firmware']", "'firmware_dirs' must be absolute paths"),
        ("exclude = 'build-*'", "'exclude' must be a list of strings"),
        ("reconcile_interval = '300'", "'reconcile_interval' must be a whole number of"),
        ("reconcile_interval = 0", "'reconcile_interval' must be a whole number of"),
        ("reconcile_interval = -5", "'reconcile_interval' must be a whole number of"),
        ("reconcile_interval = true", "'reconcile_interval' must be a whole number of"),
        ("reconcile_interval = 1.5", "'reconcile_interval' must be a whole number of"),
        ("archive_retention_days = false", "'archive_retention_days' must be a whole number of"),
        # #12 defect 9: unbounded integers overflowed the scheduler and date arithmetic
        ("reconcile_interval = 99999999999999", "'reconcile_interval' must be a whole number of seconds from 1 to"),
        ("archive_retention_days = 1000000000", "'archive_retention_days' must be a whole number of days from 1 to"),
        ("backup_schedule = 'daily'", "'backup_schedule' must be a cron expression"),
        ("backup_schedule = '61 * * * *'", "'backup_schedule' must be a cron expression"),
        ("backup_running = 'pause'", "'backup_running' must be one of coherent, suspend, skip"),
        ("start_wait = 61", "'start_wait' must be at most 60"),
        ("start_wait = 0", "'start_wait' must be a positive integer"),
        ("backup_jitter = -1", "'backup_jitter' must be an integer >= 0"),
        ("backup_keep = 3", "'backup_keep' must be a table"),
        ("[backup_keep]\nmonthly = 3", "backup_keep: unknown key(s) monthly"),
        ("[backup_keep]\nlast = 0", "backup_keep.last must be an integer >= 1"),
        ("offline_dir = 'run'", "'offline_dir' must be an absolute path"),
        ("extra_firmware = {code = '/a', template = '/b'}", "'extra_firmware' must be an array of tables"),
        ("extra_firmware = ['/a']", "extra_firmware[0]: must be a table"),
        ("[[extra_firmware]]\ntemplate = '/b'", "extra_firmware[0]: 'code' must be an absolute path"),
        ("[[extra_firmware]]\ncode = 'OVMF_CODE.fd'\ntemplate = '/b'", "'code' must be an absolute path"),
        ("[[extra_firmware]]\ncode = '/a'\ntemplate = 'VARS.fd'", "'template' must be an absolute path"),
        ("[[extra_firmware]]\ncode = '/a'\ntemplate = 7", "'template' must be an absolute path"),
        ("[[extra_firmware]]\ncode = '/a'\ntemplate = '/b'\nmachines = 'pc-q35-*'", "'machines' must be a list"),
        ("[[extra_firmware]]\ncode = '/a'\ntemplate = '/b'\nfeatures = [1]", "'features' must be a list of strings"),
        ("[[extra_firmware]]\ncode = '/a'\ntemplate = '/b'\narchitecture = 64", "'architecture' must be a string"),
        ("secureboot_templates = '2026'", "'secureboot_templates' must be one of shipped, 2023"),
        ("metrics_textfile = 'varsd.prom'", "'metrics_textfile' must be an absolute path"),
        ("metrics_listen = '0.0.0.0:9397'", "'metrics_listen' must be a loopback HOST:PORT"),
        ("metrics_listen = '127.0.0.1'", "'metrics_listen' must be a loopback HOST:PORT"),
        ("metrics_listen = '[::1]:99999'", "'metrics_listen' must be a loopback HOST:PORT"),
        ("uri = 'qemu:///system", "not valid TOML"),
        ("uri = 'a'\nuri = 'b'", "not valid TOML"),
    ],
)
def test_rejected(text, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(text, WHERE)
    msg = str(info.value)
    assert msg.startswith(f"{WHERE}: "), msg
    assert needle in msg
    assert isinstance(info.value, VarsdError)


def test_unknown_key_message_lists_the_known_keys():
    with pytest.raises(ConfigError) as info:
        parse_config("nvram-dir = '/x'", WHERE)
    msg = str(info.value)
    assert "unknown key(s) nvram-dir" in msg
    for key in ("nvram_dir", "state_dir", "uri", "extra_firmware", "exclude"):
        assert key in msg


# -- finding the file ------------------------------------------------------------------


@pytest.fixture
def no_default(tmp_path, monkeypatch):
    """The default file does not exist and VARSD_CONFIG is unset."""
    missing = str(tmp_path / "etc" / "varsd.toml")
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_PATH", missing)
    monkeypatch.delenv("VARSD_CONFIG", raising=False)
    return missing


def test_missing_default_file_means_defaults(no_default):
    assert config_path() == (no_default, False)
    cfg = load_config()
    assert cfg == Config() and cfg.source is None


def test_default_file_is_read_when_present(no_default):
    os.makedirs(os.path.dirname(no_default))
    with open(no_default, "w") as f:
        f.write("reconcile_interval = 42\n")
    cfg = load_config()
    assert cfg.reconcile_interval == 42 and cfg.source == no_default


def test_explicit_missing_file_is_an_error(no_default, tmp_path):
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=f"^{path}: config file not found$"):
        load_config(path)


def test_explicit_file(no_default, tmp_path):
    path = tmp_path / "varsd.toml"
    path.write_text("state_dir = '/srv/s'\nuri = 'test:///default'\n")
    cfg = load_config(str(path))
    assert (cfg.state_dir, cfg.uri, cfg.source) == ("/srv/s", "test:///default", str(path))


def test_varsd_config_env(no_default, tmp_path, monkeypatch):
    path = tmp_path / "env.toml"
    path.write_text("nvram_dir = '/srv/nv'\n")
    monkeypatch.setenv("VARSD_CONFIG", str(path))
    assert config_path() == (str(path), True)
    assert load_config().nvram_dir == "/srv/nv"
    # --config wins over the environment
    other = tmp_path / "other.toml"
    other.write_text("nvram_dir = '/srv/other'\n")
    assert load_config(str(other)).nvram_dir == "/srv/other"


def test_varsd_config_env_naming_a_missing_file_is_an_error(no_default, tmp_path, monkeypatch):
    monkeypatch.setenv("VARSD_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match="gone.toml: config file not found"):
        load_config()


def test_empty_varsd_config_env_means_default(no_default, monkeypatch):
    monkeypatch.setenv("VARSD_CONFIG", "")
    assert config_path() == (no_default, False)


def test_config_path_with_explicit_environ():
    assert config_path(None, {"VARSD_CONFIG": "/e.toml"}) == ("/e.toml", True)
    assert config_path("/x.toml", {"VARSD_CONFIG": "/e.toml"}) == ("/x.toml", True)


def test_connect_overrides_uri(no_default, tmp_path):
    path = tmp_path / "varsd.toml"
    path.write_text("uri = 'qemu:///system'\nstate_dir = '/srv/s'\n")
    cfg = load_config(str(path), "test:///default")
    assert cfg.uri == "test:///default" and cfg.state_dir == "/srv/s"
    assert load_config(None, "test:///default").uri == "test:///default"


def test_a_directory_is_not_a_config_file(no_default, tmp_path):
    with pytest.raises(ConfigError, match=f"^{tmp_path}: cannot read config: "):
        load_config(str(tmp_path))


def test_a_file_that_is_not_utf8_is_a_config_error(no_default, tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("uri = 'qemu:///system' # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: ")


def test_bad_file_error_names_the_file(no_default, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[[extra_firmware]]\ncode = '/a'\ntemplate = '/b'\ncodes = '/c'\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: extra_firmware[0]: unknown key(s) codes"


# -- exclusions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, uuid, excluded",
    [
        ("build-42", "00000000-0000-0000-0000-000000000001", True),
        ("build-", "00000000-0000-0000-0000-000000000001", True),
        ("mybuild-42", "00000000-0000-0000-0000-000000000001", False),
        ("Build-42", "00000000-0000-0000-0000-000000000001", False),  # globs are case-sensitive
        ("web1", UUID, True),
        ("web1", UUID.upper(), True),  # libvirt prints lower case; an admin may paste upper case
        ("web1", "3f2a1c9e-0b4d-4e8f-9a6b-1c2d3e4f5a6c", False),
        ("db", "00000000-0000-0000-0000-000000000001", False),
        ("dbx", "00000000-0000-0000-0000-000000000001", True),
        ("test[1]", "00000000-0000-0000-0000-000000000001", False),
        ("test1", "00000000-0000-0000-0000-000000000001", True),
    ],
)
def test_is_excluded(name, uuid, excluded):
    cfg = Config(exclude=("build-*", UUID, "db?", "test[12]"))
    assert cfg.is_excluded(name, uuid) is excluded


def test_uppercase_uuid_pattern_matches_lowercase_uuid():
    cfg = Config(exclude=(UUID.upper(),))
    assert cfg.is_excluded("web1", UUID)


def test_nothing_excluded_by_default():
    assert not Config().is_excluded("build-1", UUID)


# -- qemu owner ------------------------------------------------------------------------


@pytest.fixture
def me() -> tuple[str, str, int, int]:
    """A user and a group that exist on every host: root (tests run as root)."""
    pw = pwd.getpwuid(0)
    gr = grp.getgrgid(0)
    return pw.pw_name, gr.gr_name, pw.pw_uid, gr.gr_gid


def _qemu_conf(tmp_path, text: str) -> str:
    path = tmp_path / "qemu.conf"
    path.write_text(text)
    return str(path)


def test_owner_from_config_wins_over_qemu_conf(tmp_path):
    conf = _qemu_conf(tmp_path, 'user = "libvirt-qemu"\ngroup = "libvirt-qemu"\n')
    assert qemu_owner(Config(qemu_user="root", qemu_group="root"), conf) == (0, 0)


def test_owner_from_qemu_conf(tmp_path):
    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrnam("nogroup")
    conf = _qemu_conf(tmp_path, '# libvirt\nuser = "nobody"\n  group   =   "nogroup"   # trailing comment\n')
    assert qemu_owner(Config(), conf) == (nobody.pw_uid, nogroup.gr_gid)


def test_qemu_conf_numeric_forms(tmp_path):
    conf = _qemu_conf(tmp_path, 'user = "+0"\ngroup = "+65534"\n')
    assert qemu_owner(Config(), conf) == (0, 65534)


def test_qemu_conf_single_quotes(tmp_path):
    """libvirt's conf parser takes single-quoted strings as well."""
    conf = _qemu_conf(tmp_path, "user = 'nobody'\ngroup = 'nogroup'\n")
    assert qemu_owner(Config(), conf) == (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)


def test_config_user_with_qemu_conf_group(tmp_path):
    conf = _qemu_conf(tmp_path, 'user = "nobody"\ngroup = "nogroup"\n')
    assert qemu_owner(Config(qemu_user="root"), conf) == (0, grp.getgrnam("nogroup").gr_gid)


def test_commented_out_lines_are_ignored(tmp_path):
    conf = _qemu_conf(tmp_path, '#user = "nobody"\n# group = "nogroup"\n#       user = "+0"\n')
    expected = pwd.getpwnam("libvirt-qemu")
    assert qemu_owner(Config(), conf) == (expected.pw_uid, grp.getgrnam("libvirt-qemu").gr_gid)


def test_missing_qemu_conf_falls_back_to_libvirt_qemu(tmp_path):
    pw = pwd.getpwnam("libvirt-qemu")  # installed by libvirt-daemon-system (scripts/host-setup)
    assert qemu_owner(Config(), str(tmp_path / "no-qemu.conf")) == (pw.pw_uid, grp.getgrnam("libvirt-qemu").gr_gid)


def test_group_defaults_to_the_users_same_named_group(tmp_path):
    conf = _qemu_conf(tmp_path, 'user = "libvirt-qemu"\n')
    # libvirt-qemu's primary group is kvm, but a group named like the user wins
    assert qemu_owner(Config(), conf)[1] == grp.getgrnam("libvirt-qemu").gr_gid


def test_group_defaults_to_primary_group_without_a_same_named_one(tmp_path):
    nobody = pwd.getpwnam("nobody")
    with pytest.raises(KeyError):
        grp.getgrnam("nobody")
    assert qemu_owner(Config(qemu_user="nobody"), str(tmp_path / "none")) == (nobody.pw_uid, nobody.pw_gid)


@pytest.mark.parametrize(
    "cfg, conf_text, needle",
    [
        (Config(qemu_user="no-such-user-varsd"), "", "qemu user 'no-such-user-varsd' does not exist"),
        (Config(), 'user = "no-such-user-varsd"\n', "qemu user 'no-such-user-varsd' does not exist"),
        (Config(qemu_user="root", qemu_group="no-such-group-varsd"), "", "qemu group 'no-such-group-varsd'"),
        (Config(qemu_user="root"), 'group = "no-such-group-varsd"\n', "qemu group 'no-such-group-varsd'"),
        (Config(), 'user = "+notanumber"\n', r"qemu user '\+notanumber' does not exist"),
    ],
)
def test_unknown_owner_is_a_config_error(tmp_path, cfg, conf_text, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        qemu_owner(cfg, _qemu_conf(tmp_path, conf_text))
    assert "set qemu_" in str(info.value)


def test_qemu_conf_not_utf8_is_not_a_crash(tmp_path):
    path = tmp_path / "qemu.conf"
    path.write_bytes(b'# \xe9t\xe9\nuser = "nobody"\n')
    assert qemu_owner(Config(qemu_group="root"), str(path)) == (pwd.getpwnam("nobody").pw_uid, 0)


def test_qemu_conf_bare_number_is_a_name_first_then_an_id(tmp_path):
    """qemu.conf: `user = "100"` is "a user named 100 or a user with uid=100"."""
    conf = _qemu_conf(tmp_path, 'user = "65534"\ngroup = "0"\n')
    assert qemu_owner(Config(), conf) == (65534, 0)
