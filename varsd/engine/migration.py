"""`varsctl migrate`: move a domain's variables into another build's varstore layout.

Why this exists: code hard-codes where its varstore lives, so a domain whose varstore
has the 2 MiB layout cannot boot 4 MiB code (and on x86 fails *silently*: variable
changes are lost). When the distro drops or replaces the build a domain's varstore
was made for, varsd keeps the domain on what it can boot and reports
`needs-migration`; this module is the explicit admin operation that then moves every
variable (boot entries, BootOrder, PK/KEK/db/dbx, MokList, shim's SBAT level, ...)
into a fresh copy of the target build's template and binds the domain to that
build's central code. It is the only place in varsd that rewrites an existing
varstore, and only on request.

Theory of operation:

- `plan_migration(facts, catalog, ...)` is pure. From the domain's XML, run state and
  what its varstore holds (`MigrationFacts`, gathered by the shell) it chooses the
  target build and checks everything that can be checked without touching a file:
  shut off, managed, a file-backed private varstore, a build that supports the
  machine, keeps Secure Boot as it is and gets the SMM it needs. It returns a
  `MigrationPlan` (target, template, the new XML) or raises `MigrationRefused`.
- Default target: the build the domain tracks (its metadata's central code path) if
  it fits, else the first catalog build that matches the domain's needs: Secure Boot
  or not (its code, else its XML), enrolled keys or not (PK, KEK and db set in its
  varstore). `--to` names a build by descriptor path or file name, code path or code
  file name, or a code sha256 prefix; it may not switch Secure Boot either, except
  when the domain's code is unknown and only its XML's `secure='yes'` spoke for it.
- `migrate_domain(rec, ref, ...)` is the shell, under the domain's lock:
  1. read the varstore (never through a symlink) and plan;
  2. build the new store's bytes with virt-firmware and verify them in memory
     (every old variable present with equal attributes and data, nothing else, the
     target template's layout). Variables that do not fit fail *here*: nothing
     has been written yet;
  3. back the old store up to `<state_dir>/backups/<uuid>/<UTC time>_<name>_VARS.fd`
     (0600) and verify the copy byte for byte;
  4. replace the varstore atomically at the same path (so `virsh undefine --nvram`
     still finds it; owner and mode kept), after checking that the domain is still
     shut off and the file still holds what was read;
  5. read it back and verify again;
  6. redefine the domain (journaled with its old XML) to the target's central code,
     template, Secure Boot and SMM, and bind varsd's metadata to the build.
  Any failure after step 3 puts the backup back byte for byte; the XML is changed
  only in the last step, so a failure leaves it as it was.
- A private unified image (`unified`) is migrated into a *new* private varstore: the
  image is only read, never changed, and stays on disk for the admin to remove.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from varsd.adapters import fsio, virtfw
from varsd.adapters.libvirt_api import DomainRef
from varsd.adapters.virtfw import EfiVariable
from varsd.config import Config
from varsd.domain.classify import classify, firmware_image_path
from varsd.domain.xml import FirmwareEdit, apply_edit, nvram_storage, parse_domain
from varsd.engine.reconciler import Reconciler
from varsd.errors import VarsdError, VarstoreError
from varsd.firmware.selection import explain_no_build, machine_has_smm, select_build, target_matches
from varsd.model.domain import DomainFirmware, FileFacts, FirmwareConfig, PinKind, Status, VarsdMetadata
from varsd.model.firmware import Build, Catalog, MappingMode, VarstoreLayout
from varsd.planning.repair import is_private_varstore, new_varstore_path, varstore_path, wants_secure_boot

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
EFI_IMAGE_SECURITY_DATABASE = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"
KEY_VARIABLES = (f"{EFI_GLOBAL}:PK", f"{EFI_GLOBAL}:KEK", f"{EFI_IMAGE_SECURITY_DATABASE}:db")
"""A varstore with all three set has enrolled keys (Secure Boot in user mode)."""

MIN_SHA_PREFIX = 6
"""Shortest code digest prefix `--to` accepts: shorter ones match by accident."""

MIGRATION_REASON = "migrated varstore"  # journal reasons start with it; undo recognises them
BACKUP_DIR = "backups"

_HEX = re.compile(r"^[0-9a-fA-F]+$")


class MigrationRefused(VarsdError):
    """The migration was not started: the domain or the target is not fit for it. Nothing changed."""


class NothingToMigrate(MigrationRefused):
    """The domain already uses the target build with a varstore of its layout."""


class MigrationFailed(VarsdError):
    """A step failed; the message says what was restored (and what was not)."""


# -- facts and plan (pure) --------------------------------------------------------------


@dataclass(frozen=True)
class VarstoreFacts:
    """What the shell read from the file holding the domain's variables.

    For a unified image `path` is the image and `layout.size` the length of its
    leading varstore; `size` is always the whole file's size.
    """

    path: str
    size: int
    layout: VarstoreLayout | None = None
    variables: int = 0
    enrolled_keys: bool = False
    symlink: bool = False
    error: str | None = None  # unreadable, not a varstore, ...


@dataclass(frozen=True)
class MigrationFacts:
    """Everything `plan_migration` may look at, gathered by the shell."""

    xml: str  # persistent definition
    firmware: DomainFirmware  # parsed from `xml`
    state: str  # libvirt run state ("shut off", "running", "paused", ...)
    active: bool
    persistent: bool = True
    excluded: bool = False
    image: FileFacts | None = None  # the loader image
    source: VarstoreFacts | None = None  # None: the XML names a varstore file that does not exist


@dataclass(frozen=True)
class MigrationPlan:
    """What `migrate_domain` will do for one domain."""

    name: str
    uuid: str
    config: FirmwareConfig
    source: str  # file holding the variables now
    source_layout: VarstoreLayout
    target: Build
    template: str  # the target template the variables go into
    target_layout: VarstoreLayout
    varstore: str  # the new store's path: `source` itself for a split domain
    in_place: bool  # True: `source` is replaced; False: `varstore` is created (unified source)
    new_xml: str
    reason: str

    def describe(self) -> str:
        where = f"{self.varstore} (in place)" if self.in_place else f"new varstore {self.varstore}"
        return (
            f"domain '{self.name}': variables of {self.source} ({self.source_layout.describe()}) -> "
            f"{where} from {self.template} ({self.target_layout.describe()}); code {self.target.label} "
            f"({self.target.origin})"
        )


def enrolled_keys(variables: Mapping[str, EfiVariable]) -> bool:
    """True when PK, KEK and db are all set: the guest's Secure Boot has keys enrolled."""
    return all(key in variables and variables[key].data for key in KEY_VARIABLES)



