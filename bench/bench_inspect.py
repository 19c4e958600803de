"""Cost of inspecting an oversized varstore, as ratios to the plain template in the same run.

Issue 12 defect 17: a 200 MB varstore cost 460 MB RSS and 1.3 s per inspection, because
the whole file was read to find its layout and to digest it. Now only the NvData volume
is read and digests are streamed, and files larger than any firmware file (64 MiB) are
refused before reading. This prints, for a template followed by N MiB of junk:
time and peak-memory growth of one inspection (`digest=True`, as for a loader image),
each also as a ratio to inspecting the bare 4 MiB template.

    .venv/bin/python bench/bench_inspect.py [--mib 60]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc

from varsd.engine.inspect import FileInspector

TEMPLATE = "/usr/share/OVMF/OVMF_VARS_4M.fd"


def measure(path: str) -> tuple[float, int]:
    tracemalloc.start()
    t = time.perf_counter()
    FileInspector().inspect(path, digest=True)
    elapsed = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return elapsed, peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=60, help="junk after the template, MiB (the cap is 64 MiB)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        big = os.path.join(d, "big_VARS.fd")
        with open(big, "wb") as f:
            f.write(open(TEMPLATE, "rb").read())
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        base_t, base_m = measure(TEMPLATE)
        big_t, big_m = measure(big)
    print(f"template: {base_t * 1000:.1f} ms, peak {base_m / 2**20:.2f} MiB")
    print(f"template + {args.mib} MiB: {big_t * 1000:.1f} ms ({big_t / base_t:.1f}x), "
          f"peak {big_m / 2**20:.2f} MiB ({big_m / base_m:.1f}x); file size {args.mib + 0.5:.1f} MiB")


if __name__ == "__main__":
    main()
