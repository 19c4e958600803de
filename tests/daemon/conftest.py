"""Tier 2: the daemon's event logic on libvirt's in-process `test:///default` driver.

Contract of this tier: no libvirtd, no QEMU. The test driver is a real libvirt driver
(define, start, events, live metadata) living inside this process, shared by every
connection to `test:///default`, so a test defines domains on its own connection and
watches the service react through events. It proves event handling, coalescing, loop
freedom and start recording; that firmware really boots is tier 3's job.
Domains here get unique names and are undefined afterwards; the driver's built-in
`test` domain (no firmware) must always come out unmanaged.
"""

from __future__ import annotations

import grp
import os
import pwd
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest
from ovmf_files import UNIFIED as UNIFIED_2M_IMAGE  # Debian 12's files, release-aware
from support.domains import domain_xml, rom_os
from support.testdriver import tracked_connection

from varsd.config import Config
from varsd.daemon.service import Backoff, Service

TEST_URI = "test:///default"


def wait_until(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def bios_xml(name: str, image: str = UNIFIED_2M_IMAGE) -> str:
    return domain_xml(name, rom_os(image))


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    with tracked_connection(TEST_URI) as c:
        yield c


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[tuple[Service, threading.Thread]] = []
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name

    def start(**overrides: object) -> Service:
        cfg = Config(
            uri=TEST_URI,
            nvram_dir=str(tmp_path / "nvram"),
            state_dir=str(tmp_path / "state"),
            qemu_user=user,
            qemu_group=group,
            reconcile_interval=3600,
            **overrides,  # type: ignore[arg-type]
        )
        os.makedirs(cfg.nvram_dir, exist_ok=True)
        svc = Service(cfg, backoff=Backoff(0.05, 2.0, 0.2), notify=lambda *lines: True)
        t = threading.Thread(target=svc.run, name="varsd-under-test", daemon=True)
        t.start()
        assert svc.ready.wait(15), "service never became ready"
        started.append((svc, t))
        return svc

    yield start
    for svc, t in started:
        svc.request_stop()
        t.join(15)
        assert not t.is_alive(), "service did not stop within 15 s"
