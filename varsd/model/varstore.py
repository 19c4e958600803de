"""Typed records for what a varstore holds: its variables, as a guest sees them.

Plain data, so the pure migration planner can reason about variables without
importing virt-firmware (`varsd.adapters.virtfw` builds these from a store's bytes).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EfiVariable:
    """One live UEFI variable: what a guest sees through GetVariable()."""

    name: str
    guid: str
    attr: int
    data: bytes

    @property
    def key(self) -> str:
        return f"{self.guid}:{self.name}"