def _usable(build: Build) -> bool:
    return build.mode is MappingMode.SPLIT and build.template_path is not None and build.layout is not None


def resolve_build(catalog: Catalog, spec: str) -> list[Build]:
    """Catalog builds named by `spec` (see module doc), in catalog order; may be empty.

    Paths match descriptor paths and code paths exactly; plain names match descriptor
    file names (with or without `.json`) and code file names; hex strings of at
    least MIN_SHA_PREFIX digits match code digests by prefix.
    """
    spec = spec.strip()
    if not spec:
        return []
    if "/" in spec:
        path = os.path.normpath(spec)
        return [b for b in catalog.builds if path in (os.path.normpath(b.origin), os.path.normpath(b.code_path))]
    by_name = [
        b for b in catalog.builds
        if spec in (os.path.basename(b.origin), os.path.basename(b.origin).removesuffix(".json"),
                    os.path.basename(b.code_path))
    ]
    if by_name:
        return by_name
    if len(spec) >= MIN_SHA_PREFIX and _HEX.match(spec):
        prefix = spec.lower()
        return [b for b in catalog.builds if b.code_sha256.startswith(prefix)]
    return []


def _pin_problem(md: VarsdMetadata, name: str) -> str | None:
    """Why a pin forbids migrating; None when there is none or it is varsd's `incompatible` pin.

    The `incompatible` pin is varsd keeping the domain on its archived build because the
    central one no longer fits the varstore: exactly what a migration resolves, so the
    migration lifts it. An admin's pin says "keep this domain on this build", and a
    policy pin holds a new build back until it is approved: neither is overruled here.
    """
    kind = md.pin_kind
    if kind is None or kind is PinKind.INCOMPATIBLE:
        return None
    pin = (md.pinned_sha256 or "")[:12]
    if kind is PinKind.POLICY:
        return (f"held on build {pin} by upgrade_policy = \"manual\"; 'varsctl upgrade approve {name}' "
                "first, or migrate after approval")
    return f"pinned to build {pin} by an admin; 'varsctl unpin {name}' first"


