"""`varsctl migrate`: move shut-off domains' variables to a build they can boot.

Thin: argument checks and printing; `varsd.engine.migration` does the work.

Exit codes: 0 migrated (or nothing needed migrating), 1 refused or failed (with
`--all`: any domain failed, or a running one still needs migrating), 2 usage.
"""

from __future__ import annotations

import argparse
import sys

from varsd.cli.context import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE, Context
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


def _one(migrator: Migrator, ctx: Context, args: argparse.Namespace) -> int:
    ref = ctx.hv.lookup(args.domain)
    try:
        if args.dry_run:
            print(f"{ref.name}: would migrate: {migrator.plan(ref, to=args.to).describe()}")
            return EXIT_OK
        result = migrator.migrate(ref, to=args.to)
    except NothingToMigrate as exc:
        print(line(ref.name, exc, ref.uuid))
        return EXIT_OK
    except (MigrationRefused, MigrationFailed) as exc:
        print(f"varsctl: {exc}", file=sys.stderr)
        return EXIT_ATTENTION
    print(f"{ref.name}: {_done_text(result)}")
    return EXIT_OK


def _all(migrator: Migrator, ctx: Context, args: argparse.Namespace) -> int:
    candidates, errors = needs_migration(migrator.rec, ctx.hv.list_domains())
    for ref, message in errors:
        print(f"{ref.name}: cannot read: {message}", file=sys.stderr)
    if not candidates:
        print("migrate --all: no domain needs migration")
        return EXIT_ATTENTION if errors else EXIT_OK
    total = len(candidates)
    print(f"migrate --all: {total} domain(s) need migration")
    migrated = failed = skipped = 0
    for i, cand in enumerate(candidates, 1):
        head = f"[{i}/{total}] {cand.ref.name}"
        if cand.skip:
            skipped += 1
            print(f"{head}: skipped: {cand.skip}")
            continue
        try:
            if args.dry_run:
                print(f"{head}: would migrate: {migrator.plan(cand.ref).describe()}")
                migrated += 1
                continue
            print(f"{head}: migrating ({cand.detail})", flush=True)
            result = migrator.migrate(cand.ref)
        except NothingToMigrate as exc:
            print(f"{head}: {for_row(cand.ref.name, exc, cand.ref.uuid)}")
            continue
        except HypervisorError as exc:
            if exc.retryable:
                raise  # libvirtd went away: the rest would fail the same way
            failed += 1
            print(f"{head}: FAILED: {exc}")
            continue
        except VarsdError as exc:
            failed += 1
            print(f"{head}: FAILED: {exc}")
            continue
        migrated += 1
        print(f"{head}: {_done_text(result)}", flush=True)
    verb = "would be migrated (dry run)" if args.dry_run else "migrated"
    print(f"migrate --all: {migrated} {verb}, {failed} failed, {skipped} skipped (running)")
    return EXIT_ATTENTION if failed or skipped or errors else EXIT_OK


def cmd_migrate(ctx: Context, args: argparse.Namespace) -> int:
    if args.all == bool(args.domain):
        print("varsctl migrate: give either one DOMAIN or --all", file=sys.stderr)
        return EXIT_USAGE
    if args.all and args.to:
        print("varsctl migrate: --to names one build for one domain; it cannot be used with --all",
              file=sys.stderr)
        return EXIT_USAGE
    migrator = Migrator(ctx.reconciler())
    return _all(migrator, ctx, args) if args.all else _one(migrator, ctx, args)


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
    m.add_argument("domain", nargs="?", metavar="DOMAIN", help="name or UUID")
    m.add_argument("--all", action="store_true", help="every shut-off domain whose status is needs-migration")
    m.add_argument(
        "--to", metavar="BUILD",
        help="target build: descriptor path or file name, code path or file name, or a code sha256 prefix",
    )
    m.add_argument("--dry-run", action="store_true", help="show what would be done")
    m.set_defaults(func=cmd_migrate)
