"""`varsd.firmware.fit`: one table of misfits, one row per kind, plus machine globs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from varsd.firmware.fit import Misfit, Needs, fits, misfits, target_matches, why_not
from varsd.model.domain import DomainFirmware
from varsd.model.firmware import Build, MappingMode, Target, VarstoreLayout

L2M = VarstoreLayout(131072, 100, 57344)
L4M = VarstoreLayout(540672, 100, 262144)
PLAIN = Build(origin="60-edk2-x86_64.json", code_path="/usr/share/OVMF/OVMF_CODE_4M.fd", code_format="raw",
              code_sha256="a" * 64, code_size=3653632, template_path="/usr/share/OVMF/OVMF_VARS_4M.fd",
              template_format="raw", layout=L4M, targets=(Target("x86_64", ("pc-i440fx-*", "pc-q35-*")),))
SECURE = replace(PLAIN, origin="50-edk2-x86_64-secure.json", features=frozenset({"secure-boot", "requires-smm"}),
                 targets=(Target("x86_64", ("pc-q35-*",)),))
ENROLLED = replace(SECURE, features=SECURE.features | {"enrolled-keys"})
Q35 = DomainFirmware(name="web", uuid="u", arch="x86_64", machine="pc-q35-7.2")
FX = replace(Q35, machine="pc-i440fx-7.2")


@pytest.mark.parametrize(("build", "needs", "kinds", "sentence"), [
    (PLAIN, Needs.of(Q35, secure_boot=False, layout=L4M), (), None),
    (PLAIN, Needs.of(Q35, secure_boot=None), (), None),
    (replace(PLAIN, mode=MappingMode.COMBINED, layout=None), Needs.of(Q35, secure_boot=False), (Misfit.MAPPING,),
     "is not split code with a varstore template (combined)"),
    (replace(PLAIN, code_format="qcow2"), Needs.of(Q35, secure_boot=False), (Misfit.FORMAT,), "qcow2/raw format"),
    (PLAIN, Needs.of(replace(Q35, arch="aarch64", machine="virt"), secure_boot=False), (Misfit.ARCHITECTURE,),
     "does not support aarch64 machine 'virt'"),
    (SECURE, Needs.of(FX, secure_boot=True), (Misfit.MACHINE, Misfit.SMM), "does not support x86_64 machine"),
    (SECURE, Needs.of(Q35, secure_boot=False), (Misfit.SECURE_BOOT,), "is a Secure Boot build"),
    (PLAIN, Needs.of(Q35, secure_boot=True), (Misfit.SECURE_BOOT,), "is not a Secure Boot build"),
    (ENROLLED, Needs.of(Q35, secure_boot=True, enrolled_keys=False), (Misfit.ENROLLED_KEYS,), "has keys enrolled"),
    (replace(SECURE, targets=PLAIN.targets), Needs.of(FX, secure_boot=True), (Misfit.SMM,),
     "needs SMM for Secure Boot, which machine type 'pc-i440fx-7.2' cannot provide (q35 only)"),
    (PLAIN, Needs.of(Q35, secure_boot=False, layout=L2M), (Misfit.LAYOUT,),
     "expects a varstore of 540672 bytes, variables 0x64-0x40000, the domain's has 131072 bytes"),
    (PLAIN, Needs.of(Q35, secure_boot=False, code_size=1966080), (Misfit.CODE_SIZE,), "3653632-byte code image"),
])
def test_misfits_table(build, needs, kinds, sentence) -> None:
    found = misfits(build, needs)
    assert tuple(p.kind for p in found) == kinds
    assert fits(build, needs) is (not kinds)
    got = why_not(build, needs)
    assert (got is None) if sentence is None else (got is not None and sentence in got), got


def test_every_kind_has_words() -> None:
    needs = Needs.of(Q35, secure_boot=True, layout=L2M, enrolled_keys=True, code_size=1)
    for kind in Misfit:
        from varsd.firmware.fit import Problem

        problem = Problem(kind, PLAIN, needs)
        assert problem.phrase and problem.sentence.startswith(f"build {PLAIN.label}")


@pytest.mark.parametrize(
    "glob, machine, expected",
    [
        ("pc-q35-*", "pc-q35-7.2", True),
        ("pc-q35-*", "pc-i440fx-7.2", False),
        ("pc-q35-7.*", "pc-q35-6.2", False),
        ("pc-q35-?.2", "pc-q35-7.2", True),
        ("pc-q35-*", "q35", True),
        ("pc-q35-7.*", "q35", True),
        ("pc-*", "q35", True),
        ("*", "q35", True),
        ("pc-i440fx-*", "q35", False),
        ("pc-i440fx-*", "pc", True),
        ("pc-q35-*", "pc", False),
        ("pc", "pc", True),
        ("pc-*", "pc", True),
        ("pc-q35-*", "Q35", False),
    ],
)
def test_target_globs_and_aliases(glob, machine, expected):
    assert target_matches(Target("x86_64", (glob,)), "x86_64", machine) is expected
    assert target_matches(Target("aarch64", (glob,)), "x86_64", machine) is False


def test_code_secure_boot_is_none_when_one_code_serves_both_kinds() -> None:
    """AAVMF: Debian pairs one code image with a blank template (plain) and an enrolled one
    (secure-boot); the varstore decides. x86 code is one kind or the other."""
    from varsd.firmware.fit import code_secure_boot

    assert code_secure_boot([SECURE, ENROLLED]) is True and code_secure_boot([PLAIN]) is False
    assert code_secure_boot([PLAIN, ENROLLED]) is None
