"""Which XML changes the write path sends as varsd's metadata element alone (pure)."""

from __future__ import annotations

from dataclasses import replace

from varsd.domain.xml import VARSD_NS, metadata_only_change, parse_domain, parse_metadata_fragment, set_metadata
from varsd.model.domain import VarsdMetadata

XML = """<domain type='kvm'>
  <name>web</name>
  <uuid>6bdb1b24-3c3f-4d6a-9a55-1d1f2f0b7a11</uuid>
  <memory unit='KiB'>262144</memory>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
  </os>
</domain>"""
BOUND = VarsdMetadata(build_code_path="/usr/share/OVMF/OVMF_CODE_4M.fd", build_code_sha256="a" * 64)


def test_a_rebind_is_the_metadata_element_alone_in_the_form_libvirt_takes():
    old = set_metadata(XML, BOUND)
    new = set_metadata(old, replace(BOUND, build_code_sha256="b" * 64))
    fragment = metadata_only_change(old, new)
    assert fragment is not None and "xmlns" not in fragment and fragment.startswith("<firmware")
    # what libvirt stores: the bare element put into our namespace
    stored = fragment.replace("<firmware", f"<varsd:firmware xmlns:varsd='{VARSD_NS}'", 1) \
        .replace("<build", "<varsd:build").replace("</firmware>", "</varsd:firmware>")
    assert parse_metadata_fragment(stored) == parse_domain(new).metadata


def test_the_first_binding_adds_an_element_and_metadata_is_still_all_that_changes():
    assert metadata_only_change(XML, set_metadata(XML, BOUND)) is not None


def test_any_other_change_is_a_define():
    old = set_metadata(XML, BOUND)
    new = set_metadata(old.replace("OVMF_CODE_4M.fd</loader>", "OVMF_CODE_4M.ms.fd</loader>"), BOUND)
    assert metadata_only_change(old, new) is None
    assert metadata_only_change(old, old.replace("262144", "524288")) is None


def test_removing_varsds_element_is_a_define():
    assert metadata_only_change(set_metadata(XML, BOUND), XML) is None


def test_a_newer_varsds_foreign_child_is_kept_by_a_define():
    old = set_metadata(XML, BOUND).replace(
        "</varsd:firmware>", "<x:future xmlns:x='urn:other'/></varsd:firmware>")
    new = set_metadata(old, replace(BOUND, build_code_sha256="c" * 64))
    assert "urn:other" in new
    assert metadata_only_change(old, new) is None


def test_layout_whitespace_is_not_a_change():
    old = set_metadata(XML, BOUND)
    new = set_metadata(old, replace(BOUND, build_code_sha256="d" * 64)).replace("\n  <memory", "\n    <memory")
    assert metadata_only_change(old, new) is not None
