"""Backup pass benchmark over N varstores (default 1000): figures with their targets, or
ratios to a baseline measured in the same run.

  (a) first pass: every varstore read, hashed, stored once per digest and indexed;
      target <= 10 s for 1000. Also: how many files the store holds.
  (b) a pass with nothing changed, against a bare loop that only lstat()s the same
      files (the floor of any "did it change" check): the ratio, and whether the
      pass read any varstore (it must not).
  (c) a pass after 10% of the guests changed a variable: only those are read.

The varstores are copies of Debian's OVMF_VARS_4M.fd (540672 bytes); a tenth hold one
extra variable each, so the store holds 1 + N/10 files. Runs without libvirt (the pass
is the same code the daemon's schedule and `varsctl backup create` run).

    .venv/bin/python bench/bench_backups.py [--varstores 1000] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from varsd.adapters import fsio, virtfw  # noqa: E402
from varsd.adapters.backup_index import BackupIndex  # noqa: E402
from varsd.engine.backups import BackupStore, Target  # noqa: E402

TEMPLATE = "/usr/share/OVMF/OVMF_VARS_4M.fd"
VENDOR = "5b3c9c5e-1f6a-4b8e-9d2a-7a1f0e6d4c21"


def _targets(nvram: Path, n: int) -> list[Target]:
    base = Path(TEMPLATE).read_bytes()
    out = []
    for i in range(n):
        p = nvram / f"bench-{i:04d}_VARS.fd"
        data = virtfw.with_variable(TEMPLATE, "BenchVar", VENDOR, i.to_bytes(4, "little")) if i % 10 == 0 else base
        p.write_bytes(data)
        os.chmod(p, 0o600)
        out.append(Target(uuid=f"00000000-0000-4000-8000-{i:012d}", name=f"bench-{i:04d}", path=str(p)))
    return out


def _timed(fn):
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--varstores", type=int, default=1000)
    ap.add_argument("--dir", default="/var/tmp", help="where the varstores and the store go (a real disk)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="varsd-bench-backups-", dir=args.dir))
    try:
        nvram = root / "nvram"
        nvram.mkdir()
        targets = _targets(nvram, args.varstores)
        os.sync()
        store = BackupStore(str(root / "state" / "backups"), BackupIndex(str(root / "state" / "state.sqlite3")))

        reads = []
        real = fsio.read_file

        def counting(path, **kw):
            if os.path.dirname(path) == str(nvram):
                reads.append(path)
            return real(path, **kw)

        fsio.read_file = counting  # count varstore reads (the store's own read-backs do not count)

        first, t_first = _timed(lambda: store.run_pass(targets, reason="schedule"))
        objects = len(os.listdir(store.objects_dir))
        n_first = len(reads)

        reads.clear()
        _, t_stat = _timed(lambda: [os.lstat(t.path) for t in targets])
        again, t_again = _timed(lambda: store.run_pass(targets, reason="schedule"))
        _, t_stat2 = _timed(lambda: [os.lstat(t.path) for t in targets])
        baseline = min(t_stat, t_stat2)
        n_again = len(reads)

        changed = targets[5::10]
        for t in changed:
            fsio.replace_atomic(t.path, virtfw.with_variable(t.path, "BenchVar2", VENDOR, b"\x01"))
        reads.clear()
        third, t_third = _timed(lambda: store.run_pass(targets, reason="schedule"))
        n_third = len(reads)
        fsio.read_file = real

        n = args.varstores
        print(f"backup pass benchmark: {n} varstores of {os.path.getsize(TEMPLATE)} bytes, {n // 10} distinct "
              f"extra, in {root}")
        print(f"(a) first pass: {t_first:.2f} s ({n_first} varstores read, {sum(1 for r in first if r.record)} "
              f"backups); store holds {objects} file(s)            target <= 10 s")
        print(f"(b) nothing changed: {t_again * 1000:.1f} ms vs lstat of the same files {baseline * 1000:.1f} ms "
              f"= {t_again / baseline:.1f}x; varstores read: {n_again}   target: 0 reads")
        print(f"(c) {len(changed)} changed: {t_third * 1000:.0f} ms; varstores read: {n_third}; new backups: "
              f"{sum(1 for r in third if r.record)}")
        ok = t_first <= 10 and n_again == 0 and all(r.unchanged for r in again) and n_third == len(changed)
        print("result:", "OK" if ok else "MISSED A TARGET")
        return 0 if ok else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
