"""varsd benchmark on a real libvirtd: every figure is a ratio to a baseline measured in
the same run, or a latency/resource figure with its target beside it.

  (a) full reconcile of N compliant domains vs a bare loop that only fetches each
      domain's XML through libvirt-python (the floor any libvirt-based tool pays);
  (b) define-to-repaired latency, one define at a time, and for a burst of N defines
      sent as fast as one client can; varsd's throughput vs libvirt's define rate;
  (c) the daemon's resident memory with N domains, and its CPU time over idle seconds;
  (d) `varsctl status --json` (in-process: config, catalog, connect, every domain) vs the
      bare XML loop;
  (e) `varsctl firmware sync` after a firmware upgrade that rebinds every domain (the
      bench's own build, in its own firmware directory, replaced by a new one).

"Repaired" is observed through libvirt's own events: the DEFINED/UPDATED event of
varsd's redefinition reaches this client, so no polling skews the latencies.

Run as root on a host prepared by scripts/host-setup:
    .venv/bin/python bench/bench_daemon.py [--domains 1000] [--singles 100] [--idle 60]
It defines domains named varsd-bench-*, and removes them (with their varstores) at the end.
varsd is restricted to them: every other domain on the host is excluded by name (and
`varsd-test-*` by glob), so it never repairs someone else's domain.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from varsd.adapters.journal import Journal  # noqa: E402
from varsd.adapters.libvirt_api import Hypervisor  # noqa: E402
from varsd.cli.varsctl import main as varsctl_main  # noqa: E402
from varsd.config import Config, qemu_owner  # noqa: E402
from varsd.engine.reconciler import Reconciler  # noqa: E402
from varsd.firmware.catalog import load_catalog  # noqa: E402

CODE_4M = "/usr/share/OVMF/OVMF_CODE_4M.fd"
VARS_4M = "/usr/share/OVMF/OVMF_VARS_4M.fd"
DESCRIPTOR = """{{
  "description": "varsd bench build", "interface-types": ["uefi"],
  "mapping": {{"device": "flash", "executable": {{"filename": "{code}", "format": "raw"}},
              "nvram-template": {{"filename": "{vars}", "format": "raw"}}}},
  "targets": [{{"architecture": "x86_64", "machines": ["pc-i440fx-*", "pc-q35-*"]}}],
  "features": ["acpi-s3"], "tags": []
}}
"""

PREFIX = "varsd-bench-"


def domain_xml(name: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <loader type='rom'>/usr/share/ovmf/OVMF.fd</loader>
  </os>
  <features><acpi/></features>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>"""


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class Watcher:
    """Times varsd's redefinition of each bench domain from libvirt's own events."""

    def __init__(self, uri: str) -> None:
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=self._loop, daemon=True).start()
        self.conn = libvirt.open(uri)
        self.repaired: dict[str, float] = {}
        self.cond = threading.Condition()
        self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None)

    @staticmethod
    def _loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    def _event(self, _conn, dom, event, detail, _opaque) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_DEFINED and detail == libvirt.VIR_DOMAIN_EVENT_DEFINED_UPDATED:
            now = time.perf_counter()
            with self.cond:
                self.repaired.setdefault(dom.name(), now)
                self.cond.notify_all()

    def wait(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(n in self.repaired for n in names):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [n for n in names if n not in self.repaired]
                    raise SystemExit(f"bench: {len(missing)} domains never repaired, e.g. {missing[:3]}")
                self.cond.wait(left)


def cleanup(uri: str, prefix: str = PREFIX) -> None:
    """Remove the bench's domains (named `prefix`*) and their varstores."""
    conn = libvirt.open(uri)
    for dom in conn.listAllDomains():
        if dom.name().startswith(prefix):
            if dom.isActive():
                dom.destroy()
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM if "<nvram" in xml else 0)
    conn.close()


def start_daemon(cfg_path: Path, log_path: Path, notify: str) -> subprocess.Popen[bytes]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify)
    sock.settimeout(120)
    proc = subprocess.Popen(
        [sys.executable, "-m", "varsd.daemon.main", "--config", str(cfg_path), "--log-level", "warning"],
        stderr=open(log_path, "wb"),
        env=dict(os.environ, NOTIFY_SOCKET=notify),
    )
    while True:
        msg = sock.recv(4096).decode()
        if "READY=1" in msg.split("\n"):
            sock.close()
            return proc


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, calm_seconds: int = 5, limit: float = 300.0) -> float:
    """Seconds until the daemon used under 2% of a CPU for `calm_seconds` seconds in a row
    (after a burst it still backs up the new varstores and handles its own writes' events)."""
    start = time.monotonic()
    last, calm = proc_cpu_seconds(pid), 0
    while calm < calm_seconds and time.monotonic() - start < limit:
        time.sleep(1)
        now = proc_cpu_seconds(pid)
        calm = calm + 1 if now - last < 0.02 else 0
        last = now
    return time.monotonic() - start