@dataclass(frozen=True)
class _Wants:
    """What the target must keep of the domain's firmware."""

    secure: bool  # Secure Boot build or not
    keys: bool  # the varstore has PK, KEK and db
    known: bool  # `secure` comes from the domain's code (a catalog build), not just its XML


def _wants(facts: MigrationFacts, catalog: Catalog) -> _Wants:
    fw, image = facts.firmware, facts.image
    secure = wants_secure_boot(fw, image, catalog)
    shas = {image.sha256, image.trailing_sha256} - {None} if image is not None else set()
    paths = {fw.loader_path, image.realpath if image is not None else None} - {None}
    known = any(catalog.by_code_sha(s) for s in shas) or any(b.code_path in paths for b in catalog.builds)
    return _Wants(secure=secure, keys=bool(facts.source and facts.source.enrolled_keys), known=known)


def _check_target(build: Build, fw: DomainFirmware, wants: _Wants, *, explicit: bool = False) -> str | None:
    """Why `build` cannot be this domain's target; None when it can.

    Secure Boot must stay as it is. Only when the domain's code is unknown (so the
    XML's `secure='yes'`, which may also mean an SMM-protected plain build, was all
    there was to go by) may an admin's explicit `--to` choose the other kind.
    """
    if not _usable(build):
        return f"build {build.label} ({build.origin}) is not a split build with a varstore template"
    assert fw.arch and fw.machine
    if not any(target_matches(t, fw.arch, fw.machine) for t in build.targets):
        return f"build {build.label} ({build.origin}) does not support {fw.arch} machine '{fw.machine}'"
    if build.secure_boot != wants.secure and (wants.known or not explicit):
        have = "a Secure Boot build" if build.secure_boot else "not a Secure Boot build"
        need = "boots with Secure Boot" if wants.secure else "boots without Secure Boot"
        return (
            f"build {build.label} ({build.origin}) is {have}, but the domain {need}; migrating would change "
            "what the guest trusts. Choose a build of the same kind, or change Secure Boot by hand"
        )
    if build.requires_smm and not machine_has_smm(fw.machine):
        return (
            f"build {build.label} ({build.origin}) needs SMM, which machine type '{fw.machine}' cannot "
            "provide (q35 only)"
        )
    return None


def _default_target(facts: MigrationFacts, catalog: Catalog, wants: _Wants) -> Build:
    fw = facts.firmware
    assert fw.arch and fw.machine
    tracked = fw.metadata.build_code_path
    if tracked:
        for b in catalog.builds:
            if b.code_path == tracked and _check_target(b, fw, wants) is None:
                return b
    query = dict(arch=fw.arch, machine=fw.machine, secure_boot=wants.secure, smm_allowed=machine_has_smm(fw.machine))
    # The target template's own variables are not carried over (only the domain's are),
    # so enrolled-or-not decides the <nvram template> for a later reset, nothing else:
    # prefer the matching kind, but any build of the right Secure Boot kind will do.
    build = select_build(catalog, **query, enrolled_keys=wants.keys if wants.secure else None) or select_build(
        catalog, **query
    )
    if build is None or not _usable(build):
        raise MigrationRefused(
            f"domain '{fw.name}': no catalog build to migrate to: {explain_no_build(catalog, **query)}"
        )
    return build


