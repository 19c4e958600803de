"""`varsd` entry point: runs the service in the foreground (systemd Type=notify).

Logs go to stderr, where journald picks them up; every line about a domain names it.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
from collections.abc import Sequence

from varsd import __version__
from varsd.config import load_config
from varsd.daemon.service import Service
from varsd.errors import VarsdError


def build_parser() -> argparse.ArgumentParser:
    """varsd's options (also the source of its man page, generated at package build time)."""
    p = argparse.ArgumentParser(prog="varsd", description="Keep UEFI firmware of libvirt domains right.")
    p.add_argument("--config", help="config file (default $VARSD_CONFIG or /etc/varsd/varsd.toml)")
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (default from config: qemu:///system)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="least severe messages logged (default: info)")
    p.add_argument("--version", action="version", version=f"varsd {__version__}")
    return p


M_ARENA_MAX = -8  # glibc's mallopt parameter


def one_malloc_arena() -> None:
    """One glibc malloc arena for the daemon's threads. glibc gives every thread that allocates
    an arena of its own and keeps what each ever held: the workers' lxml parses and libvirt
    replies left ~10 MiB more resident at 1000 domains (bench/bench_daemon.py). Python code
    allocates under the GIL anyway, so one arena costs no parallelism. Called before any
    thread starts; an admin's MALLOC_ARENA_MAX wins; a libc without mallopt is left as is."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    one_malloc_arena()
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.connect)
        service = Service(cfg, reload_config=lambda: load_config(args.config, args.connect))
    except VarsdError as exc:
        print(f"varsd: {exc}", file=sys.stderr)
        return 2
    service.install_signal_handlers()
    return service.run()


if __name__ == "__main__":
    sys.exit(main())
