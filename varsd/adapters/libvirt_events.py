"""libvirt events: the default event loop, lifecycle subscriptions, close callbacks.

libvirt needs an event loop implementation registered *before* a connection opens,
and someone running it; `start_event_loop()` does both once per process (a daemon
thread running `virEventRunDefaultImpl`). Callbacks run on that thread, so the
handlers given here must only hand work over (queue a UUID) and return.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import libvirt

from varsd.adapters.libvirt_api import Hypervisor

log = logging.getLogger("varsd.events")

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None

_KINDS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}


@dataclass(frozen=True)
class LifecycleEvent:
    uuid: str
    name: str
    kind: str  # defined, undefined, started, stopped, ...
    detail: int


def start_event_loop() -> None:
    """Register and run libvirt's default event loop (idempotent, per process)."""
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except libvirt.libvirtError as exc:  # keep the loop alive whatever happens
                    log.warning("libvirt event loop: %s", exc)

        _loop_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _loop_thread.start()


class Subscription:
    """Lifecycle events and connection-close notice for one open Hypervisor."""

    def __init__(
        self,
        hv: Hypervisor,
        on_event: Callable[[LifecycleEvent], None],
        on_close: Callable[[str], None],
        *,
        keepalive: tuple[int, int] = (5, 3),
    ) -> None:
        self._hv = hv
        conn = hv.connection
        try:
            # Detects a hung or vanished libvirtd within interval*(count+1) seconds.
            conn.setKeepAlive(*keepalive)
        except libvirt.libvirtError:
            pass  # drivers without keepalive (test:///, embedded) have nothing to lose

        def lifecycle(_conn, dom, event, detail, _opaque) -> None:
            try:
                on_event(LifecycleEvent(dom.UUIDString(), dom.name(), _KINDS.get(event, str(event)), detail))
            except Exception:  # an exception here would be swallowed by libvirt anyway
                log.exception("lifecycle event handler failed")

        def closed(_conn, reason, _opaque) -> None:
            why = {
                libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
                libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd went away",
                libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
                libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by client",
            }.get(reason, str(reason))
            on_close(why)

        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None
        )
        self._close_registered = False
        try:
            conn.registerCloseCallback(closed, None)
            self._close_registered = True
        except libvirt.libvirtError:
            pass

    def cancel(self) -> None:
        """Best effort: the connection may already be dead."""
        try:
            conn = self._hv.connection
            conn.domainEventDeregisterAny(self._callback_id)
            if self._close_registered:
                conn.unregisterCloseCallback()
        except Exception:
            pass
