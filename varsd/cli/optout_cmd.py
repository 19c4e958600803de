"""varsctl opt-out / opt-in: an admin's per-domain "hands off", kept in the domain itself.

The flag lives in the domain's own XML (varsd's <metadata> element, manage='no'), so
it travels with the domain (migration, backup of /etc/libvirt) and other tools see it.
Setting it is an XML change like any other: through the one write transaction
(`varsd.engine.transaction`), journaled, under the domain's lock.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from varsd.cli.context import Context
from varsd.cli.output import EXIT_OK, Report, add_json
from varsd.domain.xml import parse_domain, set_metadata


def _set(ctx: Context, names: list[str], opt_out: bool, as_json: bool) -> int:
    rec = ctx.reconciler()
    out = Report("results", as_json)
    for name in names:
        ref = ctx.hv.lookup(name)
        with rec.writer.transaction(ref) as tx:
            md = parse_domain(tx.xml).metadata
            if md.opt_out == opt_out:
                out.line(f"{ref.name}: already {'opted out' if opt_out else 'managed'}", domain=ref.name,
                         changed=False)
                continue
            reason = "opted out by the admin" if opt_out else "opted back in by the admin"
            tx.write(set_metadata(tx.xml, replace(md, opt_out=opt_out)), reason)
            out.line(f"{ref.name}: {reason}", domain=ref.name, changed=True)
    out.close()
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    for command, opt_out, what in (("opt-out", True, "leave these domains alone from now on (flag in their metadata)"),
                                   ("opt-in", False, "manage these domains again")):
        p = sub.add_parser(command, help=what)
        p.add_argument("domains", nargs="+", metavar="DOMAIN", help="domain names or UUIDs")
        add_json(p)
        p.set_defaults(func=lambda ctx, args, opt_out=opt_out: _set(ctx, args.domains, opt_out, args.json))
