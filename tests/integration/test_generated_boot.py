"""A seeded sample of generated configurations (tests/generated.py, the space the
hypothesis suite in tests/planning covers) defined on the real libvirtd, reconciled and
booted: QEMU runs central code with the private varstore varsd planned. The seed is
printed in every failure message (`VARSD_GEN_SEED=N` reruns that sample).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path

from generated import BOOTABLE, CODE_4M, FORMS, VARS_4M, random_shape

from varsd.adapters import virtfw
from varsd.adapters.libvirt_api import Hypervisor

from .guests import NVRAM_DIR, open_paths, qemu_pid, varsctl, wait_for_serial

SEED = int(os.environ.get("VARSD_GEN_SEED", "20261201"))
SAMPLE = 3


def test_a_seeded_sample_of_generated_configurations_boots(hv: Hypervisor, guest_factory, config, tmp_path) -> None:
    rng = random.Random(SEED)
    images = tmp_path / "images"
    images.mkdir()
    guests = []
    for i in range(SAMPLE):
        shape = random_shape(rng, BOOTABLE)
        if "pflash" in FORMS[shape.form][0] and "acpi" not in shape.features:
            shape = replace(shape, features="<acpi/>")  # libvirt would not even define it (the input, not ours)
        name = guest_factory.name(f"gen{i}")
        need = shape.file(name, NVRAM_DIR, str(images))
        if need is not None:
            path, kind = need
            data = virtfw.with_variable(VARS_4M, "VarsdGen", "3c1d2e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f", b"seed", 7)
            if kind == "unified":
                data += Path(CODE_4M).read_bytes()
            Path(path).write_bytes(data)
            if path.startswith(NVRAM_DIR):
                guest_factory.track(path)
                os.chmod(path, 0o600)
                shutil.chown(path, "libvirt-qemu", "libvirt-qemu")
        xml = shape.xml(name, nvram_dir=NVRAM_DIR, images=str(images), serial_log="{serial_log}", domain_type="qemu")
        guests.append((guest_factory.define(name, xml=xml), shape))
    what = f"seed {SEED}: " + ", ".join(f"{g.name}={s}" for g, s in guests)

    r = varsctl(config, "reconcile", "--json", *(g.name for g, _ in guests))
    assert r.returncode == 0, f"{what}\n{r.stdout}{r.stderr}"
    report = {d["name"]: d for d in json.loads(r.stdout)["domains"]}
    assert {report[g.name]["status"] for g, _ in guests} == {"ok"}, what
    for g, _ in guests:
        hv.start(g.uuid)
    try:
        for g, _ in guests:
            wait_for_serial(g.serial_log, r"BdsDxe: (loading|starting) Boot", timeout=240)
            files = open_paths(qemu_pid(g.name))
            d = report[g.name]
            assert os.path.realpath(d["code"]) in files and d["varstore"] in files, f"{what}: {g.name} {sorted(files)}"
    finally:
        for g, _ in guests:
            hv.destroy(g.uuid)