def full_reconcile_ratio(cfg: Config, rounds: int) -> tuple[float, float, float]:
    """Median seconds of a full varsd pass vs the bare XML loop over the same domains."""
    hv = Hypervisor(cfg.uri).open()
    journal = Journal(cfg.journal_path)
    rec = Reconciler(cfg, hv, load_catalog(cfg.firmware_dirs, cfg.extra_firmware), journal, qemu_owner(cfg))
    bare_conn = libvirt.open(cfg.uri)

    def bare() -> None:
        for dom in bare_conn.listAllDomains(0):
            dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)

    def varsd_pass() -> None:
        outcomes = rec.reconcile_all()
        changed = [o.ref.name for o in outcomes if o.done]
        assert not changed, f"domains were not compliant: {changed[:3]}"

    bare()
    varsd_pass()  # warm both (handles, file-facts cache) before timing
    t_bare, t_varsd = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        bare()
        t_bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        varsd_pass()
        t_varsd.append(time.perf_counter() - t)
    hv.close()
    journal.close()
    bare_conn.close()
    b, v = statistics.median(t_bare), statistics.median(t_varsd)
    return v / b, b, v


def install_build(fw_dir: Path, generation: int) -> None:
    """The bench's own central build: a copy of Debian's 4 MiB code, made a new build (other
    bytes at the end of its padding) per generation, replaced by rename like a package does."""
    data = bytearray(Path(CODE_4M).read_bytes())
    data[-16:] = generation.to_bytes(16, "little") if generation else data[-16:]
    tmp = fw_dir / ".CODE.fd.new"
    tmp.write_bytes(bytes(data))
    os.replace(tmp, fw_dir / "CODE.fd")
    (fw_dir / "50-bench.json").write_text(DESCRIPTOR.format(code=fw_dir / "CODE.fd", vars=VARS_4M))


def quiet(fn, *args) -> tuple[float, object]:
    """Seconds `fn(*args)` took with stdout discarded, and its result."""
    saved = sys.stdout
    sys.stdout = open(os.devnull, "w")
    try:
        t = time.perf_counter()
        result = fn(*args)
        return time.perf_counter() - t, result
    finally:
        sys.stdout.close()
        sys.stdout = saved


