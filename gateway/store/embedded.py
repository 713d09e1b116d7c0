"""The embedded store: a SQLite file beside the journal, for a site without a database server.

`store.db` is separate from the journal, so store writes never hold up the journal's group
commit. One dedicated thread owns the connection and runs every query, and the event loop
only awaits it. Retention deletes old rows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from drivers.base import Heartbeat
from gateway.intake import decode_signal, encode_signal
from gateway.signal import Signal
from gateway.store.base import (
    BATCH_ID_RETENTION,
    DEFAULT_RETENTION,
    HeartbeatIntervalLookup,
    HeartbeatRecord,
    StoreError,
    StoreUnavailable,
    check_range,
    daily_availability,
    expected_interval,
    load_migrations,
    require_aware,
    zone_info,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_MICROSECOND = dt.timedelta(microseconds=1)
# SQLite allows 32,766 host parameters per statement since 3.32, so chunks stay well below.
_IN_CHUNK = 500
# Rows deleted per retention transaction.
_DELETE_CHUNK = 20_000

_HEARTBEAT_INSERT = """
    INSERT INTO heartbeats (received_at, device_id, source, panel_time, boot, seq, mains, battery_v, rssi, link, panel, fw, uptime_s)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_SIGNAL_INSERT = """
    INSERT OR IGNORE INTO signals (id, received_at, source, device_id, facility_id, event_class, code, qualifier, sia_code,
                                   group_number, zone, zone_label, text, panel_time, seq, boot, test, body, raw)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# SQLite takes the other columns from the row with max(received_at).
_LAST_HEARTBEATS = """
    SELECT device_id, max(received_at), mains, battery_v, rssi, link, panel
    FROM heartbeats {where}
    GROUP BY device_id
    ORDER BY device_id
