"""`varsctl backup create|list|restore|diff|prune` and `varsctl reset`.

Thin: arguments and printing; `varsd.engine.backups` and `varsd.engine.restore` do
the work. Every subcommand takes `--json`.

Exit codes: 0 done, 1 refused or failed (or, for create, a domain could not be
backed up), 2 usage (unknown domain or backup id). Refusals are VarsdErrors, which
varsctl's main prints and turns into 1.
"""

from __future__ import annotations

import argparse

from varsd.adapters.libvirt_api import DomainRef, NoSuchDomain
from varsd.cli.context import Context, add_domains_or_all
from varsd.cli.output import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE, add_json, emit_json, error
from varsd.clock import SYSTEM, stamp
from varsd.config import qemu_owner
from varsd.engine.backups import BackupError, BackupStore, domain_targets, open_store
from varsd.engine.offline_write import VarstoreWriter, WriteFailed, WriteRefused
from varsd.engine.restore import Restorer
from varsd.firmware.catalog import load_configured
from varsd.model.backup import BackupReason, BackupRunning
from varsd.planning.retention import plan_retention
from varsd.planning.varstore_diff import VariableDiff


def _print(args: argparse.Namespace, data: dict, text: str) -> None:
    if args.json:
        emit_json(data)
    else:
        print(text)


def _refused(args: argparse.Namespace, exc: Exception, code: int = EXIT_ATTENTION) -> int:
    """A refusal: the reason on stderr, and with --json `{"result": null, "error": ...}`."""
    error(exc)
    if args.json:
        emit_json({"result": None, "error": str(exc)})
    return code


def _store(ctx: Context) -> BackupStore:
    return open_store(ctx.cfg, read_only=ctx.read_only)


def _restorer(ctx: Context) -> Restorer:
    return Restorer(ctx.reconciler(), VarstoreWriter(ctx.cfg, ctx.hv, _store(ctx), qemu_owner(ctx.cfg)))


def _diff_text(diff: list[VariableDiff]) -> str:
    return "\n".join(f"  {d.line()}" for d in diff) or "  (no variable differs)"


# -- create ------------------------------------------------------------------------------


def cmd_create(ctx: Context, args: argparse.Namespace) -> int:
    refs = ctx.hv.list_domains() if args.all else [ctx.hv.lookup(d) for d in args.domains]
    targets, errors = domain_targets(ctx.hv, refs, ctx.cfg if args.all else None, load_configured(ctx.cfg))
    # An explicit request copies running guests too ("skip" is for the schedule).
    mode = BackupRunning.SUSPEND if ctx.cfg.backup_running is BackupRunning.SUSPEND else BackupRunning.COHERENT
    results = _store(ctx).run_pass(targets, reason=BackupReason.MANUAL, running_mode=mode, hv=ctx.hv)
    rows, lines, failed = [], [], bool(errors)
    for ref, message in errors:
        rows.append({"domain": ref.name, "uuid": ref.uuid, "error": message})
        lines.append(f"{ref.name}: cannot read: {message}")
    for r in results:
        row = {"domain": r.target.name, "uuid": r.target.uuid, "path": r.target.path}
        if r.record is not None:
            row["backup"] = r.record.as_dict()
            lines.append(f"{r.target.name}: backup #{r.record.id} sha256 {r.record.sha256[:16]} ({r.target.path})")
        elif r.unchanged:
            row["unchanged"] = True
            lines.append(f"{r.target.name}: unchanged since its newest backup")
        else:
            failed = failed or r.error is not None or not args.all
            row["skipped" if r.skipped else "error"] = r.skipped or r.error
            lines.append(f"{r.target.name}: {'skipped' if r.skipped else 'FAILED'}: {r.skipped or r.error}")
        if r.paused_ms is not None:
            row["paused_ms"] = round(r.paused_ms, 3)
        rows.append(row)
    named = {t.uuid for t in targets} | {ref.uuid for ref, _ in errors}
    for ref in refs:
        if ref.uuid not in named and not args.all:
            rows.append({"domain": ref.name, "uuid": ref.uuid, "skipped": "no file-backed varstore"})
            lines.append(f"{ref.name}: skipped: no file-backed varstore")
    _print(args, {"results": rows}, "\n".join(lines) or "no domain with a varstore")
    return EXIT_ATTENTION if failed else EXIT_OK


