"""`varsctl status`: the truth about every domain, without replanning what is known.

A fresh process has no memo of its own, so it reads the persisted one
(`varsd.engine.plan_memo`, written by the daemon, `varsctl reconcile` and `firmware
sync`). Per domain: the persistent XML (and the live XML when it runs) is fetched, and
its memo row is reused only if the key computed now matches; everything else is planned
as `varsctl reconcile --dry-run` would (`Reconciler.reconcile(apply=False)`).

What a row cannot know is checked live here:
- the run state shown is the listing's; the live XML (pending cold boot, boot record) is
  in the key;
- sharing: every domain's varstore is recorded in the varstore index (from its row, or
  parsed from the XML just fetched) before anything is judged, and a reused row whose
  file another domain also names is planned again (sharing decides its status);
- failures: only plans with actions have a last failed attempt to show, and those are
  never memoised;
- backups: their own index; a row's varstore digest only saves a hash when the file's
  stat key is still the one it was taken at.
With no database, a read-only one, or no rows (no daemon ever ran), every domain is
planned: slower, never less true.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from varsd.adapters.plan_memo_store import PlanMemoStore, StoredMemo
from varsd.domain.xml import parse_domain
from varsd.engine import plan_memo
from varsd.engine.backups import Target, target_of
from varsd.engine.fetch import fetched
from varsd.engine.reconciler import Outcome, Reconciler
from varsd.errors import VarsdError
from varsd.model.backup import SeenVarstore
from varsd.model.domain import DomainRef

log = logging.getLogger("varsd.status")


@dataclass(frozen=True)
class Look:
    """One domain's status, its varstore for the backup report, and its digest if known."""

    outcome: Outcome
    target: Target | None = None
    varstore: SeenVarstore | None = None


def look(rec: Reconciler, refs: list[DomainRef], store: PlanMemoStore | None, *, complete: bool) -> list[Look]:
    """Every domain of `refs`; `complete`: `refs` are all the domains there are (so the
    varstore index is filled from what is fetched here, not read again)."""
    try:
        rows: dict[str, StoredMemo] = store.all() if store is not None else {}
    except VarsdError as exc:
        log.debug("plan memo: %s", exc)
        rows = {}
    context = plan_memo.context_digest(rec.catalog, rec.upgrade_context(), rec.cfg.nvram_dir)
    if not complete:
        rec.varstores.fill()
    looks: list[Look | None] = [None] * len(refs)
    plan: list[tuple[int, tuple[str, str | None] | None, str | None]] = []  # (index, XML seen, nvram path)
    reused: list[tuple[int, plan_memo.Row]] = []
    for i, ref, xmls in fetched(rec.hv, refs):
        if xmls is None:
            plan.append((i, None, None))  # the reconciler reports it, naming the domain once
            continue
        xml, live_xml = xmls
        row = _reuse(rec, ref, rows.get(ref.uuid), context, xml, live_xml)
        if row is not None:
            reused.append((i, row))
            continue
        try:
            fw = parse_domain(xml)
        except VarsdError:
            plan.append((i, (xml, live_xml), None))
            continue
        rec.varstores.register(fw, running=live_xml is not None, persistent=ref.persistent)
        plan.append((i, (xml, live_xml), fw.nvram_path))
    if complete:
        rec.varstores.mark_filled()
    for i, row in reused:
        ref = refs[i]
        if rec.varstores.others(ref.uuid):
            plan.append((i, None, row.nvram_path))  # shared with another domain now: sharing decides
            continue
        target = target_of(ref, row.nvram_path)
        seen = SeenVarstore(ref.uuid, row.nvram_path, row.varstore[0], row.varstore[1], rec.clock.now()) \
            if row.varstore is not None and row.nvram_path else None
        looks[i] = Look(Outcome(ref, row.plan, boot_unrecorded=row.boot_unrecorded), target, seen)
    for i, seen_xml, nvram_path in sorted(plan, key=lambda p: p[0]):
        ref = refs[i]
        looks[i] = Look(rec.reconcile(ref, apply=False, seen=seen_xml), target_of(ref, nvram_path))
    return [lk for lk in looks if lk is not None]


def _reuse(rec: Reconciler, ref: DomainRef, stored: StoredMemo | None, context: str, xml: str,
           live_xml: str | None) -> plan_memo.Row | None:
    """The row, when its key matches the domain as it is now; its varstore recorded in the
    index from the row (no parse) with what is live: running, link, inode."""
    if stored is None:
        return None
    files = plan_memo.lookup(stored, ref, context, xml, live_xml, excluded=rec.cfg.is_excluded(ref.name, ref.uuid))
    if files is None:
        return None
    row = plan_memo.decode(ref.uuid, ref.name, stored.row, rec.catalog, running=live_xml is not None, files=files)
    if row is None:
        return None
    user, path = row.user, row.nvram_path
    if user is not None and path and path in files:
        key = files[path]
        inode = plan_memo.identity(key)
        realpath = row.realpath if inode is not None and row.realpath else os.path.realpath(path)
        rec.varstores.put_known(user, realpath, inode)
    elif path:
        return None  # a row without its varstore's key: plan it
    else:
        rec.varstores.forget(ref.uuid)
    return row
