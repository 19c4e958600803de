"""`secureboot status` over N varstores: target <= 5 s for 1000, identical stores parsed once.

Each figure is printed beside its target and against baselines measured in the same run:
  - floor: a bare loop that fetches each domain's XML and reads + hashes its varstore
    (what any audit must at least pay);
  - no cache: parsing every store's keys with virt-firmware, one parse per file.

The domains live in libvirt's `test:///default` driver (in-process, real libvirt define
and XML; no hypervisor needed, nothing on the shared qemu:///system), their varstores
in a temp directory: N copies of Debian's `OVMF_VARS_4M.ms.fd`, of which `--distinct`
differ (a boot variable each, as used guests' stores do). The audit is the same code
`varsctl secureboot status` runs (engine + planner + adapter).

    .venv/bin/python bench/bench_secureboot.py [--domains 1000] [--distinct 50]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from varsd.adapters import fsio, virtfw  # noqa: E402
from varsd.adapters.journal import Journal  # noqa: E402
from varsd.adapters.libvirt_api import Hypervisor  # noqa: E402
from varsd.config import Config  # noqa: E402
from varsd.engine.reconciler import Reconciler  # noqa: E402
from varsd.engine.secureboot import for_reconciler  # noqa: E402
from varsd.firmware.catalog import load_catalog  # noqa: E402

TEMPLATE = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
CODE = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
VENDOR = "5b3c9c5e-1f6a-4b8e-9d2a-7a1f0e6d4c21"
TARGET = 5.0


def domain_xml(name: str, store: str) -> str:
    return f"""<domain type='test'>
  <name>{name}</name>
  <uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>256</memory>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' secure='yes' type='pflash'>{CODE}</loader>
    <nvram template='{TEMPLATE}'>{store}</nvram>
  </os>
  <features><acpi/><smm state='on'/></features>
</domain>"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--distinct", type=int, default=50)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="varsd-bench-sb-"))
    try:
        cfg = Config(uri="test:///default", state_dir=str(tmp / "state"), nvram_dir=str(tmp / "nvram"),
                     qemu_user="root", qemu_group="root")
        (tmp / "nvram").mkdir()
        base = fsio.read_file(TEMPLATE)
        hv = Hypervisor(cfg.uri).open()
        for i in range(args.domains):
            store = tmp / "nvram" / f"g{i:04d}_VARS.fd"
            data = base if i >= args.distinct else virtfw.with_variables(
                TEMPLATE, [virtfw.EfiVariable("BenchMark", VENDOR, 7, i.to_bytes(4, "little"))])
            store.write_bytes(data)
            hv.define(domain_xml(f"g{i:04d}", str(store)))
        refs = [r for r in hv.list_domains() if r.name.startswith("g")]  # not the driver's own demo domain
        catalog = load_catalog(cfg.firmware_dirs, ())
        journal = Journal(cfg.journal_path)
        rec = Reconciler(cfg, hv, catalog, journal, (0, 0), actor="bench")

        t = time.perf_counter()
        for ref in refs:
            hv.persistent_xml(ref.uuid)
            hashlib.sha256(fsio.read_file(str(tmp / "nvram" / f"{ref.name}_VARS.fd"))).hexdigest()
        floor = time.perf_counter() - t

        t = time.perf_counter()
        for ref in refs:
            virtfw.secure_boot_vars_of_bytes(fsio.read_file(str(tmp / "nvram" / f"{ref.name}_VARS.fd")), ref.name)
        nocache = time.perf_counter() - t

        sb = for_reconciler(rec)
        t = time.perf_counter()
        audits = sb.audit_domains(refs)
        templates = sb.audit_templates()
        took = time.perf_counter() - t
        states = {a.state_ms2023.value for a in audits}
        assert len(audits) == args.domains and states == {"update-available"}, states
        print(f"secureboot status, {args.domains} domains ({args.distinct} distinct stores), "
              f"virt-firmware {virtfw.library_version()}")
        print(f"  audit (domains + {len(templates)} templates): {took:.2f} s   target <= {TARGET:.0f} s   "
              f"{'OK' if took <= TARGET else 'MISSED'}")
        print(f"  distinct contents parsed: {sb.reader.parses}   (stores: {args.domains}; "
              f"expected {args.distinct + 1} + templates)")
        print(f"  vs floor (XML fetch + read + sha256 per store, {floor:.2f} s): {took / floor:.2f}x")
        print(f"  vs parsing every store without the digest cache ({nocache:.2f} s): {took / nocache:.2f}x")
        journal.close()
        hv.close()
        return 0 if took <= TARGET else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
