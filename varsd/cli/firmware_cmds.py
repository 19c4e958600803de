"""varsctl firmware sync|list|history, pin, unpin, upgrade approve: firmware upgrades.

Thin: the decisions are the planner's (`varsd.planning.upgrade`), the work the
engine's (`varsd.engine.firmware_sync`, the reconciler). pin, unpin and approve write
the metadata change and let the planner place the loader, so each makes exactly one
journaled redefinition that the daemon then finds nothing to change in.

`varsctl firmware sync` is what package hooks run (`varsctl firmware sync || true`).
Exit codes: 0 done, 1 something needs attention (a domain in `error` or
`needs-migration`, a descriptor or archive problem), 2 could not run (configuration,
state directory, libvirt unreachable: firmware is still archived and recorded when
only libvirt is missing). It never prints a traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import replace

from varsd.cli.context import MAX_LIMIT, Context, add_domains_or_all, bounded_int
from varsd.cli.output import (
    ATTENTION,
    EXIT_ATTENTION,
    EXIT_OK,
    Report,
    add_json,
    emit_json,
    error,
    outcome_table,
)
from varsd.clock import stamp
from varsd.config import qemu_owner
from varsd.domain.xml import parse_domain, replace_loader_code, set_metadata
from varsd.engine import firmware_sync
from varsd.engine.reconciler import Outcome, Reconciler
from varsd.errors import VarsdError
from varsd.firmware.archive import Archive
from varsd.firmware.catalog import load_configured
from varsd.firmware.fit import Needs, misfits
from varsd.messages import line
from varsd.model.domain import FirmwareConfig, PinKind, Status
from varsd.model.firmware import Build, UpgradePolicy
from varsd.planning.repair import DomainFacts, Plan, Redefine
from varsd.planning.upgrade import admin_pin, central_at, had_secure_boot, short, tracks_central

log = logging.getLogger("varsd.cli")
_HEX = re.compile(r"^[0-9a-f]+$")
MIN_PREFIX = 6


# -- firmware sync / list / history -----------------------------------------------------


def _print_sync(report: firmware_sync.SyncReport) -> None:
    if report.refresh is not None:
        for change in report.refresh.changes:
            print(f"firmware: {change.describe()}")
    for item in (report.refresh.archived if report.refresh else ()) + report.archived:
        sha, _, path = item.partition(" ")
        print(f"firmware: archived build {sha[:12]} from {path}")
    for sha in report.pruned:
        print(f"firmware: pruned archived build {sha[:12]}")
    for problem in report.all_problems:
        print(f"firmware: problem: {problem}")
    if report.outcomes:
        for o in report.outcomes:
            for d in o.done:
                print(f"{o.ref.name}: {d}")
        print(outcome_table(list(report.outcomes)))


def cmd_sync(ctx: Context, args: argparse.Namespace) -> int:
    try:
        journal = ctx.journal
        report = firmware_sync.sync(
            ctx.cfg, journal, connect=lambda: ctx.hv, owner=lambda: qemu_owner(ctx.cfg), domains=args.domains
        )
    except VarsdError as exc:
        report = firmware_sync.SyncReport(error=str(exc))
    except Exception as exc:  # a package hook must get a line and an exit code, never a traceback
        log.debug("firmware sync failed", exc_info=True)
        report = firmware_sync.SyncReport(error=f"unexpected error: {exc!r}")
    if args.json:
        emit_json(report.as_dict())
    else:
        _print_sync(report)
    if report.error:
        print(f"varsctl firmware sync: {report.error}", file=sys.stderr)
    return report.exit_code


def cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    catalog = load_configured(ctx.cfg)
    archive = Archive(ctx.cfg.archive_dir, state_dir=ctx.cfg.state_dir)
    known = ctx.journal.archived_builds()
    entries = archive.entries()
    builds = [{"sha256": b.code_sha256, "code": b.code_path, "origin": b.origin,
               "layout": b.layout.describe() if b.layout else None, "features": sorted(b.features)}
              for b in catalog.builds]
    archived = [{"sha256": e.sha256, "path": e.path, "size": e.size, "ok": e.ok, "problem": e.problem,
                 "from": known[e.sha256].code_path if e.sha256 in known else None,
                 "last_used": stamp(known[e.sha256].last_used) if e.sha256 in known else None} for e in entries]
    status = EXIT_OK if all(a["ok"] for a in archived) else EXIT_ATTENTION
    if args.json:
        emit_json({"catalog": builds, "archive": archived, "problems": [p.message for p in catalog.problems]})
        return status
    print("CATALOG (first match first)")
    for b in builds:
        print(f"  {b['sha256'][:12]}  {b['code']}  ({b['origin']})")
    print(f"ARCHIVE ({archive.directory})")
    for a in archived:
        state = "ok" if a["ok"] else f"CORRUPT: {a['problem']}"
        print(f"  {a['sha256'][:12]}  {a['size']:>8}  from {a['from'] or '?'}  last used {a['last_used'] or '?'}  "
              f"{state}")
    for p in catalog.problems:
        print(f"problem: {p.message}")
    return status


def cmd_history(ctx: Context, args: argparse.Namespace) -> int:
    events = ctx.journal.firmware_history(limit=args.limit)
    if args.json:
        emit_json({"events": [e.__dict__ for e in events]})
        return EXIT_OK
    for e in events:
        print(f"#{e.id}  {stamp(e.at)}  {e.event:<8}  {e.sha256[:12]}  {e.code_path}")
    return EXIT_OK


# -- pin / unpin / approve ----------------------------------------------------------------


class Refused(VarsdError):
    """The command cannot do this to this domain (exit 1, with the reason)."""


def _final_xml(plan: Plan, xml: str) -> str:
    """What to write: the planner's own redefinition of `xml` if it wants one, else `xml`."""
    for action in plan.actions:
        if isinstance(action, Redefine):
            return action.xml
    return xml


