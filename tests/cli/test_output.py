"""`varsd.cli.output` and the CLI's contract: every command and option has help, both
programs have --version, every --json output is one object with its named key, read-only
commands never write the state directory, and journal JSON carries no secrets."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from varsd import __version__
from varsd.adapters.journal import Journal
from varsd.cli.output import EXIT_OK, change_dict, table
from varsd.cli.varsctl import build_parser, main
from varsd.clock import parse_stamp
from varsd.daemon import main as varsd_main
from varsd.domain.xml import redact_secrets

from .common import run


def _parsers(parser: argparse.ArgumentParser, prefix: str = "varsctl"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prefix} {name}")


def test_every_option_and_argument_has_help() -> None:
    missing = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_every_leaf_command_takes_json() -> None:
    leaves = [(n, p) for n, p in _parsers(build_parser())
              if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)]
    assert len(leaves) >= 13
    assert [n for n, p in leaves if "--json" not in p._option_string_actions] == []


@pytest.mark.parametrize("entry", [main, varsd_main.main])
def test_version(capsys, entry) -> None:
    with pytest.raises(SystemExit) as info:
        entry(["--version"])
    assert info.value.code == 0 and __version__ in capsys.readouterr().out


@pytest.mark.parametrize(("args", "key"), [
    (("status",), "domains"),
    (("reconcile", "--dry-run"), "domains"),
    (("journal",), "changes"),
    (("firmware", "list"), "catalog"),
    (("firmware", "history"), "events"),
    (("opt-in", "romguest"), "results"),
    (("unpin", "romguest"), "result"),
])
def test_json_is_one_object_with_a_named_key(capsys, host, args, key) -> None:
    _, out, _ = run(capsys, host, *args, "--json")
    doc = json.loads(out)
    assert isinstance(doc, dict) and key in doc


@pytest.mark.parametrize("args", [("status",), ("journal",), ("firmware", "list"), ("firmware", "history")])
def test_read_only_commands_create_no_journal(capsys, host, args) -> None:
    run(capsys, host, *args)
    assert not os.path.exists(host["state"])


def test_journal_json_never_prints_secrets(capsys, host) -> None:
    j = Journal(os.path.join(host["state"], "state.sqlite3"))
    secret = "<domain><devices><graphics type='vnc' port='-1' passwd='hunter2'/></devices></domain>\n"
    j.record(at=parse_stamp("2025-06-01T12:00:00Z"), uuid="u", name="g", actor="test", reason="r", old_xml=secret,
             new_xml=secret.replace("hunter2", 'x"y'))
    j.close()
    rc, out, _ = run(capsys, host, "journal", "--json")
    assert rc == EXIT_OK and "hunter2" not in out and "passwd" not in out
    (entry,) = json.loads(out)["changes"]
    assert entry["old_xml"] == "<domain><devices><graphics type='vnc' port='-1'/></devices></domain>\n"


def test_redaction_keeps_everything_else_byte_for_byte() -> None:
    xml = "<domain>\n  <graphics type=\"spice\" password=\"a'b\" autoport='yes'/>\n</domain>\n"
    assert redact_secrets(xml) == "<domain>\n  <graphics type=\"spice\" autoport='yes'/>\n</domain>\n"
    assert redact_secrets("<domain/>") == "<domain/>"

    class C:
        def __init__(self) -> None:
            self.old_xml, self.new_xml, self.id = "<a passwd='p'/>", "", 1

    assert change_dict(C()) == {"old_xml": "<a/>", "new_xml": "", "id": 1}


def test_table_pads_all_but_the_last_column() -> None:
    assert table(("A", "BB", "C"), [("xx", "y", "free text")]) == "A   BB  C\nxx  y   free text"


@pytest.mark.parametrize("command", [("backup", "create"), ("upgrade", "approve"), ("secureboot", "update")])
def test_domains_or_all_is_declared_to_argparse(capsys, host, command) -> None:
    """DOMAIN... and --all exclude each other, and one is required: argparse says so (exit 2)."""
    rc, _, err = run(capsys, host, *command, "--all", "romguest")
    assert rc == 2 and "not allowed with argument --all" in err, err
    rc, _, err = run(capsys, host, *command)
    assert rc == 2 and "one of the arguments DOMAIN --all is required" in err, err
