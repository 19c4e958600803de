"""Guests inside a bed: defined with the bed's own virsh, observed from the host.

The domain XML comes from tests/support/domains.py (one definition of a TCG test
guest); serial logs go to the bed's shared directory so the host can read them.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import testbed
from integration.guests import wait_for_serial
from support.domains import guest_xml

# the Secure Boot builds have no EFI shell: with no disk their boot manager says so
BOOT_LINE = r"BdsDxe: ((loading|starting|failed to load) Boot|No bootable option)"
NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"


@dataclass(frozen=True)
class BedGuest:
    name: str
    serial_inside: str
    serial_host: Path

    @property
    def varstore(self) -> str:
        return f"{NVRAM_DIR}/{self.name}_VARS.fd"


def define(bed: testbed.Bed, label: str, os_inner: str, *, os_firmware: str | None = None, **kwargs) -> BedGuest:
    """Define a `varsd-test-*` guest with virsh inside the bed (as an admin would);
    `os_firmware='efi'` asks libvirt to autoselect the firmware."""
    name = f"varsd-test-{secrets.token_hex(3)}-{label}"
    serial = f"{testbed.SHARE}/{name}.serial.log"
    xml = guest_xml(name, os_inner, serial_log=serial, os_firmware=os_firmware, **kwargs)
    (bed.share / f"{name}.xml").write_text(xml)
    bed.run("virsh", "-q", "define", f"{testbed.SHARE}/{name}.xml")
    return BedGuest(name, serial, bed.share / f"{name}.serial.log")


def remove(bed: testbed.Bed, guest: BedGuest) -> None:
    bed.run("virsh", "-q", "destroy", guest.name, check=False)
    bed.run("virsh", "-q", "undefine", "--nvram", guest.name, check=False)


def inactive_xml(bed: testbed.Bed, guest: BedGuest) -> str:
    return bed.run("virsh", "dumpxml", "--inactive", guest.name).stdout


def wait_booted(guest: BedGuest, timeout: float = 120) -> str:
    return wait_for_serial(str(guest.serial_host), BOOT_LINE, timeout=timeout)


def varsctl(bed: testbed.Bed, *args: str, program: str = "varsctl", check: bool = True):
    """varsctl inside the bed: the installed one, or `program` (e.g. from the bound source)."""
    r = bed.run(*program.split(), *args, check=False)
    if check:
        assert r.returncode in (0, 1), f"varsctl {' '.join(args)} exited {r.returncode}:\n{r.stdout}{r.stderr}"
    return r


def status(bed: testbed.Bed, name: str, program: str = "varsctl") -> dict:
    r = varsctl(bed, "status", "--json", name, program=program)
    (entry,) = json.loads(r.stdout)["domains"]
    return entry


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll `predicate` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not after {timeout:.0f} s (last: {last!r})")