# -- list --------------------------------------------------------------------------------


def cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    store = _store(ctx)
    defined = {r.uuid for r in ctx.hv.list_domains()}
    if args.domain:
        try:
            ref = ctx.hv.lookup(args.domain)
            records = store.index.records(ref.uuid)
        except NoSuchDomain:  # an undefined domain's backups, by its old name or UUID
            records = store.index.records(args.domain.lower()) or store.index.by_name(args.domain)
    else:
        records = store.index.records()
    plan = plan_retention(store.index.records(), ctx.cfg.backup_keep, SYSTEM.now(), defined)
    prune = {p.record.id: p.why for p in plan.prune}
    out = []
    for r in records:
        d = r.as_dict(defined=r.uuid in defined)
        d["prune"] = prune.get(r.id)
        out.append(d)
    lines = [f"{'ID':>5}  {'TAKEN':20}  {'DOMAIN':24}  {'SHA256':16}  REASON"]
    for d in out:
        mark = " (undefined)" if d["undefined"] else ""
        lines.append(f"{d['id']:>5}  {d['taken']:20}  {d['domain'] + mark:24}  {d['sha256'][:16]}  {d['reason']}"
                     + ("  [pruned next: " + d["prune"] + "]" if d["prune"] else ""))
    _print(args, {"backups": out}, "\n".join(lines))
    return EXIT_OK


def cmd_prune(ctx: Context, args: argparse.Namespace) -> int:
    store = _store(ctx)
    defined = {r.uuid for r in ctx.hv.list_domains()}
    plan = plan_retention(store.index.records(), ctx.cfg.backup_keep, SYSTEM.now(), defined)
    removed: list[str] = []
    if not args.dry_run:
        store.index.remove([p.record.id for p in plan.prune])
        removed = store.remove_unreferenced()
    data = {"pruned": [dict(p.record.as_dict(), why=p.why) for p in plan.prune], "kept": len(plan.keep),
            "files_removed": len(removed), "dry_run": args.dry_run}
    verb = "would prune" if args.dry_run else "pruned"
    lines = [f"{verb} #{p.record.id} {p.record.name} {stamp(p.record.taken)}: {p.why}" for p in plan.prune]
    lines.append(f"{verb} {len(plan.prune)} backup(s), kept {len(plan.keep)}, removed {len(removed)} file(s)")
    _print(args, {"result": data}, "\n".join(lines))
    return EXIT_OK


# -- restore, reset, diff ------------------------------------------------------------------


def cmd_restore(ctx: Context, args: argparse.Namespace) -> int:
    ref = ctx.hv.lookup(args.domain)
    try:
        result = _restorer(ctx).restore(ref, backup_id=args.id, source=args.source, dry_run=args.dry_run)
    except (BackupError, WriteRefused, WriteFailed) as exc:
        return _refused(args, exc, EXIT_USAGE if "no backup #" in str(exc) else EXIT_ATTENTION)
    b = result.backup
    data = {"domain": ref.name, "uuid": ref.uuid, "restored": b.as_dict(), "path": result.target.path,
            "dry_run": args.dry_run, "diff": [d.as_dict() for d in result.diff]}
    if result.write is not None:
        data["previous_backup"] = result.write.backup.as_dict() if result.write.backup else None
        data["changed"] = result.write.changed
    if args.dry_run:
        text = f"{ref.name}: would restore backup #{b.id} ({stamp(b.taken)}, {b.reason}) into {result.target.path}"
    elif not result.write.changed:
        text = f"{ref.name}: {result.target.path} already holds backup #{b.id}; nothing to do"
    else:
        prev = result.write.backup
        text = (f"{ref.name}: restored backup #{b.id} ({stamp(b.taken)}) into {result.target.path}; "
                "the previous content " + (f"is backup #{prev.id}" if prev else "was missing"))
    _print(args, {"result": data}, text + "\n" + _diff_text(result.diff))
    return EXIT_OK