def _when(facts: DomainFacts) -> str:
    return "; the running guest keeps its build until its next cold boot" if facts.running else ""


def _managed(ref, facts: DomainFacts, plan: Plan) -> None:
    if plan.status is Status.UNMANAGED or plan.config is not FirmwareConfig.SPLIT:
        raise Refused(f"domain '{ref.name}' is not a managed split domain ({plan.config.value}, "
                      f"{plan.status.value}: {plan.detail})")
    if not facts.firmware.metadata.build_code_sha256:
        raise Refused(f"domain '{ref.name}' is not bound to a build yet; run 'varsctl reconcile {ref.name}' first")


def _resolve_build(rec: Reconciler, facts: DomainFacts, spec: str) -> str:
    """A full digest from a digest or a prefix of at least MIN_PREFIX hex digits."""
    spec = spec.lower()
    if not _HEX.match(spec) or len(spec) < MIN_PREFIX:
        raise Refused(f"--build {spec!r}: give a code sha256 or a prefix of at least {MIN_PREFIX} hex digits")
    md = facts.firmware.metadata
    known = {b.code_sha256 for b in rec.catalog.builds} | set(rec.upgrade_context().archive.verified)
    known |= {s for s in (md.build_code_sha256, md.pinned_sha256) if s}
    if facts.live is not None and facts.live.booted_sha256:
        known.add(facts.live.booted_sha256)
    matches = sorted(s for s in known if s.startswith(spec))
    if not matches:
        raise Refused(f"no catalog or archived build has digest {spec}; see 'varsctl firmware list'")
    if len(matches) > 1:
        raise Refused(f"--build {spec} is ambiguous: {', '.join(m[:16] for m in matches)}")
    return matches[0]


def _check_fit(rec: Reconciler, ctx: Context, facts: DomainFacts, sha: str, force: bool) -> None:
    """A build the domain never ran must be known to fit it (`varsd.firmware.fit`: layout,
    Secure Boot, SMM, machine; an archived build no descriptor lists any more is judged by
    what was recorded when it was archived: its layout and features)."""
    fw = facts.firmware
    md = fw.metadata
    ran = {s for s in (md.build_code_sha256, md.pinned_sha256, fw.booted_sha256) if s}
    if facts.live is not None and facts.live.booted_sha256:
        ran.add(facts.live.booted_sha256)
    if sha in ran or force:
        return
    layout = facts.nvram.varstore_layout if facts.nvram is not None else None
    needs = Needs.of(fw, secure_boot=had_secure_boot(fw, rec.catalog, rec.upgrade_context()), layout=layout)
    candidates = [(b, needs) for b in rec.catalog.by_code_sha(sha)]
    archived = ctx.journal.archived_builds().get(sha)
    if archived is not None and archived.layout is not None:
        # Its targets were not recorded: only what was is judged.
        candidates.append((Build(origin="archive", code_path=archived.code_path, code_format="raw", code_sha256=sha,
                                 code_size=archived.size, layout=archived.layout, features=archived.features),
                           replace(needs, arch=None)))
    if not candidates:
        raise Refused(f"the varstore layout build {sha[:12]} expects is not known, so its fit with "
                      f"{fw.nvram_path} cannot be checked; use --force if you know it fits")
    if layout is None:
        raise Refused(f"{fw.nvram_path} has no readable layout, so build {sha[:12]}'s fit cannot be checked; "
                      "use --force if you know it fits")
    problems = [misfits(b, n) for b, n in candidates]
    if all(problems):
        raise Refused(f"{problems[0][0].sentence} ({fw.nvram_path}); it would not boot this domain correctly "
                      "('varsctl migrate' moves the variables)")


