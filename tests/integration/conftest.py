"""Tier 3: real libvirtd + QEMU (TCG, no KVM needed) + Debian's OVMF.

Contract of this tier:

- A root `libvirtd` (and `virtlogd`) serves `qemu:///system` (or `$VARSD_TEST_URI`).
  `.ci/run` -> `scripts/run-tests` -> `scripts/host-setup` installs and starts them.
- If libvirtd is not reachable the tests FAIL, with a message saying to run
  `scripts/host-setup`. They never skip: a silently skipped tier proves nothing.
- Every test here is marked `integration` (select or deselect with `-m`).
- Tests only ever touch domains named `varsd-test-*`, created through
  `guest_factory`, and remove them (and their varstores) afterwards. Other
  people may share the libvirtd: leftovers of crashed earlier runs are removed at
  session start, but only those whose recorded owner process is gone.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from lxml import etree
from ovmf_files import HOST_IS_DEBIAN12
from support.domains import guest_xml

from varsd.adapters.libvirt_api import DomainRef, Hypervisor, NoSuchDomain
from varsd.errors import HypervisorError

from .guests import NVRAM_DIR

PREFIX = "varsd-test-"
OWNER_TAG = "varsd-test owner="
_HERE = Path(__file__).resolve().parent
RECONNECT_TIMEOUT = 30.0
T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "debian12_host(why): changes the Debian 12 host's own packages")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in this directory `integration` (the hook sees all items: filter).

    A test marked `debian12_host(why)` changes the Debian 12 host's own packages (its
    system ovmf goes deb12u1 -> u2): on another release it does not apply, and the report
    says so and names its counterpart there. Not a missing prerequisite: nothing to install.
    """
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)
            only = item.get_closest_marker("debian12_host")
            if only is not None and not HOST_IS_DEBIAN12:
                item.add_marker(pytest.mark.skip(reason=f"Debian 12 host only: {only.args[0]}"))


# -- ownership of test domains --------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """Process start time (clock ticks since boot), so a reused PID is not mistaken for its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_token() -> str:
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _owner_alive(description: str | None) -> bool:
    if not description or not description.startswith(OWNER_TAG):
        return False
    pid, _, started = description[len(OWNER_TAG) :].partition(":")
    return pid.isdigit() and _start_time(int(pid)) == started


def _mark_owned(xml: str) -> str:
    """Record this pytest process as the domain's owner in <description>."""
    root = etree.fromstring(xml.encode())
    for old in root.findall("description"):
        root.remove(old)
    description = etree.Element("description")
    description.text = OWNER_TAG + _owner_token()
    root.insert(1, description)
    return etree.tostring(root, encoding="unicode")


def _remove_domain(hv: Hypervisor, uuid: str) -> None:
    """Destroy if running, undefine with its varstore; a vanished domain is fine."""
    try:
        ref = hv.lookup(uuid)
        if ref.active:
            hv.destroy(uuid)
        if ref.persistent:
            hv.undefine(uuid, remove_nvram=True)
    except NoSuchDomain:
        pass


def _remove_leftovers(hv: Hypervisor) -> None:
    for ref in hv.list_domains():
        if not ref.name.startswith(PREFIX):
            continue
        try:
            description = etree.fromstring(hv.persistent_xml(ref.uuid).encode()).findtext("description")
        except NoSuchDomain:
            continue
        if not _owner_alive(description):
            _remove_domain(hv, ref.uuid)


# -- surviving libvirtd restarts ------------------------------------------------------
# libvirtd may be restarted under a long session (a shared dev host, or a test of
# varsd's own reconnect logic); running guests survive that, so the bed reconnects
# instead of failing every later test and leaking domains.


