"""Man pages and bash completion for varsd and varsctl, generated from their argparse parsers.

Run at package build time (debian/rules, or by hand) so the documentation can never drift
from the options the programs really take:

    PYTHONPATH=. python3 packaging/argparse_docs.py OUTDIR

writes OUTDIR/varsd.8, OUTDIR/varsctl.8 and OUTDIR/bash-completion/varsctl (which also
completes varsd). Only the parser-building functions are called; nothing connects anywhere.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Program:
    name: str
    summary: str
    parser: Callable[[], argparse.ArgumentParser]
    sections: tuple[tuple[str, str], ...]  # extra (TITLE, roff body), after OPTIONS/COMMANDS


def _varsd_parser() -> argparse.ArgumentParser:
    from varsd.daemon.main import build_parser

    return build_parser()


def _varsctl_parser() -> argparse.ArgumentParser:
    from varsd.cli.varsctl import build_parser

    return build_parser()


_FILES = (
    ".TP\n.I /etc/varsd/varsd.toml\nConfiguration; every key is optional (see the commented defaults in it).\n"
    ".TP\n.I /var/lib/varsd/state.sqlite3\nJournal of every domain XML change, with the XML it replaced.\n"
    ".TP\n.I /var/lib/varsd/archive/\nRead-only archive of every firmware code image seen, by sha256.\n"
    ".TP\n.I /var/lib/libvirt/qemu/nvram/\nThe domains' varstores (user data: never removed by the package).\n"
)
_SEE_ALSO = ".BR virsh (1),\n.BR libvirtd (8),\n.BR virt-fw-vars (1)\n"

PROGRAMS = (
    Program("varsd", "keep UEFI firmware of libvirt domains right", _varsd_parser, (
        ("DESCRIPTION",
         "varsd watches libvirt domains. Every domain that boots OVMF gets a private varstore from the\n"
         "matching template and uses the distribution's central firmware code (two pflash devices).\n"
         "Wrong firmware configurations are repaired without losing a variable; after a firmware\n"
         "package upgrade each domain gets the new code at its next cold boot.\n"
         ".PP\nIt runs in the foreground as a systemd service of\n.B Type=notify\n"
         "and signals readiness after its first full reconcile.\n"),
        ("SIGNALS", ".TP\n.B SIGHUP\nReload the configuration and the firmware catalog.\n"
                    ".TP\n.B SIGTERM\nFinish the domain in hand and exit.\n"),
        ("FILES", _FILES),
        ("SEE ALSO", ".BR varsctl (8),\n" + _SEE_ALSO),
    )),
    Program("varsctl", "inspect and repair UEFI firmware of libvirt domains", _varsctl_parser, (
        ("DESCRIPTION",
         "varsctl is the administrator's tool for varsd: it reports every domain's firmware\n"
         "configuration, repairs, undoes journaled changes, pins and migrates varstores, and is what\n"
         "firmware package hooks call after an upgrade\n(\\fBvarsctl firmware sync\\fR).\n"
         "It works whether or not the daemon runs.\n"),
        ("EXIT STATUS", ".TP\n.B 0\nAll fine.\n.TP\n.B 1\nSomething needs attention, or an action failed.\n"
                        ".TP\n.B 2\nUsage, configuration or connection error.\n"),
        ("FILES", _FILES),
        ("SEE ALSO", ".BR varsd (8),\n" + _SEE_ALSO),
    )),
)


# -- walking a parser ----------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each direct subcommand, in definition order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not isinstance(a, argparse._SubParsersAction) and a.help is not argparse.SUPPRESS]


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """Every (sub)command path below `parser`, depth first."""
    for name, help_text, sub in _subparsers(parser):
        path = (*prefix, name)
        yield path, help_text, sub
        yield from commands(sub, path)


# -- roff ------------------------------------------------------------------------------


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _usage(parser: argparse.ArgumentParser) -> str:
    """One-line usage; the list of subcommands becomes COMMAND (they have a section of their own)."""
    usage = " ".join(parser.format_usage().split()).removeprefix("usage: ")
    return re.sub(r"\{[^{}]*\} \.\.\.", "COMMAND ...", usage)


def _option_items(parser: argparse.ArgumentParser, skip_help: bool = False) -> str:
    out = []
    for action in _options(parser):
        if skip_help and isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            metavar = ""
            if action.nargs != 0:
                metavar = " " + (action.metavar or (
                    "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()))
            head = ", ".join(f"\\fB{_roff(o)}\\fR" for o in action.option_strings) + _roff(metavar)
        else:
            head = f"\\fI{_roff(str(action.metavar or action.dest))}\\fR"
        out.append(f".TP\n{head}\n{_roff(action.help or '')}\n")
    return "".join(out)


def manpage(prog: Program, version: str, date: str) -> str:
    parser = prog.parser()
    sections = dict(prog.sections)
    out = [
        f'.\\" Generated from the argparse definitions by packaging/argparse_docs.py; do not edit.\n'
        f'.TH {prog.name.upper()} 8 "{date}" "varsd {version}" "System Administration"\n',
        f".SH NAME\n{prog.name} \\- {_roff(prog.summary)}\n",
        # left-adjusted, unhyphenated: a usage line has long tokens such as {status,reconcile,...}
        f".SH SYNOPSIS\n.ad l\n.nh\n.B {prog.name}\n{_roff(_usage(parser).removeprefix(prog.name).strip())}\n"
        ".ad\n.hy\n",
    ]
    if "DESCRIPTION" in sections:
        out.append(f".SH DESCRIPTION\n{sections.pop('DESCRIPTION')}")
    out.append(f".SH OPTIONS\n{_option_items(parser)}")
    subs = list(commands(parser))
    if subs:
        out.append(".SH COMMANDS\n")
        for path, help_text, sub in subs:
            out.append(f".SS {_roff(' '.join(path))}\n{_roff(help_text)}\n.PP\n.B {_roff(_usage(sub))}\n")
            out.append(_option_items(sub, skip_help=True))
    for title, body in sections.items():
        out.append(f".SH {title}\n{body}")
    return "".join(out)


# -- bash completion --------------------------------------------------------------------


def _words(parser: argparse.ArgumentParser) -> tuple[list[str], bool]:
    """Options and subcommand names this parser takes, and whether it takes DOMAIN names."""
    words = [o for a in _options(parser) for o in a.option_strings]
    words += [name for name, _, _ in _subparsers(parser)]
    domains = any(not a.option_strings and (a.metavar == "DOMAIN" or a.dest in ("domain", "domains"))
                  for a in _options(parser))
    return words, domains


def bash_completion() -> str:
    """One completion file for both programs: words per command path, domain names from virsh."""
    lines = [
        "# bash completion for varsd and varsctl.",
        "# Generated from the argparse definitions by packaging/argparse_docs.py; do not edit.",
        "",
        "_varsd_domains() {",
        "    virsh -q list --all --name 2>/dev/null",
        "}",
        "",
    ]
    for prog in PROGRAMS:
        parser = prog.parser()
        fn = f"_{prog.name}"
        lines += [f"{fn}() {{", "    local cur path word i", "    cur=${COMP_WORDS[COMP_CWORD]}", "    path=",
                  "    for ((i = 1; i < COMP_CWORD; i++)); do", "        word=${COMP_WORDS[i]}",
                  "        case \"$path $word\" in"]
        paths = [((), parser)] + [(p, s) for p, _, s in commands(parser)]
        for path, _ in paths[1:]:
            parent = " ".join(path[:-1])
            lines.append(f"            \"{(' ' + parent) if parent else ''} {path[-1]}\") path=\"$path {path[-1]}\" ;;")
        lines += ["        esac", "    done", "    case \"$path\" in"]
        for path, sub in paths:
            words, domains = _words(sub)
            key = (" " + " ".join(path)) if path else ""
            extra = ' $(_varsd_domains)' if domains else ""
            lines.append(f"        \"{key}\") COMPREPLY=($(compgen -W \"{' '.join(words)}{extra}\" -- \"$cur\")) ;;")
        lines += ["    esac", "}", f"complete -F {fn} {prog.name}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: argparse_docs.py OUTDIR", file=sys.stderr)
        return 2
    from varsd import __version__

    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    # Reproducible builds: the date comes from the changelog via SOURCE_DATE_EPOCH when set.
    stamp = datetime.datetime.fromtimestamp(int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or
                                            datetime.datetime.now(datetime.UTC).timestamp(), datetime.UTC)
    for prog in PROGRAMS:
        (out / f"{prog.name}.8").write_text(manpage(prog, __version__, stamp.strftime("%Y-%m-%d")))
    (out / "bash-completion").mkdir(exist_ok=True)
    (out / "bash-completion" / "varsctl").write_text(bash_completion())
    return 0


if __name__ == "__main__":
    sys.exit(main())
