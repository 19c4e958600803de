"""Metrics for fleets: what `status`, `secureboot status` and the backups compute, for Prometheus.

Built with `prometheus_client` (Debian 12's 0.16 and later): a fresh registry per
snapshot, so a metric always says what the last pass saw, never a sum of old ones.
`varsctl metrics` prints it; the daemon rewrites a node_exporter textfile
(`metrics_textfile`) and/or serves `/metrics` on a loopback address
(`metrics_listen`) after each full pass.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.registry import Collector

from varsd.adapters import fsio, virtfw
from varsd.adapters.libvirt_api import DomainRef
from varsd.clock import stamp
from varsd.engine import qemu_hook
from varsd.engine.qemu_hook import HookReport, HookState
from varsd.engine.reconciler import Outcome, Reconciler
from varsd.engine.secureboot import Audit, SecureBoot, for_reconciler
from varsd.errors import VarsdError
from varsd.model.domain import FirmwareConfig, Status
from varsd.model.secureboot import Ms2023State

log = logging.getLogger("varsd.metrics")


@dataclass(frozen=True)
class BackupFigure:
    """A domain's newest backup, as the backups store reports it (`taken` ISO 8601 UTC)."""

    name: str
    uuid: str
    taken: str | None


@dataclass(frozen=True)
class Snapshot:
    """Everything one metrics scrape reports."""

    outcomes: Sequence[Outcome] = ()
    audits: Sequence[Audit] = ()
    templates: Sequence[Audit] = ()
    backups: Sequence[BackupFigure] | None = None  # None: the backups store is not available
    errors_since: dict[str, float] = field(default_factory=dict)  # uuid -> epoch seconds of its current error
    now: float = 0.0
    hook: HookReport | None = None  # None: not this host's system daemon (nothing judged)


