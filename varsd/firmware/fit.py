"""Does build B fit domain D: the one place that decides it (pure).

libvirt checks none of this, and each misfit fails silently in the guest (domain brief,
sections 1 and 2): the code hard-codes the varstore layout, a Secure Boot build needs a
Secure Boot varstore and SMM (q35 only), enrolled keys are part of what a guest trusts,
and varsd manages raw images only. Selection (`varsd.firmware.selection`), upgrade
tracking (`varsd.planning.upgrade`), repair, migration and `varsctl pin --build` all
ask `misfits(build, needs)`.

Rules:
- `Needs` says what the domain requires; a field that is None is "don't care" (e.g.
  migration gives no layout, since it changes the layout; repair's SMM check gives
  only the machine).
- `misfits` returns every misfit, typed, in one fixed order: mapping, format,
  architecture (checked whenever the domain's is known: OVMF is x86 firmware, AAVMF
  aarch64, and neither boots the other's guests), machine, Secure Boot, enrolled keys, SMM, layout, code size. Callers
  that report one reason report the first.
- Each kind's words are in `_WORDS`, one row per kind: a short `phrase` (what is wrong
  with the build, for lists of builds passed over) and a `sentence` an admin can act
  on. Callers add only advice about what to do next.
- Machine aliases: libvirt canonicalises `q35` to `pc-q35-X.Y` and `pc` to
  `pc-i440fx-X.Y` when a domain is defined, so XML normally carries the versioned
  name. If an alias is seen anyway, it stands for *some* version of its family: it
  matches a glob that matches the alias literally or covers that family (`pc-q35-*`,
  `pc-q35-7.*`, `pc-*`, `*`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from varsd.model.domain import DomainFirmware
from varsd.model.firmware import Build, MappingMode, Target, VarstoreLayout

# alias -> machine-name prefix of the family libvirt canonicalises it into
MACHINE_ALIASES: dict[str, str] = {"q35": "pc-q35-", "pc": "pc-i440fx-"}
RAW = "raw"


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


class Misfit(StrEnum):
    """Why a build cannot boot a domain, in the order they are checked."""

    MAPPING = "mapping"  # not the mapping mode wanted (split code with a varstore template)
    FORMAT = "format"  # not raw images
    ARCHITECTURE = "architecture"
    MACHINE = "machine"
    SECURE_BOOT = "secure-boot"
    ENROLLED_KEYS = "enrolled-keys"
    SMM = "smm"  # needs SMM, the machine type cannot give it
    LAYOUT = "layout"  # the varstore layout the code hard-codes differs
    CODE_SIZE = "code-size"


@dataclass(frozen=True)
class Needs:
    """What a domain needs of a build; None means "don't care"."""

    arch: str | None = None
    machine: str | None = None
    secure_boot: bool | None = None
    enrolled_keys: bool | None = None
    smm_allowed: bool = True
    layout: VarstoreLayout | None = None
    code_size: int | None = None
    mode: MappingMode | None = MappingMode.SPLIT

    @classmethod
    def of(
        cls, fw: DomainFirmware, *, secure_boot: bool | None, layout: VarstoreLayout | None = None,
        enrolled_keys: bool | None = None, code_size: int | None = None,
        mode: MappingMode | None = MappingMode.SPLIT,
    ) -> Needs:
        """A domain's needs: its arch, machine and what SMM its machine type allows."""
        return cls(fw.arch, fw.machine, secure_boot, enrolled_keys, machine_has_smm(fw.machine), layout, code_size,
                   mode)

    def describe(self) -> str:
        """What is asked for, as in 'no split UEFI build for x86_64 pc-q35-7.2 with Secure Boot'."""
        mode = self.mode.value if self.mode is not None else "flash"
        parts = [f"no {mode} UEFI build for {self.arch} {self.machine}"]
        if self.secure_boot is not None:
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


@dataclass(frozen=True)
class Problem:
    """One misfit of one build for one domain's needs, with its words from `_WORDS`."""

    kind: Misfit
    build: Build
    needs: Needs

    @property
    def phrase(self) -> str:
        return _WORDS[self.kind][0](self.build, self.needs)

    @property
    def sentence(self) -> str:
        return _WORDS[self.kind][1](self.build, self.needs)


def _targets(b: Build) -> str:
    return "; ".join(f"{t.architecture} {','.join(t.machines)}" for t in b.targets) or "none"


def _arches(b: Build) -> str:
    return "/".join(dict.fromkeys(t.architecture for t in b.targets)) or "no architecture"


def _formats(b: Build) -> str:
    return "/".join((b.code_format, b.template_format or RAW))


