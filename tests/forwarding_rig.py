"""The forwarder in the test's own event loop: a real journal, incident engine and links.

Alarms enter through the incident engine, so the outbox rows are the ones the daemon writes.
The links deliver them over real HTTP to simulators on 127.0.0.1. Troubles that the forwarder
emits are collected in `troubles`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway import journal as journal_module
from gateway import registry
from gateway.destinations import Destination
from gateway.forwarder import BREAKER_THRESHOLD, ClientFactory, Forwarder, aiohttp_client
from gateway.incidents import IncidentEngine
from gateway.journal import Journal
from gateway.metrics import Metrics
from gateway.signal import EventClass, Qualifier, Signal, Source, new_signal_id
from tests.conftest import SECRET

FACILITIES = [
    registry.Facility(id=f"HN-{index:04d}", name=f"Cơ sở {index}", province="Hà Nội", commune="Phường Tây Hồ")
    for index in range(1, 5)
]


class FakeClock:
    """Wall-clock seconds shifted by `offset`, so a test can jump past the 100 s limit."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return dt.datetime.now(dt.timezone.utc).timestamp() + self.offset


class TroubleLog:
    """Collects emitted trouble signals and lets a test wait for a condition on them."""

    def __init__(self) -> None:
        self.signals: list[Signal] = []
        self._changed = asyncio.Event()

    def __call__(self, signal: Signal) -> None:
        self.signals.append(signal)
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[list[Signal]], bool], timeout: float) -> list[Signal]:
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.signals):
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"trouble condition still false after {timeout} s; emitted: {self.signals}") from None
        return list(self.signals)


def destination(name: str, url: str, **fields: object) -> Destination:
    settings: dict[str, object] = {"secret": SECRET, "timeout_s": 5.0, **fields}
    return Destination(name=name, url=url, **settings)


class ForwardingRig:
    def __init__(
        self,
        directory: Path,
        destinations: Sequence[Destination],
        *,
        clock: Callable[[], float] | None = None,
        confirm_limit_s: float = 100.0,
        client_factory: ClientFactory = aiohttp_client,
        breaker_threshold: int = BREAKER_THRESHOLD,
    ) -> None:
        self.directory = directory
        self.destinations = list(destinations)
        self.clock = clock or FakeClock()
        self.confirm_limit_s = confirm_limit_s
        self.client_factory = client_factory
        self.breaker_threshold = breaker_threshold
        self.troubles = TroubleLog()
        self.metrics = Metrics()
        self.journal = Journal(directory / "journal.db", synchronous="NORMAL")
        self.engine: IncidentEngine | None = None
        self.forwarder: Forwarder | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.journal.start()
        await self.journal.write(_register_facilities)
        cache = registry.RegistryCache(self.journal.reader)
        cache.load()
        self.engine = IncidentEngine(cache, self.destinations)
        self.engine.load(self.journal.reader)
        self.start_forwarder()

    def start_forwarder(self) -> None:
        """Start a fresh forwarder, as a gateway restart would."""
        self.forwarder = Forwarder(
            self.destinations,
            self.journal,
            self.metrics,
            self.troubles,
            confirm_limit_s=self.confirm_limit_s,
            clock=self.clock,
            client_factory=self.client_factory,
            breaker_threshold=self.breaker_threshold,
        )
        self._tasks = [asyncio.create_task(link.run()) for link in self.forwarder.links.values()]

    async def stop_forwarder(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def stop(self) -> None:
        await self.stop_forwarder()
        await self.journal.close()

    async def alarm(
        self,
        facility_id: str,
        *,
        code: str = "110",
        event_class: EventClass = EventClass.FIRE,
        zone: int = 1,
        qualifier: Qualifier = Qualifier.NEW,
        signal_id: str | None = None,
    ) -> Signal:
        """Route one signal from `facility_id`'s panel and wake the forwarder; return the signal."""
        assert self.engine is not None and self.forwarder is not None
        signal = Signal(
            id=signal_id or new_signal_id(),
            source=Source.MQTT,
            device_id=f"DEV-{facility_id}",
            facility_id=facility_id,
            event_class=event_class,
            code=code,
            qualifier=qualifier,
            zone=zone,
            received_at=dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc),
        )
        await self.journal.write(self.engine.route(signal))
        self.forwarder.wake()
        return signal

    def outbox(self, event_id: str, destination: str) -> dict:
        row = self.journal.reader.execute(
            """SELECT state, attempts, first_attempt_at, delivered_at, last_error FROM outbox
               WHERE event_id = ? AND destination = ?""",
            (event_id, destination),
        ).fetchone()
        assert row is not None, f"no outbox row for event {event_id} to {destination}"
        return dict(zip(("state", "attempts", "first_attempt_at", "delivered_at", "last_error"), row))

    def query(self, sql: str, *parameters: object) -> list[tuple]:
        return self.journal.reader.execute(sql, parameters).fetchall()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float, condition: str) -> None:
        """Poll journal state every 50 ms; the journal has no change notification to wait on."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise TimeoutError(f"{condition} not reached within {timeout} s") from None


def _register_facilities(conn: sqlite3.Connection) -> None:
    for facility in FACILITIES:
        registry.add_facility(conn, facility, {1: "Tầng 1", 2: "Kho"})
        registry.add_device(conn, registry.make_device(id=f"DEV-{facility.id}", facility_id=facility.id))


def journal_connection(path: Path) -> sqlite3.Connection:
    """A read-only connection to a journal another process writes."""
    return journal_module.connect(path, readonly=True)