"""


def to_us(value: dt.datetime) -> int:
    """Return microseconds since the Unix epoch, exactly."""
    return (value - _EPOCH) // _MICROSECOND


def from_us(value: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=value)


def _optional_us(value: dt.datetime | None) -> int | None:
    return None if value is None else to_us(value)


def _heartbeat_row(heartbeat: Heartbeat) -> tuple[Any, ...]:
    return (
        to_us(heartbeat.received_at),
        heartbeat.device_id,
        heartbeat.source.value,
        _optional_us(heartbeat.panel_time),
        heartbeat.boot,
        heartbeat.seq,
        heartbeat.mains,
        heartbeat.battery_v,
        heartbeat.rssi,
        heartbeat.link,
        heartbeat.panel,
        heartbeat.fw,
        heartbeat.uptime_s,
    )


def _signal_row(signal: Signal) -> tuple[Any, ...]:
    return (
        signal.id,
        to_us(signal.received_at),
        signal.source.value,
        signal.device_id,
        signal.facility_id,
        signal.event_class.value,
        signal.code,
        signal.qualifier.value,
        signal.sia_code,
        signal.group,
        signal.zone,
        signal.zone_label,
        signal.text,
        _optional_us(signal.panel_time),
        signal.seq,
        signal.boot,
        signal.test,
        encode_signal(signal),
        signal.raw,
    )


def _record(row: tuple[Any, ...]) -> HeartbeatRecord:
    device_id, received_at, mains, battery_v, rssi, link, panel = row
    return HeartbeatRecord(
        device_id=device_id,
        received_at=from_us(received_at),
        mains=None if mains is None else bool(mains),
        battery_v=battery_v,
        rssi=rssi,
        link=link,
        panel=panel,
    )


def _rows(convert: Callable[[R], tuple[Any, ...]], batch: Sequence[R]) -> list[tuple[Any, ...]]:
    """Convert a batch to rows, raising StoreError for a value that cannot be stored, such as a naive datetime."""
    try:
        return [convert(item) for item in batch]
    except (TypeError, ValueError, OverflowError) as error:
        raise StoreError(f"invalid value in the batch: {error}") from error


def _translate(error: sqlite3.Error) -> StoreError:
    """Classify a SQLite error: a locked or failing disk may recover, anything else will not."""
    message = str(error)
    if isinstance(error, sqlite3.OperationalError) and not message.startswith(("no such table", "no such column")):
        return StoreUnavailable(f"embedded store write failed: {message}")
    return StoreError(f"embedded store rejected the request: {message}")


class EmbeddedStore:
    """The store in a local SQLite file, used when no database URL is configured."""

    def __init__(
        self,
        path: Path,
        *,
        retention: dt.timedelta = DEFAULT_RETENTION,
        heartbeat_interval: HeartbeatIntervalLookup | None = None,
    ) -> None:
        self.path = path
        self.retention = retention
        self._heartbeat_interval = heartbeat_interval
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def start(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-sqlite")
        await self._run(lambda conn: None)

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._run(self._close_connection, connect=False)
        self._executor.shutdown(wait=True)
        self._executor = None

    def _close_connection(self, conn: sqlite3.Connection | None) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connect(self) -> sqlite3.Connection:
        """Open the database on the store thread, the only thread that uses the connection."""
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: once the writer has advanced the journal cursor, a confirmed batch must survive power loss.
            conn.execute("PRAGMA synchronous = FULL")
            self._conn = conn
        return self._conn

    async def _run(self, work: Callable[..., T], *, connect: bool = True) -> T:
        if self._executor is None:
            raise StoreError("the embedded store is not started; call start() first")

        def call() -> T:
            conn = self._connect() if connect else self._conn
            return work(conn)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except sqlite3.Error as error:
            raise _translate(error) from error

    async def migrate(self) -> list[str]:
        return await self._run(self._migrate)

    def _migrate(self, conn: sqlite3.Connection) -> list[str]:
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    INTEGER PRIMARY KEY,
                   name       TEXT NOT NULL,
                   applied_at REAL NOT NULL
               )"""
        )
        done = {version for (version,) in conn.execute("SELECT version FROM schema_migrations")}
        applied: list[str] = []
        for migration in load_migrations("embedded"):
            if migration.version in done:
                continue
            # executescript commits any open transaction first, so BEGIN and COMMIT go inside the script.
            try:
                conn.executescript(f"BEGIN IMMEDIATE;\n{migration.sql}\n;")
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )
                conn.execute("COMMIT")
            except sqlite3.Error:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            log.info("applied migration %s to %s", migration.name, self.path)
            applied.append(migration.name)
        return applied

    async def write_heartbeats(self, batch: Sequence[Heartbeat], batch_id: str) -> int:
        if not batch:
            return 0
        rows = _rows(_heartbeat_row, batch)
        return await self._run(functools.partial(self._write, "heartbeats", _HEARTBEAT_INSERT, rows, batch_id))

    async def write_signals(self, batch: Sequence[Signal], batch_id: str) -> int:
        if not batch:
            return 0
        rows = _rows(_signal_row, batch)
        return await self._run(functools.partial(self._write, "signals", _SIGNAL_INSERT, rows, batch_id))

    @staticmethod
    def _write(kind: str, statement: str, rows: list[tuple[Any, ...]], batch_id: str, conn: sqlite3.Connection) -> int:
        """Insert the rows and record the batch id in one transaction, or return 0 for a known batch id."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            claimed = conn.execute(
                "INSERT OR IGNORE INTO ingest_batches (batch_id, kind, rows, written_at) VALUES (?, ?, ?, ?)",
                (batch_id, kind, len(rows), to_us(dt.datetime.now(dt.timezone.utc))),
            )
            if claimed.rowcount == 0:
                conn.execute("ROLLBACK")
                return 0
            written = conn.executemany(statement, rows).rowcount
            conn.execute("COMMIT")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return written

    async def last_heartbeats(self, device_ids: Sequence[str] | None = None) -> list[HeartbeatRecord]:
        ids = None if device_ids is None else sorted(set(device_ids))

        def query(conn: sqlite3.Connection) -> list[HeartbeatRecord]:
            if ids is None:
                return [_record(row) for row in conn.execute(_LAST_HEARTBEATS.format(where=""))]
            records: list[HeartbeatRecord] = []
            for offset in range(0, len(ids), _IN_CHUNK):
                chunk = ids[offset : offset + _IN_CHUNK]
                where = f"WHERE device_id IN ({', '.join('?' * len(chunk))})"
                records.extend(_record(row) for row in conn.execute(_LAST_HEARTBEATS.format(where=where), chunk))
            return records

        return await self._run(query)

    async def availability(
        self,
        device_id: str,
        start: dt.datetime,
        end: dt.datetime,
        interval_s: float | None = None,
        tz: str = "UTC",
    ) -> list[tuple[dt.date, float]]:
        check_range(start, end)
        zone = zone_info(tz)
        interval = expected_interval(device_id, interval_s, self._heartbeat_interval)

        def query(conn: sqlite3.Connection) -> dict[dt.date, int]:
            counts: dict[dt.date, int] = {}
            rows = conn.execute(
                "SELECT received_at FROM heartbeats WHERE device_id = ? AND received_at >= ? AND received_at < ?",
                (device_id, to_us(start), to_us(end)),
            )
            for (received_at,) in rows:
                day = from_us(received_at).astimezone(zone).date()
                counts[day] = counts.get(day, 0) + 1
            return counts

        counts = await self._run(query)
        return daily_availability(counts, start, end, interval, zone)

    async def signals_for_facility(
        self, facility_id: str, start: dt.datetime, end: dt.datetime, limit: int = 1000
    ) -> list[Signal]:
        check_range(start, end)
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")

        def query(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(
                """SELECT body FROM signals
                   WHERE facility_id = ? AND received_at >= ? AND received_at < ?
                   ORDER BY received_at DESC, id DESC
                   LIMIT ?""",
                (facility_id, to_us(start), to_us(end), limit),
            )
            return [body for (body,) in rows]

        return [decode_signal(body) for body in await self._run(query)]

    async def apply_retention(self, now: dt.datetime, keep: dt.timedelta) -> int:
        """Delete heartbeats and signals received before `now - keep` and return the number of rows deleted.

        Rows go in chunks, each in its own transaction, so that store writes queued meanwhile
        wait for one chunk, not for the whole deletion.
        """
        require_aware("now", now)
        if keep <= dt.timedelta(0):
            raise ValueError(f"keep must be positive, got {keep}")
        cutoff = to_us(now - keep)
        deleted = 0
        for table in ("heartbeats", "signals"):
            while chunk := await self._run(functools.partial(self._delete_chunk, table, cutoff)):
                deleted += chunk
        batch_cutoff = to_us(now - BATCH_ID_RETENTION)
        await self._run(lambda conn: conn.execute("DELETE FROM ingest_batches WHERE written_at < ?", (batch_cutoff,)))
        if deleted:
            log.info("retention deleted %d rows older than %s from %s", deleted, (now - keep).isoformat(), self.path)
        return deleted

    @staticmethod
    def _delete_chunk(table: str, cutoff: int, conn: sqlite3.Connection) -> int:
        return conn.execute(
            f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE received_at < ? LIMIT ?)",
            (cutoff, _DELETE_CHUNK),
        ).rowcount