def cmd_pin(ctx: Context, args: argparse.Namespace) -> int:
    rec = ctx.reconciler()
    ref = ctx.hv.lookup(args.domain)
    with rec.writer.transaction(ref, "pinning") as tx:
        xml = tx.xml
        facts, plan = rec.plan_xml(ref, xml)
        _managed(ref, facts, plan)
        md = facts.firmware.metadata
        running = facts.live.booted_sha256 if facts.live is not None else None
        if args.build:
            sha = _resolve_build(rec, facts, args.build)
            _check_fit(rec, ctx, facts, sha, args.force)
        else:
            sha = running or md.pinned_sha256 or md.build_code_sha256 or ""
        # A catalog build is archived now, so the pin survives its upgrade.
        for build in rec.catalog.by_code_sha(sha)[:1]:
            rec.archive_build(build)
        pinned = set_metadata(xml, admin_pin(md, sha, args.reason, rec.clock.now(), ref.name))
        new_facts, new_plan = rec.plan_xml(ref, pinned)
        if new_plan.status is not Status.PINNED:
            raise Refused(f"cannot pin domain '{ref.name}' to build {sha[:12]}: {new_plan.detail}")
        final = _final_xml(new_plan, pinned)
        tx.write(final, f"pinned to build {sha[:12]} by the admin")
    _say(args, ref, f"{ref.name}: pinned to build {sha[:12]} ({new_plan.code}){_when(facts)}",
         status=new_plan.status.value, build=sha)
    return EXIT_OK


def cmd_unpin(ctx: Context, args: argparse.Namespace) -> int:
    rec = ctx.reconciler()
    ref = ctx.hv.lookup(args.domain)
    with rec.writer.transaction(ref, "unpinning") as tx:
        xml = tx.xml
        md = parse_domain(xml).metadata
        kind = md.pin_kind
        if kind is None:
            _say(args, ref, f"{ref.name}: not pinned", status=None)
            return EXIT_OK
        if kind is PinKind.POLICY:
            raise Refused(f"domain '{ref.name}' is held back by upgrade_policy = \"manual\", not by an admin pin; "
                          f"'varsctl upgrade approve {ref.name}' lets the new build through")
        if kind is PinKind.INCOMPATIBLE:
            raise Refused(f"domain '{ref.name}' is held on build {short(md.pinned_sha256)} because the central build "
                          f"does not fit its varstore; 'varsctl migrate {ref.name}' resolves that")
        released = md.without_pin()
        unpinned = (replace_loader_code(xml, md.build_code_path, released) if md.build_code_path
                    else set_metadata(xml, released))
        facts, plan = rec.plan_xml(ref, unpinned)
        tx.write(_final_xml(plan, unpinned), f"unpinned from build {short(md.pinned_sha256)} by the admin")
    _say(args, ref, f"{ref.name}: unpinned; now {plan.status.value}: {plan.detail}", status=plan.status.value)
    return EXIT_ATTENTION if plan.status in ATTENTION else EXIT_OK


def _approve_one(rec: Reconciler, ctx: Context, ref, named: bool, out: Report) -> Outcome | None:
    """Let a held-back build through to one domain; None when there is nothing to approve."""
    with rec.writer.transaction(ref, "approving an upgrade of") as tx:
        xml = tx.xml
        facts, _ = rec.plan_xml(ref, xml)
        fw = facts.firmware
        md = fw.metadata
        kind = md.pin_kind
        if kind is PinKind.ADMIN or kind is PinKind.INCOMPATIBLE:
            if named:
                why = (f"pinned by an admin to build {short(md.pinned_sha256)}; 'varsctl unpin {ref.name}' first"
                       if kind is PinKind.ADMIN else
                       f"the central build does not fit its varstore; 'varsctl migrate {ref.name}' resolves that")
                out.line(f"{ref.name}: not approved: {why}", domain=ref.name, approved=False)
            return None
        if kind is PinKind.POLICY and md.build_code_path:
            candidate = replace_loader_code(xml, md.build_code_path, md.without_pin())
        else:
            central = central_at(rec.catalog, md.build_code_path)
            if not (tracks_central(fw, facts.image) and central is not None
                    and central.code_sha256 != md.build_code_sha256):
                if named:
                    out.line(f"{ref.name}: nothing held back", domain=ref.name, approved=False)
                return None
            candidate = xml
        _, plan = rec.plan_xml(ref, candidate, policy=UpgradePolicy.AUTO)
        final = _final_xml(plan, candidate)
        if final == xml:
            if named:
                out.line(f"{ref.name}: nothing held back", domain=ref.name, approved=False)
            return None
        tx.write(final, "firmware upgrade approved by the admin")
    outcome = rec.reconcile(ref, apply=False)
    out.line(f"{ref.name}: approved; now {outcome.status.value}: {outcome.detail}", domain=ref.name, approved=True,
             status=outcome.status.value)
    return outcome


