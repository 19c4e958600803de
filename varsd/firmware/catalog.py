"""The host's firmware catalog: every UEFI flash build, in first-match-wins order.

Rules:

- Descriptors are read in `descriptors.list_descriptor_paths` order. Only those with
  `uefi` in `interface-types` and a `flash` device become builds; others (BIOS,
  `memory`/`kernel` devices) are skipped with a log note: they are valid, just not
  ours.
- Split builds need their code and a template that is a plain edk2 varstore (its
  layout, read with virt-firmware, is what a domain's varstore must match).
  Combined and stateless builds are kept without template or layout, so a domain
  using one can still be classified.
- The config's `extra_firmware` pairs follow the descriptors as split builds, with
  origin `config:extra_firmware[N]`.
- Then the builds no descriptor lists, found in `firmware_search_dirs` by content
  (`varsd.firmware.discovery`), with origin `discovered:<code path>`.
- Anything unusable (unreadable or malformed descriptor, missing code or template,
  template that is not a varstore) becomes a `CatalogProblem` and is skipped: a bad
  file in /etc must never stop the daemon. `load_catalog` does not raise.
- Several descriptors share images (Debian's secure builds share code through a
  symlink, two builds share a template), so digests and layouts are memoised per
  file identity within one `load_catalog` call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from varsd.adapters import fsio, virtfw
from varsd.adapters.filecache import ContentCache, StatKey, stat_key
from varsd.config import Config, ExtraFirmware
from varsd.errors import DescriptorError, VarstoreError
from varsd.firmware import discovery
from varsd.firmware.descriptors import Descriptor, ordered_descriptor_paths, parse_descriptor
from varsd.model.firmware import Build, Catalog, CatalogProblem, MappingMode, Target, VarstoreLayout

log = logging.getLogger(__name__)

MAX_DESCRIPTOR_SIZE = 1 << 20  # libvirt's limit too: a larger "descriptor" is not one


class _Skip(Exception):
    """A build that cannot be used; the message goes into a CatalogProblem."""


@dataclass(frozen=True)
class _Image:
    size: int
    sha256: str


class _Reader:
    """Digest and layout of image files, each file read once per load
    (`varsd.adapters.filecache`, keyed by the stat key after following symlinks), so two
    paths to one file (OVMF_CODE_4M.ms.fd -> OVMF_CODE_4M.secboot.fd) share an entry,
    and a file replaced by a package upgrade mid-load (rename: new inode) gets a new entry.
    """

    def __init__(self, read_layout: Callable[[str], VarstoreLayout], sha256: Callable[[str], str]) -> None:
        self._read_layout = read_layout
        self._sha256 = sha256
        self._images: ContentCache[_Image] = ContentCache()
        self._layouts: ContentCache[VarstoreLayout] = ContentCache()
        self._blanks: ContentCache[bool] = ContentCache()

    @staticmethod
    def _key(path: str, role: str) -> StatKey:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise _Skip(f"{role} {path} does not exist") from None
        except OSError as exc:
            raise _Skip(f"cannot access {role} {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise _Skip(f"{role} {path} is not a regular file")
        return stat_key(st)

    def image(self, path: str, role: str) -> _Image:
        key = self._key(path, role)

        def read() -> _Image:
            try:
                return _Image(size=key[2], sha256=self._sha256(path))
            except OSError as exc:
                raise _Skip(f"cannot read {role} {path}: {exc.strerror}") from None

        return self._images.get(key, key, read)

    def layout(self, path: str, role: str) -> VarstoreLayout:
        key = self._key(path, role)

        def read() -> VarstoreLayout:
            try:
                return self._read_layout(path)
            except VarstoreError as exc:
                raise _Skip(f"{role} is not usable as a varstore template: {exc}") from None

        return self._layouts.get(key, key, read)

    def blank(self, path: str, role: str) -> bool:
        """Whether `path` is blank flash (all erased), which ArmVirtQemu formats at first boot."""
        key = self._key(path, role)

        def read() -> bool:
            try:
                return virtfw.is_flash_size(key[2]) and fsio.erased_from(path, 0)
            except fsio.ReadError as exc:
                raise _Skip(f"cannot read {role} {path}: {exc}") from None

        return self._blanks.get(key, key, read)


def _split_parts(
    reader: _Reader, code: str, template: str, architectures: Sequence[str]
) -> tuple[_Image, _Image, VarstoreLayout | None]:
    """Code, template and the template's layout; layout None for a blank template (module rules)."""
    code_img = reader.image(code, "code image")
    tmpl_img = reader.image(template, "varstore template")
    x86 = any(a in X86_ARCHITECTURES for a in architectures)
    if not x86 and reader.blank(template, "varstore template"):
        return code_img, tmpl_img, None
    layout = reader.layout(template, "varstore template")
    if layout.size != tmpl_img.size:
        # e.g. a unified OVMF.fd named as template: libvirt would copy code into every varstore
        raise _Skip(
            f"varstore template {template} is {tmpl_img.size} bytes but its varstore is "
            f"{layout.size} bytes; a template must be a varstore file only"
        )
    if x86 and not virtfw.is_flash_size(code_img.size + layout.size):
        # OVMF's code finds its variables at 4 GiB minus the whole flash (varstore + code), so
        # code and varstore of one build always add up to the build's flash size (1, 2 or 4 MiB).
        raise _Skip(
            f"code {code} ({code_img.size} bytes) and varstore template {template} ({layout.size} bytes) "
            "are not one build's pair: they add up to no flash size (a 2 MiB varstore behind 4 MiB code "
            "loses every variable change); fix the descriptor to name the template of the code's build"
        )
    return code_img, tmpl_img, layout


