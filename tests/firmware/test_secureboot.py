"""The ms2023 judgement as a table: real stores' keys, changed one fact at a time."""

from __future__ import annotations

import dataclasses

import pytest
from ovmf_files import VARS_4M, VARS_4M_MS

from varsd.adapters import fsio, virtfw
from varsd.firmware.secureboot import judge, missing_certs
from varsd.model.secureboot import MICROSOFT_OWNER, Certificate, Ms2023State, ShippedCert

SHIPPED = virtfw.ms2023_certificates()
DEBIAN = virtfw.secure_boot_vars_of_bytes(fsio.read_file(VARS_4M_MS), VARS_4M_MS)
UPDATED = virtfw.secure_boot_vars_of_bytes(
    virtfw.with_certificates(fsio.read_file(VARS_4M_MS), VARS_4M_MS, [s for s in SHIPPED if s.der]), "updated")
SETUP = virtfw.secure_boot_vars_of_bytes(fsio.read_file(VARS_4M), VARS_4M)
STRANGER = Certificate("Contoso KEK", "11111111-2222-3333-4444-555555555555", "2030-01-01T00:00:00Z", "ab" * 32)
OWN_PK = Certificate("My Lab PK", "99999999-2222-3333-4444-555555555555", "2030-01-01T00:00:00Z", "cd" * 32)
S = Ms2023State


def _j(keys, **kw):
    args = dict(secure_code=True, shipped=SHIPPED, varstore="/nvram/g_VARS.fd") | kw
    return judge(keys, **args)


@pytest.mark.parametrize(
    ("name", "keys", "kw", "state", "needle"),
    [
        ("debian ms template", DEBIAN, {}, S.UPDATE_AVAILABLE, "missing KEK 'Microsoft Corporation KEK 2K CA 2023'"),
        ("queued", DEBIAN, {"queued": True}, S.UPDATE_QUEUED, "applied after the guest stops"),
        ("updated", UPDATED, {}, S.OK if all(s.der for s in SHIPPED) else S.UPDATE_AVAILABLE, ""),
        ("plain code", DEBIAN, {"secure_code": False}, S.NOT_APPLICABLE, "not a Secure Boot build"),
        ("stateless", None, {"stateless": True}, S.NOT_APPLICABLE, "stateless"),
        ("no varstore", None, {"varstore": None}, S.NOT_APPLICABLE, "no varstore"),
        ("unreadable", None, {"error": "g_VARS.fd: not an edk2 varstore"}, S.BLOCKED, "not an edk2 varstore"),
        ("setup mode", SETUP, {}, S.NOT_APPLICABLE, "no PK enrolled (setup mode)"),
        ("disabled", dataclasses.replace(DEBIAN, secure_boot_enable=False), {}, S.NOT_APPLICABLE, "SecureBootEnable"),
        ("custom mode", dataclasses.replace(DEBIAN, custom_mode=True), {}, S.BLOCKED, "CustomMode"),
        ("custom pk", dataclasses.replace(DEBIAN, pk=(OWN_PK,)), {}, S.BLOCKED, "custom PK 'My Lab PK'"),
        ("unknown kek owner", dataclasses.replace(DEBIAN, kek=DEBIAN.kek + (STRANGER,)), {}, S.BLOCKED,
         "unknown KEK owner 11111111"),
        ("no microsoft kek", dataclasses.replace(DEBIAN, kek=DEBIAN.kek[:1]), {}, S.BLOCKED, "not Microsoft-keyed"),
    ],
)
def test_judgement(name, keys, kw, state, needle):
    verdict = _j(keys, **kw)
    assert verdict.state is state, (name, verdict)
    assert needle in verdict.why


def test_update_available_lists_what_is_missing_and_what_can_be_added():
    verdict = _j(DEBIAN)
    assert [m.cert.subject for m in verdict.missing] == [
        "Microsoft Corporation KEK 2K CA 2023", "Windows UEFI CA 2023", "Microsoft UEFI CA 2023",
        "Microsoft Option ROM UEFI CA 2023"]
    assert verdict.addable == tuple(s for s in SHIPPED if s.der is not None)


def test_without_a_shipped_certificate_it_says_so_and_cannot_be_ok():
    """virt-firmware 24.11 has no Option ROM CA: an update adds three and says it could not add the fourth."""
    shipped = tuple(ShippedCert(s.cert, None, None, None) if "Option ROM" in s.cert.subject else s for s in SHIPPED)
    three = virtfw.secure_boot_vars_of_bytes(
        virtfw.with_certificates(fsio.read_file(VARS_4M_MS), VARS_4M_MS, [s for s in shipped if s.der]), "three")
    before = judge(DEBIAN, secure_code=True, shipped=shipped, varstore="/v")
    assert before.state is S.UPDATE_AVAILABLE and len(before.addable) == 3
    assert "does not ship 'Microsoft Option ROM UEFI CA 2023'" in before.why
    after = judge(three, secure_code=True, shipped=shipped, varstore="/v")
    assert after.state is S.UPDATE_AVAILABLE and after.addable == ()
    assert "varsd cannot add it here" in after.why


def test_a_store_with_an_unshipped_certificate_is_recognised_by_subject():
    rom = Certificate("Microsoft Option ROM UEFI CA 2023", MICROSOFT_OWNER, "2038-10-26T19:08:48Z", "ee" * 32)
    keys = dataclasses.replace(UPDATED, db=UPDATED.db + (rom,))
    shipped = tuple(ShippedCert(s.cert, None, None, None) if "Option ROM" in s.cert.subject else s for s in SHIPPED)
    assert missing_certs(keys, shipped) == ()
