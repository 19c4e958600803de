"""The Secure Boot path against Debian 13's virt-firmware 24.11 (and prometheus_client 0.16), for real.

24.11 names its certificates by file (certs/MicrosoftCorporationKEK2KCA2023.pem),
lacks the Option ROM CA and has no measurement module; the adapter must handle it.
scripts/host-setup makes `.venv-vf2411` (virt-firmware==24.11 from PyPI, the version
python3-virt-firmware packages in trixie, plus prometheus_client 0.16, Debian 12's);
this runs the adapter, planner and varsctl secureboot/metrics tests there (engine,
backups' write path and CLI on the test:/// driver). A missing venv is a failure:
host-setup was not run.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = os.path.join(REPO, ".venv-vf2411", "bin", "python")


def test_adapter_under_virt_firmware_2411():
    assert os.access(PYTHON, os.X_OK), f"{PYTHON} missing: run scripts/host-setup (it makes the 24.11 venv)"
    version = subprocess.run([PYTHON, "-c", "import importlib.metadata as m; print(m.version('virt-firmware'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "24.11"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    run = subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", REPO,
         os.path.join(REPO, "tests", "adapters", "test_virtfw_secureboot.py"),
         os.path.join(REPO, "tests", "firmware", "test_secureboot.py"),
         os.path.join(REPO, "tests", "cli", "test_secureboot_cmd.py"),
         os.path.join(REPO, "tests", "cli", "test_metrics_cmd.py"),
         os.path.join(REPO, "tests", "engine", "test_metrics.py")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    sys.stdout.write(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout
