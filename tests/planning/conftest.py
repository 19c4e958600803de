"""Tier 1, the pure core as tables: real-world domain XML in, plans and rewritten XML out.

Contract of this tier:
- No libvirt daemon and no QEMU process. The planner gets the facts the engine would
  read: firmware files are Debian 12's real OVMF images under /usr/share, and every
  other path a case's XML names lives under a per-test fake root (`HostFS`), so the
  golden XML keeps the paths real hosts have (/var/lib/libvirt/...).
- Each case is a directory `cases/<name>/` with `input.xml` (as `virsh dumpxml` or the
  tool in question writes it) and, when the plan rewrites the XML, `expected.xml`.
  `VARSD_REGEN=1 pytest tests/planning` rewrites the expected files (and deletes those
  of cases that no longer rewrite); review the diff like code.
- libvirt itself is asked only whether XML is acceptable (`test:///default` with
  schema validation, and the QEMU driver embedded in the test process).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from aavmf_files import x86_only

# Re-exported for the planning tests. tests/ is on the import path (see ovmf_files).
from ovmf_files import CODE_2M, CODE_4M, CODE_4M_SECBOOT, EFI_GLOBAL, VARS_2M, VARS_4M, VARS_4M_MS  # noqa: F401
from ovmf_files import UNIFIED as UNIFIED_2M  # noqa: F401

from varsd.adapters import virtfw
from varsd.clock import parse_stamp
from varsd.config import ExtraFirmware
from varsd.engine.inspect import FileInspector
from varsd.firmware.catalog import load_catalog
from varsd.model.domain import FileFacts
from varsd.model.firmware import Catalog

CASES_DIR = Path(__file__).parent / "cases"
REGEN = os.environ.get("VARSD_REGEN") == "1"
NOW = parse_stamp("2025-01-15T10:00:00Z")  # the clock's aware datetime; XML holds its stamp
NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"

FW_DIR = "/usr/share/qemu/firmware"
VENDOR_GUID = "6f2a9c1e-1d3b-4c8e-9a47-2b5d8e0f1c3a"  # a test variable under a vendor GUID

@dataclass(frozen=True)
class Recipe:
    """A file a case puts on the fake host; `guest_variables` when it holds a guest's variables."""

    make: Callable[[], bytes]
    guest_variables: bool = False

    def __call__(self) -> bytes:
        return self.make()


def read(path: str) -> bytes:
    return Path(path).read_bytes()


def copy_of(path: str) -> Recipe:
    return Recipe(lambda: read(path))


def cat(*paths: str) -> Recipe:
    """How a unified image is made: VARS then CODE, byte for byte."""
    return Recipe(lambda: b"".join(read(p) for p in paths))


def garbage(size: int = 540672) -> Recipe:
    return Recipe(lambda: bytes((i * 7 + 3) % 251 for i in range(size)))


def used_varstore(template: str, *, tail: str | None = None) -> Recipe:
    """A varstore a guest has booted with: BootOrder plus a vendor variable set.

    With `tail`, the result is a unified image (used varstore + that code image).
    """

    def make() -> bytes:
        data = virtfw.with_variables(
            template,
            [
                virtfw.EfiVariable("BootOrder", EFI_GLOBAL, virtfw.ATTR_NV_BS_RT, b"\x01\x00\x00\x00"),
                virtfw.EfiVariable("VarsdTest", VENDOR_GUID, virtfw.ATTR_NV_BS_RT, b"kept"),
            ],
            length=virtfw.read_layout(template).size,
        )
        return data + (read(tail) if tail else b"")

    return Recipe(make, guest_variables=True)


class HostFS:
    """The host as a case sees it: /usr/share is the real one, every other path is under `root`."""

    SYSTEM = ("/usr/share/",)

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inspector = FileInspector()

    def local(self, path: str) -> str:
        if path.startswith(self.SYSTEM):
            return path
        return str(self.root) + os.path.normpath(path)

    def visible(self, local: str) -> str:
        return local[len(str(self.root)) :] if local.startswith(str(self.root) + "/") else local

    def put(self, path: str, recipe: Recipe) -> None:
        target = Path(self.local(path))
        assert not path.startswith(self.SYSTEM), f"{path}: cases never write into /usr/share"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(recipe())

    def exists(self, path: str) -> bool:
        return os.path.exists(self.local(path))

    def inspect(self, path: str, *, digest: bool) -> FileFacts:
        """What the engine's FileInspector reports, with paths as the domain XML names them."""
        facts = self.inspector.inspect(self.local(path), digest=digest)
        realpath = self.visible(facts.realpath) if facts.realpath else None
        return replace(facts, path=path, realpath=realpath)

    def create_varstore(self, path: str, source: str, length: int | None) -> None:
        """What the engine's provisioning does, minus ownership: the first `length` bytes of `source`."""
        data = read(self.local(source))
        target = Path(self.local(path))
        assert not target.exists(), f"plan would overwrite {path}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data if length is None else data[:length])


@pytest.fixture(scope="session")
def catalogs() -> dict[str, Catalog]:
    """'4m': Debian 12's descriptors only. '2m': plus the 2 MiB pair as an extra_firmware entry."""
    four = x86_only(load_catalog([FW_DIR]))
    two = x86_only(load_catalog([FW_DIR], [ExtraFirmware(CODE_2M, VARS_2M)]))
    assert len(four.builds) == 3 and not four.problems, four
    assert len(two.builds) == 4 and not two.problems, two
    return {"4m": four, "2m": two}


@pytest.fixture
def hostfs(tmp_path: Path) -> HostFS:
    root = tmp_path / "host"
    root.mkdir()
    return HostFS(root)


def write_expected(path: Path, text: str | None) -> None:
    """Regenerate (or remove) a golden file."""
    if text is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(text)



@pytest.fixture(scope="session")
def test_driver():
    """libvirt's test:///default driver (schema-validated defines)."""
    import libvirt

    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def qemu_driver(tmp_path_factory):
    """libvirt's real QEMU driver, embedded in this process with all state in a tmp dir
    (one per process: libvirt allows a single embedded driver root)."""
    import libvirt

    from varsd.adapters.libvirt_events import start_event_loop

    start_event_loop()
    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open(f"qemu:///embed?root={tmp_path_factory.mktemp('qemu-embed')}")
    yield conn
    conn.close()