def _reconnect(hv: Hypervisor, timeout: float = RECONNECT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        hv.close()
        try:
            hv.open()
            hv.list_domains()
            return
        except HypervisorError as exc:
            if not exc.retryable or time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def _with_reconnect(hv: Hypervisor, call: Callable[[], T]) -> T:
    """Run `call`; after a retryable (connection) error, reconnect and run it once more."""
    try:
        return call()
    except HypervisorError as exc:
        if not exc.retryable:
            raise
        _reconnect(hv)
        return call()


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hv() -> Iterator[Hypervisor]:
    """The session's connection to the real libvirtd; fails (never skips) when absent."""
    uri = os.environ.get("VARSD_TEST_URI", "qemu:///system")
    hypervisor = Hypervisor(uri)
    try:
        _reconnect(hypervisor, timeout=5)
    except HypervisorError as exc:
        pytest.fail(
            f"integration tier needs a running libvirtd at {uri}: {exc}\n"
            "Run `sudo scripts/host-setup` (or `.ci/run`) to install and start it.",
            pytrace=False,
        )
    _remove_leftovers(hypervisor)
    yield hypervisor
    hypervisor.close()


@pytest.fixture(autouse=True)
def _connected(hv: Hypervisor) -> None:
    """Each test starts on a working connection, even if libvirtd restarted since the last."""
    _with_reconnect(hv, hv.list_domains)


@dataclass(frozen=True)
class Guest:
    """A test domain as defined: what tests need to boot and observe it."""

    name: str
    uuid: str
    serial_log: str

    def ref(self, hv: Hypervisor) -> DomainRef:
        return hv.lookup(self.uuid)


class GuestFactory:
    """Defines uniquely named `varsd-test-*` domains and removes them afterwards.

    XML (`os_inner` or a full `xml` template) may use the placeholders `{name}`,
    `{serial_log}` and `{nvram_dir}`; plain str.replace, so XML needs no escaping.
    """

    def __init__(self, hv: Hypervisor, log_dir: Path) -> None:
        self.hv = hv
        self.log_dir = log_dir
        self._uuids: list[str] = []
        self._files: list[Path] = []

    def name(self, label: str) -> str:
        """A fresh domain name, e.g. to place its varstore before defining it."""
        return f"{PREFIX}{secrets.token_hex(3)}-{label}"

    def define(self, label_or_name: str, os_inner: str | None = None, *, xml: str | None = None, **kwargs) -> Guest:
        """Define (not start) a guest from an <os> fragment or a full XML template.

        `kwargs` go to guests.domain_xml (machine, extra_devices, features, metadata).
        """
        if (os_inner is None) == (xml is None):
            raise TypeError("give exactly one of os_inner and xml")
        name = label_or_name if label_or_name.startswith(PREFIX) else self.name(label_or_name)
        serial_log = str(self.log_dir / f"{name}.serial.log")
        template = xml if xml is not None else guest_xml(name, os_inner or "", serial_log=serial_log, **kwargs)
        for placeholder, value in (("{name}", name), ("{serial_log}", serial_log), ("{nvram_dir}", NVRAM_DIR)):
            template = template.replace(placeholder, value)
        ref = self.hv.define(_mark_owned(template))
        assert ref.name == name, f"template defined {ref.name!r}, expected {name!r}"
        self._uuids.append(ref.uuid)
        return Guest(name=name, uuid=ref.uuid, serial_log=serial_log)

    def track(self, path: str | os.PathLike[str]) -> Path:
        """Remove this file at cleanup too (e.g. a varstore a test placed itself)."""
        self._files.append(Path(path))
        return Path(path)

    def cleanup(self) -> None:
        errors = []
        for uuid in reversed(self._uuids):
            try:
                _with_reconnect(self.hv, lambda uuid=uuid: _remove_domain(self.hv, uuid))
            except HypervisorError as exc:
                errors.append(str(exc))
        if errors:  # keep files a leaked domain may still use; the next session removes both
            raise AssertionError("test domain cleanup failed:\n" + "\n".join(errors))
        for path in self._files:
            path.unlink(missing_ok=True)


@pytest.fixture
def guest_factory(hv: Hypervisor, tmp_path: Path) -> Iterator[GuestFactory]:
    """Per-test GuestFactory; serial logs go under the test's tmp_path."""
    factory = GuestFactory(hv, tmp_path)
    yield factory
    factory.cleanup()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """varsd's default configuration, with this test's own state dir (modules may override it)."""
    cfg = tmp_path / "varsd.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\nnvram_dir = "{NVRAM_DIR}"\n')
    return cfg
