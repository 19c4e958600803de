"""The one place varsd talks to libvirt.

Everything else in varsd sees plain strings and frozen `DomainRef`s, never
`libvirt` objects, so the rest of the code can be tested without a hypervisor
and so that every libvirt failure is turned into a `HypervisorError` by one
classifier (`hypervisor_error`) that decides whether retrying can help.

Domains are addressed by UUID: names can change (rename), UUIDs cannot.
Event handling is deliberately absent; a subclass or a later revision can add
it around `Hypervisor.connection`.
"""

from __future__ import annotations

import os
import threading
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

import libvirt

from varsd.errors import HypervisorError
from varsd.model.domain import DomainRef

__all__ = [
    "DomainRef",
    "Hypervisor",
    "NoSuchDomain",
    "hypervisor_error",
]

_STATE_NAMES: dict[int, str] = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

# Errors that say "the link to libvirtd (or libvirtd itself) is unwell", not
# "your request is wrong": trying again later, possibly after reconnecting,
# can succeed. SYSTEM_ERROR also covers transient host trouble (EAGAIN, ENOSPC,
# a socket that is not there yet while libvirtd restarts); treating a rare
# permanent one as retryable costs only a few backed-off retries, the opposite
# mistake would silently drop work.
_RETRYABLE_CODES = frozenset(
    {
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,  # connection object already closed: reopen
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_OPERATION_TIMEOUT,  # e.g. "cannot acquire state change lock"
        libvirt.VIR_ERR_RESOURCE_BUSY,
    }
)
# INTERNAL_ERROR is retryable only when the RPC layer raised it ("client socket
# is closed"); from a driver it means a real, repeatable failure. Auth errors
# (AUTH_FAILED, AUTH_UNAVAILABLE, ACCESS_DENIED) are permanent: the same
# credentials will fail the same way until an admin changes something.
_CONNECTION_ERROR_DOMAINS = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})

# Where the local system QEMU driver keeps `<name>.pid`; other URIs (remote,
# session, embed, test) have no pid file varsd could read.
_QEMU_PID_DIRS = {"qemu:///system": "/run/libvirt/qemu"}

_handler_lock = threading.Lock()
_handler_installed = False


class NoSuchDomain(HypervisorError):
    """The domain does not exist (any more): permanent, and often expected."""


def hypervisor_error(exc: libvirt.libvirtError, what: str) -> HypervisorError:
    """Turn a libvirt error into a HypervisorError whose message starts with `what`.

    The single classifier for the whole package, so retry policy lives in one place.
    """
    code = exc.get_error_code()
    domain = exc.get_error_domain()
    message = exc.get_error_message() or str(exc) or "unknown libvirt error"
    text = f"{what}: {message}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return NoSuchDomain(text, retryable=False)
    retryable = code in _RETRYABLE_CODES or (
        code == libvirt.VIR_ERR_INTERNAL_ERROR and domain in _CONNECTION_ERROR_DOMAINS
    )
    return HypervisorError(text, retryable=retryable)


def _silence_libvirt() -> None:
    """Stop libvirt printing every error to stderr; we raise them instead."""
    global _handler_installed
    with _handler_lock:
        if not _handler_installed:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _handler_installed = True


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as exc:
        raise hypervisor_error(exc, what) from exc


def _is_uuid(text: str) -> bool:
    try:
        uuidlib.UUID(text)
    except ValueError:
        return False
    return True


def _xml_root(xml: str) -> ET.Element | None:
    try:
        return ET.fromstring(xml)
    except ET.ParseError:
        return None