def _ts(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def registry(snap: Snapshot) -> CollectorRegistry:
    """A registry holding the snapshot's figures (label values are the ones `--json` prints)."""
    reg = CollectorRegistry(auto_describe=True)
    by_status = Gauge("varsd_domains", "Domains by varsd status", ["status"], registry=reg)
    statuses = Counter(o.status.value for o in snap.outcomes)
    for s in Status:
        by_status.labels(s.value).set(statuses.get(s.value, 0))
    by_config = Gauge("varsd_domains_by_config", "Domains by firmware configuration class", ["config"], registry=reg)
    configs = Counter(o.plan.config.value for o in snap.outcomes)
    for c in FirmwareConfig:
        by_config.labels(c.value).set(configs.get(c.value, 0))
    Gauge("varsd_pending_cold_boot", "Running domains whose new firmware applies at their next cold boot",
          registry=reg).set(statuses.get(Status.PENDING_COLD_BOOT.value, 0))
    Gauge("varsd_needs_migration", "Domains whose varstore does not fit the code they should run",
          registry=reg).set(statuses.get(Status.NEEDS_MIGRATION.value, 0))
    Gauge("varsd_domains_error", "Domains in error", registry=reg).set(statuses.get(Status.ERROR.value, 0))
    if snap.errors_since:
        age = Gauge("varsd_last_error_age_seconds", "Seconds since the oldest current domain error began",
                    registry=reg)
        age.set(max(0.0, snap.now - min(snap.errors_since.values())))

    ms = Gauge("varsd_domains_ms2023", "Domains by Microsoft 2023 Secure Boot certificate state", ["ms2023"],
               registry=reg)
    states = Counter(a.state_ms2023.value for a in snap.audits)
    for s in Ms2023State:
        ms.labels(s.value).set(states.get(s.value, 0))
    tms = Gauge("varsd_templates_ms2023", "Varstore templates by Microsoft 2023 certificate state", ["ms2023"],
                registry=reg)
    tstates = Counter(a.state_ms2023.value for a in snap.templates)
    for s in Ms2023State:
        tms.labels(s.value).set(tstates.get(s.value, 0))
    Gauge("varsd_domains_vtpm", "Domains with a vTPM (certificate updates change their PCR7)",
          registry=reg).set(sum(1 for a in snap.audits if a.tpm))
    expiry = Gauge("varsd_secureboot_cert_not_after_min_seconds",
                   "Earliest not-after (epoch) among a domain's KEK and db certificates", ["domain"], registry=reg)
    for a in snap.audits:
        if a.keys is None or not (a.keys.kek or a.keys.db):
            continue
        t = [_ts(c.not_after) for c in a.keys.kek + a.keys.db]
        expiry.labels(a.name).set(min(x for x in t if x is not None))

    if snap.backups is not None:
        never = Gauge("varsd_backups_missing", "Domains whose varstore has never been backed up", registry=reg)
        age = Gauge("varsd_backup_age_seconds", "Seconds since a domain's newest varstore backup", ["domain"],
                    registry=reg)
        missing = 0
        for b in snap.backups:
            t = _ts(b.taken)
            if t is None:
                missing += 1
            else:
                age.labels(b.name).set(max(0.0, snap.now - t))
        never.set(missing)
    if snap.hook is not None:
        hook = Gauge("varsd_qemu_hook_state", "varsd's libvirt QEMU hook: 1 for its current state "
                     "(pending-restart: libvirt has not loaded it yet)", ["state"], registry=reg)
        for state in (HookState.ACTIVE, HookState.PENDING_RESTART, HookState.MISSING):
            hook.labels(state.value).set(1 if snap.hook.state is state else 0)
    info = Gauge("varsd_virt_firmware_info", "The virt-firmware varsd uses, and which 2023 certificates it ships",
                 ["version", "ships"], registry=reg)
    shipped = [s.cert.subject for s in virtfw.ms2023_certificates() if s.der is not None]
    info.labels(virtfw.library_version(), ", ".join(shipped)).set(1)
    return reg


def samples(snap: Snapshot) -> list[dict]:
    """The snapshot's samples as plain data (`varsctl metrics --json`)."""
    return [{"name": s.name, "labels": dict(s.labels), "value": s.value}
            for fam in registry(snap).collect() for s in fam.samples]


def text(snap: Snapshot) -> str:
    return generate_latest(registry(snap)).decode()


def write_textfile(path: str, reg: CollectorRegistry) -> None:
    """Replace the node_exporter textfile atomically (readers never see half a file)."""
    data = generate_latest(reg)
    try:
        if os.path.lexists(path):
            fsio.replace_atomic(path, data)
        else:
            fsio.create_exclusive(path, data, mode=0o644)
    except VarsdError as exc:
        log.warning("metrics textfile: %s", exc)


class _Current(Collector):
    """Serves whatever snapshot was published last (the HTTP thread never computes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reg: CollectorRegistry = CollectorRegistry()

    def publish(self, reg: CollectorRegistry) -> None:
        with self._lock:
            self._reg = reg

    def collect(self) -> Iterable:
        with self._lock:
            reg = self._reg
        return reg.collect()


class Exporter:
    """The daemon's side: publish a snapshot to the textfile and/or the /metrics server."""

    def __init__(self, textfile: str | None, listen: tuple[str, int] | None) -> None:
        self.textfile = textfile
        self._current = _Current()
        self.server = None
        if listen is not None:
            from prometheus_client import start_http_server

            served = CollectorRegistry(auto_describe=False)
            served.register(self._current)
            addr, port = listen
            result = start_http_server(port, addr=addr, registry=served)
            self.server = result[0] if isinstance(result, tuple) else None  # 0.16 returns None
            log.info("metrics: serving /metrics on %s:%d", addr, port)

    def publish(self, snap: Snapshot) -> None:
        reg = registry(snap)
        self._current.publish(reg)
        if self.textfile:
            write_textfile(self.textfile, reg)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def take_snapshot(rec: Reconciler, refs: Sequence[DomainRef] | None = None, *,
                  outcomes: Sequence[Outcome] | None = None, sb: SecureBoot | None = None,
                  errors_since: dict[str, float] | None = None) -> Snapshot:
    """What varsctl metrics and the daemon export: the same figures `status` and `secureboot status` print.

    `outcomes` from a pass just made are reused; otherwise every domain is looked at
    (without acting). Stores are parsed once per content (KeyReader)."""
    refs = list(rec.hv.list_domains() if refs is None else refs)
    if outcomes is None:
        outcomes = [rec.reconcile(ref, apply=False) for ref in refs]
    sb = sb if sb is not None else for_reconciler(rec)
    audits = sb.audit_domains(refs)
    try:
        latest = sb.writer.store.index.latest_all()
        backups: list[BackupFigure] | None = [
            BackupFigure(a.name, a.uuid or "", stamp(latest[a.uuid].taken) if a.uuid in latest else None)
            for a in audits if a.varstore]  # domains with a varstore file: the ones a backup can cover
    except VarsdError as exc:
        log.warning("metrics: backup index: %s", exc)
        backups = None
    hook = qemu_hook.probe(rec.cfg.uri)
    return Snapshot(outcomes=outcomes, audits=audits, templates=sb.audit_templates(),
                    backups=backups, errors_since=errors_since or {}, now=rec.clock.now().timestamp(),
                    hook=None if hook.state is HookState.NOT_CHECKED else hook)
