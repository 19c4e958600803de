"""Fast tests of the libvirt adapter on libvirt's in-process `test:///default` driver.

No daemon and no QEMU: the test driver is a real libvirt driver (define, start,
metadata) whose state lives in this process. It starts with one running domain
named `test`. Its state is dropped only when the last reference to the connection
goes (domain objects held by tracebacks keep it), so tests never rely on a reset:
they define uniquely named domains through `make` and leave `test` untouched.
"""

from __future__ import annotations

import uuid as uuidlib

import libvirt
import pytest
from support.domains import domain_xml, split_os

from varsd.adapters.libvirt_api import DomainRef, Hypervisor, NoSuchDomain, hypervisor_error
from varsd.errors import HypervisorError

NS = "https://varsd.example/test"


def _xml(name: str, memory_kib: int = 131072, uuid: str | None = None) -> str:
    return domain_xml(name, split_os("/usr/share/OVMF/OVMF_CODE_4M.fd", f"/var/lib/libvirt/qemu/nvram/{name}_VARS.fd"),
                      uuid=uuid, memory_kib=memory_kib, machine=None)


@pytest.fixture
def hv():
    with Hypervisor("test:///default") as h:
        yield h


@pytest.fixture
def make(hv):
    """define(label, running=False) -> DomainRef of a fresh `web-<hex>-<label>` domain; removed afterwards."""
    made: list[str] = []

    def define(label: str = "vm", *, running: bool = False, memory_kib: int = 131072) -> DomainRef:
        ref = hv.define(_xml(f"web-{uuidlib.uuid4().hex[:8]}-{label}", memory_kib))
        made.append(ref.uuid)
        if running:
            hv.start(ref.uuid)
            ref = hv.lookup(ref.uuid)
        return ref

    yield define
    for uuid in made:  # the test driver rejects UNDEFINE_NVRAM, so not hv.undefine()
        dom = hv.connection.lookupByUUIDString(uuid)
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def _libvirt_error(code: int, domain: int, message: str = "boom") -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, domain, message, libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    return exc


# -- listing and lookup ---------------------------------------------------------------


def test_list_domains_shows_the_builtin_running_domain(hv):
    (ref,) = [r for r in hv.list_domains() if r.name == "test"]
    assert ref.state == "running" and ref.active and ref.persistent


def test_lookup_by_name_and_by_uuid_in_any_case(hv):
    by_name = hv.lookup("test")
    assert hv.lookup(by_name.uuid) == by_name
    assert hv.lookup(by_name.uuid.upper()) == by_name
    assert by_name.label == f"domain 'test' ({by_name.uuid})"


def test_lookup_of_missing_domain_is_permanent_and_names_it(hv):
    with pytest.raises(NoSuchDomain) as info:
        hv.lookup("web1")
    assert not info.value.retryable
    assert "domain 'web1'" in str(info.value)
    assert isinstance(info.value, HypervisorError)


def test_lookup_of_missing_uuid_names_the_uuid(hv):
    missing = "00000000-0000-0000-0000-00000000beef"
    with pytest.raises(NoSuchDomain, match=missing):
        hv.persistent_xml(missing)


def test_errors_do_not_reach_stderr(hv, capfd):
    with pytest.raises(NoSuchDomain):
        hv.lookup("nope")
    assert capfd.readouterr().err == ""


# -- define, start, XML ---------------------------------------------------------------


def test_define_returns_inactive_persistent_ref(hv, make):
    ref = make("def")
    assert isinstance(ref, DomainRef)
    assert (ref.state, ref.active, ref.persistent) == ("shut off", False, True)
    assert ref in hv.list_domains()


def test_live_xml_is_none_when_not_running(hv, make):
    ref = make("off")
    assert hv.live_xml(ref.uuid) is None
    assert f"<name>{ref.name}</name>" in hv.persistent_xml(ref.uuid)


def test_redefining_a_running_domain_changes_only_the_persistent_config(hv, make):
    ref = make("redef", running=True, memory_kib=131072)
    assert (ref.state, ref.active) == ("running", True)
    hv.define(_xml(ref.name, memory_kib=262144, uuid=ref.uuid))
    assert "262144" in hv.persistent_xml(ref.uuid)
    live = hv.live_xml(ref.uuid)
    assert live is not None and "131072" in live and "262144" not in live
    hv.destroy(ref.uuid)
    after = hv.lookup(ref.uuid)
    assert (after.state, after.active) == ("shut off", False)
    assert hv.live_xml(ref.uuid) is None
    assert "262144" in hv.persistent_xml(ref.uuid)


def test_start_of_running_domain_is_permanent_and_names_it(hv, make):
    ref = make("twice", running=True)
    with pytest.raises(HypervisorError) as info:
        hv.start(ref.uuid)
    assert not info.value.retryable
    assert str(info.value).startswith(f"domain '{ref.name}' ({ref.uuid}): cannot start: ")


def test_define_of_invalid_xml_is_permanent_and_names_the_domain(hv):
    with pytest.raises(HypervisorError) as info:
        hv.define("<domain type='test'><name>broken</name></domain>")
    assert not info.value.retryable
    assert "domain 'broken'" in str(info.value)