def bare_loop_seconds(uri: str) -> float:
    conn = libvirt.open(uri)
    t = time.perf_counter()
    for dom in conn.listAllDomains(0):
        dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    conn.close()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", default="qemu:///system")
    ap.add_argument("--domains", type=int, default=1000, help="burst size N (default 1000)")
    ap.add_argument("--singles", type=int, default=100, help="domains defined one at a time (default 100)")
    ap.add_argument("--idle", type=int, default=60, help="idle seconds for the CPU figure (default 60)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the full-reconcile comparison")
    args = ap.parse_args()

    cleanup(args.uri)
    work = Path(tempfile.mkdtemp(prefix="varsd-bench-"))
    fw_dir = work / "firmware"
    fw_dir.mkdir()
    install_build(fw_dir, 0)
    conn = libvirt.open(args.uri)
    others = sorted({d.name() for d in conn.listAllDomains(0)} | {"varsd-test-*"})
    conn.close()
    exclude = "[" + ", ".join(f'"{n}"' for n in others) + "]"
    cfg_path = work / "varsd.toml"
    cfg_path.write_text(f'uri = "{args.uri}"\nstate_dir = "{work / "state"}"\nreconcile_interval = 3600\n'
                        f'firmware_dirs = ["{fw_dir}"]\nexclude = {exclude}\n')
    cfg = Config(uri=args.uri, state_dir=str(work / "state"), reconcile_interval=3600,
                 firmware_dirs=(str(fw_dir),), exclude=tuple(others))
    watcher = Watcher(args.uri)
    proc = start_daemon(cfg_path, work / "varsd.log", str(work / "notify.sock"))
    rss_ready = proc_rss_mib(proc.pid)
    results: list[str] = []
    try:
        # (b1) one define at a time
        single = []
        for i in range(args.singles):
            name = f"{PREFIX}single-{i:04d}"
            t0 = time.perf_counter()
            watcher.conn.defineXML(domain_xml(name))
            watcher.wait([name], 30)
            single.append(watcher.repaired[name] - t0)
        # (b2) a burst, as fast as one client can define
        names = [f"{PREFIX}burst-{i:04d}" for i in range(args.domains)]
        xmls = [domain_xml(n) for n in names]
        started: dict[str, float] = {}
        t_burst = time.perf_counter()
        for n, x in zip(names, xmls, strict=True):
            started[n] = time.perf_counter()
            watcher.conn.defineXML(x)
        t_defined = time.perf_counter()
        watcher.wait(names, 600)
        t_done = max(watcher.repaired[n] for n in names)
        burst = [watcher.repaired[n] - started[n] for n in names]
        define_rate = args.domains / (t_defined - t_burst)
        varsd_rate = args.domains / (t_done - t_burst)
        total = args.domains + args.singles
        time.sleep(2)
        rss = proc_rss_mib(proc.pid)
        # (c) idle CPU, once the daemon has worked off the burst
        settled = settle(proc.pid)
        rss_settled = proc_rss_mib(proc.pid)
        cpu0 = proc_cpu_seconds(proc.pid)
        time.sleep(args.idle)
        idle_cpu = proc_cpu_seconds(proc.pid) - cpu0
        per_minute = idle_cpu * 60 / args.idle
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        # (a) full reconcile of the now compliant domains
        ratio, t_bare, t_varsd = full_reconcile_ratio(cfg, args.rounds)
        # (d) varsctl status --json, in-process, vs the bare loop (medians)
        status_t, bare_t = [], []
        for _ in range(args.rounds):
            bare_t.append(bare_loop_seconds(args.uri))
            status_t.append(quiet(varsctl_main, ["--config", str(cfg_path), "status", "--json"])[0])
        status_ratio = statistics.median(status_t) / statistics.median(bare_t)
        # (e) an upgrade of the bench build: every bench domain is rebound by one sync
        install_build(fw_dir, 1)
        sync_s, sync_rc = quiet(varsctl_main, ["--config", str(cfg_path), "firmware", "sync"])
        journal = Journal(cfg.journal_path)
        rebound = sum(1 for c in journal.changes(limit=10 * total) if c.reason.startswith("firmware upgrade"))
        journal.close()

        def row(label: str, value: str, target: str) -> None:
            results.append(f"{label:<48} {value:>22}   target {target}")

        row(f"(a) full reconcile / bare XML loop ({total} dom.)", f"{ratio:.2f}x", "<= 1.5x")
        results.append(f"{'':<4}bare loop {t_bare * 1000:.0f} ms, varsd pass {t_varsd * 1000:.0f} ms "
                       f"(median of {args.rounds})")
        row(f"(b) single define->repaired p50 ({args.singles})", f"{pct(single, 50) * 1000:.1f} ms", "")
        row("    single define->repaired p99", f"{pct(single, 99) * 1000:.1f} ms", "< 50 ms")
        row(f"    burst define->repaired p50 ({args.domains})", f"{pct(burst, 50) * 1000:.0f} ms", "")
        row("    burst define->repaired p99", f"{pct(burst, 99) * 1000:.0f} ms", "< 1000 ms")
        row("    varsd throughput / libvirt define rate", f"{varsd_rate / define_rate:.2f}x", ">= 0.5x")
        results.append(f"{'':<4}libvirt defines {define_rate:.0f}/s, varsd repairs {varsd_rate:.0f}/s")
        row(f"(c) resident memory with {total} domains", f"{rss:.1f} MiB", "<= 80 MiB")
        results.append(f"{'':<4}at READY (no domain yet, catalog loaded) {rss_ready:.1f} MiB; "
                       f"settled {settled:.0f} s after the burst: {rss_settled:.1f} MiB")
        row(f"    CPU per idle minute ({args.idle} s measured)", f"{per_minute:.3f} s", "< 0.1 s")
        row(f"(d) varsctl status --json / bare XML loop ({total})", f"{status_ratio:.2f}x", "<= 1.5x")
        results.append(f"{'':<4}bare loop {statistics.median(bare_t) * 1000:.0f} ms, status "
                       f"{statistics.median(status_t) * 1000:.0f} ms (median of {args.rounds})")
        row(f"(e) firmware sync rebinding {rebound} domains", f"{sync_s:.2f} s (exit {sync_rc})", "<= 2 s")
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.conn.close()
        cleanup(args.uri)
        shutil.rmtree(work, ignore_errors=True)
    print("varsd benchmark (" + time.strftime("%Y-%m-%d") + f", {os.cpu_count()} cores, {args.uri})")
    print("\n".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