def _named_target(spec: str, facts: MigrationFacts, catalog: Catalog, wants: _Wants) -> Build:
    fw = facts.firmware
    matches = resolve_build(catalog, spec)
    if not matches:
        known = "; ".join(f"{os.path.basename(b.origin)} ({b.label})" for b in catalog.builds) or "none"
        raise MigrationRefused(f"--to {spec}: no catalog build has that descriptor, code path or digest. "
                               f"Builds: {known}")
    if len({b.code_sha256 for b in matches}) > 1:
        listed = "; ".join(f"{b.origin} ({b.label})" for b in matches)
        raise MigrationRefused(f"--to {spec}: ambiguous, it names different builds: {listed}")
    # One code image may come with several templates (Debian: enrolled and not): take the
    # one that fits the domain, else the first that passes the checks, to report why not.
    assert fw.arch and fw.machine
    sub = Catalog(builds=tuple(matches))
    fitting = select_build(sub, arch=fw.arch, machine=fw.machine, secure_boot=wants.secure,
                           enrolled_keys=wants.keys if wants.secure else None, smm_allowed=machine_has_smm(fw.machine))
    if fitting is not None and _check_target(fitting, fw, wants, explicit=True) is None:
        return fitting
    for b in matches:
        if _check_target(b, fw, wants, explicit=True) is None:
            return b
    problem = _check_target(matches[0], fw, wants, explicit=True)
    raise MigrationRefused(f"domain '{fw.name}': cannot migrate to --to {spec}: {problem}")


def _refuse(fw: DomainFirmware, why: str) -> MigrationRefused:
    return MigrationRefused(f"domain '{fw.name}': {why}; nothing was changed")