_Words = Callable[[Build, Needs], str]
_WORDS: dict[Misfit, tuple[_Words, _Words]] = {
    Misfit.MAPPING: (
        lambda b, n: f"{b.mode.value} mapping" if b.mode is not n.mode else "no varstore template",
        lambda b, n: f"build {b.label} is not split code with a varstore template ({b.mode.value})",
    ),
    Misfit.FORMAT: (
        lambda b, n: f"{_formats(b)} format",
        lambda b, n: f"build {b.label} is in {_formats(b)} format, the domain's firmware is raw",
    ),
    Misfit.ARCHITECTURE: (
        lambda b, n: f"targets {_targets(b)}",
        lambda b, n: f"build {b.label} does not support {n.arch}"
                     f"{f' machine {n.machine!r}' if n.machine else ''}: it is firmware for {_arches(b)}",
    ),
    Misfit.MACHINE: (
        lambda b, n: f"targets {_targets(b)}",
        lambda b, n: f"build {b.label} does not support {n.arch} machine '{n.machine}'",
    ),
    Misfit.SECURE_BOOT: (
        lambda b, n: "Secure Boot build" if b.secure_boot else "no Secure Boot",
        lambda b, n: f"build {b.label} is {'a Secure Boot build' if b.secure_boot else 'not a Secure Boot build'}, "
                     "unlike the domain's firmware",
    ),
    Misfit.ENROLLED_KEYS: (
        lambda b, n: "keys enrolled" if b.enrolled_keys else "no keys enrolled",
        lambda b, n: f"build {b.label} {'has keys enrolled' if b.enrolled_keys else 'has no keys enrolled'}, "
                     "unlike the domain's varstore",
    ),
    Misfit.SMM: (
        lambda b, n: "requires SMM",
        lambda b, n: f"build {b.label} needs SMM for Secure Boot, which machine type '{n.machine}' cannot "
                     "provide (q35 only)",
    ),
    Misfit.LAYOUT: (
        lambda b, n: f"varstore layout {b.layout.describe()}" if b.layout else "no varstore template",
        lambda b, n: f"build {b.label} expects a varstore of "
                     f"{b.layout.describe() if b.layout else 'no layout (it has no template)'}, the domain's has "
                     f"{n.layout.describe() if n.layout else 'none'}",
    ),
    Misfit.CODE_SIZE: (
        lambda b, n: f"code image is {b.code_size} bytes",
        lambda b, n: f"build {b.label} has a {b.code_size}-byte code image, the domain's is {n.code_size} bytes",
    ),
}


def misfits(build: Build, needs: Needs) -> tuple[Problem, ...]:
    """Every reason `build` cannot boot a domain with these needs (module order); () when it fits."""
    found: list[Misfit] = []
    if needs.mode is not None and (build.mode is not needs.mode
                                   or (needs.mode is MappingMode.SPLIT and build.layout is None)):
        found.append(Misfit.MAPPING)
    if (build.code_format, build.template_format or RAW) != (RAW, RAW):
        found.append(Misfit.FORMAT)
    if needs.arch and not any(t.architecture == needs.arch for t in build.targets):
        found.append(Misfit.ARCHITECTURE)  # an x86 domain never gets AAVMF, nor an aarch64 one OVMF
    elif needs.arch and needs.machine and not any(target_matches(t, needs.arch, needs.machine)
                                                  for t in build.targets):
        found.append(Misfit.MACHINE)
    if needs.secure_boot is not None and build.secure_boot != needs.secure_boot:
        found.append(Misfit.SECURE_BOOT)
    if needs.enrolled_keys is not None and build.enrolled_keys != needs.enrolled_keys:
        found.append(Misfit.ENROLLED_KEYS)
    if build.requires_smm and not needs.smm_allowed:
        found.append(Misfit.SMM)
    if needs.layout is not None and build.layout != needs.layout:
        found.append(Misfit.LAYOUT)
    if needs.code_size is not None and build.code_size != needs.code_size:
        found.append(Misfit.CODE_SIZE)
    return tuple(Problem(kind, build, needs) for kind in found)


def code_secure_boot(builds: Sequence[Build]) -> bool | None:
    """Whether the code these builds share (one digest) is Secure Boot code; None when the
    builds disagree.

    On x86 Secure Boot is the code's: SMM-protected variables, a build of its own. AAVMF has
    no SMM, and Debian ships one code image for both: AAVMF_CODE.ms.fd (a symlink to
    AAVMF_CODE.fd) is "secure-boot" beside the enrolled template, AAVMF_CODE.fd is plain
    beside the blank one. There the varstore alone decides, so the code's kind is "don't
    care" (None) and a domain keeps the build whose template its varstore fits.
    """
    kinds = {b.secure_boot for b in builds}
    return kinds.pop() if len(kinds) == 1 else None


def fits(build: Build, needs: Needs) -> bool:
    return not misfits(build, needs)


def why_not(build: Build, needs: Needs) -> str | None:
    """The admin sentence for the first misfit; None when the build fits."""
    found = misfits(build, needs)
    return found[0].sentence if found else None
