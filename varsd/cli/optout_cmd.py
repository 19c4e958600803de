"""varsctl opt-out / opt-in: an admin's per-domain "hands off", kept in the domain itself.

The flag lives in the domain's own XML (varsd's <metadata> element, manage='no'), so
it travels with the domain (migration, backup of /etc/libvirt) and other tools see it.
Setting it is an XML change like any other: journaled, under the domain's lock.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from varsd.cli.context import EXIT_OK, Context
from varsd.domain.xml import parse_domain, set_metadata


def _set(ctx: Context, names: list[str], opt_out: bool) -> int:
    rec = ctx.reconciler()
    for name in names:
        ref = ctx.hv.lookup(name)
        with rec.domain_lock(ref, "opting out/in"):
            xml = ctx.hv.persistent_xml(ref.uuid)
            md = parse_domain(xml).metadata
            if md.opt_out == opt_out:
                print(f"{ref.name}: already {'opted out' if opt_out else 'managed'}")
                continue
            reason = "opted out by the admin" if opt_out else "opted back in by the admin"
            rec.redefine(ref, xml, set_metadata(xml, replace(md, opt_out=opt_out)), reason)
            print(f"{ref.name}: {reason}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    out = sub.add_parser("opt-out", help="leave these domains alone from now on (flag in their metadata)")
    out.add_argument("domains", nargs="+", metavar="DOMAIN")
    out.set_defaults(func=lambda ctx, args: _set(ctx, args.domains, True))
    back = sub.add_parser("opt-in", help="manage these domains again")
    back.add_argument("domains", nargs="+", metavar="DOMAIN")
    back.set_defaults(func=lambda ctx, args: _set(ctx, args.domains, False))
