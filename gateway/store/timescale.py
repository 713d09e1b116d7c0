"""The store on PostgreSQL with TimescaleDB: `heartbeats` and `signals` are hypertables.

Heartbeats are written with binary COPY. Retention depends on the TimescaleDB edition:
Apache-licensed builds (what Linux distributions ship) have no retention policies, so
`apply_retention` drops old chunks itself. On other editions `migrate` adds a retention
policy and `apply_retention` leaves the data to it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

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

# Key of the session advisory lock that serializes `migrate` across gateway processes.
MIGRATION_LOCK_KEY = 0x70CCC5702E
HYPERTABLES = ("heartbeats", "signals")
# Pool names tell the log filter of each store which pool's records are its own.
_pool_numbers = itertools.count(1)

_HEARTBEAT_COLUMNS = (
    "received_at, device_id, source, panel_time, boot, seq, mains, battery_v, rssi, link, panel, fw, uptime_s"
)
_HEARTBEAT_TYPES = [
    "timestamptz", "text", "text", "timestamptz", "int8", "int8", "bool", "float8", "int4", "text", "text", "text", "int8",
]
_SIGNAL_INSERT = """
    INSERT INTO signals (received_at, id, source, device_id, facility_id, event_class, code, qualifier, sia_code,
                         group_number, zone, zone_label, text, panel_time, seq, boot, test, body, raw)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT DO NOTHING
"""
_RECORD_COLUMNS = "h.device_id, h.received_at, h.mains, h.battery_v, h.rssi, h.link, h.panel"
# The newest row per device with one index probe per device. A plain DISTINCT ON would read every row.
_LAST_HEARTBEATS_OF = f"""
    SELECT {_RECORD_COLUMNS}
    FROM unnest(%s::text[]) AS d(device_id)
    CROSS JOIN LATERAL (
        SELECT * FROM heartbeats WHERE heartbeats.device_id = d.device_id ORDER BY received_at DESC LIMIT 1
    ) AS h
    ORDER BY h.device_id
"""
# The distinct device ids by a loose index scan (one probe per device), then as above.
_LAST_HEARTBEATS_ALL = f"""
    WITH RECURSIVE devices(device_id) AS (
        (SELECT device_id FROM heartbeats ORDER BY device_id LIMIT 1)
        UNION ALL
        SELECT (SELECT heartbeats.device_id FROM heartbeats
                WHERE heartbeats.device_id > devices.device_id ORDER BY heartbeats.device_id LIMIT 1)
        FROM devices WHERE devices.device_id IS NOT NULL
    )
    SELECT {_RECORD_COLUMNS}
    FROM devices
    CROSS JOIN LATERAL (
        SELECT * FROM heartbeats WHERE heartbeats.device_id = devices.device_id ORDER BY received_at DESC LIMIT 1
    ) AS h
    WHERE devices.device_id IS NOT NULL
    ORDER BY h.device_id
