"""systemd's notify protocol (sd_notify) with the standard library.

A datagram to $NOTIFY_SOCKET; a no-op when not run by systemd. Used for READY=1
after the first full reconcile, STATUS= lines, STOPPING=1 and WATCHDOG=1.
"""

from __future__ import annotations

import os
import socket


def sd_notify(*lines: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asked for (seconds), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    # Like sd_watchdog_enabled(): 0 (or nonsense) means no watchdog, not "ping constantly".
    return value / 2_000_000 if value > 0 else None
