"""Derived 2023 templates: new guests get stores with Microsoft's 2023 certificates.

Debian 12's `OVMF_VARS*.ms.fd` hold only the 2011 Microsoft CAs, so every guest made
from them (and every clone) starts 2011-only. With `secureboot_templates = "2023"`
varsd derives, per Microsoft-keyed Secure Boot template, a copy with the 2023 KEK and
db certificates added (nothing removed), and the catalog offers that copy as the
build's template: provisioning copies it, and the domain's provenance metadata
records it (`template_path`, `template_sha256`).

- Content-addressed: `<state_dir>/templates/<sha256>.fd`, named by the digest of the
  derived bytes, written once (atomic, never overwriting, 0644: a template holds no
  secrets) and verified against its name before every use. Same template, same
  virt-firmware certificates: same file.
- Templates that are not Microsoft-keyed, already have the certificates, or are
  blocked (custom PK) are left as shipped. A derivation that fails is logged and the
  shipped template is used: a new guest never waits for this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading

from varsd.adapters import fsio, virtfw
from varsd.config import Config
from varsd.errors import VarsdError
from varsd.firmware.secureboot import judge
from varsd.model.firmware import Build, Catalog, MappingMode
from varsd.model.secureboot import Ms2023State

log = logging.getLogger("varsd.firmware")

DERIVED_DIR = "templates"
_lock = threading.Lock()
_cache: dict[tuple[str, str], str | None] = {}  # (template sha, certificates) -> derived path or None


def derived_dir(cfg: Config) -> str:
    return os.path.join(cfg.state_dir, DERIVED_DIR)


def derive(cfg: Config, build: Build) -> str | None:
    """The derived template for `build` (created if needed), or None when it keeps its own."""
    if build.mode is not MappingMode.SPLIT or not build.secure_boot or not build.template_path:
        return None
    shipped = virtfw.ms2023_certificates()
    key = (build.template_sha256 or build.template_path, ",".join(s.sha256 or "-" for s in shipped))
    with _lock:
        if key in _cache and (_cache[key] is None or _verified(_cache[key])):
            return _cache[key]
    try:
        data = fsio.read_file(build.template_path)
        keys = virtfw.secure_boot_vars_of_bytes(data, build.template_path)
    except VarsdError as exc:
        log.warning("secureboot_templates: %s: %s; new guests get the shipped template", build.template_path, exc)
        return None
    verdict = judge(keys, secure_code=True, shipped=shipped, varstore=build.template_path)
    path = None
    if verdict.state is Ms2023State.UPDATE_AVAILABLE and verdict.addable:
        try:
            blob = virtfw.with_certificates(data, build.template_path, verdict.addable)
            path = _store(cfg, blob)
        except VarsdError as exc:
            log.warning("secureboot_templates: cannot derive from %s: %s; new guests get the shipped template",
                        build.template_path, exc)
            return None
        log.info("secureboot_templates: %s derived from %s (added %s)", path, build.template_path,
                 ", ".join(s.cert.subject for s in verdict.addable))
    with _lock:
        _cache[key] = path
    return path


def _verified(path: str | None) -> bool:
    if path is None:
        return False
    try:
        return fsio.sha256_file(path) == os.path.basename(path).removesuffix(".fd")
    except OSError:
        return False


def _store(cfg: Config, blob: bytes) -> str:
    sha = hashlib.sha256(blob).hexdigest()
    directory = derived_dir(cfg)
    path = os.path.join(directory, f"{sha}.fd")
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise VarsdError(f"cannot create {directory}: {fsio.describe_oserror(exc)}") from None
    if _verified(path):
        return path
    try:
        fsio.create_exclusive(path, blob, mode=0o644)
    except fsio.TargetExists:
        if not _verified(path):
            raise VarsdError(f"{path} exists but its content does not match its name; move it aside") from None
    return path


def with_derived_templates(cfg: Config, catalog: Catalog) -> Catalog:
    """The catalog with each Microsoft-keyed template replaced by its derived 2023 copy."""
    builds = []
    for build in catalog.builds:
        path = derive(cfg, build)
        if path is None:
            builds.append(build)
            continue
        builds.append(dataclasses.replace(build, template_path=path,
                                          template_sha256=os.path.basename(path).removesuffix(".fd"),
                                          derived_from=build.template_path))
    return dataclasses.replace(catalog, builds=tuple(builds))
