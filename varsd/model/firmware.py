"""Typed records for firmware builds: what the catalog knows about each image pair.

A *build* is one code image plus the varstore template it was built with (or, for
combined/stateless builds, the code image alone). The varstore *layout* of a template
is what a code image hard-codes: two images can only be used together when the
domain's varstore has exactly the layout of the build's template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class UpgradePolicy(StrEnum):
    """`upgrade_policy`: whether a new fitting central build reaches a domain by itself."""

    AUTO = "auto"  # at the domain's next cold boot
    MANUAL = "manual"  # held back (a `policy` pin) until `varsctl upgrade approve`


class MappingMode(StrEnum):
    """How a flash build is mapped (QEMU firmware.json `mapping.mode`)."""

    SPLIT = "split"
    COMBINED = "combined"
    STATELESS = "stateless"


@dataclass(frozen=True)
class VarstoreLayout:
    """Where the variables live inside a varstore file, as read by virt-firmware.

    `size` is the file size, `start`/`end` the variable store range inside it. Two
    varstores are interchangeable for a code image only when all three match.
    """

    size: int
    start: int
    end: int

    def describe(self) -> str:
        return f"{self.size} bytes, variables 0x{self.start:x}-0x{self.end:x}"


@dataclass(frozen=True)
class Target:
    """One `targets` entry of a descriptor: an architecture and machine-type globs."""

    architecture: str
    machines: tuple[str, ...]



@dataclass(frozen=True)
class Build:
    """A firmware build the host offers, from a descriptor or the config's extra pairs.

    `origin` names where it came from (descriptor file path, or `config:extra[N]`) so
    every report can point an admin at the file to look at.
    """

    origin: str
    code_path: str
    code_format: str
    code_sha256: str
    code_size: int
    mode: MappingMode = MappingMode.SPLIT
    template_path: str | None = None
    template_format: str | None = None
    template_sha256: str | None = None
    layout: VarstoreLayout | None = None
    features: frozenset[str] = frozenset()
    targets: tuple[Target, ...] = ()
    interface_types: tuple[str, ...] = ("uefi",)
    description: str = ""
    derived_from: str | None = None  # the shipped template, when template_path is varsd's derived 2023 copy
    # The template is blank flash (all erased) that the code formats at its first boot (Debian 12's
    # AAVMF_VARS.fd); `layout` is then what that code formats, learned from a formatted template of
    # the same code (see varsd.firmware.catalog), and a domain's still-blank varstore fits it.
    template_blank: bool = False

    @property
    def secure_boot(self) -> bool:
        return "secure-boot" in self.features

    @property
    def requires_smm(self) -> bool:
        return "requires-smm" in self.features

    @property
    def enrolled_keys(self) -> bool:
        return "enrolled-keys" in self.features


    @property
    def label(self) -> str:
        """Short human name: the code file and the first 12 hex digits of its digest."""
        return f"{self.code_path}@{self.code_sha256[:12]}"


@dataclass(frozen=True)
class CatalogProblem:
    """A descriptor or extra pair that could not be used, and why (reported, never fatal)."""

    source: str
    message: str


@dataclass(frozen=True)
class Catalog:
    """Every usable build, in precedence order (first match wins), plus what was skipped."""

    builds: tuple[Build, ...] = ()
    problems: tuple[CatalogProblem, ...] = field(default=())

    def by_code_path(self, path: str) -> Build | None:
        for b in self.builds:
            if b.code_path == path:
                return b
        return None

    def by_code_sha(self, sha256: str) -> list[Build]:
        return [b for b in self.builds if b.code_sha256 == sha256]