"""


def _text(value: str | None) -> str | None:
    """Replace NUL characters, which PostgreSQL text cannot contain. The signal body keeps the original."""
    if value is not None and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _heartbeat_row(heartbeat: Heartbeat) -> tuple[Any, ...]:
    return (
        heartbeat.received_at,
        heartbeat.device_id,
        heartbeat.source.value,
        heartbeat.panel_time,
        heartbeat.boot,
        heartbeat.seq,
        heartbeat.mains,
        heartbeat.battery_v,
        heartbeat.rssi,
        _text(heartbeat.link),
        _text(heartbeat.panel),
        _text(heartbeat.fw),
        heartbeat.uptime_s,
    )


def _signal_row(signal: Signal) -> tuple[Any, ...]:
    return (
        signal.received_at,
        signal.id,
        signal.source.value,
        signal.device_id,
        signal.facility_id,
        signal.event_class.value,
        _text(signal.code),
        signal.qualifier.value,
        _text(signal.sia_code),
        signal.group,
        signal.zone,
        _text(signal.zone_label),
        _text(signal.text),
        signal.panel_time,
        signal.seq,
        signal.boot,
        signal.test,
        encode_signal(signal),
        signal.raw,
    )


def _record(row: TupleRow) -> HeartbeatRecord:
    device_id, received_at, mains, battery_v, rssi, link, panel = row
    return HeartbeatRecord(
        device_id=device_id,
        received_at=received_at.astimezone(dt.timezone.utc),
        mains=mains,
        battery_v=battery_v,
        rssi=rssi,
        link=link,
        panel=panel,
    )


class _PoolLogFilter(logging.Filter):
    """Keep the pool's per-attempt connection warnings out of the log.

    The store writer logs the start and end of an outage once, whereas the pool would log
    every reconnection attempt. The last message is kept to explain a PoolTimeout, whose own
    text does not say why no connection could be made.
    """

    def __init__(self, pool_name: str) -> None:
        super().__init__()
        self.pool_name = pool_name
        self.last_error = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not isinstance(record.args, tuple) or not record.args:
            return True
        if record.args[0] != self.pool_name:
            return True
        if record.msg.startswith("error connecting in"):
            self.last_error = str(record.args[1]) if len(record.args) > 1 else record.getMessage()
            return False
        return not record.msg.startswith("reconnection attempt in pool")


class TimescaleStore:
    """The store in PostgreSQL with the timescaledb extension, through a psycopg connection pool."""

    def __init__(
        self,
        url: str,
        *,
        retention: dt.timedelta = DEFAULT_RETENTION,
        heartbeat_interval: HeartbeatIntervalLookup | None = None,
        max_connections: int = 4,
        connect_timeout_s: float = 5.0,
        acquire_timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self.retention = retention
        self._heartbeat_interval = heartbeat_interval
        self._max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._acquire_timeout_s = acquire_timeout_s
        self._pool: AsyncConnectionPool | None = None
        self._log_filter = _PoolLogFilter(f"gateway-store-{next(_pool_numbers)}")

    @property
    def _connect_kwargs(self) -> dict[str, Any]:
        # Keepalives let a connection to a host that vanished fail within about 25 s.
        return {
            "connect_timeout": max(1, round(self._connect_timeout_s)),
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "application_name": "pccc-gateway-store",
        }

    async def start(self) -> None:
        if self._pool is not None:
            return
        pool_logger = logging.getLogger("psycopg.pool")
        # psycopg_pool 3.3 logs every connection checkout at INFO, so quieten it unless a level was set.
        if pool_logger.level == logging.NOTSET:
            pool_logger.setLevel(logging.WARNING)
        pool_logger.addFilter(self._log_filter)
        self._pool = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self._max_connections,
            name=self._log_filter.pool_name,
            kwargs=self._connect_kwargs,
            check=AsyncConnectionPool.check_connection,
            timeout=self._acquire_timeout_s,
            reconnect_timeout=max(10.0, self._acquire_timeout_s * 2),
            open=False,
        )
        # Not waiting: a database that is down at start-up must not stop the gateway.
        await self._pool.open(wait=False)

    async def close(self) -> None:
        if self._pool is None:
            return
        await self._pool.close()
        self._pool = None
        logging.getLogger("psycopg.pool").removeFilter(self._log_filter)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[TupleRow]]:
        """Lend a pooled connection, translating psycopg's errors into StoreUnavailable or StoreError."""
        if self._pool is None:
            raise StoreError("the TimescaleDB store is not started; call start() first")
        try:
            async with self._pool.connection() as conn:
                yield conn
            # A stale cause must not explain a later timeout that has another reason.
            self._log_filter.last_error = ""
        except PoolTimeout as error:
            cause = self._log_filter.last_error or str(error)
            raise StoreUnavailable(f"no database connection within {self._acquire_timeout_s:g} s: {cause}") from error
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            raise StoreUnavailable(f"database connection failed: {error}") from error
        except psycopg.Error as error:
            raise StoreError(f"database rejected the request: {error}") from error
        except (TypeError, ValueError, OverflowError) as error:
            # A value that cannot become a row, such as a naive datetime: retrying would fail the same way.
            raise StoreError(f"invalid value in the request: {error}") from error

    async def migrate(self) -> list[str]:
        """Apply pending migrations under an advisory lock, then set up retention policies where supported."""
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, **self._connect_kwargs)
        except psycopg.OperationalError as error:
            raise StoreUnavailable(f"cannot connect to the database to migrate it: {error}") from error
        try:
            async with conn:
                return await self._migrate(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            raise StoreUnavailable(f"database connection failed during migration: {error}") from error
        except psycopg.Error as error:
            raise StoreError(f"migration failed: {error}") from error

    async def _migrate(self, conn: psycopg.AsyncConnection[TupleRow]) -> list[str]:
        await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    integer PRIMARY KEY,
                       name       text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now()
                   )"""
            )
            cursor = await conn.execute("SELECT version FROM schema_migrations")
            done = {version for (version,) in await cursor.fetchall()}
            applied: list[str] = []
            for migration in load_migrations("timescale"):
                if migration.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (migration.version, migration.name)
                    )
                log.info("applied migration %s", migration.name)
                applied.append(migration.name)
            await self._add_retention_policies(conn)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))

    async def _add_retention_policies(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        if await self._license(conn) == "apache":
            return
        # NOTE: if_not_exists keeps an existing policy, so a changed retention takes effect only
        # after `SELECT remove_retention_policy('heartbeats')` (and 'signals'). The tests run the
        # Apache-only build, so they never reach this branch.
        for table in HYPERTABLES:
            await conn.execute(
                "SELECT add_retention_policy(%s::regclass, drop_after => %s::interval, if_not_exists => true)",
                (table, self.retention),
            )

    @staticmethod
    async def _license(conn: psycopg.AsyncConnection[TupleRow]) -> str:
        cursor = await conn.execute("SHOW timescaledb.license")
        row = await cursor.fetchone()
        return str(row[0]) if row else ""

    async def license(self) -> str:
        """Return `SHOW timescaledb.license`: 'apache' for Apache-only builds, 'timescale' otherwise."""
        async with self._connection() as conn:
            return await self._license(conn)

    async def write_heartbeats(self, batch: Sequence[Heartbeat], batch_id: str) -> int:
        if not batch:
            return 0
        async with self._connection() as conn, conn.transaction():
            if not await self._claim_batch(conn, batch_id, "heartbeats", len(batch)):
                return 0
            async with conn.cursor().copy(f"COPY heartbeats ({_HEARTBEAT_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_HEARTBEAT_TYPES)
                for heartbeat in batch:
                    await copy.write_row(_heartbeat_row(heartbeat))
        return len(batch)

    async def write_signals(self, batch: Sequence[Signal], batch_id: str) -> int:
        if not batch:
            return 0
        async with self._connection() as conn, conn.transaction():
            if not await self._claim_batch(conn, batch_id, "signals", len(batch)):
                return 0
            async with conn.cursor() as cursor:
                await cursor.executemany(_SIGNAL_INSERT, [_signal_row(signal) for signal in batch])
                return max(cursor.rowcount, 0)

    @staticmethod
    async def _claim_batch(conn: psycopg.AsyncConnection[TupleRow], batch_id: str, kind: str, rows: int) -> bool:
        """Record the batch id in the current transaction, or return False if it was recorded before."""
        cursor = await conn.execute(
            "INSERT INTO ingest_batches (batch_id, kind, rows) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (batch_id, kind, rows),
        )
        return cursor.rowcount == 1

    async def last_heartbeats(self, device_ids: Sequence[str] | None = None) -> list[HeartbeatRecord]:
        async with self._connection() as conn:
            if device_ids is None:
                cursor = await conn.execute(_LAST_HEARTBEATS_ALL)
            else:
                cursor = await conn.execute(_LAST_HEARTBEATS_OF, (list(device_ids),))
            return [_record(row) for row in await cursor.fetchall()]

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
        async with self._connection() as conn:
            cursor = await conn.execute(
                """SELECT (time_bucket(INTERVAL '1 day', received_at, %(tz)s::text) AT TIME ZONE %(tz)s::text)::date AS day, count(*)
                   FROM heartbeats
                   WHERE device_id = %(device_id)s AND received_at >= %(start)s AND received_at < %(end)s
                   GROUP BY day""",
                {"tz": tz, "device_id": device_id, "start": start, "end": end},
            )
            counts = {day: count for day, count in await cursor.fetchall()}
        return daily_availability(counts, start, end, interval, zone)

    async def signals_for_facility(
        self, facility_id: str, start: dt.datetime, end: dt.datetime, limit: int = 1000
    ) -> list[Signal]:
        check_range(start, end)
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        async with self._connection() as conn:
            cursor = await conn.execute(
                """SELECT body FROM signals
                   WHERE facility_id = %s AND received_at >= %s AND received_at < %s
                   ORDER BY received_at DESC, id DESC
                   LIMIT %s""",
                (facility_id, start, end, limit),
            )
            return [decode_signal(body) for (body,) in await cursor.fetchall()]

    async def apply_retention(self, now: dt.datetime, keep: dt.timedelta) -> int:
        """Drop chunks older than `now - keep` on Apache-only builds and return how many were dropped.

        On other editions the retention policies added by `migrate` drop chunks, and this
        returns 0. Both forget batch ids older than BATCH_ID_RETENTION.
        """
        require_aware("now", now)
        if keep <= dt.timedelta(0):
            raise ValueError(f"keep must be positive, got {keep}")
        dropped = 0
        async with self._connection() as conn:
            if await self._license(conn) == "apache":
                for table in HYPERTABLES:
                    cursor = await conn.execute(
                        "SELECT drop_chunks(%s::regclass, older_than => %s::timestamptz)", (table, now - keep)
                    )
                    dropped += len(await cursor.fetchall())
            await conn.execute("DELETE FROM ingest_batches WHERE written_at < %s", (now - BATCH_ID_RETENTION,))
        if dropped:
            log.info("retention dropped %d chunks older than %s", dropped, (now - keep).isoformat())
        return dropped
