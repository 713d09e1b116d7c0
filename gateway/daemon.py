"""The gateway daemon: wires intake, routing core, incidents and forwarder, and runs them.

Every long-running loop runs under `supervise`, which restarts it after a crash with capped
backoff, so no single failing driver or destination takes the daemon down.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import signal as os_signal
import time
from collections.abc import Awaitable, Callable

from drivers.mqtt.driver import MqttDriver, MqttEndpoint
from gateway import device_api, incident_api
from gateway.backoff import Backoff
from gateway.config import Config
from gateway.destinations import Destination
from gateway.embedded_broker import EmbeddedBroker
from gateway.forwarder import Forwarder
from gateway.http_status import StatusServer
from gateway.incidents import Decision, IncidentEngine, IncidentState
from gateway.intake import Intake
from gateway.journal import Journal
from gateway.metrics import Metrics
from gateway.registry import RegistryCache
from gateway.router import Router
from gateway.signal import Signal, utc_now
from gateway.store import Store, open_store
from gateway.supervision import Supervisor, SystemClock
from gateway.supervision.restart import note_open_conditions
from gateway.store.writer import StoreWriter

log = logging.getLogger(__name__)

STAGE_TIMEOUT_S = 10.0
SUBSCRIBE_WAIT_S = 10.0


async def supervise(name: str, factory: Callable[[], Awaitable[None]], metrics: Metrics) -> None:
    """Run `factory()` forever; log and restart it with backoff when it raises."""
    backoff = Backoff(initial=0.5, cap=30.0)
    while True:
        started = time.monotonic()
        try:
            await factory()
            log.warning("task %s returned; restarting it", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task %s crashed; restarting it", name)
        metrics.task_restarts.labels(name).inc()
        if time.monotonic() - started > 60:
            backoff.reset()
        await asyncio.sleep(backoff.next_delay())


def destinations_from(config: Config) -> list[Destination]:
    return [
        Destination(
            name=item.name,
            url=item.url,
            scope=item.scope,
            secret=item.secret,
            bearer_token=item.bearer_token,
            timeout_s=item.timeout_s,
            ca_file=item.ca_file,
            client_cert=item.client_cert,
            client_key=item.client_key,
            max_in_flight=item.max_in_flight,
        )
        for item in config.destinations
    ]


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.journal = Journal(config.gateway.data_dir / "journal.db", synchronous=config.gateway.journal_synchronous)
        self.router = Router(self.metrics)
        self.destinations = destinations_from(config)
        self.registry: RegistryCache | None = None
        self.intake: Intake | None = None
        self.engine: IncidentEngine | None = None
        self.forwarder: Forwarder | None = None
        self.mqtt: MqttDriver | None = None
        self.broker: EmbeddedBroker | None = None
        self.status: StatusServer | None = None
        self.store: Store | None = None
        self.supervisor: Supervisor | None = None
        self._background: set[asyncio.Task] = set()
        self.store_writer: StoreWriter | None = None
        self._intake_tasks: list[asyncio.Task] = []
        self._core_tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        await self.journal.start()
        self.registry = RegistryCache(self.journal.reader)
        devices = self.registry.load()
        retention = dt.timedelta(days=self.config.store.retention_days)
        self.store = open_store(self.config.store.url or None, self.config.gateway.data_dir, retention=retention,
                                heartbeat_interval=self._heartbeat_interval)
        await self.store.start()
        self.store_writer = StoreWriter(self.store, self.journal, self.metrics.registry, retention=retention)
        self.router.on_heartbeats(self.store_writer.offer_heartbeats)
        self.router.on_alarm(self.store_writer.notify_signal)

        self.engine = IncidentEngine(self.registry, self.destinations, trouble_holdoff_s=self.config.incidents.trouble_holdoff_s)
        open_incidents = self.engine.load(self.journal.reader)
        self.intake = Intake(self.journal, self.registry, self.router, self.metrics)
        self.forwarder = Forwarder(self.destinations, self.journal, self.metrics, emit_trouble=self._emit_gateway_signal)
        self.router.on_alarm(self._route_alarm)

        # The registry and open incidents live as long as the process: moving them out of the
        # collector's generations keeps full collections from scanning them on the hot path.
        gc.collect()
        gc.freeze()

        self._start_supervision()

        replayed = self.intake.unrouted()
        for signal in replayed:
            self.router.offer_alarm(signal)
        if not self.destinations:
            log.warning(
                "no command-centre destination is configured: alarms are journaled and kept in incidents but forwarded "
                "nowhere; add --forward URL or a [[destinations]] entry"
            )
        log.info(
            "gateway starting: %d devices registered, %d open incidents, %d signals to replay, %d destinations",
            devices,
            open_incidents,
            len(replayed),
            len(self.destinations),
        )

        self.status = StatusServer(
            self.metrics,
            self.health,
            self.config.http.host,
            self.config.http.port,
            extra_routes=self._add_routes,
        )
        await self.status.start()

        mqtt_url = self.config.mqtt.url
        if mqtt_url == "embedded":
            self.broker = EmbeddedBroker(self.config.embedded_broker.host, self.config.embedded_broker.port)
            await self.broker.start()
            mqtt_url = self.broker.url
        endpoint = MqttEndpoint(mqtt_url, username=self.config.mqtt.username, password=self.config.mqtt.password)
        self.mqtt = MqttDriver(
            self.intake,
            endpoint,
            client_id=self.config.mqtt.client_id,
            keepalive_s=self.config.mqtt.keepalive_s,
            shared_group=self.config.mqtt.shared_group,
        )

        self._core_tasks.append(asyncio.create_task(supervise("router", self.router.run, self.metrics)))
        self._core_tasks.append(asyncio.create_task(supervise("store", self.store_writer.run, self.metrics)))
        self._core_tasks.append(asyncio.create_task(supervise("supervision", self._supervision_ticks, self.metrics)))
        for name, link in self.forwarder.links.items():
            self._core_tasks.append(asyncio.create_task(supervise(f"forward:{name}", link.run, self.metrics)))
        self._core_tasks.append(asyncio.create_task(supervise("incident-sweep", self._sweep_incidents, self.metrics)))
        self._intake_tasks.append(asyncio.create_task(supervise("mqtt", self.mqtt.run, self.metrics)))
        await self._await_subscription()
        log.info("gateway running; status on http://%s:%d/healthz", self.config.http.host, self.status.port)

    def _add_routes(self, app) -> None:
        assert self.engine is not None
        assert self.supervisor is not None
        assert self.registry is not None
        incident_api.add_routes(app, self.engine, self.journal, self._after_route)
        device_api.add_routes(app, self.supervisor, self.registry)

    def _start_supervision(self) -> None:
        assert self.registry is not None and self.intake is not None
        self.supervisor = Supervisor(
            SystemClock(),
            self._emit_gateway_signal,
            grace_s=self.config.gateway.startup_grace_s,
            device_lookup=self.registry.device,
        )
        try:
            self.supervisor.load_from_registry(self.registry.devices())
        except ValueError as error:
            # Names every device whose window is shorter than its heartbeat; the rest are supervised.
            log.error("%s", error)
        note_open_conditions(self.supervisor, self.journal.reader)
        self.router.on_alarm(self.supervisor.on_signal)
        self.router.on_heartbeats(self.supervisor.on_heartbeats)
        self.intake.status_listeners.append(self.supervisor.on_status)
        self.intake.link_listeners.append(self.supervisor.on_link)

    def _emit_gateway_signal(self, signal: Signal) -> None:
        """Journal and route a signal the gateway raised (supervision, forwarding trouble); must not raise."""
        assert self.intake is not None
        task = asyncio.get_running_loop().create_task(self.intake.submit_internal(signal))
        self._background.add(task)
        task.add_done_callback(lambda done: self._background_done(done, signal))

    def _background_done(self, task: asyncio.Task, signal: Signal) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("journaling gateway signal %s (%s from %s) failed: %s", signal.id, signal.code, signal.device_id, task.exception())

    async def _supervision_ticks(self) -> None:
        assert self.supervisor is not None
        while True:
            await asyncio.sleep(1.0)
            self.supervisor.tick()

    def _heartbeat_interval(self, device_id: str) -> float | None:
        device = self.registry.device(device_id) if self.registry is not None else None
        return float(device.heartbeat_s) if device is not None else None

    async def _await_subscription(self) -> None:
        """Wait briefly for the broker subscription, so that start() returns ready to receive.

        With the embedded broker this matters most: it has no session from an earlier run, so an
        event published before the gateway subscribes would reach no one.
        """
        assert self.mqtt is not None
        try:
            await asyncio.wait_for(self.mqtt.subscribed.wait(), timeout=SUBSCRIBE_WAIT_S)
        except TimeoutError:
            log.warning("not subscribed to the broker within %.0f s; starting anyway and retrying in the background", SUBSCRIBE_WAIT_S)

    def _route_alarm(self, signal: Signal) -> None:
        assert self.engine is not None
        write = self.engine.route(signal)
        future = self.journal.submit(write)
        future.add_done_callback(self._after_route)

    def _after_route(self, future: asyncio.Future[Decision]) -> None:
        error = future.exception()
        if error is not None:
            log.error("recording a routing decision failed (%s); the signal is replayed at the next start", error)
            return
        decision = future.result()
        if decision.action == "opened":
            log.info("incident %s opened by signal %s", decision.incident_id, decision.signal_id)
        if decision.outbox_count and self.forwarder is not None:
            self.forwarder.wake()

    async def _sweep_incidents(self) -> None:
        """Auto-resolve trouble incidents whose signals all restored, after the hold-off."""
        assert self.engine is not None
        while True:
            await asyncio.sleep(1.0)
            now = utc_now()
            for incident in self.engine.due_auto_resolve(now.timestamp()):
                write = self.engine.change_state(incident.id, IncidentState.RESOLVED, at=now, actor="gateway", outcome="restored")
                self.journal.submit(write).add_done_callback(self._after_route)

    def health(self) -> dict:
        mqtt_up = self.mqtt is not None and self.mqtt.connected.is_set()
        pending = self.journal.reader.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
        problems = []
        if not mqtt_up:
            problems.append("MQTT link is down")
        if not self.destinations:
            problems.append("no command-centre destination configured")
        if self.forwarder is not None:
            for name, link in self.forwarder.links.items():
                if link.breaker.state.value != "closed":
                    problems.append(f"command centre {name} is unreachable; events wait in the outbox")
        return {
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "mqtt": "up" if mqtt_up else "down",
            "alarm_lane": self.router.alarm_depth,
            "heartbeat_lane": self.router.heartbeat_depth,
            "outbox_pending": pending,
            "open_incidents": len(self.engine.open_incidents) if self.engine else 0,
            "destinations": {name: link.breaker.state.value for name, link in self.forwarder.links.items()} if self.forwarder else {},
        }

    async def stop(self) -> None:
        """Shut down in stages, each bounded; a slow stage is named in the log."""
        await self._stage("stop intake", self._cancel(self._intake_tasks))
        await self._stage("drain alarm lane", self._drain_alarms())
        await self._stage("flush journal", self.journal.write(lambda conn: None))
        await self._stage("stop forwarder and core tasks", self._cancel(self._core_tasks))
        if self.store_writer is not None:
            await self._stage("spool store buffer", self.store_writer.close())
        if self.store is not None:
            await self._stage("close store", self.store.close())
        if self.status is not None:
            await self._stage("stop status server", self.status.stop())
        await self._stage("close journal", self.journal.close())
        if self.broker is not None:
            await self._stage("stop embedded broker", self.broker.stop())
        self._stopped.set()
        log.info("gateway stopped")

    async def _drain_alarms(self) -> None:
        self.router.serve_alarms()

    async def _stage(self, name: str, work: Awaitable[object]) -> None:
        started = time.monotonic()
        try:
            await asyncio.wait_for(work, timeout=STAGE_TIMEOUT_S)
        except TimeoutError:
            log.warning("shutdown stage %r did not finish within %.0f s; going on", name, STAGE_TIMEOUT_S)
            return
        log.debug("shutdown stage %r took %.3f s", name, time.monotonic() - started)

    @staticmethod
    async def _cancel(tasks: list[asyncio.Task]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tasks.clear()


async def run_until_signalled(config: Config, on_started: Callable[[Gateway], None] | None = None) -> None:
    """Run the gateway until SIGTERM or SIGINT, then stop it in stages."""
    gateway = Gateway(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (os_signal.SIGTERM, os_signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await gateway.start()
    if on_started is not None:
        on_started(gateway)
    await stop.wait()
    log.info("stop requested; shutting down")
    await gateway.stop()