X86_ARCHITECTURES = frozenset({"x86_64", "i686"})


def _descriptor_build(desc: Descriptor, reader: _Reader) -> Build:
    mode = desc.mode or MappingMode.SPLIT
    if mode is MappingMode.SPLIT and desc.template_path is not None:
        code_img, tmpl_img, layout = _split_parts(
            reader, desc.executable_path, desc.template_path, [t.architecture for t in desc.targets]
        )
        tmpl_sha: str | None = tmpl_img.sha256
        blank = layout is None
    else:
        code_img, tmpl_sha, layout = reader.image(desc.executable_path, "code image"), None, None
        blank = False
    return Build(
        origin=desc.path,
        code_path=desc.executable_path,
        code_format=desc.executable_format or "raw",
        code_sha256=code_img.sha256,
        code_size=code_img.size,
        mode=mode,
        template_path=desc.template_path,
        template_format=desc.template_format,
        template_sha256=tmpl_sha,
        layout=layout,
        features=desc.features,
        targets=desc.targets,
        interface_types=desc.interface_types,
        description=desc.description,
        template_blank=blank,
    )


def _extra_build(index: int, extra: ExtraFirmware, reader: _Reader) -> Build:
    origin = f"config:extra_firmware[{index}]"
    code_img, tmpl_img, layout = _split_parts(reader, extra.code, extra.template, [extra.architecture])
    return Build(
        origin=origin,
        code_path=extra.code,
        code_format="raw",
        code_sha256=code_img.sha256,
        code_size=code_img.size,
        mode=MappingMode.SPLIT,
        template_path=extra.template,
        template_format="raw",
        template_sha256=tmpl_img.sha256,
        layout=layout,
        template_blank=layout is None,
        features=frozenset(extra.features),
        targets=(Target(extra.architecture, tuple(extra.machines)),),
        interface_types=("uefi",),
        description=f"extra firmware pair from the varsd configuration ({origin})",
    )


def _read_descriptor(path: str) -> bytes:
    # fsio refuses FIFOs and devices without blocking (one swapped in after the listing).
    try:
        return fsio.read_file(path, max_size=MAX_DESCRIPTOR_SIZE)
    except fsio.ReadError as exc:
        raise _Skip(f"cannot read descriptor: {str(exc).removeprefix(f'{path}: ')}") from None


