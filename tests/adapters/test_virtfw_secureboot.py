"""virtfw's Secure Boot side on Debian's real templates, for both virt-firmware versions.

This module runs twice in CI: in the project venv (PyPI's virt-firmware 26.x) and, via
tests/adapters/test_virtfw_2411.py, in a venv holding Debian 13's virt-firmware 24.11
(fewer certificates under other names, no measurement module).
"""

from __future__ import annotations

import struct

import pytest
from ovmf_files import VARS_2M_MS, VARS_4M, VARS_4M_MS

from varsd.adapters import fsio, virtfw
from varsd.errors import VarstoreError
from varsd.model.secureboot import MICROSOFT_OWNER, MS_2023_CERTS

VERSION = virtfw.library_version()
OLD = VERSION.startswith("24.")  # Debian 13's python3-virt-firmware
DB_GUID = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"


@pytest.mark.parametrize("path", [VARS_4M_MS, VARS_2M_MS])
def test_debian_ms_templates_hold_only_the_2011_certificates(path):
    keys = virtfw.secure_boot_vars_of_bytes(fsio.read_file(path), path)
    assert [c.subject for c in keys.pk] == ["Debian UEFI Secure Boot (PK/KEK key)"]
    assert [(c.subject, c.owner, c.not_after) for c in keys.kek] == [
        ("Debian UEFI Secure Boot (PK/KEK key)", "a0baa8a3-041d-48a8-bc87-c36d121b5e3d", "2029-07-05T23:42:49Z"),
        ("Microsoft Corporation KEK CA 2011", MICROSOFT_OWNER, "2026-06-24T20:51:29Z"),
    ]
    assert [(c.subject, c.not_after) for c in keys.db] == [
        ("Microsoft Windows Production PCA 2011", "2026-10-19T18:51:42Z"),
        ("Microsoft Corporation UEFI CA 2011", "2026-06-27T21:32:45Z"),
    ]
    assert (keys.dbx_entries, keys.db_hashes) == (1, 0)
    assert (keys.secure_boot_enable, keys.custom_mode, keys.setup_mode, keys.enforcing) == (True, False, False, True)
    assert keys.secure_boot is None  # volatile in edk2: never in the file


def test_plain_template_is_in_setup_mode():
    keys = virtfw.secure_boot_vars_of_bytes(fsio.read_file(VARS_4M), VARS_4M)
    assert keys.setup_mode and not keys.enforcing and keys.kek == () and keys.db == ()


def test_shipped_2023_certificates_match_the_version():
    shipped = {s.cert.subject: s for s in virtfw.ms2023_certificates()}
    assert list(shipped) == [c.subject for c in MS_2023_CERTS]
    rom = "Microsoft Option ROM UEFI CA 2023"
    have = {name for name, s in shipped.items() if s.der is not None}
    if OLD:  # 24.11: three, as certs/<CN>.pem files; no Option ROM CA
        assert have == set(shipped) - {rom}
        assert all(s.source.endswith(".pem") and "/certs/" in s.source for s in shipped.values() if s.der)
    else:  # 26.x: all four as certs/microsoft.com/*.pem resources
        assert have == set(shipped)
        assert all("microsoft.com/" in s.source for s in shipped.values())
    # the same certificate whichever version ships it
    assert shipped["Microsoft Corporation KEK 2K CA 2023"].sha256 == \
        "3cd3f0309edae228767a976dd40d9f4affc4fbd5218f2e8cc3c9dd97e8ac6f9d"


def test_adding_certificates_keeps_everything_else_and_is_idempotent():
    old = fsio.read_file(VARS_4M_MS)
    shipped = [s for s in virtfw.ms2023_certificates() if s.der is not None]
    new = virtfw.with_certificates(old, VARS_4M_MS, shipped)
    keys = virtfw.secure_boot_vars_of_bytes(new, "new")
    assert [c.subject for c in keys.kek] == [
        "Debian UEFI Secure Boot (PK/KEK key)", "Microsoft Corporation KEK CA 2011",
        "Microsoft Corporation KEK 2K CA 2023"]
    want_db = ["Microsoft Windows Production PCA 2011", "Microsoft Corporation UEFI CA 2011", "Windows UEFI CA 2023",
               "Microsoft UEFI CA 2023"] + ([] if OLD else ["Microsoft Option ROM UEFI CA 2023"])
    assert [c.subject for c in keys.db] == want_db
    assert all(c.owner == MICROSOFT_OWNER for c in keys.kek[1:] + keys.db)
    before, after = virtfw.variables_of_bytes(old, "old"), virtfw.variables_of_bytes(new, "new")
    assert before.keys() == after.keys()
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"8be4df61-93ca-11d2-aa0d-00e098032b8c:KEK", f"{DB_GUID}:db"}
    for k in changed:
        assert after[k].data.startswith(before[k].data)  # appended, nothing removed or reordered
    assert len(new) == len(old) and virtfw.layout_of_bytes(new, "new") == virtfw.layout_of_bytes(old, "old")
    assert virtfw.with_certificates(new, "new", shipped) == new


