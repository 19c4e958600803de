"""Tier 2, the shell on libvirt's in-process `test:///default` driver: real files, real
varstores, real locks and journal; no libvirtd, no QEMU (that is tests/integration)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from varsd.adapters.journal import Journal


@pytest.fixture
def journal(cfg) -> Iterator[Journal]:
    """The state database of the test module's `cfg`."""
    j = Journal(cfg.journal_path)
    yield j
    j.close()