def plan_migration(
    facts: MigrationFacts, catalog: Catalog, *, to: str | None, nvram_dir: str, now: str
) -> MigrationPlan:
    """The migration of one domain (module rules), or MigrationRefused saying why not."""
    fw = facts.firmware
    if not facts.persistent:
        raise _refuse(fw, "transient domain: no persistent definition to migrate")
    if facts.active:
        raise _refuse(
            fw,
            f"is {facts.state}; migrate only shut-off domains (a running guest may write its varstore "
            f"at any moment). Shut it down, then run 'varsctl migrate {fw.name}'",
        )
    if fw.metadata.opt_out:
        raise _refuse(fw, "opted out of varsd (metadata manage='no')")
    if facts.excluded:
        raise _refuse(fw, "excluded by the 'exclude' setting")
    config = classify(fw, facts.image, catalog)
    if config is FirmwareConfig.CONFIDENTIAL:
        raise _refuse(fw, f"confidential guest (launchSecurity {fw.launch_security}): its measured firmware "
                      "is never split or migrated")
    if config in (FirmwareConfig.NONE, FirmwareConfig.STATELESS, FirmwareConfig.AUTOSELECT):
        raise _refuse(fw, f"firmware configuration '{config.value}' has no varstore varsd manages")
    if config in (FirmwareConfig.BIOS_ROM, FirmwareConfig.CODE_ONLY):
        raise _refuse(fw, f"'{config.value}' firmware has no variables to migrate; 'varsctl reconcile' gives "
                      "it a varstore")
    storage = nvram_storage(facts.xml)
    if storage not in (None, "file"):
        raise _refuse(fw, f"varstore on {storage} storage (<nvram type='{storage}'>) is not a local file")
    pin_problem = _pin_problem(fw.metadata, fw.name)
    if pin_problem:
        raise _refuse(fw, pin_problem)
    if not fw.arch or not fw.machine:
        raise _refuse(fw, "domain XML has no <os><type arch machine>")

    source = facts.source
    if source is None:
        # Nothing to do is exit 0 (README), not a refusal.
        raise NothingToMigrate(f"domain '{fw.name}': varstore {fw.nvram_path} does not exist yet (never "
                               "started?): nothing to migrate; 'varsctl reconcile' or libvirt creates it")
    if source.symlink:
        raise _refuse(fw, f"varstore {source.path} is a symbolic link; varsd does not rewrite through links")
    if source.layout is None:
        raise _refuse(fw, f"{source.path} is not a usable edk2 varstore"
                      f"{': ' + source.error if source.error else ''}")
    unified = config is FirmwareConfig.UNIFIED
    as_file = FileFacts(path=source.path, exists=True, size=source.size, varstore_layout=source.layout)
    if not unified and not is_private_varstore(catalog, nvram_dir, as_file):
        raise _refuse(fw, f"varstore {source.path} is not private to the domain (a firmware package's file, "
                      "or more than a varstore); 'varsctl reconcile' gives the domain its own copy first")

    wants = _wants(facts, catalog)
    target = _named_target(to, facts, catalog, wants) if to else _default_target(facts, catalog, wants)
    problem = _check_target(target, fw, wants, explicit=bool(to))
    if problem:
        raise _refuse(fw, problem)
    assert target.template_path and target.layout
    if not unified and fw.loader_path == target.code_path and source.layout == target.layout:
        raise NothingToMigrate(
            f"domain '{fw.name}': already uses {target.label} with a varstore of its layout; nothing to migrate"
        )

    varstore = new_varstore_path(nvram_dir, fw, {fw.loader_path}) if unified else source.path
    md = replace(
        fw.metadata,
        build_code_path=target.code_path,
        build_code_sha256=target.code_sha256,
        template_path=target.template_path,
        template_sha256=target.template_sha256,
        varstore_source=f"migrated:{source.path}",
        provisioned_at=now,
    )
    if md.pinned_sha256:  # varsd's own `incompatible` pin: the migration resolves it
        md = md.without_pin()
    new_xml = apply_edit(
        facts.xml,
        FirmwareEdit(
            code_path=target.code_path,
            nvram_path=varstore,
            template_path=target.template_path,
            secure=target.secure_boot,
            smm=target.requires_smm or fw.smm,
            metadata=md,
        ),
    )
    return MigrationPlan(
        name=fw.name,
        uuid=fw.uuid,
        config=config,
        source=source.path,
        source_layout=source.layout,
        target=target,
        template=target.template_path,
        target_layout=target.layout,
        varstore=varstore,
        in_place=not unified,
        new_xml=new_xml,
        reason=f"{MIGRATION_REASON} ({source.layout.size} -> {target.layout.size} bytes) to {target.label}",
    )