def test_time_stamp_never_goes_back():
    """Debian stamps its KEK when it builds the template (2024 or 2025, by ovmf version); the 2023
    certificate must not move the stamp back (a later authenticated KEK update is checked against it),
    and a stamp older than the certificate moves up to its not-before, as virt-firmware does."""
    old = fsio.read_file(VARS_4M_MS)
    kek = [s for s in virtfw.ms2023_certificates() if s.cert.variable == "KEK"]
    key = "KEK\0" + "8be4df61-93ca-11d2-aa0d-00e098032b8c"
    before = virtfw._parse(old, "old").records[key].raw_time
    assert struct.unpack_from("<H", before)[0] >= 2023
    new = virtfw.with_certificates(old, VARS_4M_MS, kek)
    assert virtfw._parse(new, "new").records[key].raw_time == before
    # the same store with the KEK stamped 2012: the stamp becomes the 2023 certificate's not-before
    parsed = virtfw._parse(old, "old")
    records = dict(parsed.records)
    r = records[key]
    records[key] = virtfw._RawVar("KEK", str(r.guid), r.attr, r.data, r.count, r.pkidx,
                                  struct.pack("<H", 2012) + before[2:])
    stale = virtfw._render(parsed, records, "stale", "stale")
    assert virtfw._parse(stale, "stale").records[key].raw_time[:2] == struct.pack("<H", 2012)
    moved = virtfw._parse(virtfw.with_certificates(stale, "stale", kek), "moved").records[key].raw_time
    assert struct.unpack_from("<H", moved)[0] == 2023


def test_store_without_kek_is_refused():
    kek = [s for s in virtfw.ms2023_certificates() if s.cert.variable == "KEK"]
    with pytest.raises(VarstoreError, match="has no KEK variable"):
        virtfw.with_certificates(fsio.read_file(VARS_4M), VARS_4M, kek)


def test_unshipped_certificate_is_refused_not_guessed():
    missing = [s for s in virtfw.ms2023_certificates() if s.der is None]
    if not OLD:
        assert missing == []
        return
    with pytest.raises(VarstoreError, match="does not ship 'Microsoft Option ROM UEFI CA 2023'"):
        virtfw.with_certificates(fsio.read_file(VARS_4M_MS), VARS_4M_MS, missing)


def test_pcr7_prediction_or_plain_unavailability():
    old = fsio.read_file(VARS_4M_MS)
    new = virtfw.with_certificates(old, VARS_4M_MS, [s for s in virtfw.ms2023_certificates() if s.der])
    pcr = virtfw.predict_pcr7(old, new, VARS_4M_MS)
    if OLD:
        assert (pcr.before, pcr.after, pcr.changes) == (None, None, None)
        assert "24.11 has no measurement module" in pcr.why
    else:
        assert pcr.why is None and pcr.changes is True
        assert len(pcr.before) == 64 and pcr.before == virtfw.predict_pcr7(old, old, "x").after
        assert virtfw.predict_pcr7(old, old, "x").changes is False


def test_damaged_signature_list_is_a_varstore_error():
    old = fsio.read_file(VARS_4M_MS)
    key = f"{DB_GUID}:db"
    db = virtfw.variables_of_bytes(old, "x")[key]
    bad = virtfw.EfiVariable(name="db", guid=DB_GUID, attr=db.attr, data=db.data[:40])
    path = "/tmp/varsd-test-damaged-db.fd"
    with open(path, "wb") as f:
        f.write(old)
    try:
        blob = virtfw.with_variables(path, [bad])
    finally:
        import os

        os.unlink(path)
    with pytest.raises(VarstoreError, match="db: damaged signature list"):
        virtfw.secure_boot_vars_of_bytes(blob, "damaged")


@pytest.mark.parametrize("present", range(16))
def test_every_starting_subset_ends_with_all_and_loses_nothing(present):
    """Generated: a store already holding any subset of the 2023 certificates (as hand-updated guests do)."""
    from varsd.firmware.secureboot import judge

    shipped = [s for s in virtfw.ms2023_certificates() if s.der is not None]
    start = [s for i, s in enumerate(shipped) if present >> i & 1]
    old = virtfw.with_certificates(fsio.read_file(VARS_4M_MS), VARS_4M_MS, start) if start else \
        fsio.read_file(VARS_4M_MS)
    before = virtfw.secure_boot_vars_of_bytes(old, "before")
    verdict = judge(before, secure_code=True, shipped=virtfw.ms2023_certificates(), varstore="/v")
    names = {s.cert.subject for s in shipped} - {s.cert.subject for s in start}
    assert {s.cert.subject for s in verdict.addable} == names
    new = virtfw.with_certificates(old, "old", verdict.addable)
    after = virtfw.secure_boot_vars_of_bytes(new, "after")
    for var in ("pk", "kek", "db"):
        assert {c.sha256 for c in getattr(before, var)} <= {c.sha256 for c in getattr(after, var)}
    assert after.dbx_entries == before.dbx_entries
    final = judge(after, secure_code=True, shipped=virtfw.ms2023_certificates(), varstore="/v")
    assert final.addable == () and (final.state.value == "ok") == (not OLD)
