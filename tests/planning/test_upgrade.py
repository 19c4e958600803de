"""Upgrade planning as tables: a domain bound to build A, the central path changes, what the
persistent definition must say (pure: facts in, plan out; no files, no libvirt).

Each row is a host state: which builds the catalog lists, what the code files hold
(path -> digest, `None` for a removed file, `ERR` for an unreadable one), what the
archive has verified or found corrupt, the policy, and whether the domain runs (with
the digest its QEMU process booted). Every row is planned, checked, executed on the
fake host (the new XML), and planned again: the second plan asks for nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import pytest
from support.domains import domain_xml, split_os, varsd_metadata

from varsd.clock import parse_stamp
from varsd.domain.xml import parse_domain
from varsd.firmware.archive import ArchiveIndex, archive_path
from varsd.firmware.fit import Needs, why_not
from varsd.model.domain import DomainFirmware, FileFacts, FirmwareConfig, PinKind, Status
from varsd.model.firmware import Build, Catalog, MappingMode, Target, VarstoreLayout
from varsd.planning.repair import DomainFacts, Plan, Redefine, plan_repair
from varsd.planning.upgrade import (
    Hold,
    Track,
    UpgradeContext,
    Wait,
    decide_pinned,
    decide_tracking,
    place_hold,
)

NOW = parse_stamp("2025-06-01T12:00:00Z")  # the clock's aware datetime; XML holds its stamp
NV = "/var/lib/libvirt/qemu/nvram"
ARCHIVE = "/var/lib/varsd/archive"
CODE = "/usr/share/OVMF/OVMF_CODE.fd"
VARS = "/usr/share/OVMF/OVMF_VARS.fd"
VARSTORE = f"{NV}/web_VARS.fd"
L2M = VarstoreLayout(131072, 100, 57344)
L4M = VarstoreLayout(540672, 100, 262144)
A, B, C, X = "a" * 64, "b" * 64, "c" * 64, "f" * 64  # X: a digest no descriptor describes
ERR = "ERR"
TARGETS = (Target("x86_64", ("pc-i440fx-*", "pc-q35-*")),)


def build(sha: str, *, layout: VarstoreLayout = L2M, path: str = CODE, features: frozenset[str] = frozenset(),
          targets: tuple[Target, ...] = TARGETS, code_format: str = "raw") -> Build:
    return Build(origin="/usr/share/qemu/firmware/60-test.json", code_path=path, code_format=code_format,
                 code_sha256=sha, code_size=1966080 if layout == L2M else 3653632, mode=MappingMode.SPLIT,
                 template_path=VARS, template_format="raw", template_sha256="7" * 64, layout=layout,
                 features=features, targets=targets)


BUILD_A, BUILD_B, BUILD_B4 = build(A), build(B), build(B, layout=L4M)
BUILD_B_SECURE = build(B, features=frozenset({"secure-boot", "requires-smm"}))
BUILD_B_Q35_ONLY = build(B, targets=(Target("x86_64", ("pc-q35-*",)),))


def web_xml(*, loader: str = CODE, bound: str = A, pin: str | None = None, pin_by: str | None = None,
            machine: str = "pc-q35-7.2", booted: str | None = None) -> str:
    """The domain `web` on `loader`, bound to build `bound`, maybe pinned, maybe booted."""
    pin_el = ""
    if pin:
        by = f' by="{pin_by}"' if pin_by else ""
        pin_el = f'<varsd:pin sha256="{pin}"{by}/>'
    boot = f'<boot xmlns="https://varsd.org/xmlns/boot/1" code="{loader}" sha256="{booted}"/>' if booted else ""
    metadata = varsd_metadata(f'>\n      <varsd:build code="{CODE}" sha256="{bound}"/>{pin_el}\n    ') + boot
    return domain_xml("web", split_os(loader, VARSTORE, template=VARS), domain_type="kvm",
                      uuid="3f2a0d1e-0000-4000-8000-000000000001", metadata=f"\n    {metadata}\n  ", memory_kib=None,
                      machine=machine)


@dataclass(frozen=True)
class Host:
    """The fake host a row plans on."""

    builds: tuple[Build, ...]
    files: Mapping[str, str | None]  # code path -> digest now there (None: removed, ERR: unreadable)
    archived: frozenset[str] = frozenset()
    corrupt: Mapping[str, str] = field(default_factory=dict)
    policy: str = "auto"
    booted: str | None = None  # running, and QEMU opened this build
    features: Mapping[str, frozenset[str]] = field(default_factory=dict)  # of archived builds

    def image(self, path: str) -> FileFacts:
        if path.startswith(ARCHIVE + "/"):
            sha = path[len(ARCHIVE) + 1:].removesuffix(".fd")
            if sha in self.archived:
                return FileFacts(path, True, 1966080, sha, path)
            if sha in self.corrupt:
                return FileFacts(path, True, 1966080, "0" * 64, path)
            return FileFacts(path, False)
        sha = self.files.get(path)
        if sha is None:
            return FileFacts(path, False)
        if sha == ERR:
            return FileFacts(path, True, 0, None, path, error=f"{path}: cannot open: permission denied")
        return FileFacts(path, True, 1966080, sha, path)

    def facts(self, xml: str) -> DomainFacts:
        fw = parse_domain(xml)
        live = None
        if self.booted:
            live = replace(fw, booted_sha256=self.booted)
        return DomainFacts(
            xml=xml, firmware=fw, live=live, image=self.image(fw.loader_path),
            nvram=FileFacts(VARSTORE, True, L2M.size, None, VARSTORE, varstore_layout=L2M),
        )

    @property
    def ctx(self) -> UpgradeContext:
        return UpgradeContext(self.policy, ArchiveIndex(ARCHIVE, self.archived, dict(self.corrupt)),
                              dict(self.features))

    def plan(self, xml: str) -> Plan:
        return plan_repair(self.facts(xml), Catalog(self.builds), NV, NOW, self.ctx)


def arch(sha: str) -> str:
    return archive_path(ARCHIVE, sha)


@dataclass(frozen=True)
class Row:
    name: str
    host: Host
    status: Status
    rewrites: bool  # a Redefine is planned
    loader: str = CODE  # after the plan (the XML's loader)
    bound: str | None = A
    pin: tuple[str, PinKind] | None = None
    detail: str = ""  # a phrase the detail must contain
    xml: str = field(default_factory=web_xml)

    def __str__(self) -> str:
        return self.name


ON_A = {CODE: A}
ON_B = {CODE: B}
ARCHIVED_A = frozenset({A})

TRACKING: tuple[Row, ...] = (
    # rule 1: nothing changed for the domain
    Row("unchanged", Host((BUILD_A,), ON_A), Status.OK, False),
    Row("descriptor-unreadable-build-unchanged", Host((), ON_A), Status.OK, False,
        detail="no firmware descriptor lists it at the moment"),
    Row("descriptor-unreadable-same-code-elsewhere", Host((build(A, path="/opt/fw/CODE.fd"),), ON_A), Status.OK,
        False, detail="nothing is changed because of that"),
    Row("catalog-stale", Host((BUILD_B,), ON_A), Status.OK, False, detail="is being reloaded"),
    # rule 6: a fitting new build is followed (metadata only), at the next cold boot
    Row("upgrade-fits", Host((BUILD_B,), ON_B, ARCHIVED_A), Status.OK, True, bound=B, detail="firmware upgrade"),
    Row("upgrade-fits-running", Host((BUILD_B,), ON_B, ARCHIVED_A, booted=A), Status.PENDING_COLD_BOOT, True,
        bound=B, detail="applies at next cold boot"),
    Row("running-on-old-build-already-rebound", Host((BUILD_B,), ON_B, ARCHIVED_A, booted=A),
        Status.PENDING_COLD_BOOT, False, bound=B, xml=web_xml(bound=B)),
    Row("running-on-the-bound-build", Host((BUILD_B,), ON_B, booted=B), Status.OK, False, bound=B,
        xml=web_xml(bound=B)),
    # rule 5: manual policy holds the fitting build back
    Row("upgrade-fits-manual", Host((BUILD_B,), ON_B, ARCHIVED_A, policy="manual"), Status.PINNED, True,
        loader=arch(A), pin=(A, PinKind.POLICY), detail="varsctl upgrade approve web"),
    Row("manual-no-archived-copy", Host((BUILD_B,), ON_B, policy="manual"), Status.ERROR, False,
        detail="not in the firmware archive"),
    # rule 4: a build that does not fit is never booted: held on the archived build
    Row("layout-change", Host((BUILD_B4,), ON_B, ARCHIVED_A), Status.NEEDS_MIGRATION, True, loader=arch(A),
        pin=(A, PinKind.INCOMPATIBLE), detail="varsctl migrate web"),
    Row("layout-change-manual", Host((BUILD_B4,), ON_B, ARCHIVED_A, policy="manual"), Status.NEEDS_MIGRATION,
        True, loader=arch(A), pin=(A, PinKind.INCOMPATIBLE), detail="expects a varstore of 540672 bytes"),
    Row("now-secure-boot", Host((BUILD_B_SECURE,), ON_B, ARCHIVED_A), Status.NEEDS_MIGRATION, True,
        loader=arch(A), pin=(A, PinKind.INCOMPATIBLE), detail="is a Secure Boot build"),
    Row("bound-secure-build-replaced-by-plain", Host((BUILD_B,), ON_B, ARCHIVED_A,
                                                     features={A: frozenset({"secure-boot", "requires-smm"})}),
        Status.NEEDS_MIGRATION, True, loader=arch(A), pin=(A, PinKind.INCOMPATIBLE),
        detail="is not a Secure Boot build"),
    Row("needs-smm-on-i440fx", Host((build(B, features=frozenset({"requires-smm"})),), ON_B, ARCHIVED_A),
        Status.NEEDS_MIGRATION, True, loader=arch(A), pin=(A, PinKind.INCOMPATIBLE), detail="needs SMM",
        xml=web_xml(machine="pc-i440fx-7.2")),
    Row("machine-dropped", Host((BUILD_B_Q35_ONLY,), ON_B, ARCHIVED_A), Status.NEEDS_MIGRATION, True,
        loader=arch(A), pin=(A, PinKind.INCOMPATIBLE), detail="does not support x86_64 machine 'pc-i440fx-7.2'",
        xml=web_xml(machine="pc-i440fx-7.2")),
    Row("qcow2-build", Host((build(B, code_format="qcow2"),), ON_B, ARCHIVED_A), Status.NEEDS_MIGRATION, True,
        loader=arch(A), pin=(A, PinKind.INCOMPATIBLE), detail="qcow2"),
    # rule 2: the central file is gone
    Row("central-removed", Host((), {CODE: None}, ARCHIVED_A), Status.NEEDS_MIGRATION, True, loader=arch(A),
        pin=(A, PinKind.INCOMPATIBLE), detail="was removed"),
    Row("central-removed-running", Host((), {CODE: None}, ARCHIVED_A, booted=A), Status.NEEDS_MIGRATION, True,
        loader=arch(A), pin=(A, PinKind.INCOMPATIBLE)),
    Row("central-removed-not-archived", Host((), {CODE: None}), Status.NEEDS_MIGRATION, False,
        detail="not in the firmware archive"),
    Row("central-removed-archive-corrupt", Host((), {CODE: None}, corrupt={A: f"archived image {arch(A)} is corrupt"}),
        Status.NEEDS_MIGRATION, False, detail="is corrupt"),
    Row("central-removed-booted-build-archived", Host((), {CODE: None}, frozenset({C}), booted=C),
        Status.NEEDS_MIGRATION, True, loader=arch(C), pin=(C, PinKind.INCOMPATIBLE)),
    # rule 3: what cannot be checked is not acted on
    Row("unknown-new-build", Host((BUILD_A,), {CODE: X}, ARCHIVED_A), Status.ERROR, False,
        detail="no firmware descriptor describes"),
    Row("code-unreadable", Host((BUILD_B,), {CODE: ERR}, ARCHIVED_A), Status.ERROR, False, detail="cannot be read"),
)

PINNED: tuple[Row, ...] = (
    # admin: held whatever happens centrally; the loader is the pinned build's file
    Row("admin-on-central", Host((BUILD_A,), ON_A), Status.PINNED, False, pin=(A, PinKind.ADMIN),
        xml=web_xml(pin=A, pin_by="admin")),
    Row("admin-central-upgraded", Host((BUILD_B,), ON_B, ARCHIVED_A), Status.PINNED, True, loader=arch(A),
        pin=(A, PinKind.ADMIN), xml=web_xml(pin=A, pin_by="admin")),
    Row("admin-rollback-on-archive", Host((BUILD_B,), ON_B, ARCHIVED_A), Status.PINNED, False, loader=arch(A),
        bound=B, pin=(A, PinKind.ADMIN), xml=web_xml(loader=arch(A), bound=B, pin=A, pin_by="admin")),
    Row("admin-back-to-central", Host((BUILD_A,), ON_A, ARCHIVED_A), Status.PINNED, False, loader=arch(A),
        pin=(A, PinKind.ADMIN), xml=web_xml(loader=arch(A), pin=A, pin_by="admin")),
    Row("legacy-pin-without-by", Host((BUILD_B,), ON_B, ARCHIVED_A), Status.PINNED, False, loader=arch(A),
        pin=(A, PinKind.ADMIN), xml=web_xml(loader=arch(A), pin=A)),
    Row("admin-archive-corrupt", Host((BUILD_B,), ON_B, corrupt={A: f"archived image {arch(A)} is corrupt"}),
        Status.ERROR, False, loader=arch(A), pin=(A, PinKind.ADMIN), detail="is corrupt",
        xml=web_xml(loader=arch(A), pin=A, pin_by="admin")),
    # policy: until approved, or the policy is auto again, or the held build is central again
    Row("policy-holds", Host((BUILD_B,), ON_B, ARCHIVED_A, policy="manual"), Status.PINNED, True, loader=arch(A),
        pin=(A, PinKind.POLICY), xml=web_xml(loader=arch(A), pin=A, pin_by="policy")),
    Row("policy-auto-again", Host((BUILD_B,), ON_B, ARCHIVED_A), Status.OK, True, bound=B,
        detail="hold released", xml=web_xml(loader=arch(A), pin=A, pin_by="policy")),
    Row("policy-held-build-central-again", Host((BUILD_A,), ON_A, ARCHIVED_A, policy="manual"), Status.OK, True,
        xml=web_xml(loader=arch(A), pin=A, pin_by="policy")),
    Row("policy-then-layout-change", Host((BUILD_B4,), ON_B, ARCHIVED_A, policy="manual"),
        Status.NEEDS_MIGRATION, True, loader=arch(A), pin=(A, PinKind.INCOMPATIBLE),
        xml=web_xml(loader=arch(A), pin=A, pin_by="policy")),
    # the held-back build's file is gone: approving cannot help any more, migrating can
    Row("policy-central-removed", Host((), {CODE: None}, ARCHIVED_A, policy="manual"), Status.NEEDS_MIGRATION,
        True, loader=arch(A), pin=(A, PinKind.INCOMPATIBLE), xml=web_xml(loader=arch(A), pin=A, pin_by="policy")),
    # incompatible: until migrated, or a fitting build is central again
    Row("incompatible-holds", Host((BUILD_B4,), ON_B, ARCHIVED_A), Status.NEEDS_MIGRATION, False, loader=arch(A),
        pin=(A, PinKind.INCOMPATIBLE), xml=web_xml(loader=arch(A), pin=A, pin_by="incompatible")),
    Row("incompatible-fitting-build-back", Host((BUILD_B,), ON_B, ARCHIVED_A), Status.OK, True, bound=B,
        xml=web_xml(loader=arch(A), pin=A, pin_by="incompatible")),
    Row("incompatible-same-build-listed-elsewhere",
        Host((BUILD_B4, build(A, path="/srv/firmware/OVMF_CODE.fd")),
             {CODE: B, "/srv/firmware/OVMF_CODE.fd": A}, ARCHIVED_A),
        Status.OK, True, bound=A, loader="/srv/firmware/OVMF_CODE.fd",
        xml=web_xml(loader=arch(A), pin=A, pin_by="incompatible")),
    Row("incompatible-fitting-build-back-manual", Host((BUILD_B,), ON_B, ARCHIVED_A, policy="manual"),
        Status.PINNED, True, loader=arch(A), pin=(A, PinKind.POLICY),
        xml=web_xml(loader=arch(A), pin=A, pin_by="incompatible")),
    Row("incompatible-running-old", Host((BUILD_B4,), ON_B, ARCHIVED_A, booted=C), Status.NEEDS_MIGRATION, False,
        loader=arch(A), pin=(A, PinKind.INCOMPATIBLE), detail="running build cccccccccccc until its next cold boot",
        xml=web_xml(loader=arch(A), pin=A, pin_by="incompatible")),
)


def _new_xml(plan: Plan) -> str | None:
    xmls = [a.xml for a in plan.actions if isinstance(a, Redefine)]
    assert len(xmls) <= 1 and len(xmls) == len(plan.actions), plan.actions
    return xmls[0] if xmls else None


@pytest.mark.parametrize("row", TRACKING + PINNED, ids=str)
def test_upgrade_rules(row: Row) -> None:
    plan = row.host.plan(row.xml)
    assert plan.config is FirmwareConfig.SPLIT
    assert plan.status is row.status, plan.detail
    new = _new_xml(plan)
    assert (new is not None) is row.rewrites, plan.detail
    assert row.detail in plan.detail
    fw = parse_domain(new or row.xml)
    assert fw.loader_path == row.loader, plan.detail
    assert fw.metadata.build_code_sha256 == row.bound
    assert (fw.metadata.pinned_sha256, fw.metadata.pin_kind) == (row.pin or (None, None))
    # what varsd must never change on an upgrade
    before = parse_domain(row.xml)
    assert (fw.nvram_path, fw.nvram_template, fw.loader_readonly, fw.loader_secure, fw.smm, fw.machine) == (
        before.nvram_path, before.nvram_template, before.loader_readonly, before.loader_secure, before.smm,
        before.machine)
    if plan.code is not None and row.status is not Status.ERROR:
        assert plan.code == row.loader


@pytest.mark.parametrize("row", [r for r in TRACKING + PINNED if r.rewrites], ids=str)
def test_replanning_asks_for_nothing_more(row: Row) -> None:
    plan = row.host.plan(row.xml)
    again = row.host.plan(_new_xml(plan))
    assert again.actions == (), again.detail
    assert again.status is plan.status, again.detail


def test_a_held_domain_records_who_why_and_when() -> None:
    host = Host((BUILD_B4,), ON_B, ARCHIVED_A)
    md = parse_domain(_new_xml(host.plan(web_xml()))).metadata
    assert (md.pin_by, md.pinned_at) == ("incompatible", NOW)
    assert "expects a varstore of 540672 bytes" in md.pin_reason and "varsctl migrate web" in md.pin_reason


def test_next_boot_digest_is_reported() -> None:
    assert Host((BUILD_B,), ON_B, ARCHIVED_A).plan(web_xml()).next_boot_sha256 == B
    assert Host((BUILD_B4,), ON_B, ARCHIVED_A).plan(web_xml()).next_boot_sha256 == A


# -- the rules one by one --------------------------------------------------------------------

FW = DomainFirmware(name="web", uuid="u", arch="x86_64", machine="pc-q35-7.2", loader_path=CODE,
                    loader_type="pflash", loader_readonly=True, nvram_path=VARSTORE)


@pytest.mark.parametrize(("candidate", "machine", "secure", "why"), [
    (BUILD_B, "pc-q35-7.2", False, None),
    (BUILD_B4, "pc-q35-7.2", False, "expects a varstore of 540672 bytes, variables 0x64-0x40000, the domain's has "
                                    "131072 bytes, variables 0x64-0xe000"),
    (replace(BUILD_B, mode=MappingMode.COMBINED, layout=None), "pc-q35-7.2", False, "not split code"),
    (BUILD_B_SECURE, "pc-q35-7.2", False, "is a Secure Boot build"),
    (BUILD_B, "pc-q35-7.2", True, "is not a Secure Boot build"),
    (build(B, features=frozenset({"requires-smm"})), "pc-i440fx-7.2", False, "needs SMM"),
    (BUILD_B_Q35_ONLY, "pc-i440fx-7.2", False, "does not support"),
    (build(B, code_format="qcow2"), "pc-q35-7.2", False, "qcow2/raw format"),
])
def test_upgrade_misfit_sentences(candidate, machine, secure, why) -> None:
    got = why_not(candidate, Needs.of(replace(FW, machine=machine), secure_boot=secure, layout=L2M))
    assert (got is None) if why is None else (got is not None and why in got), got


def test_decide_tracking_returns_none_when_the_bound_build_is_central() -> None:
    image = FileFacts(CODE, True, 1, A, CODE)
    fw = replace(FW, metadata=parse_domain(web_xml()).metadata)
    assert decide_tracking(fw, image, Catalog((BUILD_A,)), L2M, False, "auto") is None
    assert isinstance(decide_tracking(fw, image, Catalog(()), L2M, False, "auto"), Wait)
    moved = decide_tracking(fw, FileFacts(CODE, True, 1, B, CODE), Catalog((BUILD_B,)), L2M, False, "auto")
    assert isinstance(moved, Track) and moved.build is BUILD_B
    held = decide_tracking(fw, FileFacts(CODE, False), Catalog(()), L2M, False, "auto", booted=C)
    assert isinstance(held, Hold) and held.candidates == (A, C)


def test_decide_pinned_admin_is_never_released() -> None:
    fw = parse_domain(web_xml(loader=arch(A), bound=B, pin=A, pin_by="admin"))
    for policy in ("auto", "manual"):
        got = decide_pinned(fw, Catalog((BUILD_B,)), L2M, False, policy)
        assert isinstance(got, Hold) and got.kind is PinKind.ADMIN


def test_an_incompatible_hold_follows_its_build_listed_again_at_another_path() -> None:
    """The central path is gone (Debian 13), the admin adds the same 2 MiB pair as
    extra_firmware at another path: the domain follows it there, off the archive."""
    fw = parse_domain(web_xml(loader=arch(A), bound=A, pin=A, pin_by="incompatible"))
    elsewhere = build(A, path="/srv/firmware/OVMF_CODE.fd")
    got = decide_pinned(fw, Catalog((BUILD_B4, elsewhere)), L2M, False, "auto")
    assert isinstance(got, Track) and got.build.code_path == "/srv/firmware/OVMF_CODE.fd"
    # an admin's pin is still never released by this
    admin = parse_domain(web_xml(loader=arch(A), bound=A, pin=A, pin_by="admin"))
    assert isinstance(decide_pinned(admin, Catalog((elsewhere,)), L2M, False, "auto"), Hold)


def test_place_hold_prefers_the_archived_copy_which_no_upgrade_can_change() -> None:
    fw = parse_domain(web_xml(loader="/srv/fw/copy-of-A.fd", pin=A, pin_by="admin"))
    index = ArchiveIndex(ARCHIVE, frozenset({A}))
    # the archived copy first, even when the loader file or the central path is the build now
    here = place_hold((A,), FileFacts("/srv/fw/copy-of-A.fd", True, 1, A), fw, Catalog((BUILD_A,)), index)
    assert here.code_path == arch(A)
    # no copy archived yet: the file that already is the build, else the central path
    unarchived = ArchiveIndex(ARCHIVE)
    here = place_hold((A,), FileFacts("/srv/fw/copy-of-A.fd", True, 1, A), fw, Catalog((BUILD_B,)), unarchived)
    assert here.code_path == "/srv/fw/copy-of-A.fd"
    central = place_hold((A,), FileFacts("/srv/fw/copy-of-A.fd", True, 1, X), fw, Catalog((BUILD_A,)), unarchived)
    assert central.code_path == CODE
    none = place_hold((A,), None, fw, Catalog((BUILD_B,)), ArchiveIndex(ARCHIVE))
    assert isinstance(none, str) and "not in the firmware archive" in none
