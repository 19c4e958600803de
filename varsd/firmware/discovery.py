"""Firmware builds no descriptor lists: found in the distro's firmware directories.

Most pre-2023 guests boot Debian's 2 MiB `OVMF_CODE.fd`, which no Debian 12 descriptor
lists. A build varsd does not know is a build it never binds, archives or holds, so a
package upgrade that removes it leaves those guests unbootable. So every code image in
the firmware directories is looked at, and paired with its varstore template by what
the files *are*, never by their names:

- Every regular file (symlinks resolved: Debian's `OVMF_CODE.ms.fd` is one) is read once,
  whatever names it has; each name is listed as a build path, as Debian's descriptors
  list `OVMF_CODE_4M.ms.fd`, and identified by the content it names (a path whose target
  changes is a new build):
  a file that is exactly an edk2 varstore is a template; one that begins with a varstore
  and goes on is a unified image; an edk2 x86 or aarch64 code image (its firmware volumes,
  read with virt-firmware, hold OVMF's or ArmVirtQemu's modules) is a code image; anything
  else is skipped.
- The layout a code image expects is the leading varstore of a unified image whose
  remaining bytes *are* that code (Debian's `OVMF.fd` = `OVMF_VARS.fd` + `OVMF_CODE.fd`);
  without one, it is that of a template in the same directory whose size and the code's
  fill one flash device of 1, 2 or 4 MiB (the code maps its varstore right below
  itself, at 4 GiB minus the device size).
- Secure Boot is what the code is built with: SMM-protected variables (`VariableSmm`)
  mean features `secure-boot` + `requires-smm` and a q35 machine, like Debian's
  `*.secboot.fd` descriptors. Such code gets a build with an unenrolled template and,
  when the directory has one, another with a template that has keys enrolled (PK set),
  read from the template's variables.
- AAVMF (aarch64, `ArmCpuDxe` among its modules): code and varstore each fill a 64 MiB
  flash bank, so its templates are the files of its size beside it; the blank one (all
  zeros, formatted by the code at first boot) takes the layout of the formatted ones. No
  SMM: a plain build with the blank (or an unenrolled) template, and, when the code can do
  Secure Boot (`SecureBootConfigDxe`), a `secure-boot` one with an enrolled template, as
  Debian's aarch64 descriptors pair them.
- Code a descriptor or `extra_firmware` already lists (same content) is not listed again;
  discovered builds come after those, so new guests still get the distro's preference.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from varsd.adapters import fsio, virtfw
from varsd.errors import VarstoreError
from varsd.model.firmware import Build, MappingMode, Target, VarstoreLayout

log = logging.getLogger(__name__)

FLASH_SIZES = (1 << 20, 2 << 20, 4 << 20)
AAVMF_BANK = 64 << 20  # a QEMU `virt` flash bank: AAVMF code and varstore each fill one
MIN_SIZE, MAX_SIZE = 64 << 10, 64 << 20
X86_MODULE = "AmdSevDxe"  # in every OVMF x86 build, in no ArmVirt one
ARM_MODULE = "ArmCpuDxe"  # in every ArmVirtQemu (AAVMF) build, in no OVMF one
SMM_MODULE = "VariableSmm"
SB_CONFIG_MODULE = "SecureBootConfigDxe"  # AAVMF code that can do Secure Boot at all
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"


@dataclass(frozen=True)
class Probe:
    """What one firmware file is, read from its content (the impure part hands these in)."""

    path: str  # resolved
    size: int
    sha256: str
    layout: VarstoreLayout | None = None  # leading varstore, if any
    trailing_sha256: str | None = None  # unified image: digest of what follows the varstore
    modules: frozenset[str] = frozenset()  # code image: edk2 module names
    enrolled: bool = False  # template: PK set
    blank: bool = False  # all erased flash (AAVMF's blank template)

    @property
    def is_template(self) -> bool:
        return self.layout is not None and self.layout.size == self.size

    @property
    def is_unified(self) -> bool:
        return self.layout is not None and self.layout.size < self.size

    @property
    def arch(self) -> str | None:
        """The code's architecture, from its modules; None for anything not code."""
        if self.layout is not None:
            return None
        if X86_MODULE in self.modules:
            return "x86_64"
        if ARM_MODULE in self.modules:
            return "aarch64"
        return None

    @property
    def is_code(self) -> bool:
        return self.arch is not None


