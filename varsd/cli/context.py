"""What every varsctl subcommand needs: config, libvirt, journal, catalog; opened lazily."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.adapters.plan_memo_store import PlanMemoStore
from varsd.cli.output import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE, error
from varsd.config import Config, qemu_owner
from varsd.engine.reconciler import Reconciler
from varsd.firmware.catalog import load_configured
from varsd.model.domain import DomainRef

__all__ = ["EXIT_ATTENTION", "EXIT_OK", "EXIT_USAGE", "Context"]

SQLITE_MAX_INT = 2**63 - 1  # journal ids are SQLite integers
MAX_LIMIT = 1_000_000


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`, or a usage error (exit 2)
    instead of an OverflowError deep in SQLite."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range ({low} to {high})")
        return value

    parse.__name__ = "number"
    return parse


def add_domains_or_all(p: argparse.ArgumentParser, *, domains_help: str, all_help: str) -> None:
    """`DOMAIN...` or `--all`, exactly one, declared to argparse (usage error, exit 2).

    `default=[]` is what makes it work: an empty `nargs='*'` positional then takes its
    default object, which argparse does not count as given (with `None` it would)."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("domains", nargs="*", default=[], metavar="DOMAIN", help=domains_help)
    which.add_argument("--all", action="store_true", help=all_help)


class Context:
    """What every subcommand needs, opened lazily and closed once."""

    def __init__(self, cfg: Config, *, read_only: bool = False) -> None:
        self.cfg = cfg
        self.read_only = read_only  # the command only reads: the journal is opened read-only
        self._hv: Hypervisor | None = None
        self._journal: Journal | None = None
        self._memo_store: PlanMemoStore | None = None

    @property
    def hv(self) -> Hypervisor:
        if self._hv is None:
            self._hv = Hypervisor(self.cfg.uri).open()
        return self._hv

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = Journal(self.cfg.journal_path, read_only=self.read_only, readers=self.cfg.admin_group)
        return self._journal

    @property
    def memo_store(self) -> PlanMemoStore:
        """The persisted plan memo (varsd.engine.plan_memo); read-only with the journal."""
        if self._memo_store is None:
            self._memo_store = PlanMemoStore(self.cfg.journal_path, read_only=self.read_only)
        return self._memo_store

    def reconciler(self) -> Reconciler:
        catalog = load_configured(self.cfg)
        return Reconciler(self.cfg, self.hv, catalog, self.journal, qemu_owner(self.cfg), actor="varsctl",
                          on_wait=error,  # "varsctl: waiting for pid N (what it does, for S s)"
                          memo_store=self.memo_store)

    def secureboot(self):
        """The Secure Boot audit/rollout engine over this context's libvirt, catalog and journal."""
        return self.secureboot_for(self.reconciler())

    def secureboot_for(self, rec: Reconciler):
        from varsd.engine.secureboot import for_reconciler

        return for_reconciler(rec)

    def refs(self, names: Sequence[str]) -> list[DomainRef]:
        return [self.hv.lookup(n) for n in names] if names else self.hv.list_domains()

    def close(self) -> None:
        if self._hv is not None:
            self._hv.close()
        if self._journal is not None:
            self._journal.close()
        if self._memo_store is not None:
            self._memo_store.close()
