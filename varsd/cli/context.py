"""What every varsctl subcommand needs: config, libvirt, journal, catalog; opened lazily."""

from __future__ import annotations

from collections.abc import Sequence

from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.cli.output import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE
from varsd.config import Config, qemu_owner
from varsd.engine.reconciler import Reconciler
from varsd.firmware.catalog import load_configured
from varsd.model.domain import DomainRef

__all__ = ["EXIT_ATTENTION", "EXIT_OK", "EXIT_USAGE", "Context"]


class Context:
    """What every subcommand needs, opened lazily and closed once."""

    def __init__(self, cfg: Config, *, read_only: bool = False) -> None:
        self.cfg = cfg
        self.read_only = read_only  # the command only reads: the journal is opened read-only
        self._hv: Hypervisor | None = None
        self._journal: Journal | None = None

    @property
    def hv(self) -> Hypervisor:
        if self._hv is None:
            self._hv = Hypervisor(self.cfg.uri).open()
        return self._hv

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = Journal(self.cfg.journal_path, read_only=self.read_only)
        return self._journal

    def reconciler(self) -> Reconciler:
        catalog = load_configured(self.cfg)
        return Reconciler(self.cfg, self.hv, catalog, self.journal, qemu_owner(self.cfg), actor="varsctl")

    def refs(self, names: Sequence[str]) -> list[DomainRef]:
        return [self.hv.lookup(n) for n in names] if names else self.hv.list_domains()

    def close(self) -> None:
        if self._hv is not None:
            self._hv.close()
        if self._journal is not None:
            self._journal.close()
