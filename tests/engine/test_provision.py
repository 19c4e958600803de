"""provision_varstore: real templates in, exact private varstores out; existing files are never replaced."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from ovmf_files import (  # tests/ is on the import path (see ovmf_files)
    CODE_2M,
    CODE_4M,
    LAYOUT_2M,
    LAYOUT_4M,
    UNIFIED,
    VARS_2M,
    VARS_4M,
    VARS_4M_MS,
)
from support.varstores import read_variables

from varsd.adapters import fsio, virtfw
from varsd.engine import provision
from varsd.engine.provision import Provisioned, provision_varstore
from varsd.errors import ProvisionError, VarstoreError

VENDOR = "2d3a1f3e-5b0c-4d6a-9e57-8c0f7a1b2c3d"


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _snapshot(path) -> tuple[bytes, int, int, int, int]:
    st = os.lstat(path)
    return _read(path), st.st_ino, st.st_mode, st.st_uid, st.st_mtime_ns


def test_from_template(tmp_path, qemu_owner):
    target = str(tmp_path / "vm_VARS.fd")
    got = provision_varstore(target, VARS_4M_MS, expected_layout=LAYOUT_4M, owner=qemu_owner)
    template = _read(VARS_4M_MS)
    assert got == Provisioned(path=target, adopted=False, layout=LAYOUT_4M)
    assert hashlib.sha256(_read(target)).digest() == hashlib.sha256(template).digest()
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == qemu_owner
    assert _read(target) == template
    assert read_variables(target) == read_variables(VARS_4M_MS)
    assert os.listdir(tmp_path) == ["vm_VARS.fd"]


def test_from_a_symlinked_template(tmp_path, qemu_owner):
    """Distro templates are often symlinks (OVMF_CODE_4M.ms.fd ->): the source may be one."""
    link = tmp_path / "template-link.fd"
    link.symlink_to(VARS_2M)
    target = str(tmp_path / "vm_VARS.fd")
    provision_varstore(target, str(link), expected_layout=LAYOUT_2M, owner=qemu_owner)
    assert _read(target) == _read(VARS_2M)


def test_from_unified_image_prefix(tmp_path, qemu_owner):
    # A private unified image whose varstore holds a guest's variable, as a VM would have.
    vars_blob = virtfw.with_variable(VARS_2M, "VarsdTest", VENDOR, b"boot entry of the guest")
    image = tmp_path / "vm-OVMF.fd"
    image.write_bytes(vars_blob + _read(CODE_2M))
    target = str(tmp_path / "vm_VARS.fd")
    got = provision_varstore(target, str(image), expected_layout=LAYOUT_2M, owner=qemu_owner, length=131072)
    assert not got.adopted and got.layout == LAYOUT_2M
    assert _read(target) == vars_blob
    assert os.path.getsize(target) == 131072
    assert read_variables(target) == read_variables(str(image), 131072)
    assert f"{VENDOR}:VarsdTest" in read_variables(target)


def test_from_the_distro_unified_image(tmp_path, qemu_owner):
    target = str(tmp_path / "vm_VARS.fd")
    provision_varstore(target, UNIFIED, expected_layout=LAYOUT_2M, owner=qemu_owner, length=131072)
    assert _read(target) == _read(UNIFIED)[:131072]
    assert read_variables(target) == read_variables(UNIFIED, 131072)


def test_unified_image_without_length_is_refused(tmp_path, qemu_owner):
    target = str(tmp_path / "vm_VARS.fd")
    with pytest.raises(ProvisionError, match="only the first 131072"):
        provision_varstore(target, UNIFIED, expected_layout=LAYOUT_2M, owner=qemu_owner)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("source", [CODE_2M, CODE_4M])
def test_template_that_is_not_a_varstore(tmp_path, qemu_owner, source):
    target = str(tmp_path / "vm_VARS.fd")
    with pytest.raises(VarstoreError, match="not an edk2 varstore") as info:
        provision_varstore(target, source, expected_layout=LAYOUT_4M, owner=qemu_owner)
    assert source in str(info.value)
    assert os.listdir(tmp_path) == []


def test_missing_template(tmp_path, qemu_owner):
    source = str(tmp_path / "OVMF_VARS_gone.fd")
    with pytest.raises(ProvisionError, match="no such file") as info:
        provision_varstore(str(tmp_path / "vm_VARS.fd"), source, expected_layout=LAYOUT_4M, owner=qemu_owner)
    assert source in str(info.value)
    assert os.listdir(tmp_path) == []


def test_unified_image_shorter_than_length(tmp_path, qemu_owner):
    short = tmp_path / "short.fd"
    short.write_bytes(_read(VARS_2M)[:4096])
    with pytest.raises(ProvisionError, match="only 4096 bytes"):
        provision_varstore(
            str(tmp_path / "vm_VARS.fd"), str(short), expected_layout=LAYOUT_2M, owner=qemu_owner, length=131072
        )
    assert os.listdir(tmp_path) == ["short.fd"]


def test_layout_mismatch(tmp_path, qemu_owner):
    target = str(tmp_path / "vm_VARS.fd")
    with pytest.raises(VarstoreError) as info:
        provision_varstore(target, VARS_2M, expected_layout=LAYOUT_4M, owner=qemu_owner)
    msg = str(info.value)
    assert VARS_2M in msg and LAYOUT_2M.describe() in msg and LAYOUT_4M.describe() in msg
    assert os.listdir(tmp_path) == []


def test_adopts_an_identical_existing_file_without_touching_it(tmp_path, qemu_owner):
    target = tmp_path / "vm_VARS.fd"
    target.write_bytes(_read(VARS_4M))
    os.chmod(target, 0o644)  # not what varsd would create: adoption must not "fix" it either
    before = _snapshot(target)
    got = provision_varstore(str(target), VARS_4M, expected_layout=LAYOUT_4M, owner=qemu_owner)
    assert got.adopted and got.layout == LAYOUT_4M
    assert fsio.sha256_file(str(target)) == fsio.sha256_file(VARS_4M)
    assert _snapshot(target) == before
    assert os.lstat(target).st_uid == 0
    assert os.listdir(tmp_path) == ["vm_VARS.fd"]


def test_refuses_a_differing_existing_file(tmp_path, qemu_owner):
    target = tmp_path / "vm_VARS.fd"
    target.write_bytes(virtfw.with_variable(VARS_4M, "VarsdTest", VENDOR, b"the guest's own state"))
    before = _snapshot(target)
    with pytest.raises(ProvisionError, match="already exists and differs") as info:
        provision_varstore(str(target), VARS_4M, expected_layout=LAYOUT_4M, owner=qemu_owner)
    assert "never overwrites" in str(info.value) and str(target) in str(info.value)
    assert _snapshot(target) == before
    assert os.listdir(tmp_path) == ["vm_VARS.fd"]


def test_refuses_a_symlink_even_to_identical_bytes(tmp_path, qemu_owner):
    elsewhere = tmp_path / "other_VARS.fd"
    elsewhere.write_bytes(_read(VARS_4M))
    before = _snapshot(elsewhere)
    target = tmp_path / "vm_VARS.fd"
    target.symlink_to(elsewhere)
    with pytest.raises(ProvisionError, match="symbolic link"):
        provision_varstore(str(target), VARS_4M, expected_layout=LAYOUT_4M, owner=qemu_owner)
    assert os.readlink(target) == str(elsewhere)
    assert _snapshot(elsewhere) == before


def test_adopts_when_an_identical_file_appears_during_creation(tmp_path, qemu_owner, monkeypatch):
    """A concurrent creator wins the race: its identical file is adopted, not an error."""
    target = str(tmp_path / "vm_VARS.fd")
    real_create = fsio.create_exclusive

    def racing_create(path, data, **kw):
        with open(path, "xb") as f:
            f.write(data)
        real_create(path, data, **kw)

    monkeypatch.setattr(provision.fsio, "create_exclusive", racing_create)
    got = provision_varstore(target, VARS_2M, expected_layout=LAYOUT_2M, owner=qemu_owner)
    assert got.adopted
    assert os.listdir(tmp_path) == ["vm_VARS.fd"]


def test_full_disk(mount_tmpfs, qemu_owner):
    d = mount_tmpfs("size=64k")
    target = os.path.join(d, "vm_VARS.fd")
    with pytest.raises(ProvisionError, match="no space left on device") as info:
        provision_varstore(target, VARS_4M, expected_layout=LAYOUT_4M, owner=qemu_owner)
    assert target in str(info.value)
    assert os.listdir(d) == []


def test_read_only_nvram_dir(mount_tmpfs, qemu_owner):
    d = mount_tmpfs("size=1m,ro")
    with pytest.raises(ProvisionError, match="read-only file system"):
        provision_varstore(os.path.join(d, "vm_VARS.fd"), VARS_2M, expected_layout=LAYOUT_2M, owner=qemu_owner)
    assert os.listdir(d) == []


# -- JSON varstores (QEMU uefi-vars, libvirt <varstore>) ------------------------------

JSON_TEMPLATE = (b'{"version": 2, "variables": [{"name": "PK", "guid": "8be4df61-93ca-11d2-aa0d-00e098032b8c", '
                 b'"attr": 39, "data": "a1c0"}]}\n')


def _json_template(tmp_path) -> str:
    path = tmp_path / "OVMF_VARS.qemuvars.json"
    path.write_bytes(JSON_TEMPLATE)
    return str(path)


@pytest.mark.parametrize("empty", [False, True], ids=["missing", "empty"])
def test_a_missing_or_empty_json_varstore_gets_the_template(tmp_path, qemu_owner, empty):
    target = tmp_path / "varstore" / "guest.json"  # libvirt makes varstore/ at the first start: maybe not yet
    if empty:
        target.parent.mkdir()
        target.write_bytes(b"")
        os.chmod(target, 0o644)
    made = provision.provision_json_varstore(str(target), _json_template(tmp_path), owner=qemu_owner)
    assert made is not None and made.path == str(target) and not made.adopted
    st = os.lstat(target)
    assert target.read_bytes() == JSON_TEMPLATE
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, *qemu_owner)
    assert sorted(p.name for p in target.parent.iterdir()) == ["guest.json"]  # no temp file left
    pst = os.lstat(target.parent)
    assert empty or (stat.S_IMODE(pst.st_mode), pst.st_uid, pst.st_gid) == (0o755, *qemu_owner)
    assert provision.inspect_json_varstore(str(target)).state.value == "valid"


def test_a_json_varstore_with_content_is_never_touched(tmp_path, qemu_owner):
    target = tmp_path / "guest.json"
    target.write_bytes(b'{"version": 2, "variables": []}')
    before = _snapshot(target)
    assert provision.provision_json_varstore(str(target), _json_template(tmp_path), owner=qemu_owner) is None
    assert _snapshot(target) == before


def test_a_symlink_at_the_json_path_is_refused_and_its_target_untouched(tmp_path, qemu_owner):
    victim = tmp_path / "other.json"
    victim.write_bytes(b"")
    link = tmp_path / "guest.json"
    link.symlink_to(victim)
    with pytest.raises(ProvisionError, match="is not a regular file"):
        provision.provision_json_varstore(str(link), _json_template(tmp_path), owner=qemu_owner)
    assert victim.read_bytes() == b"" and link.is_symlink()
    assert provision.inspect_json_varstore(str(link)).state.value == "invalid"


@pytest.mark.parametrize("template", [VARS_4M, "text"], ids=["pflash-template", "not-json"])
def test_a_template_that_is_not_a_json_varstore_is_an_error_naming_it(tmp_path, qemu_owner, template):
    if template == "text":
        template = str(tmp_path / "t.json")
        Path(template).write_text("hello\n")
    target = tmp_path / "guest.json"
    with pytest.raises(VarstoreError, match=f"^{template}: not a QEMU JSON varstore"):
        provision.provision_json_varstore(str(target), template, owner=qemu_owner)
    assert not target.exists()
    assert provision.preflight_json(str(target), template).startswith(f"{template}: not a QEMU JSON varstore")


def test_a_missing_template_is_an_error_naming_it(tmp_path, qemu_owner):
    with pytest.raises(ProvisionError, match="cannot read JSON varstore template: .*nope.json"):
        provision.provision_json_varstore(str(tmp_path / "g.json"), str(tmp_path / "nope.json"), owner=qemu_owner)
    assert not (tmp_path / "g.json").exists()
