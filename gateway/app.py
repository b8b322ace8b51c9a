"""Composition root: builds the parts, runs them as named tasks, shuts them down in order.

Shutdown order matters for data safety: ingest stops first (it commits and acknowledges
what it holds, then disconnects, so the broker keeps everything after that), then the
flush loop gets a bounded final flush, then the database is closed. A second signal exits
at once: everything acknowledged is already committed, so nothing is lost by hurrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from gateway import __version__
from gateway.aio import ProgressWatch
from gateway.clock import Clock
from gateway.config import CloudSettings, FlushSettings, Settings
from gateway.errors import StoreError
from gateway.ingest import MqttIngest, RouteTable
from gateway.log import get_logger
from gateway.ops.observe import Observer
from gateway.ops.reload import serve_reloads
from gateway.ops.status_socket import StatusServer, socket_path
from gateway.ops.systemd import ServiceMonitor, ServiceNotifier, status_line
from gateway.store import Capacity, Store
from gateway.store.quota_journal import journal_path
from gateway.store.timekeeping import TimeKeeper
from gateway.uplink.budget import RequestBudget
from gateway.uplink.cloud import BlynkCloud
from gateway.uplink.flush import FlushLoop
from gateway.uplink.netwatch import NetworkWatcher
from gateway.uplink.quota import DailyQuota

if TYPE_CHECKING:
    from gateway.ops.metrics import MetricsExporter

log = get_logger("app")

# The full integrity check reads the whole file: let the first uploads go out before it.
VERIFY_DELAY_S = 2.0
# The watchdog's patience with ingest: messages waiting and not one commit attempt finished.
# Covers the commit interval, a resync reconnect and the store's busy and retry waits.
INGEST_STALL_BUDGET_S = 60.0


class Gateway:
    """The daemon as an object, so tests can run it in-process and stop it on demand."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock_ms: Callable[[], int] | None = None,
        cloud_transport: httpx.AsyncBaseTransport | None = None,
        notifier: ServiceNotifier | None = None,
        config_path: Path | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`clock`: the wall clock, whether to trust it and this boot's time (tests inject
        fake ones); by default the system's, trusted as `[clock]` says, reading `clock_ms`
        as its wall clock if given."""
        self.settings = settings
        # SIGHUP re-reads this file (see reload.py); None: reload is not offered.
        self.config_path = config_path
        self._reload_requested = asyncio.Event()
        # sd_notify; disabled unless given (run_until_signalled reads $NOTIFY_SOCKET).
        self.notifier = notifier or ServiceNotifier(None)
        self.clock = clock or Clock.from_settings(settings.clock, wall_ms=clock_ms)
        self._clock_ms = self.clock.now_ms
        self.timekeeper: TimeKeeper | None = None
        self._cloud_transport = cloud_transport
        self._stop_requested = asyncio.Event()
        self.started = asyncio.Event()
        self.store: Store | None = None
        self.ingest: MqttIngest | None = None
        self.flush: FlushLoop | None = None
        self.cloud: BlynkCloud | None = None
        self.network: NetworkWatcher | None = None
        # `status` and metrics read the gateway through these (see _start_observers).
        self.observer: Observer | None = None
        self.metrics: MetricsExporter | None = None

    def request_stop(self) -> None:
        self._stop_requested.set()

    def request_reload(self) -> None:
        self._reload_requested.set()

    async def run(self) -> None:
        settings = self.settings
        started_at = time.monotonic()
        # owner=True: a damaged file is moved aside and salvaged here (logged as
        # `buffer_corrupt`) instead of stopping the gateway. That, an upgrade of an old
        # file and the full check later can outlast systemd's timeouts: the store reports
        # their progress to the notifier, which keeps systemd informed (ops/systemd.py).
        self.store = store = await Store.open(
            settings.store.path,
            synchronous=settings.store.synchronous,
            clock_ms=self._clock_ms,
            capacity=Capacity(
                max_points=settings.store.max_points,
                max_bytes=settings.store.max_bytes,
                policy=settings.store.full_policy,
                max_dead_letters=settings.store.max_dead_letters,
                disk_reserve_bytes=settings.store.disk_reserve_bytes,
            ),
            owner=True,
            page_size=settings.store.page_size,
            long_work=self.notifier,
            stop=self._stop_requested,  # a disk too full to open the buffer: wait for room
            boot_id=self.clock.boot_id,
            # RAM that outlives a crash, not a reboot: a kill strands no reserved quota.
            quota_journal=journal_path(settings.store.path, os.environ.get("RUNTIME_DIRECTORY")),
        )
        # Before ingest: earlier boots' held readings are settled, the clock looked at.
        self.timekeeper = timekeeper = TimeKeeper(self.clock, store, settings.clock)
        await timekeeper.start()
        # None: `trust = "always"`, nothing is held and no step is looked for (as before).
        keeps_time = None if self.clock.always else self.clock
        # Every request the gateway makes counts against this (uplink/budget.py).
        budget = RequestBudget(settings.cloud.max_requests_per_minute)
        self.cloud = cloud = BlynkCloud(
            settings.cloud.server,
            settings.cloud.client_id,
            settings.cloud.client_secret.get_secret_value(),
            timeout_s=settings.cloud.timeout_s,
            transport=self._cloud_transport,
            budget=budget,
        )
        routes = RouteTable(
            settings.routes,
            settings.mqtt.max_payload_bytes,
            devices=settings.devices,
            daily_points_limit=settings.cloud.daily_points_limit,
        )
        self.ingest = ingest = MqttIngest(
            settings.mqtt,
            routes,
            store,
            commit_interval_s=settings.store.commit_interval_ms / 1000,
            commit_max_readings=settings.commit_max_readings(),
            pass_through_wait_s=(
                settings.flush.pass_through_wait_s if settings.flush.pass_through else 0.0
            ),
            oldest_sendable_ms=settings.cloud.oldest_sendable_ms,
            clock_ms=self._clock_ms,
            clock=keeps_time,
        )
        self.network = network = NetworkWatcher()
        network.start()
        self.flush = flush = FlushLoop(
            store,
            cloud,
            settings.flush,
            settings.cloud,
            clock_ms=self._clock_ms,
            network_changed=network.changed.listen(),
            clock=keeps_time,
            budget=budget,
        )
        log.info(
            "gateway_started",
            version=__version__,
            db=str(settings.store.path),
            buffered=store.pending_points,
            clean_start=store.started_clean,
            recovered_from=str(store.recovery.moved_to) if store.recovery else None,
            full_policy=settings.store.full_policy,
            routes=len(routes.routes),
            clock=self.clock.source.name,
            clock_synchronized=self.clock.trusted,
            held_for_clock=store.provisional_points,
            broker=f"{settings.mqtt.host}:{settings.mqtt.port}",
            cloud=settings.cloud.server,
            startup_ms=round((time.monotonic() - started_at) * 1000, 1),
        )
        for route in settings.routes:
            if (problem := route.catch_all_problem()) is not None:
                log.warning("route_catches_all", route=route.topic, problem=problem)
        try:
            async with asyncio.TaskGroup() as tasks:
                ingest_task = tasks.create_task(ingest.run(), name="ingest")
                flush_task = tasks.create_task(flush.run(), name="flush")
                verify_task = tasks.create_task(self._verify(store), name="store-verify")
                reload_task = tasks.create_task(self._serve_reloads(), name="reload")
                observers = self._start_observers(tasks)
                if keeps_time is not None:  # stopped with the observers, before ingest
                    observers.append(tasks.create_task(timekeeper.run(), name="clock"))
                notify_task = tasks.create_task(self._service_monitor().run(), name="sd-notify")
                await asyncio.sleep(0)  # let ingest start before telling systemd we are up
                self.notifier.ready(self._status_now())
                self.started.set()
                await self._stop_requested.wait()
                verify_task.cancel()
                reload_task.cancel()
                for task in observers:
                    task.cancel()
                self.notifier.stopping(f"stopping, backlog {store.pending_points:,}")
                notify_task.cancel()
                await self._shutdown(ingest_task, flush_task)
        finally:
            network.close()
            await cloud.aclose()
            await store.close()
            log.info(
                "gateway_stopped",
                buffered=store.pending_points,
                received=ingest.stats.received,
                delivered=flush.stats.delivered,
            )

    async def _serve_reloads(self) -> None:
        if self.config_path is not None:
            await serve_reloads(self, self.notifier, self.config_path, self._reload_requested)

    # ------------------------------------------------------------------ reload (ops.reload)

    def running(self) -> bool:
        return self.ingest is not None and self.flush is not None and self.cloud is not None

    def replace_routes(self, routes: RouteTable) -> tuple[list[str], list[str]]:
        assert self.ingest is not None
        return self.ingest.replace_routes(routes)

    def reconfigure_uplink(self, cloud: CloudSettings, flush: FlushSettings) -> None:
        assert self.cloud is not None and self.flush is not None
        self.cloud.set_credentials(cloud.client_id, cloud.client_secret.get_secret_value())
        self.flush.reconfigure(flush, cloud)

    def settings_applied(self, settings: Settings) -> None:
        self.settings = settings

    async def unpark_all(self) -> None:
        assert self.flush is not None
        await self.flush.unpark_all()

    async def _verify(self, store: Store) -> None:
        """The full integrity check, once, in the background (start-up only probes the file).

        A damaged file found here is swapped for a salvaged one by the store itself; a
        failure to check is logged and never takes the gateway down. Shutdown cancels this
        task: the check stops at once, but a recovery under way runs to its end first (the
        store shields it), so the store is never left half-swapped.
        """
        await asyncio.sleep(VERIFY_DELAY_S)
        try:
            await store.verify()
        except StoreError as exc:
            log.error("integrity_check_failed", error=str(exc))

    def _start_observers(self, tasks: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """The status socket, the rate sampler and (if configured) the metrics exporter.

        They only read the gateway; shutdown cancels them first, so `status` then reports
        "not running" from the database alone.
        """
        assert self.flush is not None
        self.observer = observer = Observer(self, clock_ms=self._clock_ms)
        self.flush.upload_observer = observer.uploads
        server = StatusServer(
            socket_path(self.settings.store.path), lambda: observer.live().to_json()
        )
        started = [
            tasks.create_task(server.serve(), name="status-socket"),
            tasks.create_task(observer.sample_forever(), name="observe-rates"),
        ]
        metrics = self.settings.metrics
        if metrics.listen is not None or metrics.textfile is not None:
            # Imported only when configured: prometheus-client costs ~2 MiB of RSS.
            from gateway.ops.metrics import MetricsExporter

            self.metrics = MetricsExporter(metrics, observer)
            started.append(tasks.create_task(self.metrics.run(), name="metrics"))
        return started

    # ------------------------------------------------------------------ systemd

    def _service_monitor(self) -> ServiceMonitor:
        """WATCHDOG=1 only while both loops live, and STATUS= for `systemctl status`.

        Ingest may idle for hours without messages, so it is watched from outside: stalled
        when messages wait and no commit (or refused attempt) completes for
        INGEST_STALL_BUDGET_S. The flush loop beats its own heartbeat.
        """
        ingest, flush = self.ingest, self.flush
        assert ingest is not None and flush is not None
        ingest_watch = ProgressWatch(
            busy=lambda: ingest.held_messages > 0,
            progress=lambda: ingest.stats.commits + ingest.stats.held_commits,
            budget_s=INGEST_STALL_BUDGET_S,
        )
        return ServiceMonitor(
            self.notifier,
            {"ingest": ingest_watch.stalled_s, "flush": flush.heartbeat.stalled_s},
            self._status_with_quota,
        )

    def _status_now(self) -> str:
        assert self.store is not None and self.ingest is not None and self.flush is not None
        return status_line(
            cloud_online=self.flush.uplink.online,
            mqtt_connected=self.ingest.connected.is_set(),
            backlog=self.store.pending_points,
            held_for_clock=self._held_for_clock(),
        )

    def _held_for_clock(self) -> int | None:
        """Readings waiting for the clock, while it is not trusted (`STATUS=` says so)."""
        if self.store is None or self.clock.trusted:
            return None
        return self.store.provisional_points

    def clock_report(self) -> dict[str, Any] | None:
        """The clock and what waits for it, for `status` and the metrics."""
        return None if self.timekeeper is None else self.timekeeper.report()

    async def _status_with_quota(self) -> str:
        """The one-line summary: the cloud link, the backlog and the age of its oldest
        reading, today's quota of the busiest device (two index reads, every few seconds)."""
        assert self.store is not None and self.ingest is not None and self.flush is not None
        cloud = self.settings.cloud
        now_ms = self._clock_ms()
        day = DailyQuota(cloud.daily_points_limit, cloud.day_timezone).day_of(now_ms)
        heads = await self.store.stream_heads()
        oldest_ms = min((head.oldest_ts_ms for head in heads), default=None)
        used_today = [points for points, _ in (await self.store.quota_day(day)).values()]
        return status_line(
            cloud_online=self.flush.uplink.online,
            mqtt_connected=self.ingest.connected.is_set(),
            backlog=self.store.pending_points,
            oldest_age_s=None if oldest_ms is None else (now_ms - oldest_ms) / 1000,
            quota_used=max(used_today, default=None),
            quota_limit=cloud.daily_points_limit,
            held_for_clock=self._held_for_clock(),
        )

    async def _shutdown(
        self, ingest_task: asyncio.Task[None], flush_task: asyncio.Task[None]
    ) -> None:
        assert self.ingest is not None and self.flush is not None
        log.info("gateway_stopping", buffered=self.store.pending_points if self.store else None)
        await self.ingest.stop()
        ingest_task.cancel()
        self.flush.stop()
        budget_s = self.settings.flush.shutdown_flush_s
        deadline = time.monotonic() + budget_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget_s):
                await asyncio.shield(flush_task)
        if not flush_task.done():
            flush_task.cancel()
        await self.flush.final_flush(max(0.0, deadline - time.monotonic()))


async def run_until_signalled(settings: Settings, config_path: Path | None = None) -> int:
    """`blynk-gateway run`: first SIGTERM/SIGINT stops gracefully, a second exits at once;
    SIGHUP reloads the configuration file."""
    gateway = Gateway(
        settings, notifier=ServiceNotifier.from_environment(), config_path=config_path
    )
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("signal_received", signal=signal.Signals(signum).name, action="stopping")
            gateway.request_stop()
        else:
            log.warning("signal_received", signal=signal.Signals(signum).name, action="exit_now")
            os._exit(1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, gateway.request_reload)
    await gateway.run()
    return 0
