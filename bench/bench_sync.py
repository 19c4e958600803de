"""`varsctl firmware sync` after upgrades that rebind every domain, repeated: the spread of
one figure on a shared, loaded host needs several rounds over the same domains.

    .venv/bin/python bench/bench_sync.py [--domains 1000] [--rounds 3]

It defines `varsd-bench-sync-*` domains like bench_daemon.py's (varsd restricted to them),
lets `varsctl reconcile` repair and bind them, then per round installs a new build of the
bench's own firmware (rename over, like dpkg) and times one in-process `firmware sync`
(every domain rebound: one applied journal entry per domain is checked; a non-zero exit
is printed with its reasons), beside a bare
XML loop over the same domains measured in the same round. Then an idle sync (nothing to
rebind). The domains and their varstores are removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_daemon as bench  # noqa: E402

from varsd.adapters.journal import Journal  # noqa: E402
from varsd.cli.varsctl import main as varsctl_main  # noqa: E402

PREFIX = "varsd-bench-sync-"


def timed_sync(argv: list[str]) -> tuple[float, int, dict]:
    """Seconds of one in-process `varsctl ... firmware sync --json`, its exit code and report."""
    saved, out = sys.stdout, io.StringIO()
    sys.stdout = out
    try:
        t = time.perf_counter()
        rc = varsctl_main([*argv, "--json"])
        seconds = time.perf_counter() - t
    finally:
        sys.stdout = saved
    return seconds, rc, json.loads(out.getvalue())


def why(rc: int, report: dict) -> str:
    """What made a sync exit non-zero (on a shared host: e.g. another suite's domain undefined
    during the sync is a domain the in-use pass could not read)."""
    if rc == 0:
        return ""
    bad = [f"{d['name']}: {d['status']}" for d in report["domains"] if d["status"] not in ("ok", "unmanaged")]
    return f"; exit {rc}: {(report['firmware']['problems'] + bad)[:3]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", default="qemu:///system")
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    bench.cleanup(args.uri, PREFIX)
    work = Path(tempfile.mkdtemp(prefix="varsd-bench-sync-"))
    fw = work / "firmware"
    fw.mkdir()
    bench.install_build(fw, 0)
    conn = libvirt.open(args.uri)
    others = sorted({d.name() for d in conn.listAllDomains(0)} | {"varsd-test-*"})
    cfg = work / "varsd.toml"
    cfg.write_text(f'uri = "{args.uri}"\nstate_dir = "{work / "state"}"\nreconcile_interval = 3600\n'
                   f'firmware_dirs = ["{fw}"]\nexclude = [{", ".join(f"{o!r}" for o in others)}]\n')
    sync = ["--config", str(cfg), "firmware", "sync"]
    times: list[float] = []
    lines: list[str] = []
    try:
        for i in range(args.domains):
            conn.defineXML(bench.domain_xml(f"{PREFIX}{i:04d}"))
        bench.quiet(varsctl_main, ["--config", str(cfg), "reconcile"])
        for generation in range(1, args.rounds + 1):
            bench.install_build(fw, generation)
            bare = bench.bare_loop_seconds(args.uri)
            seconds, rc, report = timed_sync(sync)
            sha = hashlib.sha256((fw / "CODE.fd").read_bytes()).hexdigest()
            journal = Journal(str(work / "state" / "state.sqlite3"))
            rebound = sum(1 for c in journal.changes(limit=20 * args.domains)
                          if c.outcome == "applied" and sha in c.new_xml)
            journal.close()
            assert rebound == args.domains, (rc, rebound, report)
            times.append(seconds)
            lines.append(f"round {generation}: sync rebinding {rebound} domains {seconds:.2f} s "
                         f"(bare XML loop {bare * 1000:.0f} ms, ratio {seconds / bare:.1f}x){why(rc, report)}")
        idle, rc, report = timed_sync(sync)
        lines.append(f"idle sync (nothing to rebind): {idle:.2f} s{why(rc, report)}")
    finally:
        conn.close()
        bench.cleanup(args.uri, PREFIX)
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    print(f"firmware sync rebinding {args.domains}: median {statistics.median(times):.2f} s, "
          f"min {min(times):.2f}, max {max(times):.2f} (target <= 2 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