class Hypervisor:
    """One libvirt connection. Use as a context manager or call open()/close().

    Every method raises HypervisorError (NoSuchDomain when the domain is gone).
    """

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._conn: libvirt.virConnect | None = None
        self._handles: dict[str, libvirt.virDomain] = {}
        self._lib_version: int | None = None

    # -- connection -----------------------------------------------------------------

    @property
    def uri(self) -> str:
        return self._uri

    def open(self) -> Hypervisor:
        """Connect (idempotent). Fails retryably when libvirtd is not reachable."""
        if self._conn is None:
            _silence_libvirt()
            with _translated(f"cannot connect to {self._uri}"):
                self._conn = libvirt.open(self._uri)
        return self

    def close(self) -> None:
        """Disconnect; never raises, so it is safe in cleanup paths."""
        conn, self._conn = self._conn, None
        self._handles.clear()
        self._lib_version = None
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass

    def __enter__(self) -> Hypervisor:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def is_alive(self) -> bool:
        """False when not open or the connection broke (then close() and open() again)."""
        if self._conn is None:
            return False
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    @property
    def connection(self) -> libvirt.virConnect:
        """The raw connection, for extensions inside this module (e.g. events)."""
        if self._conn is None:
            raise HypervisorError(f"not connected to {self._uri}", retryable=True)
        return self._conn

    # -- domains --------------------------------------------------------------------

    def list_domains(self) -> list[DomainRef]:
        """All domains, active and inactive, sorted by name.

        Two RPCs however many domains there are (states of all domains in one
        getAllDomainStats call, plus the transient ones): a full pass over hundreds
        of domains must not pay three round trips per domain before it starts.
        """
        with _translated(f"cannot list domains on {self._uri}"):
            stats = self.connection.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)
            transient = {
                d.UUIDString() for d in self.connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)
            }
        refs = []
        for dom, record in stats:
            uuid = dom.UUIDString()
            self._handles[uuid] = dom
            state = record.get("state.state", libvirt.VIR_DOMAIN_NOSTATE)
            refs.append(
                DomainRef(
                    uuid=uuid,
                    name=dom.name(),
                    state=_STATE_NAMES.get(state, "nostate"),
                    active=state not in _INACTIVE_STATES,
                    persistent=uuid not in transient,
                )
            )
        return sorted(refs, key=lambda r: (r.name, r.uuid))

    def lookup(self, name_or_uuid: str) -> DomainRef:
        """Find a domain by UUID (any case) or, failing that, by name."""
        cached = self._handles.get(name_or_uuid.lower()) if _is_uuid(name_or_uuid) else None
        if cached is not None:
            try:
                return self._ref(cached)
            except NoSuchDomain:
                self._handles.pop(name_or_uuid.lower(), None)  # undefined (and maybe redefined): look up afresh
        dom = self._lookup(name_or_uuid)
        self._handles[dom.UUIDString()] = dom
        return self._ref(dom)

    def persistent_xml(self, uuid: str) -> str:
        """The configuration used at the next cold boot (secure: includes secrets)."""
        dom = self._domain(uuid)
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        with _translated(f"{_label(dom)}: cannot read persistent XML"):
            return dom.XMLDesc(flags)

    def live_xml(self, uuid: str) -> str | None:
        """The running instance's XML, or None when the domain is not running.

        Decided from the XML itself (a live definition carries an `id`), so a
        domain stopping between two calls cannot make us return stale config.
        """
        dom = self._domain(uuid)
        with _translated(f"{_label(dom)}: cannot read live XML"):
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
        root = _xml_root(xml)
        if root is None or root.get("id") in (None, "-1"):
            return None
        return xml

    def lib_version(self) -> int:
        """Version of the libvirt serving this connection (major * 1e6 + minor * 1e3 + micro),
        read once per connection."""
        if self._lib_version is None:  # asked before every write; fixed for a connection's life
            with _translated("cannot read libvirt's version"):
                self._lib_version = int(self.connection.getLibVersion())
        return self._lib_version

    def define(self, xml: str) -> DomainRef:
        """Define or redefine a domain; a running one changes only at its next cold boot."""
        root = _xml_root(xml)
        name = root.findtext("name") if root is not None else None
        what = f"domain '{name}'" if name else "domain XML"
        with _translated(f"{what}: cannot define"):
            dom = self.connection.defineXML(xml)
        try:
            # After the define succeeded: a failure here must not make the caller journal
            # an applied change as failed.
            state, _reason = dom.state()
        except libvirt.libvirtError:
            state = libvirt.VIR_DOMAIN_NOSTATE
        uuid = dom.UUIDString()
        self._handles[uuid] = dom
        return DomainRef(
            uuid=uuid,
            name=dom.name(),
            state=_STATE_NAMES.get(state, "nostate"),
            active=state not in _INACTIVE_STATES,
            persistent=True,
        )

    def undefine(self, uuid: str, *, remove_nvram: bool) -> None:
        """Remove a persistent definition, stating explicitly what happens to the varstore.

        For test beds and tooling: varsd itself never undefines domains.
        """
        dom = self._domain(uuid)
        flags = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM if remove_nvram else libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
        with _translated(f"{_label(dom)}: cannot undefine"):
            dom.undefineFlags(flags)

    def start(self, uuid: str) -> None:
        """Cold-boot an inactive domain (new QEMU process)."""
        dom = self._domain(uuid)
        with _translated(f"{_label(dom)}: cannot start"):
            dom.create()

    def is_running(self, uuid: str) -> bool:
        """Whether a QEMU process exists or is being started for the domain (libvirt's isActive).

        Stricter than `DomainRef.active`: a start in progress counts from the moment
        libvirt begins it (before its hooks run), which is what an offline write of the
        domain's varstore must know."""
        dom = self._domain(uuid)
        with _translated(f"{_label(dom)}: cannot read state"):
            return bool(dom.isActive())

    def has_managed_save(self, uuid: str) -> bool:
        """A saved RAM image the next start resumes from (its varstore must not change under it)."""
        dom = self._domain(uuid)
        with _translated(f"{_label(dom)}: cannot read managed save state"):
            return bool(dom.hasManagedSaveImage(0))

    def suspend(self, uuid: str) -> None:
        """Pause the vCPUs (the QEMU process stays)."""
        dom = self._domain(uuid)
        with _translated(f"{_label(dom)}: cannot suspend"):
            dom.suspend()

    def resume(self, uuid: str) -> None:
        dom = self._domain(uuid)
        with _translated(f"{_label(dom)}: cannot resume"):
            dom.resume()

    def destroy(self, uuid: str) -> None:
        """Power off immediately."""
        dom = self._domain(uuid)
        with _translated(f"{_label(dom)}: cannot destroy"):
            dom.destroy()

    # -- metadata -------------------------------------------------------------------

    def set_metadata(self, uuid: str, xml_fragment: str, *, key: str, ns_uri: str, live: bool, config: bool) -> None:
        """Store one element under our namespace; `live` lasts only for this boot."""
        dom = self._domain(uuid)
        with _translated(f"{_label(dom)}: cannot set metadata {ns_uri}"):
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml_fragment, key, ns_uri, _affect(live, config))

    def remove_metadata(self, uuid: str, *, ns_uri: str, live: bool, config: bool) -> None:
        """Drop our element (no error when it is absent)."""
        dom = self._domain(uuid)
        with _translated(f"{_label(dom)}: cannot remove metadata {ns_uri}"):
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, ns_uri, _affect(live, config))

    def get_metadata(self, uuid: str, *, ns_uri: str, live: bool) -> str | None:
        """Our element from the live (or persistent) definition; None when absent.

        Asking for live metadata of a domain that is not running also gives None:
        there is no running instance to describe.
        """
        dom = self._domain(uuid)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if live else libvirt.VIR_DOMAIN_AFFECT_CONFIG
        try:
            return dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, ns_uri, flags)
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            if code == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            if live and code == libvirt.VIR_ERR_OPERATION_INVALID and not _active(dom):
                return None
            raise hypervisor_error(exc, f"{_label(dom)}: cannot read metadata {ns_uri}") from exc

    # -- host process ---------------------------------------------------------------

    def qemu_pid(self, uuid: str) -> int | None:
        """PID of the domain's QEMU process, when this is the local system QEMU driver.

        Read from libvirt's pid file and checked against /proc, so a stale file
        or a reused PID gives None. Lets callers see which inode QEMU has open.
        """
        pid_dir = _QEMU_PID_DIRS.get(self._uri)
        if pid_dir is None:
            return None
        dom = self._domain(uuid)
        name = dom.name()
        try:
            with open(os.path.join(pid_dir, f"{name}.pid")) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        if not any(arg.startswith(f"guest={name},".encode()) or arg == f"guest={name}".encode() for arg in argv):
            return None
        return pid

    # -- internals ------------------------------------------------------------------

    def _lookup(self, name_or_uuid: str) -> libvirt.virDomain:
        conn = self.connection
        if _is_uuid(name_or_uuid):
            try:
                return conn.lookupByUUIDString(name_or_uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise hypervisor_error(exc, f"domain {name_or_uuid}: lookup failed") from exc
                # fall through: a domain may be *named* like a UUID
        with _translated(f"domain '{name_or_uuid}': lookup failed"):
            return conn.lookupByName(name_or_uuid)

    def _domain(self, uuid: str) -> libvirt.virDomain:
        """A handle by UUID; handles from listing are reused (a handle is just a name)."""
        dom = self._handles.get(uuid)
        if dom is not None:
            return dom
        with _translated(f"domain {uuid}: lookup failed"):
            dom = self.connection.lookupByUUIDString(uuid)
        self._handles[uuid] = dom
        return dom

    def _ref(self, dom: libvirt.virDomain) -> DomainRef:
        with _translated(f"{_label(dom)}: cannot read state"):
            state, _reason = dom.state()
            return DomainRef(
                uuid=dom.UUIDString(),
                name=dom.name(),
                state=_STATE_NAMES.get(state, "nostate"),
                active=state not in _INACTIVE_STATES,
                persistent=bool(dom.isPersistent()),
            )


_INACTIVE_STATES = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_NOSTATE, libvirt.VIR_DOMAIN_CRASHED)


def _label(dom: libvirt.virDomain) -> str:
    """`domain 'web1' (uuid)`: both values are cached client-side, no RPC."""
    try:
        return f"domain '{dom.name()}' ({dom.UUIDString()})"
    except libvirt.libvirtError:
        return "domain (unknown)"


def _active(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def _affect(live: bool, config: bool) -> int:
    if not (live or config):
        raise ValueError("metadata change must affect the live domain, the config, or both")
    return (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0) | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0)