def pair_builds(probes: Sequence[Probe], known_code: set[str]) -> list[Build]:
    """The builds these files make (module rules; pure). `known_code`: digests already listed."""
    by_dir: dict[str, list[Probe]] = {}
    for p in probes:
        by_dir.setdefault(os.path.dirname(p.path), []).append(p)
    unified_layout = {p.trailing_sha256: p.layout for p in probes if p.is_unified and p.trailing_sha256}
    builds: list[Build] = []
    for code in sorted((p for p in probes if p.is_code), key=lambda p: p.path):
        if code.sha256 in known_code:
            continue
        here = by_dir.get(os.path.dirname(code.path), [])
        builds += _x86_builds(code, here, unified_layout) if code.arch == "x86_64" else _arm_builds(code, here)
    # Enrolled first among a code's builds, as Debian's descriptors order them (40- before 50-).
    return sorted(builds, key=lambda b: (b.code_path, "enrolled-keys" not in b.features))


def _x86_builds(code: Probe, here: Sequence[Probe], unified_layout: dict[str | None, VarstoreLayout | None]
                ) -> list[Build]:
    templates = [t for t in here if t.is_template]
    layout = unified_layout.get(code.sha256)
    if layout is None:
        fits = {t.layout for t in templates if code.size + t.size in FLASH_SIZES}
        layout = fits.pop() if len(fits) == 1 else None
    if layout is None:
        log.debug("firmware discovery: %s: no varstore template of its layout beside it", code.path)
        return []
    secure = SMM_MODULE in code.modules
    same = sorted((t for t in templates if t.layout == layout), key=lambda t: t.path)
    choices = [t for t in same if not t.enrolled][:1]
    if secure:
        choices += [t for t in same if t.enrolled][:1]
    return [_build(code, tmpl, layout, secure) for tmpl in choices]


def _arm_builds(code: Probe, here: Sequence[Probe]) -> list[Build]:
    """AAVMF: code and varstore each fill a flash bank of the same size, so a template is one
    of the code's size beside it. There is no SMM: Secure Boot is the varstore's (keys
    enrolled), so the code gets a plain build (a blank or unenrolled template, whose layout is
    that of the formatted ones beside it) and a Secure Boot one with an enrolled template,
    as Debian's descriptors pair AAVMF_CODE.fd."""
    formatted = sorted((t for t in here if t.is_template and t.size == code.size), key=lambda t: t.path)
    layouts = {t.layout for t in formatted if t.layout is not None}  # templates: never None
    layout = layouts.pop() if len(layouts) == 1 else None
    if layout is None:
        log.debug("firmware discovery: %s: no single varstore layout beside it", code.path)
        return []
    blank = sorted((t for t in here if t.blank and t.size == code.size), key=lambda t: t.path)
    plain = (blank + [t for t in formatted if not t.enrolled])[:1]
    # Code built without Secure Boot (Debian 13's AAVMF_CODE.no-secboot.fd) lacks its setup module.
    enrolled = [t for t in formatted if t.enrolled][:1] if SB_CONFIG_MODULE in code.modules else []
    return [_build(code, t, layout, False) for t in plain] + [_build(code, t, layout, True) for t in enrolled]


def _build(code: Probe, tmpl: Probe, layout: VarstoreLayout, secure: bool) -> Build:
    if code.arch == "aarch64":
        features = {"secure-boot"} if secure else set()
        target = Target("aarch64", ("virt-*",))
    else:
        features = {"secure-boot", "requires-smm"} if secure else set()
        target = Target("x86_64", ("pc-q35-*",) if secure else ("pc-i440fx-*", "pc-q35-*"))
    if tmpl.enrolled:
        features.add("enrolled-keys")
    return Build(
        origin=f"discovered:{code.path}", code_path=code.path, code_format="raw", code_sha256=code.sha256,
        code_size=code.size, mode=MappingMode.SPLIT, template_path=tmpl.path, template_format="raw",
        template_sha256=tmpl.sha256, layout=layout, features=frozenset(features), targets=(target,),
        template_blank=tmpl.blank,
        description=f"found in {os.path.dirname(code.path)} (no descriptor lists it), template {tmpl.path}",
    )


# -- reading (the impure edge) --------------------------------------------------------


def _files(dirs: Sequence[str]) -> dict[str, str]:
    """Paths of regular files (after resolving symlinks) in `dirs` and their direct
    subdirectories -> the file each resolves to."""
    out: dict[str, str] = {}
    for top in dirs:
        for d in [top] + sorted(os.path.join(top, n) for n in _listdir(top) if os.path.isdir(os.path.join(top, n))):
            for name in sorted(_listdir(d)):
                real = os.path.realpath(os.path.join(d, name))
                try:
                    st = os.stat(real)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and MIN_SIZE <= st.st_size <= MAX_SIZE:
                    out.setdefault(os.path.join(d, name), real)
    return out


