"""Outage tests of the store writer against a real TimescaleDB cluster that is stopped and restarted.

Heartbeats and journaled signals keep arriving while the database is down. Intake must not
wait for the store, and after the restart every heartbeat and signal must be stored once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgspec
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from drivers.base import Heartbeat
from gateway.intake import encode_signal
from gateway.journal import Journal
from gateway.signal import EventClass, Qualifier, Signal, Source, new_signal_id
from gateway.store import TimescaleStore
from gateway.store.writer import StoreWriter
from tests.timescale_server import TimescaleCluster, timescale_cluster_handle

pytestmark = pytest.mark.timescaledb

WAIT_S = 60.0
TICK_S = 0.01
HEARTBEATS_PER_TICK = 100
DEVICES = 500
# A synchronous call that takes this long would stall every driver on the event loop.
MAX_OFFER_S = 0.05
# Alarm journaling must stay as fast as without a store. The limit is generous for a loaded CI machine.
MAX_JOURNAL_COMMIT_S = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TimescaleCluster]:
    with timescale_cluster_handle(tmp_path_factory.mktemp("timescale")) as handle:
        yield handle


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    journal = Journal(tmp_path / "journal.db", synchronous="NORMAL")
    await journal.start()
    try:
        yield journal
    finally:
        await journal.close()


@pytest.fixture
async def store(cluster: TimescaleCluster) -> AsyncIterator[TimescaleStore]:
    store = TimescaleStore(cluster.url, connect_timeout_s=1.0, acquire_timeout_s=1.0)
    await store.start()
    await store.migrate()
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        conn.execute("TRUNCATE heartbeats, signals, ingest_batches")
    try:
        yield store
    finally:
        await store.close()


def make_writer(store: TimescaleStore, journal: Journal, **overrides: object) -> tuple[StoreWriter, CollectorRegistry]:
    settings: dict[str, object] = {
        "batch_size": 500,
        "flush_interval_s": 0.05,
        "buffer_limit": 1000,
        "signal_batch_size": 50,
        "signal_poll_s": 0.1,
        "backoff_initial_s": 0.1,
        "backoff_cap_s": 0.5,
    }
    settings.update(overrides)
    registry = CollectorRegistry()
    return StoreWriter(store, journal, registry, **settings), registry  # type: ignore[arg-type]


def journal_insert(signal: Signal) -> Callable[[sqlite3.Connection], None]:
    """Return a journal operation that stores `signal` as intake does."""
    row = (
        signal.id,
        signal.device_id,
        signal.facility_id,
        signal.event_class.value,
        signal.code,
        signal.qualifier.value,
        signal.zone,
        signal.received_at.timestamp(),
        encode_signal(signal),
    )

    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            """INSERT INTO signals (id, device_id, facility_id, event_class, code, qualifier, zone, received_at, body)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            row,
        )

    return write


class Producer:
    """Offers heartbeats and journals signals at a steady pace, timing every intake call."""

    def __init__(self, writer: StoreWriter, journal: Journal) -> None:
        self.writer = writer
        self.journal = journal
        self.heartbeats = 0
        self.signals = 0
        self.max_offer_s = 0.0
        self.max_commit_s = 0.0
        self.stopped = asyncio.Event()
        self._origin = dt.datetime.now(dt.timezone.utc)

    def next_heartbeat(self) -> Heartbeat:
        index = self.heartbeats
        self.heartbeats += 1
        return Heartbeat(
            device_id=f"DEV-{index % DEVICES:04d}",
            source=Source.MQTT,
            received_at=self._origin + dt.timedelta(microseconds=index),
            seq=index,
            mains=True,
            battery_v=13.0,
            rssi=-60,
            link="eth",
            panel="normal",
        )

    def next_signal(self) -> Signal:
        self.signals += 1
        return Signal(
            id=new_signal_id(),
            source=Source.MQTT,
            device_id=f"DEV-{self.signals % DEVICES:04d}",
            facility_id="HN-0001",
            event_class=EventClass.TROUBLE,
            code="301",
            qualifier=Qualifier.NEW,
            zone=self.signals % 100,
            received_at=dt.datetime.now(dt.timezone.utc),
            seq=self.signals,
        )

    async def run(self) -> None:
        while not self.stopped.is_set():
            batch = [self.next_heartbeat() for _ in range(HEARTBEATS_PER_TICK)]
            started = time.perf_counter()
            self.writer.offer_heartbeats(batch)
            self.max_offer_s = max(self.max_offer_s, time.perf_counter() - started)

            started = time.perf_counter()
            await self.journal.submit(journal_insert(self.next_signal()))
            self.max_commit_s = max(self.max_commit_s, time.perf_counter() - started)
            await asyncio.sleep(TICK_S)


