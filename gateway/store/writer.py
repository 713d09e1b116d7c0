"""The store writer: moves heartbeats and journaled signals into the store without blocking intake.

Heartbeats from the routing core's heartbeat lane wait in a bounded in-memory buffer and go to
the store in batches (by size, or after a short interval). When the buffer is full, because
the store is down or slower than intake, its oldest heartbeats are spooled to the journal's
`store_spool` table instead of being dropped, and are written once the store keeps up again.
Heartbeats are dropped, and counted, only when the spool is full too or the journal fails.

Non-heartbeat signals are already durable in the journal's `signals` table. They are copied to
the store in rowid order, and the cursor in `store_cursor` advances only after the store
confirmed a batch, so an outage or a restart never skips one.

Every batch carries a batch id, which the store records in the same transaction as the rows.
A batch keeps its id across retries and through the spool. So a retry whose first attempt
committed does not write rows twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import msgspec
import uuid_utils
from prometheus_client import CollectorRegistry, Counter, Gauge

from drivers.base import Heartbeat
from gateway.backoff import Backoff
from gateway.intake import decode_signal
from gateway.journal import Journal, JournalError
from gateway.signal import Signal, utc_now
from gateway.store.base import Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

CURSOR_NAME = "signals"
# Minimum seconds between two warnings about spooled or dropped heartbeats.
WARNING_INTERVAL_S = 60.0
# Seconds after a recovery during which a new failure is logged only if it lasts this long.
FLAP_WINDOW_S = 10.0

_spool_encoder = msgspec.msgpack.Encoder()
_spool_decoder = msgspec.msgpack.Decoder(list[Heartbeat])


class StoreMetrics:
    """Prometheus metrics of the store writer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.rows_written = Counter("gateway_store_rows_written", "Rows the store confirmed as new", ["kind"], registry=r)
        self.batches = Counter("gateway_store_batches", "Batches the store confirmed", ["kind"], registry=r)
        self.failures = Counter(
            "gateway_store_failures", "Failed store requests, by reason: unavailable or rejected", ["kind", "reason"], registry=r
        )
        self.spooled = Counter("gateway_store_heartbeats_spooled", "Heartbeats spooled to the journal because the buffer was full", registry=r)
        self.dropped = Counter(
            "gateway_store_heartbeats_dropped", "Heartbeats lost: spool_full, journal_error, rejected or corrupt_spool", ["reason"], registry=r
        )
        self.signals_skipped = Counter(
            "gateway_store_signals_skipped", "Journaled signals the store rejected or that could not be decoded, kept only in the journal", ["reason"], registry=r
        )
        self.buffer_depth = Gauge("gateway_store_buffer_depth", "Heartbeats waiting in memory for the store", registry=r)
        self.spool_depth = Gauge("gateway_store_spool_depth", "Heartbeats waiting in the journal spool", registry=r)
        self.lag = Gauge("gateway_store_lag_seconds", "Age of the oldest heartbeat or signal not yet in the store", ["kind"], registry=r)
        self.up = Gauge("gateway_store_up", "1 while the store accepts requests, 0 during an outage", registry=r)


@dataclasses.dataclass(frozen=True)
class _Batch:
    batch_id: str
    rows: list[Heartbeat]


def _new_batch_id() -> str:
    return f"hb-{uuid_utils.uuid7()}"


class _Outage:
    """Logs the start and the end of a store outage once each, however many retries it takes.

    A failure within FLAP_WINDOW_S of a recovery is logged only once it has lasted that long,
    so a connection that flaps while the database restarts does not log an outage per flap.
    """

    def __init__(self, metrics: StoreMetrics) -> None:
        self._metrics = metrics
        self.started: float | None = None
        self.logged = False
        self.failures = 0
        self.recovered_at = -FLAP_WINDOW_S
        self.ended = asyncio.Event()

    def failed(self, kind: str, error: StoreUnavailable) -> None:
        now = time.monotonic()
        self.failures += 1
        if self.started is None:
            self.started = now
            self.logged = False
            self.ended = asyncio.Event()
            self._metrics.up.set(0)
        if self.logged:
            return
        if self.started - self.recovered_at < FLAP_WINDOW_S and now - self.started < FLAP_WINDOW_S:
            return
        self.logged = True
        log.warning(
            "store unavailable (first failed request: %s): %s. Heartbeats wait in memory and in the journal spool, "
            "signals in the journal. Retrying with backoff.",
            kind,
            error,
        )

    def recovered(self) -> None:
        self._metrics.up.set(1)
        if self.started is None:
            return
        now = time.monotonic()
        if self.logged:
            log.info("store available again after %.1f s and %d failed attempts", now - self.started, self.failures)
        self.recovered_at = now
        self.started = None
        self.failures = 0
        self.ended.set()