def _listdir(d: str) -> list[str]:
    try:
        return os.listdir(d)
    except OSError:
        return []


ModuleCache = dict[str, frozenset[str]]


def probe(path: str) -> Probe | None:
    """What `path` is by content (varstore, unified image, or maybe code); None if unreadable."""
    try:
        data = fsio.read_file(path)
    except fsio.ReadError:
        return None
    sha = fsio.sha256_bytes(data)
    try:
        layout: VarstoreLayout | None = virtfw.layout_of_bytes(data, path)
    except VarstoreError:
        return Probe(path, len(data), sha, blank=virtfw.is_blank_flash(data))
    if layout.size == len(data):
        try:
            enrolled = f"{EFI_GLOBAL}:PK" in virtfw.variables_of_bytes(data, path)
        except VarstoreError:
            return None
        return Probe(path, len(data), sha, layout=layout, enrolled=enrolled)
    return Probe(path, len(data), sha, layout=layout, trailing_sha256=fsio.sha256_bytes(data[layout.size:]))


def with_modules(p: Probe, cache: ModuleCache) -> Probe:
    """`p` with its edk2 modules read (slow: volumes are LZMA-compressed), memoised by digest."""
    if p.sha256 not in cache:
        try:
            cache[p.sha256] = virtfw.code_modules(fsio.read_file(p.path), p.path)
        except (VarstoreError, fsio.ReadError):
            cache[p.sha256] = frozenset()
    return replace(p, modules=cache[p.sha256])


def _bank_varstore(path: str) -> bool:
    """A file of a whole AAVMF bank that begins with a varstore: a template (AAVMF has no unified
    images), which matters only beside unlisted code; seen from its first MiB, not its 64."""
    try:
        if os.stat(path).st_size != AAVMF_BANK:
            return False
        virtfw.layout_of_bytes(fsio.read_head(path, 1 << 20), path)
    except (OSError, fsio.ReadError, VarstoreError):
        return False
    return True


def discover(dirs: Sequence[str], known_code: set[str], *, modules_cache: ModuleCache | None = None,
             probe_file: Callable[[str], Probe | None] = probe, known_files: frozenset[str] = frozenset(),
             known_templates: frozenset[str] = frozenset()) -> list[Build]:
    """Builds found in `dirs` whose code no descriptor or extra pair lists (never raises).

    `known_files`: resolved paths of code images already listed, not read again (a 64 MiB
    AAVMF code image costs a read and a digest for nothing). `known_templates`: resolved
    paths of listed templates, read (like any 64 MiB AAVMF template) only in a directory that
    holds a file that may be unlisted code: they matter only for pairing it."""
    cache = modules_cache if modules_cache is not None else {}
    probes: list[Probe] = []
    read: dict[str, Probe | None] = {}
    deferred: list[tuple[str, str]] = []

    def take(path: str, real: str) -> None:
        if real not in read:  # each file read once, whatever names it has
            try:
                read[real] = probe_file(real)
            except Exception as exc:  # one odd file never takes the catalog down
                log.debug("firmware discovery: %s: %s", path, exc)
                read[real] = None
        found = read[real]
        if found is not None:
            probes.append(replace(found, path=path))

    for path, real in _files(dirs).items():
        if real in known_files:
            continue
        if real in known_templates or _bank_varstore(real):
            deferred.append((path, real))
            continue
        take(path, real)
    wanted = {os.path.dirname(p.path) for p in probes
              if p.layout is None and not p.blank and p.sha256 not in known_code}
    for path, real in deferred:
        if os.path.dirname(path) in wanted:
            take(path, real)
    sizes = {p.size for p in probes if p.is_template}
    trailing = {p.trailing_sha256 for p in probes if p.is_unified}
    out = []
    for p in probes:
        # Only what could be code of a template here is parsed: OVMF code fills the flash
        # device its varstore does not (SeaBIOS and option ROMs never get this far).
        maybe_code = p.layout is None and not p.blank and p.sha256 not in known_code and (
            p.sha256 in trailing or any(p.size + s in FLASH_SIZES for s in sizes)
            or (p.size == AAVMF_BANK and p.size in sizes))
        out.append(with_modules(p, cache) if maybe_code else p)
    return pair_builds(out, known_code)
