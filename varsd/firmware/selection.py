"""Choosing a build from the catalog for a domain, the way libvirt autoselects firmware.

Rules (after libvirt's qemuFirmwareMatchDomain in src/qemu/qemu_firmware.c):

- Builds are tried in catalog order; the first that passes every check wins.
- Checks, in order: mapping mode; a target whose architecture equals `arch` and one
  of whose machine globs matches `machine` (fnmatch, like g_pattern_match_simple);
  `secure-boot` present exactly when Secure Boot is wanted; if `enrolled_keys` is
  given, `enrolled-keys` present exactly when wanted; no `requires-smm` when the
  domain cannot have SMM; then, to keep an existing varstore usable, the template
  layout and the code size when given.
- Stricter than libvirt on purpose: libvirt leaves Secure Boot "don't care" when
  the XML does not say; varsd always knows which one the domain runs, and swapping
  a Secure Boot build for a plain one (or back) changes what the guest trusts.
- Machine aliases: libvirt canonicalises `q35` to `pc-q35-X.Y` and `pc` to
  `pc-i440fx-X.Y` when a domain is defined, so XML normally carries the versioned
  name. If an alias is seen anyway, we assume it stands for *some* version of its
  family: it matches a glob that matches the alias literally or covers that family
  (`pc-q35-*`, `pc-q35-7.*`, `pc-*`, `*`). We cannot know which version QEMU would
  pick without asking QEMU, so a versioned glob counts as a match.

Everything here is pure: no I/O, no logging.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from varsd.model.firmware import Build, Catalog, MappingMode, Target, VarstoreLayout

# alias -> machine-name prefix of the family libvirt canonicalises it into
MACHINE_ALIASES: dict[str, str] = {"q35": "pc-q35-", "pc": "pc-i440fx-"}


def _glob_matches(glob: str, machine: str) -> bool:
    if fnmatch.fnmatchcase(machine, glob):
        return True
    prefix = MACHINE_ALIASES.get(machine)
    if prefix is None:
        return False
    # "x" stands in for any version: covers "*", "pc-*", "pc-q35-*"; startswith covers "pc-q35-7.*"
    return glob.startswith(prefix) or fnmatch.fnmatchcase(prefix + "x", glob)


def target_matches(target: Target, arch: str, machine: str) -> bool:
    """Whether a descriptor target covers arch+machine, accepting libvirt's aliases."""
    return target.architecture == arch and any(_glob_matches(g, machine) for g in target.machines)


@dataclass(frozen=True)
class _Want:
    arch: str
    machine: str
    secure_boot: bool
    enrolled_keys: bool | None
    smm_allowed: bool
    layout: VarstoreLayout | None
    code_size: int | None
    mode: MappingMode

    def describe(self) -> str:
        parts = [f"no {self.mode.value} UEFI build for {self.arch} {self.machine}"]
        parts.append("with Secure Boot" if self.secure_boot else "without Secure Boot")
        if self.enrolled_keys is not None:
            parts.append("with enrolled keys" if self.enrolled_keys else "without enrolled keys")
        if not self.smm_allowed:
            parts.append("not requiring SMM")
        if self.layout is not None:
            parts.append(f"with varstore layout {self.layout.describe()}")
        if self.code_size is not None:
            parts.append(f"with a {self.code_size}-byte code image")
        return " ".join(parts)


def _mismatch(build: Build, want: _Want) -> str | None:
    """Why `build` does not fit, as a short phrase; None when it fits."""
    if build.mode is not want.mode:
        return f"{build.mode.value} mapping"
    if not any(target_matches(t, want.arch, want.machine) for t in build.targets):
        offered = "; ".join(f"{t.architecture} {','.join(t.machines)}" for t in build.targets) or "none"
        return f"targets {offered}"
    if build.secure_boot != want.secure_boot:
        return "Secure Boot build" if build.secure_boot else "no Secure Boot"
    if want.enrolled_keys is not None and build.enrolled_keys != want.enrolled_keys:
        return "keys enrolled" if build.enrolled_keys else "no keys enrolled"
    if not want.smm_allowed and build.requires_smm:
        return "requires SMM"
    if want.layout is not None and build.layout != want.layout:
        return f"varstore layout {build.layout.describe()}" if build.layout else "no varstore template"
    if want.code_size is not None and build.code_size != want.code_size:
        return f"code image is {build.code_size} bytes"
    return None


def _first(catalog: Catalog, want: _Want) -> Build | None:
    return next((b for b in catalog.builds if _mismatch(b, want) is None), None)


def select_build(
    catalog: Catalog,
    *,
    arch: str,
    machine: str,
    secure_boot: bool,
    enrolled_keys: bool | None = None,
    smm_allowed: bool = True,
    layout: VarstoreLayout | None = None,
    code_size: int | None = None,
    mode: MappingMode = MappingMode.SPLIT,
) -> Build | None:
    """The first build in catalog order that fits the domain (module rules), or None."""
    return _first(catalog, _Want(arch, machine, secure_boot, enrolled_keys, smm_allowed, layout, code_size, mode))


def explain_no_build(
    catalog: Catalog,
    *,
    arch: str,
    machine: str,
    secure_boot: bool,
    enrolled_keys: bool | None = None,
    smm_allowed: bool = True,
    layout: VarstoreLayout | None = None,
    code_size: int | None = None,
    mode: MappingMode = MappingMode.SPLIT,
) -> str:
    """An admin-readable sentence: what was asked for and why each build was passed over.

    Same arguments as `select_build`. If a build does fit, says which one, so callers
    may use it unconditionally in reports.
    """
    want = _Want(arch, machine, secure_boot, enrolled_keys, smm_allowed, layout, code_size, mode)
    found = _first(catalog, want)
    if found is not None:
        return f"{found.origin} fits: {found.label}"
    head = want.describe()
    if not catalog.builds:
        tail = "the firmware catalog is empty"
        if catalog.problems:
            tail += f" ({len(catalog.problems)} descriptor(s) could not be used, see the catalog problems)"
        return f"{head}: {tail}"
    reasons = "; ".join(f"{b.origin}: {_mismatch(b, want)}" for b in catalog.builds)
    return f"{head}. Passed over: {reasons}"


def machine_has_smm(machine: str | None) -> bool:
    """Whether the machine type can give a guest SMM, which Secure Boot builds need.

    libvirt allows `<smm state='on'/>` with `secure='yes'` on q35 machine types only.
    """
    return bool(machine) and "q35" in str(machine)


# Architectures on which libvirt refuses UEFI pflash without <acpi/> ("UEFI requires ACPI
# on this architecture", checked with libvirt 9.0); aarch64 guests may boot with a device tree.
ACPI_REQUIRED_ARCHS = frozenset({"x86_64", "i686"})


def uefi_needs_acpi(arch: str | None) -> bool:
    """Whether a UEFI pflash domain of this architecture must have `<features><acpi/>`."""
    return arch in ACPI_REQUIRED_ARCHS
