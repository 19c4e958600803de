"""varsctl: the admin's tool. Thin: parse arguments, call the engine, print.

What is printed, the JSON shapes and the exit codes are `varsd.cli.output`'s (README:
"Output"). Exit codes: 0 all fine, 1 something needs attention (a domain in `error` or
`needs-migration`, or an action failed), 2 usage, configuration or connection error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

from varsd import __version__
from varsd.adapters.libvirt_api import NoSuchDomain
from varsd.cli.context import MAX_LIMIT, SQLITE_MAX_INT, Context, bounded_int
from varsd.cli.output import (
    EXIT_ATTENTION,
    EXIT_OK,
    EXIT_USAGE,
    add_json,
    change_dict,
    emit_json,
    error,
    exit_for,
    outcome_table,
)
from varsd.clock import stamp
from varsd.config import load_config
from varsd.domain.xml import parse_domain, set_metadata
from varsd.engine import qemu_hook, status
from varsd.engine.backups import backup_status, open_store
from varsd.errors import ConfigError, HypervisorError, VarsdError
from varsd.model.domain import Status
from varsd.model.journal import ChangeKind
from varsd.planning.repair import Action, CreateJsonVarstore, CreateVarstore


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    rec = ctx.reconciler()
    refs = ctx.refs(args.domains)
    looks = status.look(rec, refs, ctx.memo_store, complete=not args.domains)
    hook = qemu_hook.probe(ctx.cfg.uri)
    outcomes = [lk.outcome for lk in looks]
    if args.json:
        targets = [lk.target for lk in looks if lk.target is not None]
        known = {lk.outcome.ref.uuid: lk.varstore for lk in looks if lk.varstore is not None}
        backups = backup_status(open_store(ctx.cfg, read_only=True), targets, known)
        doc: dict[str, object] = {"domains": [dict(o.as_dict(), backup=backups.get(o.ref.uuid)) for o in outcomes]}
        if hook.state is not qemu_hook.HookState.NOT_CHECKED:  # this host's own daemon: its hook is judged
            doc["host"] = {"qemu_hook": hook.as_dict()}
        emit_json(doc)
    else:
        print(outcome_table(outcomes))
        if hook.attention:
            print(f"\nqemu hook {hook.state.value}: {hook.detail}")
    return max(exit_for(outcomes), EXIT_ATTENTION if hook.attention else EXIT_OK)


def describe_action(action: Action) -> str:
    """What a planned action would do, as a sentence (reconcile --dry-run)."""
    if isinstance(action, CreateVarstore):
        what = f"the first {action.length} bytes of {action.source}" if action.length else action.source
        return f"create varstore {action.path} from {what} ({action.layout.describe()})"
    if isinstance(action, CreateJsonVarstore):
        return f"provision the JSON varstore {action.path} from {action.template}"
    return f"redefine the domain: {action.reason}"


def cmd_reconcile(ctx: Context, args: argparse.Namespace) -> int:
    rec = ctx.reconciler()
    outcomes = [rec.reconcile(ref, apply=not args.dry_run) for ref in ctx.refs(args.domains)]
    if args.json:
        emit_json({"domains": [o.as_dict() for o in outcomes]})
    else:
        for o in outcomes:
            if args.dry_run:
                for a in o.plan.actions:
                    print(f"{o.ref.name}: would {describe_action(a)}")
            for d in o.done:
                print(f"{o.ref.name}: {d}")
        print(outcome_table(outcomes))
    return exit_for(outcomes)


def cmd_journal(ctx: Context, args: argparse.Namespace) -> int:
    uuid = ctx.hv.lookup(args.domain).uuid if args.domain else None
    changes = ctx.journal.changes(uuid, limit=args.limit)
    if args.json:
        emit_json({"changes": [change_dict(c) for c in changes]})
        return EXIT_OK
    for c in changes:
        print(f"#{c.id}  {stamp(c.at)}  {c.name}  {c.actor}  {c.outcome}  {c.reason}")
    return EXIT_OK


def cmd_undo(ctx: Context, args: argparse.Namespace) -> int:
    """Put back the XML a journaled change replaced (itself journaled)."""
    change = ctx.journal.change(args.change)
    if change is None:
        error(f"no journal entry #{args.change}")
        return EXIT_USAGE
    rec = ctx.reconciler()
    ref = ctx.hv.lookup(change.uuid)
    # The one write transaction (the domain's lock, a fresh read, an archived loader
    # verified): a daemon acting on it at this moment must not overwrite the restored
    # definition, nor we its repair.
    with rec.writer.transaction(ref, "undoing a change of") as tx:
        if tx.xml != change.new_xml and not args.force:
            error(f"domain '{ref.name}' changed after journal #{change.id} (a later repair or an "
                  "admin's edit); undoing would discard that. See 'varsctl journal', or use --force")
            return EXIT_ATTENTION
        _, plan = rec.plan_xml(ref, change.old_xml)
        migrated = change.kind is ChangeKind.MIGRATION
        if (migrated or plan.status is Status.NEEDS_MIGRATION) and not args.force:
            # e.g. undoing a migration's XML change while the varstore is already migrated:
            # old code with a varstore of another layout silently loses every variable change.
            error(f"the definition from before journal #{change.id} does not fit domain '{ref.name}''s "
                  f"varstore as it is now ({'that change migrated the varstore' if migrated else plan.detail}): "
                  "old code with a varstore of another layout loses every variable change. Copy the migration's "
                  "backup back over the varstore first (see 'varsctl migrate' in the README), then use --force")
            return EXIT_ATTENTION
        restored = change.old_xml
        if args.opt_out:
            restored = set_metadata(restored, replace(parse_domain(restored).metadata, opt_out=True))
        else:
            _, again = rec.plan_xml(ref, restored)
            if again.actions and not args.force:
                # The daemon would redo the change within seconds: an undo that silently does not last.
                error(f"domain '{ref.name}': the definition from before journal #{change.id} is what varsd "
                      f"repairs ({again.detail}); the daemon would change it again at its next look. Nothing was "
                      f"changed. To restore it and keep it: 'varsctl undo {change.id} --opt-out' (varsd then "
                      f"leaves the domain alone until 'varsctl opt-in {ref.name}'); to restore it only until the "
                      "next repair: --force")
                return EXIT_ATTENTION
        tx.write(restored, f"undo of journal #{change.id}" + (", domain opted out" if args.opt_out else ""),
                 as_given=True)
    text = f"{ref.name}: restored the definition from before journal #{change.id}" + (
        "; opted out, so varsd leaves it alone (varsctl opt-in to manage it again)" if args.opt_out else "")
    if args.json:
        emit_json({"result": {"domain": ref.name, "uuid": ref.uuid, "undone": change.id, "message": text}})
    else:
        print(text)
    return EXIT_OK


class UsageError(Exception):
    """A subcommand's arguments are wrong (exit 2, with argparse's message)."""


class _SubcommandParser(argparse.ArgumentParser):
    """Subcommand parsers report usage errors to `main` (exit code 2) instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="varsctl", description="Inspect and repair UEFI firmware of libvirt domains.",
        epilog="Exit codes: 0 fine, 1 something needs attention, 2 usage, configuration or connection error.",
    )
    p.add_argument("--config", help="config file (default $VARSD_CONFIG or /etc/varsd/varsd.toml)")
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (default from config: qemu:///system)")
    p.add_argument("--verbose", "-v", action="store_true", help="log what is done (INFO) to stderr")
    p.add_argument("--version", action="version", version=f"varsctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_SubcommandParser)

    s = sub.add_parser("status", help="report every domain's firmware configuration and status")
    add_json(s)
    s.add_argument("domains", nargs="*", metavar="DOMAIN", help="domain names or UUIDs (default: all)")
    s.set_defaults(func=cmd_status, read_only=True)

    r = sub.add_parser("reconcile", help="repair domains now, without the daemon")
    r.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    add_json(r)
    r.add_argument("domains", nargs="*", metavar="DOMAIN", help="domain names or UUIDs (default: all)")
    r.set_defaults(func=cmd_reconcile)

    j = sub.add_parser("journal", help="list journaled domain XML changes")
    j.add_argument("domain", nargs="?", metavar="DOMAIN", help="only this domain's changes (name or UUID)")
    j.add_argument("--limit", type=bounded_int(1, MAX_LIMIT), default=50,
                   help="at most this many, newest first (default 50)")
    add_json(j)
    j.set_defaults(func=cmd_journal, read_only=True)

    u = sub.add_parser("undo", help="restore the XML a journaled change replaced")
    u.add_argument("change", type=bounded_int(1, SQLITE_MAX_INT), metavar="ID",
                   help="the journal entry's number (see 'varsctl journal')")
    u.add_argument("--force", action="store_true",
                   help="undo even if the domain changed since, or if varsd will repair it again")
    u.add_argument("--opt-out", action="store_true",
                   help="also opt the domain out, so the restored definition lasts (varsctl opt-in undoes that)")
    add_json(u)
    u.set_defaults(func=cmd_undo)

    for register in _command_modules():
        register(sub)
    return p


def _command_modules():
    """Subcommands that live in their own modules register themselves here."""
    from varsd.cli import backup_cmd, firmware_cmds, metrics_cmd, migrate_cmd, optout_cmd, secureboot_cmd

    return [optout_cmd.register, firmware_cmds.register, migrate_cmd.register, backup_cmd.register,
            secureboot_cmd.register, metrics_cmd.register]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="varsctl: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = load_config(args.config, args.connect)
    except ConfigError as exc:
        error(exc)
        return EXIT_USAGE
    ctx = Context(cfg, read_only=getattr(args, "read_only", False))
    try:
        return args.func(ctx, args)
    except (ConfigError, NoSuchDomain) as exc:  # e.g. no qemu user; a domain name that does not exist
        error(exc)
        return EXIT_USAGE
    except HypervisorError as exc:
        error(exc)
        # libvirt unreachable is a connection error (2); libvirt refusing an action is 1.
        return EXIT_USAGE if exc.retryable else EXIT_ATTENTION
    except VarsdError as exc:
        error(exc)
        return EXIT_ATTENTION
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
