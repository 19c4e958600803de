"""Profile `varsctl status --json` (and, with --sync, `firmware sync` after a rebind-all
upgrade) over N domains of its own, then remove them.

    .venv/bin/python bench/profile_status.py 240 [--sync]

It defines `varsd-bench-r2-*` domains like bench_daemon.py's, lets `varsctl reconcile`
repair them (varsd restricted to them), prints the medians of five bare XML loops and
five `status --json` runs and their ratio, then a cProfile table. Keep N <= 250 on a
shared libvirtd.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import tempfile
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_daemon as bench  # noqa: E402

from varsd.cli.varsctl import main as varsctl_main  # noqa: E402

PREFIX = "varsd-bench-r2-"
URI = "qemu:///system"


def profiled(argv: list[str]) -> tuple[float, str]:
    prof = cProfile.Profile()
    prof.enable()
    seconds, _ = bench.quiet(varsctl_main, argv)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
    return seconds, out.getvalue()


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 150
    bench.cleanup(URI, PREFIX)
    work = Path(tempfile.mkdtemp(prefix="varsd-r2prof-"))
    fw = work / "firmware"
    fw.mkdir()
    bench.install_build(fw, 0)
    conn = libvirt.open(URI)
    others = sorted({d.name() for d in conn.listAllDomains(0)} | {"varsd-test-*", "varsd-bench-[sb]*"})
    cfg = work / "varsd.toml"
    cfg.write_text(f'uri = "{URI}"\nstate_dir = "{work / "state"}"\nreconcile_interval = 3600\n'
                   f'firmware_dirs = ["{fw}"]\nexclude = [{", ".join(f"{o!r}" for o in others)}]\n')
    status = ["--config", str(cfg), "status", "--json"]
    try:
        for i in range(n):
            conn.defineXML(bench.domain_xml(f"{PREFIX}{i:04d}"))
        bench.quiet(varsctl_main, ["--config", str(cfg), "reconcile"])
        # A second pass finds them compliant and memoises their plans, as the daemon does at
        # the event of its own redefinition.
        bench.quiet(varsctl_main, ["--config", str(cfg), "reconcile"])
        bare_t, status_t = [], []
        for _ in range(5):
            bare_t.append(bench.bare_loop_seconds(URI))
            status_t.append(bench.quiet(varsctl_main, status)[0])
        bare, st = statistics.median(bare_t), statistics.median(status_t)
        print(f"bare {bare * 1000:.0f} ms, status {st * 1000:.0f} ms, ratio {st / bare:.2f}x")
        print(profiled(status)[1])
        if "--sync" in sys.argv:
            bench.install_build(fw, 1)
            seconds, table = profiled(["--config", str(cfg), "firmware", "sync"])
            print(f"sync {seconds:.2f} s\n{table}")
    finally:
        conn.close()
        bench.cleanup(URI, PREFIX)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
