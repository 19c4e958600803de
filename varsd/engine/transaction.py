"""The one write path for a domain's XML: every change of a persistent definition goes here.

Reconcile, undo, opt-out/opt-in, pin/unpin, upgrade approve and migrate all change a
domain's XML the same way, in one transaction (`Writer.transaction(ref)`):

1. the domain's lock (`host_lock` on `<state_dir>/locks/<uuid>.lock`), so varsd and
   varsctl never act on one domain at once; the holder records what it does for waiters
   (`varsd.engine.lock`), and first settles journal entries an actor killed mid-define
   left `pending`, against the definition libvirt actually has (issue 12);
2. a fresh read of the persistent definition (`Transaction.xml`, read on first use),
   which the caller plans from;
3. per write (`Transaction.write`): refusal (`StaleDefinition`) when the definition is
   no longer what the change was planned from (the lock keeps varsd and varsctl apart,
   but not `virsh edit`); the checks every write needs: an archived loader is verified
   before a definition points at it (its content must still have the digest its name
   promises: `undo` may restore an XML whose archived image was pruned or corrupted
   since); `format='raw'` made explicit on loader and nvram where the connected libvirt
   has the attributes (9.2+; `templateFormat` 10.10+), since varsd's code and varstores are raw;
4. the journal entry with the previous XML, *before* libvirt sees the change;
5. the define (a running domain changes only at its next cold boot), and the journal
   entry settled as applied (with libvirt's normalised copy) or failed. A change of
   nothing but varsd's own metadata element (an upgrade's rebind) is written as that
   element alone (`virDomainSetMetadata` on the persistent definition), not a define.

`Writer.write_batch` is the same transaction for many domains at once (an upgrade that
rebinds every domain): each domain's lock (one order for every actor; a domain whose lock
is held is left to the caller), pending entries settled, one fresh read each and the
stale refusal, the same checks, then ONE journal transaction holding every intent (one
fsync for the batch, before libvirt sees any change), the writes (a few in parallel:
libvirtd saves each definition to disk), and one transaction settling them all. A crash
anywhere leaves each entry `pending` or settled, as for one domain: the next holder of its
lock settles it against what libvirt has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.clock import Clock
from varsd.domain.xml import (
    VARSD_NS,
    VARSD_PREFIX,
    firmware_formats,
    metadata_only_change,
    parse_domain,
    with_raw_formats,
)
from varsd.engine.lock import host_lock
from varsd.errors import HypervisorError, VarsdError
from varsd.firmware.archive import Archive, ArchiveError
from varsd.model.archive import is_archive_path, sha_of_archive_path
from varsd.model.domain import DomainFirmware, DomainRef
from varsd.model.journal import ChangeKind

log = logging.getLogger("varsd.reconcile")


def settle_outcome(old_xml: str, new_xml: str, current: str) -> tuple[str, str | None]:
    """How an interrupted define ended, judged by the definition libvirt has now (pure):
    the new firmware is there -> applied (with libvirt's copy, for undo); the old one is
    there -> not applied; else someone changed it since (undo then rightly asks)."""
    now, new, old = parse_domain(current), parse_domain(new_xml), parse_domain(old_xml)
    if current == new_xml or (now == new and new != old):
        return "applied (settled after an interrupted define)", current
    if current == old_xml or now == old:
        return "failed: interrupted before libvirt stored it (settled)", None
    return "interrupted: the definition changed since (settled)", None


class StaleDefinition(VarsdError):
    """The domain was redefined by someone else between our read and our write."""


WRITERS = 4  # concurrent writes of a batch: libvirtd saves (and fsyncs) each definition (1.0 -> 0.9 ms
# per domain idle, 8: 0.65 ms; under load no difference measured, and 4 leave libvirtd room for others)


@dataclass(frozen=True)
class PlannedWrite:
    """One domain's change for `Writer.write_batch`, planned (lock-free) from `planned_from`."""

    ref: DomainRef
    planned_from: str
    new_xml: str
    reason: str
    kind: ChangeKind = ChangeKind.EDIT
    parsed: DomainFirmware | None = None  # `planned_from` parsed, when the planner has it


@dataclass
class BatchResult:
    """What `write_batch` did with each domain (by uuid); every domain is in exactly one."""

    stored: dict[str, str] = field(default_factory=dict)  # written: the definition as libvirt stored it
    failed: dict[str, VarsdError] = field(default_factory=dict)  # not written (journaled as failed if it got that far)
    stale: list[DomainRef] = field(default_factory=list)  # changed since planned: refused, nothing journaled
    busy: list[DomainRef] = field(default_factory=list)  # its lock is held (or unusable): not tried


class Writer:
    """Writes domain definitions for one actor (`varsd` or `varsctl`)."""

    def __init__(
        self, hv: Hypervisor, journal: Journal, archive: Archive, lock_path: Callable[[str], str], *,
        actor: str, clock: Clock, on_corrupt_archive: Callable[[], None] = lambda: None,
        lock_wait: float | None = None, on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.hv = hv
        self.journal = journal
        self.archive = archive
        self.lock_path = lock_path
        self.actor = actor
        self.clock = clock
        self.on_corrupt_archive = on_corrupt_archive
        self.lock_wait = lock_wait  # None: wait while the holder progresses (varsctl); the daemon bounds it
        self.on_wait = on_wait

    @contextmanager
    def transaction(self, ref: DomainRef, doing: str = "reconciling") -> Iterator[Transaction]:
        """The domain's lock and a fresh read of its persistent definition (module steps 1-2);
        `doing` is what waiters are told (e.g. "varsctl: pinning domain 'web'")."""
        with host_lock(self.lock_path(ref.uuid), doing=f"{self.actor}: {doing} domain '{ref.name}'",
                       max_wait=self.lock_wait, on_wait=self.on_wait):
            self.settle_pending(ref)
            yield Transaction(self, ref)

    def settle_pending(self, ref: DomainRef) -> None:
        """Settle entries an interrupted define left `pending` (SIGTERM to varsctl, SIGKILL to
        the daemon). Only under the domain's lock: whoever holds it is the only actor."""
        pending = self.journal.pending(ref.uuid)
        if not pending:
            return
        current = self.hv.persistent_xml(ref.uuid)
        for change in pending:
            outcome, stored = settle_outcome(change.old_xml, change.new_xml, current)
            self.journal.settle(change.id, outcome, stored_xml=stored)
            log.warning("domain '%s': journal #%d was interrupted mid-define; settled as %s", ref.name,
                        change.id, outcome)

    def verify_archived_loader(self, ref: DomainRef, xml: str) -> None:
        """Verify-before-use: a definition about to boot an archived image gets it only if
        the file's content still has the digest its name promises (ArchiveError if not)."""
        self.verify_loader(ref, parse_domain(xml).loader_path)

    def verify_loader(self, ref: DomainRef, loader: str | None) -> None:
        """`verify_archived_loader` of a definition whose loader is `loader`."""
        if not is_archive_path(self.archive.directory, loader):
            return
        entry = self.archive.verify(sha_of_archive_path(loader or "") or "")
        if not entry.ok:
            self.on_corrupt_archive()
            raise ArchiveError(f"domain '{ref.name}': not pointed at {loader}: {entry.problem}")

    def write(self, ref: DomainRef, planned_from: str, new_xml: str, reason: str,
              kind: ChangeKind = ChangeKind.EDIT, as_given: bool = False) -> str:
        """Module steps 3-5 for a change planned from `planned_from`; the caller holds the
        domain's lock (inside `transaction`). Returns the definition as libvirt stored it.

        `as_given`: `new_xml` is an admin's definition put back (undo), written as it was:
        no format='raw' added. A metadata-only change (opt-out/in, a rebind) gets none either:
        varsd did not write that loader, and it stays a virDomainSetMetadata."""
        self.verify_archived_loader(ref, new_xml)
        fragment = metadata_only_change(planned_from, new_xml)
        if self.hv.persistent_xml(ref.uuid) != planned_from:
            raise StaleDefinition(f"domain '{ref.name}' was redefined meanwhile; will look again")
        new_xml = self._formats(new_xml, fragment, as_given)
        change = self.journal.record(**self._intent(ref, planned_from, new_xml, reason, kind))
        try:
            self._apply(ref, new_xml, fragment)
        except VarsdError as exc:
            self.journal.settle(change, f"failed: {exc}")
            raise
        stored = self._read_back(ref)
        self.journal.settle(change, "applied", stored_xml=stored)
        log.info("domain '%s': %s (journal #%d)", ref.name, reason, change)
        return stored if stored is not None else new_xml

    def write_batch(self, writes: Sequence[PlannedWrite], doing: str = "reconciling") -> BatchResult:
        """Module steps 1-5 for many domains at once (module doc); never waits for a lock
        (a busy domain is returned as such). Raises only what no single domain caused (the
        journal could not take the intents: then nothing was written)."""
        result = BatchResult()
        with ExitStack() as locks:
            held: list[PlannedWrite] = []
            for w in sorted(writes, key=lambda w: w.ref.uuid):  # one order: batches never wait on each other
                try:
                    locks.enter_context(host_lock(self.lock_path(w.ref.uuid), max_wait=0.0,
                                                  doing=f"{self.actor}: {doing} domain '{w.ref.name}'"))
                except VarsdError:  # LockBusy, or a lock file that cannot be used: the one-domain way
                    result.busy.append(w.ref)  # waits for it, or says why
                    continue
                held.append(w)
            ready: list[tuple[PlannedWrite, str, str | None]] = []
            for w in held:
                try:
                    self.settle_pending(w.ref)
                    fragment = metadata_only_change(w.planned_from, w.new_xml)
                    if fragment is not None and w.parsed is not None:
                        self.verify_loader(w.ref, w.parsed.loader_path)  # the loader it has, parsed already
                    else:
                        self.verify_archived_loader(w.ref, w.new_xml)
                    if self.hv.persistent_xml(w.ref.uuid) != w.planned_from:
                        result.stale.append(w.ref)
                        continue
                    ready.append((w, self._formats(w.new_xml, fragment, False), fragment))
                except VarsdError as exc:
                    result.failed[w.ref.uuid] = exc
            if not ready:
                return result
            ids = self.journal.record_many([self._intent(w.ref, w.planned_from, new, w.reason, w.kind)
                                            for w, new, _ in ready])

            def write(item: tuple[PlannedWrite, str, str | None]) -> tuple[str | None, VarsdError | None]:
                w, new_xml, fragment = item
                try:
                    self._apply(w.ref, new_xml, fragment)
                except VarsdError as exc:
                    return None, exc
                return self._read_back(w.ref), None

            with ThreadPoolExecutor(max_workers=min(WRITERS, len(ready)), thread_name_prefix="varsd-write") as pool:
                done = list(pool.map(write, ready))
            settles: list[tuple[int, str, str | None]] = []
            for (w, new_xml, _), change, (stored, exc) in zip(ready, ids, done, strict=True):
                if exc is not None:
                    settles.append((change, f"failed: {exc}", None))
                    result.failed[w.ref.uuid] = exc
                else:
                    settles.append((change, "applied", stored))
                    result.stored[w.ref.uuid] = stored if stored is not None else new_xml
                    log.info("domain '%s': %s (journal #%d)", w.ref.name, w.reason, change)
            self.journal.settle_many(settles)
        return result

    def _formats(self, new_xml: str, fragment: str | None, as_given: bool) -> str:
        """Explicit format='raw' (and templateFormat) where the connected libvirt has them, only
        on firmware XML varsd itself wrote: not an admin's definition put back (undo), and not a
        change of only varsd's metadata (that loader is not varsd's to rewrite)."""
        if as_given or fragment is not None:
            return new_xml
        return with_raw_formats(new_xml, firmware_formats(self.hv.lib_version()))

    def _intent(self, ref: DomainRef, old_xml: str, new_xml: str, reason: str, kind: ChangeKind) -> dict:
        return dict(at=self.clock.now(), uuid=ref.uuid, name=ref.name, actor=self.actor, reason=reason,
                    old_xml=old_xml, new_xml=new_xml, kind=kind)

    def _apply(self, ref: DomainRef, new_xml: str, fragment: str | None) -> None:
        """The define; or, when only varsd's record changes (a rebind after an upgrade), just
        that element of the persistent definition (virDomainSetMetadata, AFFECT_CONFIG): half
        the cost of a define for libvirtd, the same journal entry."""
        if fragment is not None:
            self.hv.set_metadata(ref.uuid, fragment, key=VARSD_PREFIX, ns_uri=VARSD_NS, live=False, config=True)
        else:
            self.hv.define(new_xml)

    def _read_back(self, ref: DomainRef) -> str | None:
        try:
            return self.hv.persistent_xml(ref.uuid)
        except HypervisorError:
            return None  # the change is made; only the normalised copy is missing


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
              kind: ChangeKind = ChangeKind.EDIT, as_given: bool = False) -> None:
        """Journal (as `kind`) and define `new_xml`, planned from `planned_from` (default: `xml`)."""
        self._xml = self.writer.write(self.ref, self.xml if planned_from is None else planned_from, new_xml, reason,
                                      kind, as_given)
