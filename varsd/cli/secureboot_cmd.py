"""`varsctl secureboot status|update`: the audit and the rollout of Microsoft's 2023 certificates.

Thin: argument checks and printing; `varsd.engine.secureboot` does the work.

Exit codes: status: 0 every store `ok` or `n/a`, 1 something is `update-available`,
`update-queued` or `blocked`. update: 0 every domain updated, queued or unchanged, 1
any refused, held or failed, 2 usage.
"""

from __future__ import annotations

import argparse
import sys

from varsd.cli.context import MAX_LIMIT, Context, add_domains_or_all, bounded_int
from varsd.cli.output import EXIT_ATTENTION, EXIT_OK, add_json, emit_json, table
from varsd.engine.secureboot import Audit, Outcome, SecureBoot, UpdateResult
from varsd.messages import line
from varsd.model.secureboot import Ms2023State

_QUIET = {Ms2023State.OK, Ms2023State.NOT_APPLICABLE}
_FINE = {Outcome.UPDATED, Outcome.QUEUED, Outcome.UNCHANGED, Outcome.WOULD_UPDATE, Outcome.WOULD_QUEUE}


def _keys(a: Audit) -> str:
    k = a.keys
    if k is None:
        return "-"
    return f"KEK {len(k.kek)}, db {len(k.db)}, dbx {k.dbx_entries}"


def _text(domains: list[Audit], templates: list[Audit], verbose: bool) -> str:
    out = [table(("DOMAIN", "STATE", "SECURE-BOOT", "TPM", "KEYS", "MS2023", "DETAIL"), (
        (a.name, a.state or "-", "on" if a.secure_build and a.keys is not None and a.keys.enforcing else "off",
         "yes" if a.tpm else "no", _keys(a), a.state_ms2023.value, a.judgement.why) for a in domains))]
    if templates:
        out += ["", table(("TEMPLATE", "PATH", "SECURE-BOOT", "KEYS", "MS2023", "DETAIL"), (
            (a.name, a.varstore or "-", "yes" if a.secure_build else "no", _keys(a), a.state_ms2023.value,
             a.judgement.why) for a in templates))]
    if verbose:
        for a in domains + templates:
            if a.keys is None:
                continue
            out.append(f"\n{a.kind} {a.name}:")
            if a.keys.pk:
                out.append(f"  PK   {a.keys.pk[0].subject} (owner {a.keys.pk[0].owner})")
            for var in ("kek", "db"):
                for c in getattr(a.keys, var):
                    out.append(f"  {var.upper() if var == 'kek' else var:4} {c.subject}  not after {c.not_after}")
            out.append(f"  dbx  {a.keys.dbx_entries} entries")
    return "\n".join(out)


def engine(ctx: Context) -> SecureBoot:
    return ctx.secureboot()


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    sb = engine(ctx)
    domains = sb.audit_domains(ctx.refs(args.domains))
    templates = sb.audit_templates() if not args.domains else []
    if args.json:
        emit_json({"domains": [a.as_dict() for a in domains], "templates": [a.as_dict() for a in templates]})
    else:
        print(_text(domains, templates, args.verbose_keys))
    return EXIT_OK if all(a.state_ms2023 in _QUIET for a in domains) else EXIT_ATTENTION


def _print_results(results: list[UpdateResult]) -> None:
    for r in results:
        out = sys.stdout if r.outcome in _FINE else sys.stderr
        print(line(r.name, f"{r.outcome.value}: {r.detail}", r.uuid), file=out)


def cmd_update(ctx: Context, args: argparse.Namespace) -> int:
    sb = engine(ctx)
    refs = ctx.refs(args.domains)
    if args.all:
        # Only stores an update applies to; the rest would only be listed as refused.
        wanted = {a.uuid for a in sb.audit_domains(refs)
                  if a.state_ms2023 in (Ms2023State.UPDATE_AVAILABLE, Ms2023State.UPDATE_QUEUED)}
        refs = sorted((r for r in refs if r.uuid in wanted), key=lambda r: r.name)
    results = sb.update(refs, tpm_ack=args.tpm_ack, dry_run=args.dry_run, canary=args.canary)
    if args.json:
        emit_json({"results": [r.as_dict() for r in results]})
    else:
        if not results:
            print("secureboot update: no domain needs the update")
        _print_results(results)
    return EXIT_OK if all(r.outcome in _FINE for r in results) else EXIT_ATTENTION


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("secureboot", help="Secure Boot certificates: audit, roll out Microsoft's 2023 CAs")
    ssub = p.add_subparsers(dest="secureboot_command", required=True)

    s = ssub.add_parser("status", help="every domain's and template's Secure Boot keys and ms2023 state")
    add_json(s)
    s.add_argument("--keys", dest="verbose_keys", action="store_true", help="list every certificate")
    s.add_argument("domains", nargs="*", metavar="DOMAIN", help="only these domains (default: all, plus templates)")
    s.set_defaults(func=cmd_status, read_only=True)

    u = ssub.add_parser("update", help="add the Microsoft 2023 KEK/db certificates (backup first)")
    add_domains_or_all(u, domains_help="domains to update (or --all)",
                       all_help="every domain whose store is update-available")
    u.add_argument("--canary", type=bounded_int(1, MAX_LIMIT), metavar="N",
                   help="update N domains only; run again once they booted")
    u.add_argument("--tpm-ack", action="store_true",
                   help="update guests with a vTPM too (PCR7 changes: BitLocker/LUKS recovery)")
    u.add_argument("--dry-run", action="store_true", help="say what would be done; change nothing")
    add_json(u)
    u.set_defaults(func=cmd_update)
