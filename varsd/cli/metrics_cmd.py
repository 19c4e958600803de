"""`varsctl metrics`: every figure of `status`, `secureboot status` and the backups, in Prometheus text format."""

from __future__ import annotations

import argparse
import sys

from varsd.cli.context import Context
from varsd.cli.output import EXIT_OK, add_json, emit_json
from varsd.engine import metrics


def cmd_metrics(ctx: Context, args: argparse.Namespace) -> int:
    rec = ctx.reconciler()
    snap = metrics.take_snapshot(rec, ctx.refs(args.domains) if args.domains else None, sb=ctx.secureboot_for(rec))
    if args.textfile:
        metrics.write_textfile(args.textfile, metrics.registry(snap))
    elif args.json:
        emit_json({"metrics": metrics.samples(snap)})
    else:
        sys.stdout.write(metrics.text(snap))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("metrics", help="print metrics in the Prometheus text format")
    p.add_argument("domains", nargs="*", metavar="DOMAIN", help="only these domains (default: all)")
    add_json(p)
    p.add_argument("--textfile", metavar="PATH", help="write a node_exporter textfile (atomically) instead")
    p.set_defaults(func=cmd_metrics)
