"""The one write path for a domain's XML: every change of a persistent definition goes here.

Reconcile, undo, opt-out/opt-in, pin/unpin, upgrade approve and migrate all change a
domain's XML the same way, in one transaction (`Writer.transaction(ref)`):

1. the domain's lock (`host_lock` on `<state_dir>/locks/<uuid>.lock`), so varsd and
   varsctl never act on one domain at once;
2. a fresh read of the persistent definition (`Transaction.xml`, read on first use),
   which the caller plans from;
3. per write (`Transaction.write`): refusal (`StaleDefinition`) when the definition is
   no longer what the change was planned from (the lock keeps varsd and varsctl apart,
   but not `virsh edit`); the checks every write needs: an archived loader is verified
   before a definition points at it (its content must still have the digest its name
   promises: `undo` may restore an XML whose archived image was pruned or corrupted
   since);
4. the journal entry with the previous XML, *before* libvirt sees the change;
5. the define (a running domain changes only at its next cold boot), and the journal
   entry settled as applied (with libvirt's normalised copy) or failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.clock import Clock, stamp
from varsd.domain.xml import parse_domain
from varsd.engine.lock import host_lock
from varsd.errors import HypervisorError, VarsdError
from varsd.firmware.archive import Archive, ArchiveError
from varsd.model.archive import is_archive_path, sha_of_archive_path
from varsd.model.domain import DomainRef
from varsd.model.journal import ChangeKind

log = logging.getLogger("varsd.reconcile")


class StaleDefinition(VarsdError):
    """The domain was redefined by someone else between our read and our write."""


class Writer:
    """Writes domain definitions for one actor (`varsd` or `varsctl`)."""

    def __init__(
        self, hv: Hypervisor, journal: Journal, archive: Archive, lock_path: Callable[[str], str], *,
        actor: str, clock: Clock, on_corrupt_archive: Callable[[], None] = lambda: None,
    ) -> None:
        self.hv = hv
        self.journal = journal
        self.archive = archive
        self.lock_path = lock_path
        self.actor = actor
        self.clock = clock
        self.on_corrupt_archive = on_corrupt_archive

    @contextmanager
    def transaction(self, ref: DomainRef) -> Iterator[Transaction]:
        """The domain's lock and a fresh read of its persistent definition (module steps 1-2)."""
        with host_lock(self.lock_path(ref.uuid)):
            yield Transaction(self, ref)

    def verify_archived_loader(self, ref: DomainRef, xml: str) -> None:
        """Verify-before-use: a definition about to boot an archived image gets it only if
        the file's content still has the digest its name promises (ArchiveError if not)."""
        loader = parse_domain(xml).loader_path
        if not is_archive_path(self.archive.directory, loader):
            return
        entry = self.archive.verify(sha_of_archive_path(loader or "") or "")
        if not entry.ok:
            self.on_corrupt_archive()
            raise ArchiveError(f"domain '{ref.name}': not pointed at {loader}: {entry.problem}")

    def write(self, ref: DomainRef, planned_from: str, new_xml: str, reason: str,
              kind: ChangeKind = ChangeKind.EDIT) -> str:
        """Module steps 3-5 for a change planned from `planned_from`; the caller holds the
        domain's lock (inside `transaction`). Returns the definition as libvirt stored it."""
        self.verify_archived_loader(ref, new_xml)
        if self.hv.persistent_xml(ref.uuid) != planned_from:
            raise StaleDefinition(f"domain '{ref.name}' was redefined meanwhile; will look again")
        change = self.journal.record(
            at=stamp(self.clock.now()), uuid=ref.uuid, name=ref.name, actor=self.actor, reason=reason,
            old_xml=planned_from, new_xml=new_xml, kind=kind,
        )
        try:
            self.hv.define(new_xml)
        except VarsdError as exc:
            self.journal.settle(change, f"failed: {exc}")
            raise
        try:
            stored = self.hv.persistent_xml(ref.uuid)
        except HypervisorError:
            stored = None  # the change is made; only the normalised copy is missing
        self.journal.settle(change, "applied", stored_xml=stored)
        log.info("domain '%s': %s (journal #%d)", ref.name, reason, change)
        return stored if stored is not None else new_xml


class Transaction:
    """One domain's definition under its lock: `xml` is read fresh on first use (a caller
    that plans with its own fresh read passes it as `planned_from`) and follows each write."""

    def __init__(self, writer: Writer, ref: DomainRef) -> None:
        self.writer = writer
        self.ref = ref
        self._xml: str | None = None

    @property
    def xml(self) -> str:
        if self._xml is None:
            self._xml = self.writer.hv.persistent_xml(self.ref.uuid)
        return self._xml

    def write(self, new_xml: str, reason: str, *, planned_from: str | None = None,
              kind: ChangeKind = ChangeKind.EDIT) -> None:
        """Journal (as `kind`) and define `new_xml`, planned from `planned_from` (default: `xml`)."""
        self._xml = self.writer.write(self.ref, self.xml if planned_from is None else planned_from, new_xml, reason,
                                      kind)
