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


M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameters
MMAP_THRESHOLD = 256 * 1024


def tune_malloc() -> None:
    """Keep the daemon's resident memory to what it uses (glibc; called before any thread starts).

    - One malloc arena for all threads: glibc gives every thread that allocates an arena of
      its own and keeps what each ever held (the workers' lxml parses and libvirt replies).
      Python code allocates under the GIL anyway, so one arena costs no parallelism.
    - A fixed mmap threshold: glibc raises it to the size of every large buffer freed, so
      after reading firmware images (64 MiB AAVMF ones, in 1 MiB reads) later buffers of
      that size came from the heap and stayed resident (daemon at 1000 domains: 102 MiB
      after a cold start, 77 MiB with this; bench/bench_daemon.py).
    The admin's MALLOC_ARENA_MAX / MALLOC_MMAP_THRESHOLD_ win; a libc without mallopt is left as is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(M_ARENA_MAX, 1)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()
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
