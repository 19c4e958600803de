"""The varsd service: list, then watch; one worker; reconnect forever.

Theory of operation:
- Threads: libvirt's event loop (callbacks only queue work), four workers (all libvirt
  calls that may take long, all reconciles; never both on one domain), APScheduler's timer (queues a full pass),
  and the main thread, which supervises the connection and handles signals.
- On every (re)connect: subscribe to lifecycle events, then list every domain and
  queue it. Events are hints; the worker re-reads the domain. A reconcile of a domain
  varsd itself just redefined plans no action, so its own DEFINED events end there.
- The connection is watched by libvirt keepalive and a close callback. When it goes,
  the supervisor reconnects with capped exponential backoff; it never exits because
  libvirtd is away, and never spins.
- SIGTERM/SIGINT: the worker finishes the domain in hand, then the process exits.
  SIGHUP: reload the config and the firmware catalog, then queue a full pass.
- Firmware upgrades (varsd.engine.firmware_sync): at start-up every code image the
  catalog lists is archived and recorded, before a package upgrade can replace it.
  Every FIRMWARE_CHECK_INTERVAL seconds a stat() of the descriptor directories and
  the watched code images tells whether the package manager changed anything; if so
  the catalog is reloaded, new images archived, the change recorded and a full pass
  queued (so a host without package hooks converges too). Once a day the archive is
  pruned of builds nobody has used for `archive_retention_days`.
- Varstore backups (varsd.engine.lifecycle): a STOPPED event backs the guest's
  varstore up if it changed; a DEFINED event moves a renamed domain's varstore; a
  STARTED event checks whether the start replaced the varstore (--reset-nvram). At
  connect every shut-off domain's varstore is backed up if changed, and
  `backup_schedule` (cron, with `backup_jitter`) runs a pass over all, then retention.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from varsd.adapters import fsio
from varsd.adapters.journal import Journal
from varsd.adapters.libvirt_api import Hypervisor
from varsd.adapters.libvirt_events import LifecycleEvent, Subscription, start_event_loop
from varsd.adapters.plan_memo_store import PlanMemoStore
from varsd.clock import SYSTEM, Clock, stamp
from varsd.config import Config, parse_listen, qemu_owner
from varsd.daemon.notify import sd_notify, watchdog_interval
from varsd.daemon.workqueue import WorkQueue
from varsd.domain.xml import parse_domain
from varsd.engine import firmware_sync, qemu_hook
from varsd.engine.backups import open_store
from varsd.engine.boots import record_boot
from varsd.engine.inspect import FileInspector
from varsd.engine.lifecycle import Lifecycle
from varsd.engine.metrics import Exporter, take_snapshot
from varsd.engine.reconciler import Outcome, Reconciler
from varsd.engine.secureboot import SecureBoot, for_reconciler
from varsd.errors import HypervisorError, LockBusy, StateDirError, VarsdError
from varsd.firmware.archive import Archive
from varsd.firmware.catalog import load_configured
from varsd.messages import about_domain, for_row
from varsd.model.backup import BackupReason
from varsd.model.domain import DomainRef, Status
from varsd.retry import SETTINGS, Action, Backoff, Purpose, RetrySettings, decide

log = logging.getLogger("varsd")

BOOT_PREFIX = "boot:"
LIFE_PREFIX = "life:"  # a domain was defined (maybe renamed) or stopped: its varstore's lifecycle
BACKUP_OFFLINE = "backups:offline"  # every shut-off domain's varstore, if changed
BACKUP_SCHEDULE = "backups:schedule"  # backup_schedule's pass over all, then retention
# Workers overlap one domain's fsyncs and libvirt round trips with another's (a repair
# waits far more than it computes); the
# queue never hands the same domain to both, and acting takes the domain's lock.
WORKERS = 4
# Settings tied to what the process holds open (journal, archive, file ownership).
RESTART_ONLY = ("state_dir", "qemu_user", "qemu_group", "metrics_textfile", "metrics_listen")
STOP_GRACE = 20.0  # seconds the domains in hand get at SIGTERM (systemd TimeoutStopSec=30)
FIRMWARE_CHECK_INTERVAL = 30  # seconds between stat() checks of the firmware files
ARCHIVE_PRUNE_INTERVAL = 24 * 3600
METRICS_INTERVAL = 60  # seconds between metrics snapshots (textfile rewrite, /metrics content)


class Service:
    def __init__(
        self,
        cfg: Config,
        *,
        reload_config: Callable[[], Config] | None = None,
        backoff: Backoff | None = None,
        clock: Clock = SYSTEM,
        notify: Callable[..., bool] = sd_notify,
    ) -> None:
        self.cfg = cfg
        self.reload_config = reload_config  # how main() loaded it (file + --connect), for SIGHUP
        self.retry = RetrySettings.for_reconnect(backoff) if backoff else SETTINGS  # every delay: varsd.retry
        self.clock = clock
        self.notify = notify
        self.queue = WorkQueue()
        self.inspector = FileInspector()
        self.journal = Journal(cfg.journal_path, readers=cfg.admin_group)
        self.memo_store = PlanMemoStore(cfg.journal_path)  # compliant plans, for fresh processes (status)
        self.backups = open_store(cfg)
        self.owner = qemu_owner(cfg)
        self.archive = Archive(cfg.archive_dir, state_dir=cfg.state_dir)
        self.catalog = self._load_catalog()
        self._firmware_watch: tuple | None = None  # last watch_signature seen
        self._firmware_lock = threading.Lock()  # one firmware check at a time
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._reloading = threading.Lock()
        self._interval = cfg.reconcile_interval
        self._disconnected = threading.Event()
        self._lock = threading.Lock()  # guards hv / reconciler swaps
        self.hv: Hypervisor | None = None
        self.reconciler: Reconciler | None = None
        self._subscription: Subscription | None = None
        self._workers = [
            threading.Thread(target=self._work, name=f"varsd-worker-{i}", daemon=True) for i in range(WORKERS)
        ]
        self._count_lock = threading.Lock()
        self._scheduler = BackgroundScheduler(daemon=True)
        self.ready = threading.Event()
        self.handled = 0  # reconciles done, for tests and STATUS
        self.first_pass_pending: set[str] = set()
        self._names: dict[str, str] = {}
        self._retries: dict[str, int] = {}
        self._errors_since: dict[str, float] = {}  # uuid -> when its current error began (metrics)
        self._secureboot: tuple[Reconciler, SecureBoot] | None = None
        listen = parse_listen(cfg.metrics_listen) if cfg.metrics_listen else None
        self.exporter = Exporter(cfg.metrics_textfile, listen) if cfg.metrics_textfile or listen else None
        self._busy: dict[str, int] = {}  # domain -> consecutive looks that found its lock held
        self._reported: dict[str, tuple[str, str]] = {}  # uuid -> the problem last logged for it

    # -- public control ------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stop.set()
        self.queue.close()

    def request_reload(self, *_: object) -> None:
        self._reload.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        for name in fsio.sweep_temp_files(self.cfg.nvram_dir):
            log.warning("removed %s/%s, a temp file left by a killed varsd/varsctl", self.cfg.nvram_dir, name)
        start_event_loop()
        for w in self._workers:
            w.start()
        self._scheduler.add_job(
            self.queue_full_pass, "interval", seconds=self._interval, id="full-pass",
            max_instances=1, coalesce=True,
        )
        self.check_firmware(force=True)  # archive what is there before anything can replace it
        self._scheduler.add_job(
            self.check_firmware, "interval", seconds=FIRMWARE_CHECK_INTERVAL, id="firmware-check",
            max_instances=1, coalesce=True,
        )
        self._scheduler.add_job(
            self.prune_archive, "interval", seconds=ARCHIVE_PRUNE_INTERVAL, id="archive-prune",
            max_instances=1, coalesce=True,
        )
        if self.exporter is not None:
            self._scheduler.add_job(
                self.export_metrics, "interval", seconds=METRICS_INTERVAL, id="metrics",
                max_instances=1, coalesce=True,
            )
        self._scheduler.add_job(
            self.queue.put, self._backup_trigger(self.cfg), args=[BACKUP_SCHEDULE], id="backup-schedule",
            max_instances=1, coalesce=True,
        )
        self._scheduler.start()
        self.notify("STATUS=connecting to " + self.cfg.uri)
        wd = watchdog_interval()
        delays = self.retry.reconnect.delays()
        last_wd = last_status = 0.0
        last_handled = 0
        try:
            while not self._stop.is_set():
                if wd and time.monotonic() - last_wd >= wd:
                    self.notify("WATCHDOG=1")
                    last_wd = time.monotonic()
                if self._reload.is_set() and self._reloading.acquire(blocking=False):
                    # Off the main thread: a reload may wait for the firmware lock and hash
                    # images, and this thread must keep pinging the watchdog.
                    self._reload.clear()
                    threading.Thread(target=self._reload_in_background, name="varsd-reload", daemon=True).start()
                if self.hv is None or self._disconnected.is_set():
                    if self._connect():
                        delays = self.retry.reconnect.delays()
                    else:
                        self._stop.wait(next(delays))
                    continue
                if not self.ready.is_set() and not self.first_pass_pending:
                    self.ready.set()
                    self.notify("READY=1", f"STATUS=watching {self.cfg.uri}")
                    log.info("first full reconcile done; watching %s", self.cfg.uri)
                    hook = qemu_hook.probe(self.cfg.uri)
                    if hook.attention:  # `varsctl status` says it too, as long as it lasts
                        log.warning("qemu hook %s: %s", hook.state.value, hook.detail)
                    if self.exporter is not None:
                        self._scheduler.add_job(self.export_metrics, id="metrics-first")
                if time.monotonic() - last_status >= 10 and self.handled != last_handled:
                    last_status, last_handled = time.monotonic(), self.handled
                    self.notify(f"STATUS=watching {self.cfg.uri}: {self.handled} domain checks, "
                                f"{self.queue.pending()} queued")
                self._stop.wait(min(wd or 0.2, 0.2))
        finally:
            self._shutdown()
        return 0

    # -- connection ----------------------------------------------------------------

    def _connect(self) -> bool:
        self._teardown_connection()
        hv = Hypervisor(self.cfg.uri)
        try:
            hv.open()
            self._disconnected.clear()
            subscription = Subscription(hv, self._on_event, self._on_close)
            refs = hv.list_domains()
        except HypervisorError as exc:
            log.warning("libvirt not reachable (%s); retrying", exc)
            self.notify(f"STATUS=waiting for libvirt: {exc}")
            hv.close()
            return False
        with self._lock:
            self.hv = hv
            self._subscription = subscription
            self.reconciler = self._new_reconciler(hv, self.cfg, self.catalog)
        log.info("connected to %s: %d domains, full reconcile queued", self.cfg.uri, len(refs))
        if not self.ready.is_set():
            self.first_pass_pending = {r.uuid for r in refs}
        for ref in refs:
            self.queue.put(ref.uuid)
        self.queue.put(BACKUP_OFFLINE)  # changed while varsd was not watching
        return True

    @staticmethod
    def _backup_trigger(cfg: Config) -> CronTrigger:
        trigger = CronTrigger.from_crontab(cfg.backup_schedule)
        trigger.jitter = cfg.backup_jitter or None
        return trigger

    def _teardown_connection(self) -> None:
        with self._lock:
            if self._subscription is not None:
                self._subscription.cancel()
            if self.hv is not None:
                self.hv.close()
            self.hv, self.reconciler, self._subscription = None, None, None

    def _on_close(self, why: str) -> None:
        log.warning("connection to %s closed (%s); reconnecting", self.cfg.uri, why)
        self._disconnected.set()

    def _on_event(self, ev: LifecycleEvent) -> None:
        """Runs on libvirt's event thread: queue and return at once."""
        self._names[ev.uuid] = ev.name  # names the domain in logs even once it is gone
        if ev.kind == "started":
            self.queue.put(BOOT_PREFIX + ev.uuid)
        if ev.kind in ("stopped", "defined"):
            self.queue.put(LIFE_PREFIX + ev.uuid)
        self.queue.put(ev.uuid)

    def queue_full_pass(self) -> None:
        with self._lock:
            hv = self.hv
        if hv is None:
            return
        try:
            refs = hv.list_domains()
        except HypervisorError as exc:
            log.warning("full pass: %s", exc)
            return
        for ref in refs:
            self.queue.put(ref.uuid)

    def _new_reconciler(self, hv: Hypervisor, cfg: Config, catalog) -> Reconciler:
        return Reconciler(cfg, hv, catalog, self.journal, self.owner, actor="varsd", clock=self.clock,
                          inspector=self.inspector, archive=self.archive, lock_wait=self.retry.lock_wait,
                          memo_store=self.memo_store)

    def _reload_in_background(self) -> None:
        try:
            self._do_reload()
        except Exception:  # a reload must never take the daemon down
            log.exception("reload failed; keeping the old configuration")
        finally:
            self._reloading.release()

    def _do_reload(self) -> None:
        """Re-read config and catalog; they apply to the very next domain handled.

        A new Reconciler is swapped in whole, so no domain is planned with half old,
        half new settings. Keys that name the state varsd holds open (state_dir, the
        qemu owner) need a restart: they are kept, with a warning.
        """
        if self.reload_config is None:
            cfg = self.cfg
        else:
            try:
                cfg = self.reload_config()
            except VarsdError as exc:
                log.error("reload: %s; keeping the old configuration", exc)
                return
        fixed = [k for k in RESTART_ONLY if getattr(cfg, k) != getattr(self.cfg, k)]
        if fixed:
            log.warning("reload: %s changed; that takes a restart of varsd (kept the old value)", ", ".join(fixed))
            cfg = replace(cfg, **{k: getattr(self.cfg, k) for k in fixed})
        reconnect = cfg.uri != self.cfg.uri
        catalog = self._load_catalog(cfg)
        with self._lock:
            self.cfg, self.catalog = cfg, catalog
            if self.hv is not None:
                self.reconciler = self._new_reconciler(self.hv, cfg, catalog)
        if (cfg.backup_schedule, cfg.backup_jitter) != (self.cfg.backup_schedule, self.cfg.backup_jitter):
            self._scheduler.reschedule_job("backup-schedule", trigger=self._backup_trigger(cfg))
        if cfg.reconcile_interval != self._interval:
            self._interval = cfg.reconcile_interval
            self._scheduler.reschedule_job("full-pass", trigger="interval", seconds=cfg.reconcile_interval)
        log.info("configuration and firmware catalog reloaded")
        self._refresh_firmware(catalog)
        if reconnect:
            self._disconnected.set()  # the new URI: reconnect, which queues everything
        else:
            self.queue_full_pass()

    # -- firmware upgrades -----------------------------------------------------------

    def check_firmware(self, *, force: bool = False) -> bool:
        """The cheap change signal (module doc); True when firmware changed and was handled.

        The signature is taken *before* the catalog is read: a file that changes while
        it is being read changes the next signature too, so the next check reads again.
        """
        with self._firmware_lock:
            try:
                watched = self.journal.firmware_state().keys()
            except VarsdError as exc:
                log.error("firmware check: %s", exc)
                watched = set()
            signature = firmware_sync.watch_signature(self.cfg, self.catalog, watched)
            if not force and signature == self._firmware_watch:
                return False
            first = self._firmware_watch is None
            self._firmware_watch = signature
            if not first:
                log.info("firmware files changed; reloading the firmware catalog")
            catalog = self._load_catalog()
            with self._lock:
                self.catalog = catalog
                if self.reconciler is not None:
                    self.reconciler.catalog = catalog
            self._refresh_firmware(catalog)
        if not first:
            self.queue_full_pass()
        return True

    def _refresh_firmware(self, catalog) -> None:
        try:
            found = firmware_sync.refresh(self.cfg, self.journal, self.archive, catalog=catalog,
                                          inspector=self.inspector, clock=self.clock)
        except VarsdError as exc:
            log.error("firmware archive: %s", exc)
            return
        for item in found.archived:
            sha, _, path = item.partition(" ")
            log.info("firmware archive: stored build %s from %s", sha[:12], path)
        for change in found.changes:
            self.notify(f"STATUS=firmware {change.describe()}")

    def prune_archive(self) -> list[str]:
        """Drop archived builds nobody is bound to, pinned to or running, after retention."""
        with self._lock:
            hv, rec = self.hv, self.reconciler
        if hv is None or rec is None:
            return []
        try:
            pruned = firmware_sync.prune_daemon(rec, self.journal, hv.list_domains(), clock=self.clock)
        except VarsdError as exc:
            log.warning("firmware archive: not pruned: %s", exc)
            return []
        for sha in pruned:
            log.info("firmware archive: pruned build %s (unused for %d days)", sha[:12],
                     self.cfg.archive_retention_days)
        return pruned

    def _load_catalog(self, cfg: Config | None = None):
        return load_configured(cfg or self.cfg)

    # -- worker --------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            key = self.queue.get()
            if key is None:
                return
            try:
                self._handle(key)
            except Exception:  # the daemon never dies of one domain
                log.exception("unexpected error while handling %s", key)
            finally:
                self.queue.done(key)

    def _handle(self, key: str) -> None:
        with self._lock:
            hv, rec = self.hv, self.reconciler
        if hv is None or rec is None:
            return  # disconnected: the reconnect lists and queues every domain anyway
        try:
            if key.startswith(BOOT_PREFIX):
                uuid = key[len(BOOT_PREFIX) :]
                self._record_boot(hv, uuid)
                try:
                    self._lifecycle(rec).check_reset(hv.lookup(uuid))
                except HypervisorError:
                    raise
                except VarsdError as exc:
                    log.warning("%s", about_domain(self._names.get(uuid, uuid),
                                                   f"could not check the varstore after the start: {exc}", uuid))
                return
            if key.startswith(LIFE_PREFIX):
                self._varstore_lifecycle(hv, rec, key[len(LIFE_PREFIX) :])
                return
            if key == BACKUP_OFFLINE:
                self._lifecycle(rec).backup_offline(hv.list_domains(), reason=BackupReason.OFFLINE)
                return
            if key == BACKUP_SCHEDULE:
                results = self._lifecycle(rec).scheduled_pass()
                log.info("scheduled backup pass: %d varstore(s), %d new backup(s)", len(results),
                         sum(1 for r in results if r.record))
                return
            try:
                ref = hv.lookup(key)
            except HypervisorError as exc:
                if exc.retryable:
                    raise
                self._close_record(key)
                return
            outcome = rec.reconcile(ref)
            for other in rec.take_rechecks():  # e.g. a clone using this domain's own varstore
                self.queue.put(other)
            if outcome.boot_unrecorded:
                # Running since before varsd watched it (the live XML the reconcile read has
                # no boot record): QEMU's open file still tells.
                record_boot(hv, ref.uuid, stamp(self.clock.now()))
            if not ref.active:
                self._apply_queued_update(rec, ref)
            if outcome.status is Status.ERROR:
                self._errors_since.setdefault(ref.uuid, self.clock.now().timestamp())
            else:
                self._errors_since.pop(ref.uuid, None)
            with self._count_lock:
                self.handled += 1
            if outcome.busy:
                # varsctl (or a frozen actor) holds the domain: a retry, not an error (varsd.retry)
                n = self._busy.get(key, 0)
                self._busy[key] = n + 1
                self.queue.put_later(key, decide(LockBusy(outcome.detail), attempt=n, purpose=Purpose.LOCK,
                                                 settings=self.retry).delay)
                return
            self._busy.pop(key, None)
            if outcome.retry:
                first = key not in self._retries
                delay = self._retry_delay(key)
                # once when the trouble starts (the outcome's own message is logged by _report);
                # every later retry only at debug level
                log.log(logging.WARNING if first else logging.DEBUG, "%s",
                        about_domain(ref.name, f"will look again in {delay:.0f} s", ref.uuid))
                self.queue.put_later(key, delay)
            else:
                self._retries.pop(key, None)
            self._report(ref, outcome)
        except HypervisorError as exc:
            action = decide(exc, alive=not exc.retryable or hv.is_alive(), settings=self.retry).action
            if action is Action.RECONNECT:
                log.warning("%s; reconnecting", about_domain(self._names.get(key, key), exc, key))
                self._disconnected.set()  # the reconnect re-lists and queues everything
            elif action is Action.RETRY:
                self.queue.put_later(key, self._retry_delay(key))
                log.warning("%s; will look again", about_domain(self._names.get(key, key), exc, key))
            else:
                log.error("%s", about_domain(self._names.get(key, key), exc, key))
        except StateDirError as exc:
            # state_dir became unusable under us (remounted read-only, full): not this domain's
            # fault; said once per look, and the domain is looked at again later.
            log.error("%s", about_domain(self._names.get(key, key), f"not handled: {exc}", key))
            self.queue.put_later(key, self._retry_delay(key))
        finally:
            # Whatever happened, this domain no longer holds READY back.
            self.first_pass_pending.discard(key)

    def secureboot(self, rec: Reconciler) -> SecureBoot:
        """The Secure Boot engine for the current reconciler (rebuilt when a reload swaps it)."""
        with self._lock:
            if self._secureboot is None or self._secureboot[0] is not rec:
                self._secureboot = (rec, for_reconciler(rec))
            return self._secureboot[1]

    def _apply_queued_update(self, rec: Reconciler, ref) -> None:
        """A guest that stopped with a certificate update queued gets it now, before its next start."""
        try:
            result = self.secureboot(rec).apply_queued(ref)
        except VarsdError as exc:
            log.error("%s", about_domain(ref.name, f"queued Secure Boot update failed: {for_row(ref.name, exc)}"))
            return
        if result is not None:
            log.info("%s", about_domain(ref.name, f"secureboot {result.outcome.value}: {result.detail}", ref.uuid))

    def export_metrics(self) -> None:
        """Publish a metrics snapshot (scheduler thread); never raises."""
        with self._lock:
            rec = self.reconciler
        if rec is None or self.exporter is None:
            return
        try:
            snap = take_snapshot(rec, sb=self.secureboot(rec), errors_since=dict(self._errors_since))
            self.exporter.publish(snap)
        except Exception:  # metrics must never take the daemon down
            log.exception("metrics snapshot failed")

    def _lifecycle(self, rec: Reconciler) -> Lifecycle:
        return Lifecycle(self.cfg, rec, self.backups)

    def _varstore_lifecycle(self, hv: Hypervisor, rec: Reconciler, uuid: str) -> None:
        """Defined or stopped: move a renamed domain's varstore, then back it up if it changed."""
        try:
            ref = hv.lookup(uuid)
        except HypervisorError as exc:
            if exc.retryable:
                raise
            return  # undefined meanwhile
        life = self._lifecycle(rec)
        try:
            life.follow_rename(ref)
        except HypervisorError:
            raise
        except VarsdError as exc:
            log.error("%s", about_domain(ref.name, exc, ref.uuid))
        life.backup_offline([hv.lookup(uuid)])

    def _report(self, ref: DomainRef, outcome: Outcome) -> None:
        """Log a domain's problem when it appears or changes, and once when it clears."""
        problem, before = outcome.problem, self._reported.get(ref.uuid)
        if outcome.cleared is not None:
            done = outcome.done[-1] if outcome.done else "the attempt"
            since = stamp(outcome.cleared.first_at)
            log.info("%s", about_domain(ref.name, f"{done} succeeded; the failure seen {outcome.cleared.count} "
                                                  f"time(s) since {since} is cleared", ref.uuid))
        elif before is not None and problem is None:
            log.info("%s", about_domain(ref.name, f"{outcome.status.value} now; cleared: {before[1]}", ref.uuid))
        if problem is not None and problem != before:
            level = logging.WARNING if outcome.status is Status.NEEDS_MIGRATION else logging.ERROR
            log.log(level, "%s", about_domain(ref.name, outcome.detail, ref.uuid))
        if problem is None:
            self._reported.pop(ref.uuid, None)
        else:
            self._reported[ref.uuid] = problem

    def _retry_delay(self, key: str) -> float:
        """Per-domain backoff for domain-level trouble (`varsd.retry`: the domain row)."""
        n = self._retries.get(key, 0)
        self._retries[key] = n + 1
        return self.retry.domain.delay(n)

    def _record_boot(self, hv: Hypervisor, uuid: str) -> None:
        boot = record_boot(hv, uuid, stamp(self.clock.now()))
        if boot:
            name = self._names.get(uuid) or hv.lookup(uuid).name
            log.info("domain '%s' booted code %s (sha256 %s)", name, boot.code_path, boot.sha256[:12])

    def _close_record(self, uuid: str) -> None:
        """An undefined domain: forget its plan, close its record; its varstore stays."""
        if self.reconciler is not None:
            varstore = self.reconciler.forget(uuid)
        else:
            varstore = None
        name = self._names.pop(uuid, uuid)
        try:
            if varstore is None:  # not in memory (undefined before its plan was remembered): the journal knows
                varstore = self._last_written_varstore(uuid)
            rec = self.journal.close_record(uuid, self.clock.now(), varstore)
        except VarsdError as exc:
            log.error("%s", about_domain(name, f"undefined, but its record could not be closed: {exc}", uuid))
            return
        kept = (rec.varstore if rec else None) or varstore
        log.info("domain '%s' was undefined; record closed%s", name,
                 f", varstore {kept} kept" if kept else "")

    def _last_written_varstore(self, uuid: str) -> str | None:
        """The varstore named by the newest XML varsd applied to the domain, if any."""
        for change in self.journal.changes(uuid, limit=20):
            if change.outcome == "applied" and change.new_xml:
                try:
                    return parse_domain(change.new_xml).nvram_path
                except VarsdError:
                    return None
        return None

    def _shutdown(self) -> None:
        self.notify("STOPPING=1")
        self.queue.close()
        try:
            self._scheduler.shutdown(wait=False)
        except Exception:
            pass
        deadline = time.monotonic() + STOP_GRACE  # all workers together, within TimeoutStopSec
        for w in self._workers:
            w.join(timeout=max(0.0, deadline - time.monotonic()))
        self._teardown_connection()
        if self.exporter is not None:
            self.exporter.close()
        self.journal.close()
        self.memo_store.close()
        self.backups.index.close()
        log.info("stopped")