def compare_variables(old: Mapping[str, EfiVariable], new: Mapping[str, EfiVariable]) -> str | None:
    """None when `new` holds exactly `old`'s variables with equal attributes and data; else what differs."""
    missing = sorted(k for k in old if k not in new)
    changed = sorted(k for k in old if k in new and (new[k].attr, new[k].data) != (old[k].attr, old[k].data))
    extra = sorted(k for k in new if k not in old)
    parts = []
    for what, keys in (("missing", missing), ("changed", changed), ("unexpected", extra)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            parts.append(f"{what}: {shown}")
    return "; ".join(parts) or None


# -- the shell ------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationResult:
    """A migration that was carried out (or, with `dry_run`, would be)."""

    plan: MigrationPlan
    backup: str | None  # None for a dry run
    variables: int
    done: bool


def utc_stamp(now: datetime) -> str:
    """Compact UTC timestamp for file names: sortable, no colons."""
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def _read_source(fw: DomainFirmware, config: FirmwareConfig, image: FileFacts | None) -> tuple[
        VarstoreFacts | None, bytes, dict[str, EfiVariable]]:
    """The variables' file as facts, its varstore bytes and its variables (never via a symlink)."""
    path = fw.loader_path if config is FirmwareConfig.UNIFIED else fw.nvram_path
    if path is None:
        return None, b"", {}
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, b"", {}
    except OSError as exc:
        return VarstoreFacts(path=path, size=0, error=f"cannot stat: {fsio.describe_oserror(exc)}"), b"", {}
    if stat.S_ISLNK(st.st_mode) and config is not FirmwareConfig.UNIFIED:
        return VarstoreFacts(path=path, size=st.st_size, symlink=True), b"", {}
    try:
        data = fsio.read_file(path, follow_symlinks=config is FirmwareConfig.UNIFIED)
        layout = virtfw.layout_of_bytes(data, path)
        data = data[: layout.size] if config is FirmwareConfig.UNIFIED else data
        variables = virtfw.variables_of_bytes(data, path)
    except (fsio.ReadError, VarstoreError) as exc:
        return VarstoreFacts(path=path, size=st.st_size, error=str(exc)), b"", {}
    facts = VarstoreFacts(
        path=path, size=st.st_size, layout=layout, variables=len(variables), enrolled_keys=enrolled_keys(variables)
    )
    return facts, data, variables


def _verify_store(data: bytes, old: Mapping[str, EfiVariable], layout: VarstoreLayout, what: str) -> None:
    try:
        got_layout = virtfw.layout_of_bytes(data, what)
        got = virtfw.variables_of_bytes(data, what)
    except VarstoreError as exc:
        raise MigrationFailed(f"{what}: {exc}") from None
    if got_layout != layout:
        raise MigrationFailed(f"{what}: layout {got_layout.describe()}, expected the template's {layout.describe()}")
    diff = compare_variables(old, got)
    if diff:
        raise MigrationFailed(f"{what}: variables differ from the old store ({diff})")


def _write_backup(backup_dir: str, name: str, uuid: str, stamp: str, data: bytes) -> str:
    """Create the backup exclusively (0600) and check it reads back byte for byte."""
    try:
        os.makedirs(backup_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise MigrationFailed(f"cannot create backup directory {backup_dir}: {fsio.describe_oserror(exc)}") from None
    base = os.path.basename(varstore_path("", name, uuid))  # <name>_VARS.fd, or <uuid>_ for odd names
    for n in range(100):
        path = os.path.join(backup_dir, f"{stamp}{'' if n == 0 else f'.{n}'}_{base}")
        try:
            fsio.create_exclusive(path, data, mode=0o600)
        except fsio.TargetExists:
            continue  # two migrations of one domain within a second
        except VarsdError as exc:
            raise MigrationFailed(f"cannot back up the varstore: {exc}") from None
        try:
            copy = fsio.read_file(path, follow_symlinks=False)
        except fsio.ReadError as exc:
            raise MigrationFailed(f"cannot read back the backup: {exc}") from None
        if copy != data:
            raise MigrationFailed(f"backup {path} does not read back equal to the varstore; stopped")
        return path
    raise MigrationFailed(f"cannot back up the varstore: too many backups named {stamp}_* in {backup_dir}")


def replace_file(path: str, data: bytes, *, expect: bytes | None = None) -> None:
    """fsio.replace_atomic, failing as a MigrationFailed (the one error migrate reports)."""
    try:
        fsio.replace_atomic(path, data, expect=expect)
    except fsio.ReplaceError as exc:
        raise MigrationFailed(str(exc)) from None


def _remove_if(path: str, data: bytes) -> None:
    """Remove a store we created, if it still holds what we wrote."""
    try:
        if fsio.read_file(path, follow_symlinks=False) == data:
            os.unlink(path)
    except (OSError, fsio.ReadError):
        pass


class Migrator:
    """Runs migrations with one reconciler (config, libvirt, catalog, journal)."""

    def __init__(self, rec: Reconciler, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.rec = rec
        self.clock = clock

    @property
    def cfg(self) -> Config:
        return self.rec.cfg

    def _facts(self, ref: DomainRef) -> tuple[MigrationFacts, bytes, dict[str, EfiVariable]]:
        hv = self.rec.hv
        ref = hv.lookup(ref.uuid)
        xml = hv.persistent_xml(ref.uuid)
        fw = parse_domain(xml)
        image_path = firmware_image_path(fw)
        image = self.rec.inspector.inspect(image_path, digest=True) if image_path else None
        config = classify(fw, image, self.rec.catalog)
        source, data, variables = _read_source(fw, config, image)
        facts = MigrationFacts(
            xml=xml, firmware=fw, state=ref.state, active=ref.active, persistent=ref.persistent,
            excluded=self.cfg.is_excluded(ref.name, ref.uuid), image=image, source=source,
        )
        return facts, data, variables

    def plan(self, ref: DomainRef, *, to: str | None = None) -> MigrationPlan:
        """The migration `migrate` would carry out now (no lock, nothing written)."""
        facts, _, _ = self._facts(ref)
        return plan_migration(facts, self.rec.catalog, to=to, nvram_dir=self.cfg.nvram_dir,
                              now=_iso(self.clock()))

    def migrate(self, ref: DomainRef, *, to: str | None = None) -> MigrationResult:
        """Migrate one shut-off domain (module steps), under its lock."""
        with self.rec.domain_lock(ref, "migrating"):
            now = self.clock()
            facts, old_bytes, old_vars = self._facts(ref)
            plan = plan_migration(facts, self.rec.catalog, to=to, nvram_dir=self.cfg.nvram_dir, now=_iso(now))
            return self._carry_out(ref, facts, plan, old_bytes, old_vars, now)

    def _carry_out(
        self, ref: DomainRef, facts: MigrationFacts, plan: MigrationPlan, old_bytes: bytes,
        old_vars: dict[str, EfiVariable], now: datetime,
    ) -> MigrationResult:
        name = plan.name
        # 2. new bytes, verified in memory: a store that does not fit fails before any write.
        try:
            new_bytes = virtfw.migrate_variables(plan.source, plan.template, template_length=plan.target_layout.size)
        except VarstoreError as exc:
            raise MigrationFailed(f"domain '{name}': cannot migrate: {exc}; nothing was changed") from None
        try:
            _verify_store(new_bytes, old_vars, plan.target_layout, f"migrated copy of {plan.source}")
        except MigrationFailed as exc:
            raise MigrationFailed(f"domain '{name}': {exc}; nothing was changed") from None

        # 3. backup, verified.
        backup_dir = os.path.join(self.cfg.state_dir, BACKUP_DIR, plan.uuid)
        try:
            backup = _write_backup(backup_dir, name, plan.uuid, utc_stamp(now), old_bytes)
        except MigrationFailed as exc:
            raise MigrationFailed(f"domain '{name}': {exc}; nothing was changed") from None

        # 4.-6. write, read back, redefine; any failure puts the old store back.
        hv = self.rec.hv
        written = False
        try:
            if hv.lookup(plan.uuid).active:
                raise MigrationFailed("the domain was started meanwhile")
            if plan.in_place:
                written = True  # from here on, whatever failed, the old store is put back
                replace_file(plan.varstore, new_bytes, expect=old_bytes)
            else:
                try:
                    fsio.create_exclusive(plan.varstore, new_bytes, mode=0o600, uid=self.rec.owner[0],
                                          gid=self.rec.owner[1])
                except VarsdError as exc:
                    raise MigrationFailed(str(exc)) from None
            written = True
            try:
                on_disk = fsio.read_file(plan.varstore, follow_symlinks=False)
            except fsio.ReadError as exc:
                raise MigrationFailed(f"cannot read back {plan.varstore}: {exc}") from None
            if on_disk != new_bytes:
                raise MigrationFailed(f"{plan.varstore} does not read back as written")
            _verify_store(on_disk, old_vars, plan.target_layout, plan.varstore)
            self.rec.redefine(ref, facts.xml, plan.new_xml, plan.reason)
        except BaseException as exc:
            restored = self._restore(plan, old_bytes, new_bytes, backup) if written else "nothing was written"
            if isinstance(exc, VarsdError):
                raise MigrationFailed(
                    f"domain '{name}': migration failed: {exc}; {restored}; varsd did not change the domain's XML"
                ) from None
            raise
        if hv.lookup(plan.uuid).active:
            # Started between our last check and the redefine: that QEMU process runs the
            # old code with the migrated varstore. Nothing to undo (the store holds every
            # variable); the admin must cold-boot it onto the new code now.
            raise MigrationFailed(
                f"domain '{name}' was started while it was being migrated: its variables are migrated and its "
                "definition now names the new build, but the running QEMU still has the old code; shut it down "
                f"and start it again now (backup: {backup})"
            )
        # Like any binding: keep a copy of the build, before an upgrade can replace it.
        self.rec.archive_build(plan.target)
        return MigrationResult(plan=plan, backup=backup, variables=len(old_vars), done=True)

    def _running(self, uuid: str) -> bool:
        try:
            return self.rec.hv.lookup(uuid).active
        except VarsdError:
            return True  # cannot tell: act as if it ran, never overwrite what it may have written

    def _restore(self, plan: MigrationPlan, old_bytes: bytes, new_bytes: bytes, backup: str) -> str:
        """Undo the write; returns what happened, for the error message."""
        if not plan.in_place:
            _remove_if(plan.varstore, new_bytes)
            return f"the new varstore {plan.varstore} was removed"
        try:
            current = fsio.read_file(plan.varstore, follow_symlinks=False)
        except fsio.ReadError:
            current = None
        if current == old_bytes:
            return f"the varstore is unchanged (backup: {backup})"
        if current != new_bytes and self._running(plan.uuid):
            # Not what we wrote, and a guest runs on it: it may hold newer variables than
            # the backup. Putting the backup over it could lose them: leave it, say so.
            return (f"the domain was started meanwhile and its varstore {plan.varstore} was left as it is; "
                    f"the pre-migration copy is {backup}")
        try:
            replace_file(plan.varstore, old_bytes, expect=current)
            if fsio.read_file(plan.varstore, follow_symlinks=False) != old_bytes:
                raise MigrationFailed("restored file does not read back equal to the backup")
        except (MigrationFailed, fsio.ReadError) as exc:
            return (f"RESTORING THE VARSTORE FAILED ({exc}): copy the backup {backup} back to {plan.varstore} "
                    "(cp --preserve=mode,ownership) before starting the domain")
        return f"the varstore was restored from the backup {backup}"


def _iso(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- --all --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A domain `migrate --all` looked at: it needs a migration; `skip` says why it is not done now."""

    ref: DomainRef
    detail: str
    skip: str | None = None


def needs_migration(rec: Reconciler, refs: list[DomainRef]) -> tuple[list[Candidate], list[tuple[DomainRef, str]]]:
    """Domains whose status is `needs-migration` (running ones marked skip), and read errors."""
    found: list[Candidate] = []
    errors: list[tuple[DomainRef, str]] = []
    for ref in refs:
        try:
            _, plan = rec.examine(ref)
        except VarsdError as exc:
            errors.append((ref, str(exc)))
            continue
        if plan.status is not Status.NEEDS_MIGRATION:
            continue
        skip = f"is {ref.state}; shut it down, then run 'varsctl migrate {ref.name}'" if ref.active else None
        found.append(Candidate(ref=ref, detail=plan.detail, skip=skip))
    return found, errors