def _listing(directory: str) -> list[tuple[str, int]]:
    """(name, size) of the regular files in `directory`; nothing if it cannot be read.

    A dangling symlink is listed with size 1, not dropped: it must still override a
    lower-precedence file (libvirt fails on it too), and the catalog then reports it
    as unreadable instead of silently falling back to the distro file.
    """
    out = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=True)
                except FileNotFoundError:
                    if entry.is_symlink():
                        out.append((entry.name, 1))
                    continue
                except OSError:
                    out.append((entry.name, 1))  # exists but unreadable: report it downstream
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.append((entry.name, st.st_size))
    except OSError:  # missing, not a directory, or unreadable: contributes nothing
        return []
    return out


def list_descriptor_paths(dirs: Sequence[str]) -> list[str]:
    """Effective descriptor paths found on disk in `dirs` (lowest precedence first)."""
    return ordered_descriptor_paths({d: _listing(d) for d in dirs}, dirs)


def _with_remedy(message: str, path: str, firmware_dirs: Sequence[str]) -> str:
    """A broken descriptor the admin does not own (a distro's, e.g. Debian 12's
    50-edk2-aarch64-secure.json names a file its package lacks) is hidden the QEMU way: a
    same-named empty file in the highest-precedence directory, which libvirt honours too."""
    top = firmware_dirs[-1] if firmware_dirs else None
    if top is None or os.path.dirname(path) == top.rstrip("/"):
        return message  # the admin's own file: fix or remove it
    return f"{message}; to hide it from varsd and libvirt, create an empty {os.path.join(top, os.path.basename(path))}"


def load_catalog(
    firmware_dirs: Sequence[str],
    extra: Sequence[ExtraFirmware] = (),
    *,
    read_layout: Callable[[str], VarstoreLayout] = virtfw.read_layout,
    sha256: Callable[[str], str] = fsio.sha256_file,
    search_dirs: Sequence[str] = (),
    modules_cache: dict[str, frozenset[str]] | None = None,
    probe_file: Callable[[str], discovery.Probe | None] = discovery.probe,
) -> Catalog:
    """Build the catalog from descriptor dirs (lowest precedence first) and extra pairs.

    Never raises for bad input: each unusable descriptor or pair is a CatalogProblem.
    """
    reader = _Reader(read_layout, sha256)
    builds: list[Build] = []
    problems: list[CatalogProblem] = []
    for path in list_descriptor_paths(firmware_dirs):
        try:
            desc = parse_descriptor(_read_descriptor(path), path)
        except DescriptorError as exc:
            problems.append(CatalogProblem(source=path, message=_with_remedy(str(exc), path, firmware_dirs)))
            continue
        except _Skip as exc:
            problems.append(CatalogProblem(source=path, message=_with_remedy(f"firmware descriptor {path}: {exc}",
                                                                              path, firmware_dirs)))
            continue
        if not desc.is_uefi_flash:
            log.info(
                "firmware descriptor %s: skipped, not a UEFI flash build (interfaces %s, device %s)",
                path,
                ",".join(desc.interface_types) or "none",
                desc.device,
            )
            continue
        formats = {desc.executable_format, desc.template_format} - {None}
        if formats != {"raw"}:
            # Fedora/RHEL ship qcow2 builds beside the raw ones; varsd manages raw varstores
            # (what libvirt copies and virt-firmware's raw codec writes). Not a problem.
            log.info("firmware descriptor %s: skipped, %s images (varsd manages raw ones)", path,
                     "/".join(sorted(f for f in formats if f)))
            continue
        try:
            builds.append(_descriptor_build(desc, reader))
        except _Skip as exc:
            problems.append(CatalogProblem(source=path, message=_with_remedy(f"firmware descriptor {path}: {exc}",
                                                                              path, firmware_dirs)))
        except Exception as exc:  # a bug or library surprise must not take the catalog down
            log.exception("firmware descriptor %s: unexpected error", path)
            problems.append(CatalogProblem(source=path, message=f"firmware descriptor {path}: unexpected error: {exc}"))
    for i, pair in enumerate(extra):
        origin = f"config:extra_firmware[{i}]"
        try:
            builds.append(_extra_build(i, pair, reader))
        except _Skip as exc:
            problems.append(CatalogProblem(source=origin, message=f"{origin}: {exc}"))
        except Exception as exc:  # see above
            log.exception("%s: unexpected error", origin)
            problems.append(CatalogProblem(source=origin, message=f"{origin}: unexpected error: {exc}"))
    builds = _with_blank_layouts(builds, problems)
    if search_dirs:
        try:
            listed = frozenset(os.path.realpath(b.code_path) for b in builds)
            templates = frozenset(os.path.realpath(b.template_path) for b in builds if b.template_path)
            builds += discovery.discover(search_dirs, {b.code_sha256 for b in builds}, modules_cache=modules_cache,
                                         known_files=listed, known_templates=templates - listed,
                                         probe_file=probe_file)
        except Exception as exc:  # see above
            log.exception("firmware discovery: unexpected error")
            problems.append(CatalogProblem(source="discovery", message=f"firmware discovery: unexpected error: {exc}"))
    return Catalog(builds=tuple(builds), problems=tuple(problems))


