"""Connections to libvirt's in-process test:/// driver that clean up after a test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import libvirt


@contextlib.contextmanager
def tracked_connection(uri: str) -> Iterator[libvirt.virConnect]:
    """A connection whose list `conn.made` names the domains a test defined; afterwards each
    is destroyed if running and undefined (the driver's state outlives the connection only
    while one is open, so the fixture also keeps it alive across varsctl's own connections)."""
    conn = libvirt.open(uri)
    made: list[str] = []
    conn.made = made  # type: ignore[attr-defined]
    try:
        yield conn
    finally:
        for name in made:
            try:
                dom = conn.lookupByName(name)
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                continue
        conn.close()
