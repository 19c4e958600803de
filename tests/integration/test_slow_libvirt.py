"""A slow libvirt is a fault too (issue 12): varsd neither gives up wrongly nor double-applies.

Seen on this machine kind: with /dev/kvm's group wrong, libvirt re-probes QEMU on every
call and each define takes about 50 s. Here a small launcher makes the real libvirtd's
define slow (it sleeps before calling the real `virDomainDefineXML`: a wrapper that delays
the define, as the issue suggests) and shortens the lock's "frozen holder" bound far
below the define's duration. Three `varsctl reconcile` runs on the same two real domains
then race: every run must exit 0, each domain must be repaired exactly once (one applied
journal entry, one varstore), and the waiters must have followed the holder (they say
whom they wait for) instead of giving up on a timer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import ovmf_files
from lxml import etree

from varsd.adapters.libvirt_api import Hypervisor

from .guests import NVRAM_DIR

DEFINE_DELAY = 6.0  # seconds each define takes; the frozen-holder bound below is 2 s

LAUNCHER = textwrap.dedent(f"""
    import sys, time
    from varsd.adapters import libvirt_api
    from varsd.cli import varsctl
    from varsd.engine import lock

    lock.STALE = 2.0  # a holder silent for 2 s would be frozen: the heartbeat must keep it alive
    real = libvirt_api.Hypervisor.define

    def slow_define(self, xml):
        time.sleep({DEFINE_DELAY})
        return real(self, xml)

    libvirt_api.Hypervisor.define = slow_define
    sys.exit(varsctl.main(sys.argv[1:]))
""")


def test_three_racing_reconciles_on_a_slow_libvirt(hv: Hypervisor, guest_factory, tmp_path: Path) -> None:
    cfg = tmp_path / "varsd.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\nnvram_dir = "{NVRAM_DIR}"\n'
                   'firmware_dirs = ["/usr/share/qemu/firmware"]\n')
    guests = [guest_factory.define(label, f"<loader type='rom'>{ovmf_files.UNIFIED}</loader>")
              for label in ("slow-a", "slow-b")]
    for g in guests:
        guest_factory.track(f"{NVRAM_DIR}/{g.name}_VARS.fd")
    names = [g.name for g in guests]
    runs = [subprocess.Popen([sys.executable, "-c", LAUNCHER, "--config", str(cfg), "reconcile", *names],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in runs]

    for rc, out, err in results:
        assert rc == 0, out + err
        assert "gave up" not in err and "no sign of life" not in err, err
    assert any("waiting for pid" in err for _, _, err in results), "no run ever waited: the race did not happen"
    for g in guests:
        xml = hv.persistent_xml(g.uuid)
        # libvirt 12.9 stores format='raw' on it too: compare the element, not its spelling
        loader = etree.fromstring(xml.encode()).find("os/loader")
        assert (loader.get("readonly"), loader.get("type"), loader.text) == (
            "yes", "pflash", "/usr/share/OVMF/OVMF_CODE_4M.fd"), xml
        assert f"{NVRAM_DIR}/{g.name}_VARS.fd" in xml
    journal = subprocess.run([sys.executable, "-m", "varsd.cli.varsctl", "--config", str(cfg), "journal", "--json"],
                             capture_output=True, text=True, timeout=120)
    entries = json.loads(journal.stdout)["changes"]
    for name in names:
        mine = [e for e in entries if e["name"] == name]
        assert [e["outcome"] for e in mine] == ["applied"], mine  # exactly one repair, never two
    done = [line for _, out, _ in results for line in out.splitlines() if ": redefined:" in line]
    assert sorted(line.split(":")[0] for line in done) == sorted(names)  # each domain by one run only
