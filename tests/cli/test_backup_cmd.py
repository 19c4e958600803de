"""varsctl backup list/prune/restore/diff and reset on the test:/// driver (no QEMU).

The real-boot cases (undefine --nvram, reset, races, rename) are in
tests/integration/test_backups.py; these cover the command surface and retention.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

from ovmf_files import EFI_GLOBAL, VARS_2M, VARS_4M

from varsd.adapters import fsio, virtfw
from varsd.adapters.backup_index import BackupIndex
from varsd.engine.backups import BackupStore

from .common import U_SPLIT, run


def _store(host) -> BackupStore:
    return BackupStore(os.path.join(host["state"], "backups"),
                       BackupIndex(os.path.join(host["state"], "state.sqlite3")))


def _ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


def test_create_list_and_json_shape(capsys, host):
    rc, out, err = run(capsys, host, "backup", "create", "splitguest", "--json")
    assert rc == 0, err
    [row] = json.loads(out)["results"]
    assert row["backup"]["reason"] == "manual" and row["backup"]["sha256"] == fsio.sha256_file(VARS_4M)
    rc, out, _ = run(capsys, host, "backup", "create", "splitguest")
    assert "unchanged" in out
    rc, out, _ = run(capsys, host, "backup", "list", "--json")
    [b] = json.loads(out)["backups"]
    assert set(b) >= {"id", "domain", "uuid", "taken", "sha256", "size", "reason", "undefined", "prune"}
    assert (b["domain"], b["uuid"], b["undefined"], b["prune"]) == ("splitguest", U_SPLIT, False, None)


def test_retention_prunes_as_configured_and_says_so_first(capsys, host):
    with open(host["config"], "a") as f:
        f.write("[backup_keep]\nlast = 2\ndaily = 0\nweekly = 0\n")
    store = _store(host)
    data = [virtfw.with_variable(VARS_4M, "V", EFI_GLOBAL, bytes([i])) for i in range(4)]
    for i, d in enumerate(data):
        sha = store.put(d)
        store.index.add(uuid=U_SPLIT, name="splitguest", taken=_ago(4 - i), sha256=sha, size=len(d),
                        reason="stop", source=host["split_vars"])
    gone = "0a000000-0000-4000-8000-0000000000ee"  # undefined long ago
    store.index.add(uuid=gone, name="oldguest", taken=_ago(400), sha256=store.put(data[0]), size=1,
                    reason="stop", source="/x")
    rc, out, _ = run(capsys, host, "backup", "list", "--json")
    listed = {b["id"]: b for b in json.loads(out)["backups"]}
    assert [i for i, b in listed.items() if b["prune"]] == [1, 2, 5]
    assert listed[5]["undefined"] is True and "undefined" in listed[5]["prune"]
    rc, out, _ = run(capsys, host, "backup", "prune", "--dry-run", "--json")
    assert [p["id"] for p in json.loads(out)["result"]["pruned"]] == [1, 2, 5]
    assert len(store.index.records()) == 5
    rc, out, _ = run(capsys, host, "backup", "prune", "--json")
    result = json.loads(out)["result"]
    assert rc == 0 and result["kept"] == 2 and result["files_removed"] == 2  # data[0] (ids 1 and 5), data[1]
    assert [r.id for r in store.index.records()] == [3, 4]
    assert sorted(os.listdir(store.objects_dir)) == sorted(f"{fsio.sha256_bytes(d)}.fd" for d in data[2:])


def test_restore_refuses_a_backup_of_another_layout_and_a_damaged_one(capsys, host):
    store = _store(host)
    small = open(VARS_2M, "rb").read()
    rec = store.index.add(uuid=U_SPLIT, name="splitguest", taken=_ago(1), sha256=store.put(small), size=len(small),
                          reason="manual", source="/x")
    rc, _, err = run(capsys, host, "backup", "restore", "splitguest", "--id", str(rec.id))
    assert rc == 1 and "layout" in err and "silently lose" in err
    good = virtfw.with_variable(VARS_4M, "V", EFI_GLOBAL, b"x")
    rec2 = store.index.add(uuid=U_SPLIT, name="splitguest", taken=_ago(0), sha256=store.put(good),
                           size=len(good), reason="manual", source="/x")
    obj = store.object_path(rec2.sha256)
    raw = bytearray(open(obj, "rb").read())
    raw[7] ^= 1
    with open(obj, "wb") as f:
        f.write(raw)
    before = open(host["split_vars"], "rb").read()
    rc, _, err = run(capsys, host, "backup", "restore", "splitguest")
    assert rc == 1 and "damaged" in err
    assert open(host["split_vars"], "rb").read() == before
    rc, _, err = run(capsys, host, "backup", "restore", "splitguest", "--id", "999")
    assert rc == 2 and "no backup #999" in err


def test_restore_from_another_domain_needs_from(capsys, host):
    store = _store(host)
    data = virtfw.with_variable(VARS_4M, "V", EFI_GLOBAL, b"old-guest")
    rec = store.index.add(uuid="0a000000-0000-4000-8000-0000000000ee", name="oldguest", taken=_ago(1),
                          sha256=store.put(data), size=len(data), reason="stop", source="/x")
    rc, _, err = run(capsys, host, "backup", "restore", "splitguest", "--id", str(rec.id))
    assert rc == 1 and "--from 0a000000-0000-4000-8000-0000000000ee" in err
    rc, out, err = run(capsys, host, "backup", "restore", "splitguest", "--from", "oldguest", "--dry-run", "--json")
    assert rc == 0, err
    result = json.loads(out)["result"]
    assert result["restored"]["id"] == rec.id
    assert any(d["variable"] == "V" and d["change"] == "added" for d in result["diff"])


def test_read_only_commands_create_nothing(capsys, host):
    for args in (("backup", "list"), ("status", "--json")):
        rc, _, err = run(capsys, host, *args)
        assert rc in (0, 1), err
    assert not os.path.exists(host["state"])


def test_restore_by_default_takes_the_newest_backup_that_differs_from_now(capsys, host):
    """After --reset-nvram (or undefine --nvram + define) the next stop backs up the fresh
    store: that newest backup equals the file, and restoring it would change nothing."""
    store = _store(host)
    lived = virtfw.with_variable(VARS_4M, "V", EFI_GLOBAL, b"lived-in")
    now = open(host["split_vars"], "rb").read()
    older = store.index.add(uuid=U_SPLIT, name="splitguest", taken=_ago(2), sha256=store.put(lived),
                            size=len(lived), reason="stop", source=host["split_vars"])
    store.index.add(uuid=U_SPLIT, name="splitguest", taken=_ago(1), sha256=store.put(now), size=len(now),
                    reason="stop", source=host["split_vars"])
    rc, out, err = run(capsys, host, "backup", "restore", "splitguest", "--json")
    assert rc == 0, err
    assert json.loads(out)["result"]["restored"]["id"] == older.id
    assert open(host["split_vars"], "rb").read() == lived