def test_define_of_unparsable_xml_is_permanent(hv):
    with pytest.raises(HypervisorError) as info:
        hv.define("<domain><bogus")
    assert not info.value.retryable
    assert str(info.value).startswith("domain XML: cannot define")


# -- metadata -------------------------------------------------------------------------


def test_metadata_absent_is_none(hv, make):
    uuid = make("nometa", running=True).uuid
    assert hv.get_metadata(uuid, ns_uri=NS, live=True) is None
    assert hv.get_metadata(uuid, ns_uri=NS, live=False) is None


def test_live_metadata_stays_out_of_the_config(hv, make):
    uuid = make("livemeta", running=True).uuid
    hv.set_metadata(uuid, "<boot code='abc'/>", key="varsd", ns_uri=NS, live=True, config=False)
    assert hv.get_metadata(uuid, ns_uri=NS, live=True) == '<boot code="abc"/>'
    assert hv.get_metadata(uuid, ns_uri=NS, live=False) is None
    assert NS not in hv.persistent_xml(uuid)
    hv.destroy(uuid)
    assert hv.get_metadata(uuid, ns_uri=NS, live=True) is None  # gone with the instance


def test_config_metadata_is_in_the_persistent_xml(hv, make):
    uuid = make("confmeta", running=True).uuid
    hv.set_metadata(uuid, "<state v='1'/>", key="varsd", ns_uri=NS, live=False, config=True)
    assert hv.get_metadata(uuid, ns_uri=NS, live=False) == '<state v="1"/>'
    assert hv.get_metadata(uuid, ns_uri=NS, live=True) is None
    assert NS in hv.persistent_xml(uuid)


def test_metadata_on_both_and_removal(hv, make):
    uuid = make("bothmeta", running=True).uuid
    hv.set_metadata(uuid, "<x/>", key="varsd", ns_uri=NS, live=True, config=True)
    assert hv.get_metadata(uuid, ns_uri=NS, live=True) == "<x/>"
    assert hv.get_metadata(uuid, ns_uri=NS, live=False) == "<x/>"
    hv.remove_metadata(uuid, ns_uri=NS, live=True, config=True)
    assert hv.get_metadata(uuid, ns_uri=NS, live=True) is None
    assert hv.get_metadata(uuid, ns_uri=NS, live=False) is None


def test_live_metadata_of_inactive_domain(hv, make):
    ref = make("offmeta")
    assert hv.get_metadata(ref.uuid, ns_uri=NS, live=True) is None
    with pytest.raises(HypervisorError, match=f"domain '{ref.name}'") as info:
        hv.set_metadata(ref.uuid, "<x/>", key="varsd", ns_uri=NS, live=True, config=False)
    assert not info.value.retryable


def test_metadata_must_affect_something(hv, make):
    with pytest.raises(ValueError):
        hv.set_metadata(make("nowhere").uuid, "<x/>", key="v", ns_uri=NS, live=False, config=False)


# -- connection and classification ----------------------------------------------------


def test_unreachable_daemon_is_retryable():
    hv = Hypervisor("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    with pytest.raises(HypervisorError) as info:
        hv.open()
    assert info.value.retryable
    assert "cannot connect to qemu+unix:///system" in str(info.value)
    assert not hv.is_alive()


def test_closed_connection_fails_retryably():
    hv = Hypervisor("test:///default").open()
    assert hv.is_alive()
    hv.close()
    hv.close()  # idempotent
    with pytest.raises(HypervisorError) as info:
        hv.list_domains()
    assert info.value.retryable


def test_qemu_pid_is_none_without_a_local_qemu_driver(hv):
    assert hv.qemu_pid(hv.lookup("test").uuid) is None


@pytest.mark.parametrize(
    ("code", "domain", "retryable"),
    [
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, True),
        (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_FROM_NONE, True),
        (libvirt.VIR_ERR_RPC, libvirt.VIR_FROM_RPC, True),
        (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_FROM_QEMU, True),
        (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_FROM_NONE, True),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, True),  # client socket is closed
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_REMOTE, True),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, False),
        (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, False),
        (libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_FROM_DOMAIN, False),
        (libvirt.VIR_ERR_XML_DETAIL, libvirt.VIR_FROM_DOMAIN, False),
        (libvirt.VIR_ERR_CONFIG_UNSUPPORTED, libvirt.VIR_FROM_QEMU, False),
        (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU, False),
        (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_FROM_REMOTE, False),
        (libvirt.VIR_ERR_ACCESS_DENIED, libvirt.VIR_FROM_ACCESS, False),
    ],
)
def test_hypervisor_error_classification(code, domain, retryable):
    err = hypervisor_error(_libvirt_error(code, domain, "it broke"), "domain 'web1' (u): cannot start")
    assert err.retryable is retryable
    assert str(err) == "domain 'web1' (u): cannot start: it broke"
    assert isinstance(err, NoSuchDomain) is (code == libvirt.VIR_ERR_NO_DOMAIN)