def cmd_reset(ctx: Context, args: argparse.Namespace) -> int:
    ref = ctx.hv.lookup(args.domain)
    try:
        result = _restorer(ctx).reset(ref, dry_run=args.dry_run)
    except (BackupError, WriteRefused, WriteFailed) as exc:
        return _refused(args, exc)
    data = {"domain": ref.name, "uuid": ref.uuid, "template": result.template, "path": result.target.path,
            "dry_run": args.dry_run, "lost": [d.as_dict() for d in result.diff]}
    if result.write is not None:
        data["previous_backup"] = result.write.backup.as_dict() if result.write.backup else None
    if args.dry_run:
        text = f"{ref.name}: would reset {result.target.path} to a fresh copy of {result.template}; it would lose:"
    else:
        prev = result.write.backup
        text = (f"{ref.name}: reset {result.target.path} to a fresh copy of {result.template}; the previous "
                f"variables are in backup #{prev.id if prev else '-'} ('varsctl backup restore {ref.name} --id "
                f"{prev.id if prev else '?'}' undoes it). Lost:")
    _print(args, {"result": data}, text + "\n" + _diff_text(result.diff))
    return EXIT_OK


def cmd_diff(ctx: Context, args: argparse.Namespace) -> int:
    restorer = _restorer(ctx)
    store = restorer.store
    ref: DomainRef | None
    try:
        ref = ctx.hv.lookup(args.domain)
    except NoSuchDomain:
        if args.id is None:
            raise
        ref = None
    records = []
    for i in (args.id, args.id2):
        if i is None:
            records.append(None)
            continue
        r = store.index.get(i)
        if r is None:
            error(f"no backup #{i} (see 'varsctl backup list')")
            return EXIT_USAGE
        records.append(r)
    a, b, diff = restorer.diff(ref, records[0], records[1])
    _print(args, {"result": {"from": a, "to": b, "diff": [d.as_dict() for d in diff]}},
           f"{a} -> {b}:\n{_diff_text(diff)}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add `backup` and `reset` to varsctl's parser."""
    b = sub.add_parser("backup", help="varstore backups: create, list, restore, diff, prune")
    bs = b.add_subparsers(dest="backup_command", required=True)

    c = bs.add_parser("create", help="back up domains' varstores now (unchanged ones are not stored again)")
    add_domains_or_all(c, domains_help="domain name or UUID",
                       all_help="every domain with a varstore file (except excluded ones)")
    add_json(c)
    c.set_defaults(func=cmd_create)

    ls = bs.add_parser("list", help="list backups (undefined domains' too, marked), and what pruning would remove")
    ls.add_argument("domain", nargs="?", metavar="DOMAIN", help="name or UUID (also of an undefined domain)")
    add_json(ls)
    ls.set_defaults(func=cmd_list, read_only=True)

    r = bs.add_parser("restore", help="put a backup back into a shut-off domain's varstore (backed up first)")
    r.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    r.add_argument("--id", type=int, help="the backup to restore (default: the domain's newest)")
    r.add_argument("--from", dest="source", metavar="NAME|UUID",
                   help="take another domain's backups (e.g. the same guest before it was undefined)")
    r.add_argument("--dry-run", action="store_true", help="say what would be restored and what would change")
    add_json(r)
    r.set_defaults(func=cmd_restore)

    d = bs.add_parser("diff", help="per-variable differences: two backups, a backup and now, or newest and now")
    d.add_argument("domain", metavar="DOMAIN", help="domain name or UUID (any name when two IDs are given)")
    d.add_argument("id", type=int, nargs="?", metavar="ID", help="backup to compare from (default: the newest)")
    d.add_argument("id2", type=int, nargs="?", metavar="ID2", help="backup to compare to (default: the varstore now)")
    add_json(d)
    d.set_defaults(func=cmd_diff, read_only=True)

    p = bs.add_parser("prune", help="apply retention (backup_keep) now")
    p.add_argument("--dry-run", action="store_true", help="say what would be pruned")
    add_json(p)
    p.set_defaults(func=cmd_prune)

    z = sub.add_parser("reset", help="the safe --reset-nvram: back up, then a fresh copy of the domain's template")
    z.add_argument("domain", metavar="DOMAIN", help="domain name or UUID (shut off)")
    z.add_argument("--dry-run", action="store_true", help="show what the reset would lose")
    add_json(z)
    z.set_defaults(func=cmd_reset)
