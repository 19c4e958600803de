"""varsctl: the admin's tool. Thin: parse arguments, call the engine, print.

Exit codes (documented in README): 0 all fine, 1 something needs attention (a domain
in `error` or `needs-migration`, or an action failed), 2 usage, configuration or
connection error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

from varsd.adapters.libvirt_api import NoSuchDomain
from varsd.cli.context import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE, MAX_LIMIT, SQLITE_MAX_INT, Context, bounded_int
from varsd.config import load_config
from varsd.domain.xml import parse_domain, set_metadata
from varsd.engine.migration import MIGRATION_REASON
from varsd.engine.reconciler import Outcome
from varsd.errors import ConfigError, HypervisorError, VarsdError
from varsd.model.domain import Status

ATTENTION = {Status.ERROR, Status.NEEDS_MIGRATION}


def _table(outcomes: list[Outcome]) -> str:
    rows = [("DOMAIN", "STATE", "CONFIG", "STATUS", "DETAIL")]
    rows += [(o.ref.name, o.ref.state, o.plan.config.value, o.status.value, o.detail) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:4])) + "  " + r[4] for r in rows
    )


def _exit_for(outcomes: list[Outcome]) -> int:
    return EXIT_ATTENTION if any(o.status in ATTENTION for o in outcomes) else EXIT_OK


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    rec = ctx.reconciler()
    outcomes = [rec.reconcile(ref, apply=False) for ref in ctx.refs(args.domains)]
    if args.json:
        print(json.dumps({"domains": [o.as_dict() for o in outcomes]}, indent=2))
    else:
        print(_table(outcomes))
    return _exit_for(outcomes)


def cmd_reconcile(ctx: Context, args: argparse.Namespace) -> int:
    rec = ctx.reconciler()
    outcomes = [rec.reconcile(ref, apply=not args.dry_run) for ref in ctx.refs(args.domains)]
    if args.json:
        print(json.dumps({"domains": [o.as_dict() for o in outcomes]}, indent=2))
    else:
        for o in outcomes:
            if args.dry_run and o.plan.actions:
                for a in o.plan.actions:
                    print(f"{o.ref.name}: would {type(a).__name__}: {getattr(a, 'reason', getattr(a, 'path', ''))}")
            for d in o.done:
                print(f"{o.ref.name}: {d}")
        print(_table(outcomes))
    return _exit_for(outcomes)


def cmd_journal(ctx: Context, args: argparse.Namespace) -> int:
    uuid = ctx.hv.lookup(args.domain).uuid if args.domain else None
    changes = ctx.journal.changes(uuid, limit=args.limit)
    if args.json:
        print(json.dumps([c.__dict__ for c in changes], indent=2))
        return EXIT_OK
    for c in changes:
        print(f"#{c.id}  {c.at}  {c.name}  {c.actor}  {c.outcome}  {c.reason}")
    return EXIT_OK


def cmd_undo(ctx: Context, args: argparse.Namespace) -> int:
    """Put back the XML a journaled change replaced (itself journaled)."""
    change = ctx.journal.change(args.change)
    if change is None:
        print(f"varsctl: no journal entry #{args.change}", file=sys.stderr)
        return EXIT_USAGE
    rec = ctx.reconciler()
    ref = ctx.hv.lookup(change.uuid)
    # The domain's lock, like any write: a daemon acting on it at this moment must not
    # overwrite the restored definition, nor we its repair.
    with rec.domain_lock(ref, "undoing a change of"):
        current = ctx.hv.persistent_xml(ref.uuid)
        if current != change.new_xml and not args.force:
            print(
                f"varsctl: domain '{ref.name}' changed after journal #{change.id} (a later repair or an "
                "admin's edit); undoing would discard that. See 'varsctl journal', or use --force",
                file=sys.stderr,
            )
            return EXIT_ATTENTION
        _, plan = rec.plan_xml(ref, change.old_xml)
        migrated = change.reason.startswith(MIGRATION_REASON)
        if (migrated or plan.status is Status.NEEDS_MIGRATION) and not args.force:
            # e.g. undoing a migration's XML change while the varstore is already migrated:
            # old code with a varstore of another layout silently loses every variable change.
            print(
                f"varsctl: the definition from before journal #{change.id} does not fit domain '{ref.name}''s "
                f"varstore as it is now ({'that change migrated the varstore' if migrated else plan.detail}): "
                "old code with a varstore of another layout loses every variable change. Copy the migration's "
                "backup back over the varstore first (see 'varsctl migrate' in the README), then use --force",
                file=sys.stderr,
            )
            return EXIT_ATTENTION
        restored = change.old_xml
        if args.opt_out:
            restored = set_metadata(restored, replace(parse_domain(restored).metadata, opt_out=True))
        else:
            _, again = rec.plan_xml(ref, restored)
            if again.actions and not args.force:
                # The daemon would redo the change within seconds: an undo that silently does not last.
                print(
                    f"varsctl: domain '{ref.name}': the definition from before journal #{change.id} is what varsd "
                    f"repairs ({again.detail}); the daemon would change it again at its next look. Nothing was "
                    f"changed. To restore it and keep it: 'varsctl undo {change.id} --opt-out' (varsd then leaves "
                    f"the domain alone until 'varsctl opt-in {ref.name}'); to restore it only until the next "
                    "repair: --force",
                    file=sys.stderr,
                )
                return EXIT_ATTENTION
        why = f"undo of journal #{change.id}" + (", domain opted out" if args.opt_out else "")
        rec.redefine(ref, current, restored, why)
    print(f"{ref.name}: restored the definition from before journal #{change.id}"
          + ("; opted out, so varsd leaves it alone (varsctl opt-in to manage it again)" if args.opt_out else ""))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="varsctl", description="Inspect and repair UEFI firmware of libvirt domains.")
    p.add_argument("--config", help="config file (default $VARSD_CONFIG or /etc/varsd/varsd.toml)")
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (default from config: qemu:///system)")
    p.add_argument("--verbose", "-v", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("status", help="report every domain's firmware configuration and status")
    s.add_argument("--json", action="store_true")
    s.add_argument("domains", nargs="*", metavar="DOMAIN")
    s.set_defaults(func=cmd_status)

    r = sub.add_parser("reconcile", help="repair domains now, without the daemon")
    r.add_argument("--dry-run", action="store_true", help="show what would change")
    r.add_argument("--json", action="store_true")
    r.add_argument("domains", nargs="*", metavar="DOMAIN")
    r.set_defaults(func=cmd_reconcile)

    j = sub.add_parser("journal", help="list journaled domain XML changes")
    j.add_argument("domain", nargs="?")
    j.add_argument("--limit", type=bounded_int(1, MAX_LIMIT), default=50)
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=cmd_journal)

    u = sub.add_parser("undo", help="restore the XML a journaled change replaced")
    u.add_argument("change", type=bounded_int(1, SQLITE_MAX_INT), metavar="ID")
    u.add_argument("--force", action="store_true",
                   help="undo even if the domain changed since, or if varsd will repair it again")
    u.add_argument("--opt-out", action="store_true",
                   help="also opt the domain out, so the restored definition lasts (varsctl opt-in undoes that)")
    u.set_defaults(func=cmd_undo)

    for register in _command_modules():
        register(sub)
    return p


def _command_modules():
    """Subcommands that live in their own modules register themselves here."""
    from varsd.cli import firmware_cmds, migrate_cmd, optout_cmd

    return [optout_cmd.register, firmware_cmds.register, migrate_cmd.register]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="varsctl: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = load_config(args.config, args.connect)
    except ConfigError as exc:
        print(f"varsctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    ctx = Context(cfg)
    try:
        return args.func(ctx, args)
    except (ConfigError, NoSuchDomain) as exc:  # e.g. no qemu user; a domain name that does not exist
        print(f"varsctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except HypervisorError as exc:
        print(f"varsctl: {exc}", file=sys.stderr)
        # libvirt unreachable is a connection error (2); libvirt refusing an action is 1.
        return EXIT_USAGE if exc.retryable else EXIT_ATTENTION
    except VarsdError as exc:
        print(f"varsctl: {exc}", file=sys.stderr)
        return EXIT_ATTENTION
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
