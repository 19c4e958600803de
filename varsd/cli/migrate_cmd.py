"""`varsctl migrate`: move shut-off domains' variables to a build they can boot.

Thin: argument checks and printing; `varsd.engine.migration` does the work.

Exit codes: 0 migrated (or nothing needed migrating), 1 refused or failed (with
`--all`: any domain failed, or a running one still needs migrating), 2 usage.
"""

from __future__ import annotations

import argparse
import sys

from varsd.cli.context import Context
from varsd.cli.output import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE, Report, add_json
from varsd.engine.migration import MigrationFailed, MigrationResult, Migrator, needs_migration
from varsd.errors import HypervisorError, VarsdError
from varsd.messages import for_row, line
from varsd.planning.migration import MigrationRefused, NothingToMigrate


def _done_text(result: MigrationResult) -> str:
    plan = result.plan
    where = plan.varstore if plan.in_place else (
        f"new varstore {plan.varstore} (the unified image {plan.source} is unchanged; remove it when no longer "
        "needed)")
    return (
        f"migrated {result.variables} variable(s) into {where} "
        f"({plan.source_layout.size} -> {plan.target_layout.size} bytes, template {plan.template}); "
        f"now boots {plan.target.label} ({plan.target.origin}); backup: {result.backup}"
    )


def _one(migrator: Migrator, ctx: Context, args: argparse.Namespace, out: Report) -> int:
    ref = ctx.hv.lookup(args.domain)
    try:
        if args.dry_run:
            out.line(f"{ref.name}: would migrate: {migrator.plan(ref, to=args.to).describe()}", domain=ref.name,
                     migrated=False)
            return EXIT_OK
        result = migrator.migrate(ref, to=args.to)
    except NothingToMigrate as exc:
        out.line(line(ref.name, exc, ref.uuid), domain=ref.name, migrated=False)
        return EXIT_OK
    except (MigrationRefused, MigrationFailed) as exc:
        out.line(f"varsctl: {exc}", problem=True, domain=ref.name, migrated=False)
        return EXIT_ATTENTION
    out.line(f"{ref.name}: {_done_text(result)}", domain=ref.name, migrated=True, backup=result.backup)
    return EXIT_OK


def _all(migrator: Migrator, ctx: Context, args: argparse.Namespace, out: Report) -> int:
    candidates, errors = needs_migration(migrator.rec, ctx.hv.list_domains())
    for ref, message in errors:
        out.line(f"{ref.name}: cannot read: {message}", problem=True, domain=ref.name, migrated=False)
    if not candidates:
        out.line("migrate --all: no domain needs migration")
        return EXIT_ATTENTION if errors else EXIT_OK
    total = len(candidates)
    out.line(f"migrate --all: {total} domain(s) need migration")
    migrated = failed = skipped = 0
    for i, cand in enumerate(candidates, 1):
        head = f"[{i}/{total}] {cand.ref.name}"
        if cand.skip:
            skipped += 1
            out.line(f"{head}: skipped: {cand.skip}", domain=cand.ref.name, migrated=False)
            continue
        try:
            if args.dry_run:
                out.line(f"{head}: would migrate: {migrator.plan(cand.ref).describe()}", domain=cand.ref.name,
                         migrated=False)
                migrated += 1
                continue
            out.line(f"{head}: migrating ({cand.detail})", domain=cand.ref.name, migrated=False)
            result = migrator.migrate(cand.ref)
        except NothingToMigrate as exc:
            out.line(f"{head}: {for_row(cand.ref.name, exc, cand.ref.uuid)}", domain=cand.ref.name, migrated=False)
            continue
        except HypervisorError as exc:
            if exc.retryable:
                raise  # libvirtd went away: the rest would fail the same way
            failed += 1
            out.line(f"{head}: FAILED: {for_row(cand.ref.name, exc, cand.ref.uuid)}", domain=cand.ref.name,
                     migrated=False)
            continue
        except VarsdError as exc:
            failed += 1
            out.line(f"{head}: FAILED: {for_row(cand.ref.name, exc, cand.ref.uuid)}", domain=cand.ref.name,
                     migrated=False)
            continue
        migrated += 1
        out.line(f"{head}: {_done_text(result)}", domain=cand.ref.name, migrated=True, backup=result.backup)
    verb = "would be migrated (dry run)" if args.dry_run else "migrated"
    out.line(f"migrate --all: {migrated} {verb}, {failed} failed, {skipped} skipped (running)")
    return EXIT_ATTENTION if failed or skipped or errors else EXIT_OK


def cmd_migrate(ctx: Context, args: argparse.Namespace) -> int:
    if args.all and args.to:
        print("varsctl migrate: --to names one build for one domain; it cannot be used with --all",
              file=sys.stderr)
        return EXIT_USAGE
    migrator = Migrator(ctx.reconciler())
    out = Report("results", args.json)
    try:
        return _all(migrator, ctx, args, out) if args.all else _one(migrator, ctx, args, out)
    finally:
        out.close()


def register(sub: argparse._SubParsersAction) -> None:
    """Add `migrate` to varsctl's parser."""
    m = sub.add_parser(
        "migrate",
        help="move a shut-off domain's variables into the varstore layout of a build it can boot",
        description=(
            "Back up the domain's varstore, move every variable into a fresh copy of the target build's "
            "template, verify it, and bind the domain to the build's central code. Shut-off domains only. "
            "Default target: the catalog build matching the domain's Secure Boot and enrolled keys. "
            "Exit 0 done, 1 refused or failed (--all: any failed, or a running domain still needs it), 2 usage."
        ),
    )
    which = m.add_mutually_exclusive_group(required=True)
    which.add_argument("domain", nargs="?", metavar="DOMAIN", help="name or UUID")
    which.add_argument("--all", action="store_true", help="every shut-off domain whose status is needs-migration")
    m.add_argument(
        "--to", metavar="BUILD",
        help="target build: descriptor path or file name, code path or file name, or a code sha256 prefix",
    )
    m.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    add_json(m)
    m.set_defaults(func=cmd_migrate)
