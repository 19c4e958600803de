"""Per-variable differences between two varstores (`varsctl backup diff`). Pure.

Variables are compared by "<guid>:<name>" with attributes and data; each side is
shown through `describe` (the virt-firmware adapter decodes boot entries, BootOrder
and signature databases), so an admin sees *what* was lost: "Boot0003 title='debian'
path=...", "db: cert CN=Microsoft Corporation UEFI CA 2011", not byte offsets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class Variable(Protocol):
    name: str
    guid: str
    attr: int
    data: bytes


class Change(StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"


@dataclass(frozen=True)
class VariableDiff:
    key: str  # "<guid>:<name>"
    name: str
    change: Change
    old: str | None  # described value, None when absent
    new: str | None
    attr_old: int | None = None
    attr_new: int | None = None

    def as_dict(self) -> dict:
        return {"variable": self.name, "guid": self.key.split(":", 1)[0], "change": self.change.value,
                "old": self.old, "new": self.new}

    def line(self) -> str:
        sign = {Change.ADDED: "+", Change.REMOVED: "-", Change.CHANGED: "~"}[self.change]
        if self.change is Change.CHANGED:
            attrs = "" if self.attr_old == self.attr_new else f" (attributes {self.attr_old:#x} -> {self.attr_new:#x})"
            return f"{sign} {self.name}: {self.old}  ->  {self.new}{attrs}"
        return f"{sign} {self.name}: {self.old if self.change is Change.REMOVED else self.new}"


def _order(key: str, name: str) -> tuple:
    # Boot order first, then boot entries, then keys, then the rest by name.
    group = 0 if name in ("BootOrder", "BootNext") else 1 if name.startswith("Boot") else \
        2 if name in ("PK", "KEK", "db", "dbx", "MokList", "MokListX", "SbatLevel") else 3
    return (group, name, key)


def diff_variables(old: Mapping[str, Variable], new: Mapping[str, Variable],
                   describe: Callable[[Variable], str]) -> list[VariableDiff]:
    """What differs from `old` to `new`, boot variables first."""
    out = []
    for key in sorted(set(old) | set(new), key=lambda k: _order(k, (old.get(k) or new[k]).name)):
        a, b = old.get(key), new.get(key)
        if a is not None and b is not None and (a.attr, a.data) == (b.attr, b.data):
            continue
        name = (a or b).name  # type: ignore[union-attr]
        if a is None:
            out.append(VariableDiff(key, name, Change.ADDED, None, describe(b), None, b.attr))
        elif b is None:
            out.append(VariableDiff(key, name, Change.REMOVED, describe(a), None, a.attr, None))
        else:
            out.append(VariableDiff(key, name, Change.CHANGED, describe(a), describe(b), a.attr, b.attr))
    return out