def _with_blank_layouts(builds: list[Build], problems: list[CatalogProblem]) -> list[Build]:
    """Builds whose template is blank flash, given the layout their code formats; those it
    cannot be learned for become problems (pure).

    A blank template holds no layout to read, but the code formats one layout only: that of
    a formatted template of the same file size shipped for the same code (Debian 12 pairs
    AAVMF_CODE.fd with the blank AAVMF_VARS.fd and, through the AAVMF_CODE.ms.fd symlink,
    with the formatted AAVMF_VARS.ms.fd). Without it varsd could not tell a varstore the
    guest formatted from a foreign one, so the build is not offered.
    """
    out = []
    for b in builds:
        if not b.template_blank:
            out.append(b)
            continue
        known = {o.layout for o in builds if o.code_sha256 == b.code_sha256 and not o.template_blank
                 and o.layout is not None}
        if len(known) == 1:
            out.append(replace(b, layout=known.pop()))
            continue
        problems.append(CatalogProblem(source=b.origin, message=(
            f"{b.origin}: varstore template {b.template_path} is blank flash (the firmware formats it at its "
            f"first boot) and no formatted template of code {b.code_path} tells which layout it formats; "
            "varsd cannot check a varstore against this build, so it does not offer it")))
    return out


def load_configured(cfg: Config) -> Catalog:
    """The catalog `cfg` describes, each unusable descriptor or pair logged as a warning
    (the admin's first hint that a firmware package or /etc/qemu/firmware is broken).
    Kept between processes while its files are unchanged (`varsd.firmware.catalog_cache`)."""
    from varsd.firmware import catalog_cache

    cache_key = catalog_cache.key(cfg)
    catalog = catalog_cache.load(cfg, cache_key)
    if catalog is None:
        cache = _load_modules_cache(cfg)
        before = dict(cache)
        results = catalog_cache.FileResults(cfg)
        catalog = load_catalog(cfg.firmware_dirs, cfg.extra_firmware, search_dirs=cfg.firmware_search_dirs,
                               modules_cache=cache,
                               read_layout=lambda p: results.get("layout", p, virtfw.read_layout),
                               sha256=lambda p: results.get("sha256", p, fsio.sha256_file),
                               probe_file=lambda p: results.get("probe", p, discovery.probe))
        if cache != before:
            _save_modules_cache(cfg, cache)
        catalog_cache.save(cfg, cache_key, catalog, results)
    for problem in catalog.problems:
        log.warning("firmware catalog: %s", problem.message)
    if cfg.secureboot_templates == "2023":
        from varsd.firmware.derived import with_derived_templates

        catalog = with_derived_templates(cfg, catalog)
    return catalog


def _modules_cache_path(cfg: Config) -> str:
    return os.path.join(cfg.state_dir, "firmware-modules.json")


def _load_modules_cache(cfg: Config) -> dict[str, frozenset[str]]:
    """What the volume parser found in each code image (by digest): parsing is slow, content is not."""
    try:
        with open(_modules_cache_path(cfg), encoding="utf-8") as f:
            data = json.load(f)
        return {str(k): frozenset(map(str, v)) for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _save_modules_cache(cfg: Config, cache: dict[str, frozenset[str]]) -> None:
    """Best effort (a cache, not state): temp file + rename, never a half-written file."""
    path = _modules_cache_path(cfg)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({k: sorted(v) for k, v in cache.items()}, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("firmware discovery: cache not written: %s", exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