async def wait_for(condition: Callable[[], bool], description: str, timeout: float = WAIT_S) -> None:
    """Poll `condition` until it is true, and fail the test naming `description` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {description}")
        await asyncio.sleep(0.05)


def stored_counts(url: str) -> tuple[int, int, int, int]:
    """Return (heartbeat rows, distinct heartbeat keys, signal rows, distinct signal ids)."""
    with psycopg.connect(url, connect_timeout=5) as conn:
        heartbeats, heartbeat_keys = conn.execute(
            "SELECT count(*), count(DISTINCT (device_id, received_at)) FROM heartbeats"
        ).fetchone()
        signals, signal_ids = conn.execute("SELECT count(*), count(DISTINCT id) FROM signals").fetchone()
    return heartbeats, heartbeat_keys, signals, signal_ids


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def wait_until_stored(cluster: TimescaleCluster, heartbeats: int, signals: int) -> None:
    deadline = time.monotonic() + WAIT_S
    counts = (0, 0, 0, 0)
    while time.monotonic() < deadline:
        counts = await asyncio.to_thread(stored_counts, cluster.url)
        if counts[0] >= heartbeats and counts[2] >= signals:
            return
        await asyncio.sleep(0.2)
    pytest.fail(f"timed out after {WAIT_S:.0f} s: stored {counts}, expected {heartbeats} heartbeats and {signals} signals")


async def stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await asyncio.wait_for(task, timeout=10)
    except asyncio.CancelledError:
        pass


async def test_writer_outage_stores_everything_once(
    cluster: TimescaleCluster, store: TimescaleStore, journal: Journal, caplog: pytest.LogCaptureFixture
):
    """Test that a database outage neither blocks intake nor loses or repeats heartbeats and signals."""
    caplog.set_level(logging.INFO, logger="gateway.store.writer")
    writer, registry = make_writer(store, journal)
    run_task = asyncio.create_task(writer.run())
    producer = Producer(writer, journal)
    producer_task = asyncio.create_task(producer.run())
    cluster_down = False
    try:
        await wait_for(
            lambda: metric(registry, "gateway_store_rows_written_total", kind="heartbeats") > 0
            and metric(registry, "gateway_store_rows_written_total", kind="signals") > 0,
            "the first heartbeats and signals in the store",
        )

        await asyncio.to_thread(cluster.stop)
        cluster_down = True
        outage_started = producer.heartbeats
        spooled_before = metric(registry, "gateway_store_heartbeats_spooled_total")
        await wait_for(
            lambda: metric(registry, "gateway_store_failures_total", kind="heartbeats", reason="unavailable") > 0,
            "a heartbeat write to fail during the outage",
        )
        await wait_for(
            lambda: metric(registry, "gateway_store_heartbeats_spooled_total") > spooled_before,
            "heartbeats spooled during the outage",
        )
        await wait_for(lambda: producer.heartbeats - outage_started >= 5000, "5,000 heartbeats offered during the outage")
        await asyncio.to_thread(cluster.start)
        cluster_down = False
        restarted = producer.heartbeats
        await wait_for(lambda: producer.heartbeats - restarted >= 2000, "2,000 heartbeats offered after the restart")
        producer.stopped.set()
        await asyncio.wait_for(producer_task, timeout=10)

        await wait_until_stored(cluster, producer.heartbeats, producer.signals)
        await wait_for(lambda: writer.buffered == 0 and writer.spooled == 0, "the writer's buffer and spool to empty")
        heartbeats, heartbeat_keys, signals, signal_ids = await asyncio.to_thread(stored_counts, cluster.url)
    finally:
        producer.stopped.set()
        await stop_task(producer_task)
        await stop_task(run_task)
        await writer.close()
        # A failure during the outage must not leave the cluster down for the next tests.
        if cluster_down:
            await asyncio.to_thread(cluster.start)

    assert heartbeats == producer.heartbeats
    assert heartbeat_keys == producer.heartbeats
    assert signals == producer.signals
    assert signal_ids == producer.signals
    assert metric(registry, "gateway_store_heartbeats_dropped_total", reason="spool_full") == 0
    assert metric(registry, "gateway_store_heartbeats_dropped_total", reason="journal_error") == 0
    assert metric(registry, "gateway_store_failures_total", kind="heartbeats", reason="unavailable") > 0
    assert producer.max_offer_s < MAX_OFFER_S
    assert producer.max_commit_s < MAX_JOURNAL_COMMIT_S
    messages = [record.getMessage() for record in caplog.records if record.name == "gateway.store.writer"]
    assert sum(message.startswith("store unavailable") for message in messages) == 1
    assert sum(message.startswith("store available again") for message in messages) == 1
    cursor = journal.reader.execute("SELECT last_rowid FROM store_cursor WHERE name = 'signals'").fetchone()[0]
    assert cursor == journal.reader.execute("SELECT max(rowid) FROM signals").fetchone()[0]


async def test_writer_close_spools_for_next_run(cluster: TimescaleCluster, store: TimescaleStore, journal: Journal):
    """Test that heartbeats still in memory at close during an outage are spooled and stored by the next run."""
    await asyncio.to_thread(cluster.stop)
    try:
        # No migration at start, so the heartbeat loop takes a batch in flight and fails on it.
        writer, registry = make_writer(store, journal, buffer_limit=5000, batch_size=1000, migrate_on_start=False)
        run_task = asyncio.create_task(writer.run())
        producer = Producer(writer, journal)
        for _ in range(30):
            writer.offer_heartbeats([producer.next_heartbeat() for _ in range(HEARTBEATS_PER_TICK)])
        await wait_for(
            lambda: metric(registry, "gateway_store_failures_total", kind="heartbeats", reason="unavailable") > 0,
            "a failed heartbeat write",
        )
        in_flight = writer.buffered
        await stop_task(run_task)
        await writer.close()
        spooled = journal.reader.execute("SELECT coalesce(sum(rows), 0) FROM store_spool").fetchone()[0]
    finally:
        await asyncio.to_thread(cluster.start)

    next_writer, _ = make_writer(store, journal)
    next_task = asyncio.create_task(next_writer.run())
    try:
        await wait_until_stored(cluster, producer.heartbeats, 0)
        await wait_for(lambda: next_writer.spooled == 0, "the spool to empty")
        heartbeats, heartbeat_keys, _, _ = await asyncio.to_thread(stored_counts, cluster.url)
    finally:
        await stop_task(next_task)
        await next_writer.close()

    assert in_flight == producer.heartbeats
    assert spooled == producer.heartbeats
    assert heartbeats == producer.heartbeats
    assert heartbeat_keys == producer.heartbeats
    assert journal.reader.execute("SELECT count(*) FROM store_spool").fetchone()[0] == 0


async def test_writer_drops_rejected_batch(cluster: TimescaleCluster, store: TimescaleStore, journal: Journal):
    """Test that a batch the store rejects is dropped and counted, and later batches are still written."""
    writer, registry = make_writer(store, journal)
    run_task = asyncio.create_task(writer.run())
    producer = Producer(writer, journal)
    try:
        naive = msgspec.structs.replace(producer.next_heartbeat(), received_at=dt.datetime(2025, 3, 1, 12, 0))
        writer.offer_heartbeats([naive])
        await wait_for(
            lambda: metric(registry, "gateway_store_heartbeats_dropped_total", reason="rejected") == 1,
            "the rejected heartbeat to be counted",
        )
        good = [producer.next_heartbeat() for _ in range(10)]
        writer.offer_heartbeats(good)
        await wait_for(
            lambda: metric(registry, "gateway_store_rows_written_total", kind="heartbeats") == 10,
            "the later heartbeats to be written",
        )
        heartbeats, _, _, _ = await asyncio.to_thread(stored_counts, cluster.url)
        run_ended = run_task.done()
    finally:
        await stop_task(run_task)
        await writer.close()

    assert heartbeats == 10
    assert metric(registry, "gateway_store_failures_total", kind="heartbeats", reason="rejected") == 1
    assert run_ended is False