def cmd_approve(ctx: Context, args: argparse.Namespace) -> int:
    rec = ctx.reconciler()
    refs = ctx.refs(args.domains)
    out = Report("results", args.json)
    outcomes = []
    failed = False
    for ref in refs:
        try:
            outcome = _approve_one(rec, ctx, ref, bool(args.domains), out)
        except VarsdError as exc:
            out.line(line(ref.name, exc, ref.uuid), problem=True, domain=ref.name, approved=False)
            failed = True
            continue
        if outcome is not None:
            outcomes.append(outcome)
    if args.all and not outcomes and not failed:
        out.line("upgrade approve --all: no domain has a held-back build")
    attention = failed or any(o.status in ATTENTION for o in outcomes)
    out.close()
    return EXIT_ATTENTION if attention else EXIT_OK


def _say(args: argparse.Namespace, ref, text: str, **fields) -> None:
    """A one-domain command's result: its sentence, or with --json `{"result": {...}}`."""
    if args.json:
        emit_json({"result": {"domain": ref.name, "uuid": ref.uuid, **fields, "message": text}})
    else:
        print(text)


def _refusing(func):
    """Refused is the command saying no: the reason on stderr, exit 1."""

    def run(ctx: Context, args: argparse.Namespace) -> int:
        try:
            return func(ctx, args)
        except Refused as exc:
            error(exc)
            if getattr(args, "json", False):
                emit_json({"result": None, "error": str(exc)})
            return EXIT_ATTENTION

    return run


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to varsctl's parser."""
    fw = sub.add_parser("firmware", help="firmware builds: sync after package changes, list, history")
    fsub = fw.add_subparsers(dest="firmware_command", required=True, metavar="COMMAND")
    s = fsub.add_parser("sync", help="notice firmware package changes, archive builds, plan every domain "
                        "(for package hooks; exit 0 done, 1 attention, 2 could not run)")
    add_json(s)
    s.add_argument("domains", nargs="*", metavar="DOMAIN", help="only these domains (default: all)")
    s.set_defaults(func=cmd_sync)
    ls = fsub.add_parser("list", help="catalog builds and archived builds (digests for 'pin --build')")
    add_json(ls)
    ls.set_defaults(func=cmd_list, read_only=True)
    h = fsub.add_parser("history", help="when each watched code image appeared, changed or was removed")
    h.add_argument("--limit", type=bounded_int(1, MAX_LIMIT), default=50,
                   help="at most this many events, newest first (default 50)")
    add_json(h)
    h.set_defaults(func=cmd_history, read_only=True)

    p = sub.add_parser("pin", help="hold a domain on a build (default: the one it runs / is bound to)")
    p.add_argument("domain", metavar="DOMAIN", help="name or UUID")
    p.add_argument("--build", metavar="SHA", help="code sha256 (or a prefix) of a catalog or archived build")
    p.add_argument("--reason", help="why (kept in the domain's metadata)")
    p.add_argument("--force", action="store_true", help="pin to a build whose fit with the varstore is not known")
    add_json(p)
    p.set_defaults(func=_refusing(cmd_pin))
    u = sub.add_parser("unpin", help="release an admin's pin (the domain follows the central build again)")
    u.add_argument("domain", metavar="DOMAIN", help="name or UUID")
    add_json(u)
    u.set_defaults(func=_refusing(cmd_unpin))

    up = sub.add_parser("upgrade", help="firmware upgrades held back by upgrade_policy = \"manual\"")
    upsub = up.add_subparsers(dest="upgrade_command", required=True, metavar="COMMAND")
    a = upsub.add_parser("approve", help="let the new central build through (applies at the next cold boot)")
    add_domains_or_all(a, domains_help="these domains (name or UUID); or --all",
                       all_help="every domain with a held-back build")
    add_json(a)
    a.set_defaults(func=_refusing(cmd_approve))