def _spool_insert(batch: _Batch) -> Callable[[sqlite3.Connection], None]:
    body = _spool_encoder.encode(batch.rows)
    # Rows are in arrival order, so the first is the oldest, near enough for the lag gauge.
    oldest = batch.rows[0].received_at.timestamp()
    values = (batch.batch_id, len(batch.rows), oldest, time.time(), body)

    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO store_spool (batch_id, rows, oldest_at, spooled_at, body) VALUES (?, ?, ?, ?, ?)", values
        )

    return write


def _spool_delete(spool_id: int) -> Callable[[sqlite3.Connection], None]:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM store_spool WHERE id = ?", (spool_id,))

    return write


def _cursor_advance(rowid: int) -> Callable[[sqlite3.Connection], None]:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            """INSERT INTO store_cursor (name, last_rowid) VALUES (?, ?)
               ON CONFLICT (name) DO UPDATE SET last_rowid = excluded.last_rowid""",
            (CURSOR_NAME, rowid),
        )

    return write


class StoreWriter:
    """Feeds the store from the heartbeat lane and the journal, as the module docstring describes.

    Wire `offer_heartbeats` to `Router.on_heartbeats`, run `run()` as a supervised task, and
    after cancelling it call `close()` before the journal closes.
    """

    def __init__(
        self,
        store: Store,
        journal: Journal,
        metrics_registry: CollectorRegistry,
        *,
        batch_size: int = 5000,
        flush_interval_s: float = 0.2,
        heartbeat_writers: int = 2,
        buffer_limit: int = 100_000,
        spool_limit: int = 5_000_000,
        signal_batch_size: int = 1000,
        signal_poll_s: float = 0.5,
        retention: dt.timedelta | None = None,
        retention_interval_s: float = 3600.0,
        backoff_initial_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        migrate_on_start: bool = True,
    ) -> None:
        if batch_size < 1 or signal_batch_size < 1:
            raise ValueError(f"batch sizes must be at least 1, got {batch_size} and {signal_batch_size}")
        if buffer_limit < batch_size:
            raise ValueError(f"buffer_limit {buffer_limit} must be at least batch_size {batch_size}")
        if heartbeat_writers < 1:
            raise ValueError(f"heartbeat_writers must be at least 1, got {heartbeat_writers}")
        self._store = store
        self._journal = journal
        self.metrics = StoreMetrics(metrics_registry)
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._heartbeat_writers = heartbeat_writers
        self._buffer_limit = buffer_limit
        self._spool_limit = spool_limit
        self._signal_batch_size = signal_batch_size
        self._signal_poll_s = signal_poll_s
        self._retention = retention
        self._retention_interval_s = retention_interval_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_cap_s = backoff_cap_s
        self._migrate_on_start = migrate_on_start
        self._migrated = False

        self._buffer: deque[Heartbeat] = deque()
        # When the buffer's current rows started waiting (monotonic seconds), for the flush interval.
        self._waiting_since = 0.0
        # Batches being written, by batch id. Each keeps its id until the store confirms it.
        self._inflight: dict[str, _Batch] = {}
        # Batches whose write a cancelled or crashed run() left unconfirmed, written first by the next run().
        self._retry: deque[_Batch] = deque()
        self._spool_lock = asyncio.Lock()
        # Rowid of the last journal signal the store confirmed, as stored in `store_cursor`.
        self._signal_cursor = 0
        self._spool_committed = 0
        self._spool_pending = 0
        self._spool_writes: set[asyncio.Future[None]] = set()
        self._spooled_since_warning = 0
        self._last_warning = -WARNING_INTERVAL_S
        self._dropped_since_error = 0
        self._last_drop_error = -WARNING_INTERVAL_S
        self._heartbeats_arrived = asyncio.Event()
        self._batch_full = asyncio.Event()
        self._signals_arrived = asyncio.Event()
        self._outage = _Outage(self.metrics)

    @property
    def buffered(self) -> int:
        """Heartbeats in memory, including the batches being written."""
        unconfirmed = [*self._inflight.values(), *self._retry]
        return len(self._buffer) + sum(len(batch.rows) for batch in unconfirmed)

    @property
    def spooled(self) -> int:
        """Heartbeats in the journal spool, including spool writes not yet committed."""
        return self._spool_committed + self._spool_pending

    def offer_heartbeats(self, batch: Sequence[Heartbeat]) -> None:
        """Queue a batch of heartbeats for the store without awaiting anything, also during an outage."""
        if not batch:
            return
        if not self._buffer:
            self._waiting_since = time.monotonic()
        self._buffer.extend(batch)
        while len(self._buffer) > self._buffer_limit:
            self._spool(self._take_batch(), overflow=True)
        self._heartbeats_arrived.set()
        if len(self._buffer) >= self._batch_size:
            self._batch_full.set()
        self.metrics.buffer_depth.set(len(self._buffer))

    def notify_signal(self, signal: Signal | None = None) -> None:
        """Wake the signal copier now instead of at its next poll. It also works as a `Router.on_alarm` listener."""
        self._signals_arrived.set()

    def _take_batch(self) -> _Batch:
        count = min(self._batch_size, len(self._buffer))
        batch = _Batch(_new_batch_id(), [self._buffer.popleft() for _ in range(count)])
        # The rows left behind get a full flush interval, so that they do not leave as a tiny batch at once.
        self._waiting_since = time.monotonic()
        self.metrics.buffer_depth.set(len(self._buffer))
        return batch

    def _spool(self, batch: _Batch, *, overflow: bool = False) -> None:
        """Queue the batch for the journal's spool table, or drop and count it when that cannot be done."""
        rows = len(batch.rows)
        if self.spooled + rows > self._spool_limit:
            self._drop(batch, "spool_full", f"the spool holds {self.spooled} of at most {self._spool_limit} heartbeats")
            return
        try:
            future = self._journal.submit(_spool_insert(batch))
        except JournalError as error:
            self._drop(batch, "journal_error", str(error))
            return
        self._spool_pending += rows
        self._spool_writes.add(future)
        future.add_done_callback(functools.partial(self._after_spool_write, batch, overflow))
        self._update_spool_gauge()

    def _after_spool_write(self, batch: _Batch, overflow: bool, future: asyncio.Future[None]) -> None:
        self._spool_writes.discard(future)
        rows = len(batch.rows)
        self._spool_pending -= rows
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            self._drop(batch, "journal_error", f"spool write failed: {error or 'cancelled'}")
        else:
            self._spool_committed += rows
            self.metrics.spooled.inc(rows)
            if overflow:
                self._spooled_since_warning += rows
                self._warn_about_overflow()
            self._heartbeats_arrived.set()
        self._update_spool_gauge()

    def _drop(self, batch: _Batch, reason: str, detail: str) -> None:
        """Count dropped heartbeats, and log them at most once per WARNING_INTERVAL_S with the count since the last log."""
        self.metrics.dropped.labels(reason).inc(len(batch.rows))
        self._dropped_since_error += len(batch.rows)
        now = time.monotonic()
        if now - self._last_drop_error < WARNING_INTERVAL_S:
            return
        self._last_drop_error = now
        log.error(
            "dropped %d heartbeats since the last report, most recently batch %s (%s): %s",
            self._dropped_since_error,
            batch.batch_id,
            reason,
            detail,
        )
        self._dropped_since_error = 0

    def _warn_about_overflow(self) -> None:
        now = time.monotonic()
        if now - self._last_warning < WARNING_INTERVAL_S:
            return
        self._last_warning = now
        log.warning(
            "heartbeat buffer overflowed its limit of %d: spooled %d heartbeats to the journal since the last warning, %d in the spool",
            self._buffer_limit,
            self._spooled_since_warning,
            self.spooled,
        )
        self._spooled_since_warning = 0

    def _update_spool_gauge(self) -> None:
        self.metrics.spool_depth.set(self.spooled)

    async def run(self) -> None:
        """Migrate the store if asked, then write heartbeats, drain the spool and copy signals until cancelled."""
        if self._migrate_on_start and not self._migrated:
            applied = await self._retrying("migrate", self._new_backoff(), self._store.migrate)
            if applied:
                log.info("store migrated: %s", ", ".join(applied))
            self._migrated = True
        self._retry.extend(self._inflight.values())
        self._inflight.clear()
        self._spool_committed = self._count_spooled()
        self._update_spool_gauge()
        async with asyncio.TaskGroup() as group:
            for _ in range(self._heartbeat_writers):
                group.create_task(self._heartbeat_loop())
            group.create_task(self._signal_loop())
            group.create_task(self._retention_loop())

    async def close(self) -> None:
        """Spool the heartbeats still in memory to the journal and wait for those writes.

        Call it after `run()` was cancelled and before the journal closes. The next `run()`
        writes them to the store.
        """
        for batch in [*self._retry, *self._inflight.values()]:
            self._spool(batch)
        self._retry.clear()
        self._inflight.clear()
        while self._buffer:
            self._spool(self._take_batch())
        self.metrics.buffer_depth.set(0)
        if self._spool_writes:
            await asyncio.gather(*list(self._spool_writes), return_exceptions=True)

    def _new_backoff(self) -> Backoff:
        return Backoff(initial=self._backoff_initial_s, cap=self._backoff_cap_s)

    async def _retrying(self, kind: str, backoff: Backoff, call: Callable[[], Awaitable[T]]) -> T:
        """Await `call()` until it succeeds, retrying StoreUnavailable with backoff. StoreError is raised."""
        while True:
            try:
                result = await call()
            except StoreUnavailable as error:
                self.metrics.failures.labels(kind, "unavailable").inc()
                self._outage.failed(kind, error)
                self._refresh_lag()
                await self._sleep_unless_recovered(backoff.next_delay())
                continue
            except StoreError:
                self.metrics.failures.labels(kind, "rejected").inc()
                self._outage.recovered()
                backoff.reset()
                raise
            self._outage.recovered()
            backoff.reset()
            return result

    async def _sleep_unless_recovered(self, delay: float) -> None:
        """Sleep `delay` seconds, but wake as soon as another loop saw the store recover."""
        ended = self._outage.ended
        if ended.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await ended.wait()

    async def _heartbeat_loop(self) -> None:
        """Write batches from the buffer. The loop that has the spool lock also drains the spool."""
        backoff = self._new_backoff()
        while True:
            batch = await self._next_batch()
            if batch is not None:
                self._inflight[batch.batch_id] = batch
                await self._write_heartbeats(batch, backoff)
                del self._inflight[batch.batch_id]
            elif not self._spool_lock.locked():
                async with self._spool_lock:
                    await self._drain_spool_head(backoff)
            self._refresh_lag()

    async def _next_batch(self) -> _Batch | None:
        """Return the next batch to write, or None when the spool should be drained.

        A batch leaves the buffer when it is full or its rows waited the flush interval.
        """
        if self._retry:
            return self._retry.popleft()
        while True:
            if len(self._buffer) >= self._batch_size:
                return self._take_batch()
            if self._buffer:
                waited = time.monotonic() - self._waiting_since
                if waited >= self._flush_interval_s:
                    return self._take_batch()
                event, timeout = self._batch_full, self._flush_interval_s - waited
            elif not self._spool_lock.locked() and self._spool_head_exists():
                return None
            else:
                event, timeout = self._heartbeats_arrived, None
            event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await event.wait()

    async def _write_heartbeats(self, batch: _Batch, backoff: Backoff) -> None:
        write = functools.partial(self._store.write_heartbeats, batch.rows, batch.batch_id)
        try:
            written = await self._retrying("heartbeats", backoff, write)
        except StoreError as error:
            self._drop(batch, "rejected", f"the store rejected the batch: {error}")
            return
        self.metrics.batches.labels("heartbeats").inc()
        self.metrics.rows_written.labels("heartbeats").inc(written)

    def _spool_head_exists(self) -> bool:
        return self._journal.reader.execute("SELECT 1 FROM store_spool LIMIT 1").fetchone() is not None

    def _count_spooled(self) -> int:
        return int(self._journal.reader.execute("SELECT coalesce(sum(rows), 0) FROM store_spool").fetchone()[0])

    async def _drain_spool_head(self, backoff: Backoff) -> None:
        """Write the oldest spooled batch to the store under its own batch id, then delete it from the spool."""
        head = self._journal.reader.execute(
            "SELECT id, batch_id, rows, body FROM store_spool ORDER BY id LIMIT 1"
        ).fetchone()
        if head is None:
            # Re-synchronise: counts read at start-up may include writes whose callbacks ran later.
            self._spool_committed = 0
            self._update_spool_gauge()
            return
        spool_id, batch_id, rows, body = head
        try:
            batch = _Batch(batch_id, _spool_decoder.decode(body))
        except msgspec.DecodeError as error:
            log.error("spooled heartbeat batch %s (%d rows) cannot be decoded and is dropped: %s", batch_id, rows, error)
            self.metrics.dropped.labels("corrupt_spool").inc(rows)
        else:
            await self._write_heartbeats(batch, backoff)
        await self._journal.submit(_spool_delete(spool_id))
        self._spool_committed = max(0, self._spool_committed - rows)
        self._update_spool_gauge()

    async def _signal_loop(self) -> None:
        backoff = self._new_backoff()
        self._signal_cursor = self._load_cursor()
        while True:
            rows = self._journal.reader.execute(
                "SELECT rowid, body FROM signals WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (self._signal_cursor, self._signal_batch_size),
            ).fetchall()
            if not rows:
                self.metrics.lag.labels("signals").set(0)
                self._signal_cursor = self._check_rowid_reset(self._signal_cursor)
                await self._wait_for_signals()
                continue
            signals = self._decode_signals(rows)
            if signals:
                await self._write_signals(signals, backoff)
            await self._journal.submit(_cursor_advance(rows[-1][0]))
            self._signal_cursor = rows[-1][0]
            self._refresh_signal_lag()

    def _load_cursor(self) -> int:
        row = self._journal.reader.execute("SELECT last_rowid FROM store_cursor WHERE name = ?", (CURSOR_NAME,)).fetchone()
        return int(row[0]) if row else 0

    def _check_rowid_reset(self, cursor: int) -> int:
        """Start over if the journal's rowids restarted below the cursor, which happens after every signal was deleted.

        Copying again is safe because the store skips signal ids it already holds.
        """
        newest = self._journal.reader.execute("SELECT max(rowid) FROM signals").fetchone()[0]
        if newest is not None and newest < cursor:
            log.warning("journal signal rowids restarted (newest %d, cursor %d), so copying signals from the start", newest, cursor)
            return 0
        return cursor

    async def _wait_for_signals(self) -> None:
        self._signals_arrived.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._signal_poll_s):
                await self._signals_arrived.wait()

    def _decode_signals(self, rows: list[tuple[int, bytes]]) -> list[Signal]:
        signals: list[Signal] = []
        for rowid, body in rows:
            try:
                signals.append(decode_signal(body))
            except msgspec.DecodeError as error:
                self.metrics.signals_skipped.labels("undecodable").inc()
                log.error("journal signal at rowid %d cannot be decoded and is not copied to the store: %s", rowid, error)
        return signals

    async def _write_signals(self, signals: list[Signal], backoff: Backoff) -> None:
        batch_id = f"journal-signals:{signals[0].id}:{signals[-1].id}:{len(signals)}"
        write = functools.partial(self._store.write_signals, signals, batch_id)
        try:
            written = await self._retrying("signals", backoff, write)
        except StoreError as error:
            log.warning("store rejected a batch of %d signals (%s), so writing them one by one", len(signals), error)
            written = await self._write_signals_singly(signals, backoff)
        self.metrics.batches.labels("signals").inc()
        self.metrics.rows_written.labels("signals").inc(written)

    async def _write_signals_singly(self, signals: list[Signal], backoff: Backoff) -> int:
        """Write each signal alone, so one that the store rejects does not hold back the others."""
        written = 0
        for signal in signals:
            write = functools.partial(self._store.write_signals, [signal], f"journal-signal:{signal.id}")
            try:
                written += await self._retrying("signals", backoff, write)
            except StoreError as error:
                self.metrics.signals_skipped.labels("rejected").inc()
                log.error(
                    "store rejected signal %s from device %s, which stays in the journal only: %s", signal.id, signal.device_id, error
                )
        return written

    def _refresh_lag(self) -> None:
        """Set both lag gauges: from the oldest heartbeat in flight, in memory or spooled, and the oldest uncopied signal."""
        self._refresh_signal_lag()
        oldest = [batch.rows[0].received_at.timestamp() for batch in [*self._inflight.values(), *self._retry]]
        if self._buffer:
            oldest.append(self._buffer[0].received_at.timestamp())
        head = self._journal.reader.execute("SELECT oldest_at FROM store_spool ORDER BY id LIMIT 1").fetchone()
        if head is not None:
            oldest.append(head[0])
        self.metrics.lag.labels("heartbeats").set(max(0.0, time.time() - min(oldest)) if oldest else 0.0)

    def _refresh_signal_lag(self) -> None:
        row = self._journal.reader.execute(
            "SELECT received_at FROM signals WHERE rowid > ? ORDER BY rowid LIMIT 1", (self._signal_cursor,)
        ).fetchone()
        self.metrics.lag.labels("signals").set(max(0.0, time.time() - row[0]) if row else 0.0)

    async def _retention_loop(self) -> None:
        if self._retention is None:
            return
        while True:
            try:
                await self._store.apply_retention(utc_now(), self._retention)
            except StoreUnavailable as error:
                # The heartbeat and signal loops report the outage, and retention waits for its next turn.
                log.debug("retention skipped, store unavailable: %s", error)
            except StoreError as error:
                log.error("retention failed: %s. Next attempt in %.0f s.", error, self._retention_interval_s)
            await asyncio.sleep(self._retention_interval_s)
