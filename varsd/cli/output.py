"""What varsctl prints and returns: tables, JSON documents and exit codes, in one place.

Rules:
- Every command takes `--json`; its output is then one JSON object whose shape the
  README lists: `status`, `reconcile` and `firmware sync` print `{"domains": [...]}`
  (sync adds `firmware`, `error` and `exit_code`), every other command a named
  top-level key (`changes`, `events`, `catalog`/`archive`/`problems`, `result`,
  `results`).
- Journal entries in JSON never carry secrets: the XML varsd journals is read with
  libvirt's SECURE flag (so an undo restores it whole), and is redacted here.
- Exit codes (`varsd.model.exit.Exit`): 0 fine, 1 attention, 2 usage, configuration or
  connection error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from varsd.clock import stamp
from varsd.domain.xml import redact_secrets
from varsd.engine.reconciler import Outcome
from varsd.model.domain import ATTENTION
from varsd.model.exit import Exit

EXIT_OK, EXIT_ATTENTION, EXIT_USAGE = Exit.OK, Exit.ATTENTION, Exit.USAGE
__all__ = ["ATTENTION", "EXIT_ATTENTION", "EXIT_OK", "EXIT_USAGE", "Report", "add_json", "change_dict", "emit_json",
           "error", "exit_for", "outcome_table", "table"]


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is free text, never padded."""
    all_rows = [tuple(header)] + [tuple(r) for r in rows]
    n = len(header) - 1
    widths = [max(len(r[i]) for r in all_rows) for i in range(n)]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:n])) + "  " + r[n] for r in all_rows)


def outcome_table(outcomes: Sequence[Outcome]) -> str:
    return table(("DOMAIN", "STATE", "CONFIG", "STATUS", "DETAIL"),
                 ((o.ref.name, o.ref.state, o.plan.config.value, o.status.value, o.detail) for o in outcomes))


def exit_for(outcomes: Iterable[Outcome]) -> Exit:
    """1 when a domain needs attention (error, needs-migration), else 0."""
    return EXIT_ATTENTION if any(o.status in ATTENTION for o in outcomes) else EXIT_OK


def emit_json(doc: dict[str, Any]) -> None:
    """Print one JSON object (never a bare list: every shape has a named key): one
    top-level key per line, and a list's entries one per line (grep finds a domain's whole
    entry; json's indenting encoder is pure Python, 0.2 s for 1000 status entries)."""
    dumps = json.JSONEncoder(default=_json_value).encode  # the C encoder (no indent)
    lines = ["{"]
    for i, (key, value) in enumerate(doc.items()):
        comma = "," if i < len(doc) - 1 else ""
        if isinstance(value, list) and value:
            lines.append(f"  {dumps(key)}: [")
            lines.extend(f"    {dumps(entry)}," for entry in value[:-1])
            lines.append(f"    {dumps(value[-1])}")
            lines.append(f"  ]{comma}")
        else:
            lines.append(f"  {dumps(key)}: {dumps(value)}{comma}")
    lines.append("}")
    print("\n".join(lines))


def _json_value(value: object) -> object:
    """JSON's edge for time: a datetime as the one text form (clock.stamp)."""
    if isinstance(value, datetime):
        return stamp(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def change_dict(change: Any) -> dict[str, Any]:
    """A journal entry for JSON output, its XML without secrets (graphics passwords)."""
    # `kind` is for code (undo); the documented shape predates it and the reason says it to an admin.
    d = {k: v for k, v in change.__dict__.items() if k != "kind"}
    for key in ("old_xml", "new_xml"):
        if d.get(key):
            d[key] = redact_secrets(d[key])
    return d


def add_json(parser: argparse.ArgumentParser) -> None:
    """Every command's `--json`."""
    parser.add_argument("--json", action="store_true", help="print one JSON object (shapes: README, 'Output')")


def error(message: str | BaseException, *, prog: str = "varsctl") -> None:
    print(f"{prog}: {message}", file=sys.stderr)


class Report:
    """Line-by-line output that `--json` turns into one object `{key: [entries], ...}`.

    Each line is printed as it happens (stdout, or stderr for problems); with `--json`
    nothing is printed until `close`, and every line becomes an entry with its message
    and the fields given.
    """

    def __init__(self, key: str, as_json: bool) -> None:
        self.key = key
        self.as_json = as_json
        self.entries: list[dict[str, Any]] = []

    def line(self, text: str, *, problem: bool = False, **fields: Any) -> None:
        if self.as_json:
            self.entries.append({**fields, "message": text, "problem": problem})
        else:
            print(text, file=sys.stderr if problem else sys.stdout, flush=True)

    def close(self, **extra: Any) -> None:
        if self.as_json:
            emit_json({self.key: self.entries, **extra})
