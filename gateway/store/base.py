"""The heartbeat and signal store: the contract that every backend implements.

A store keeps the history of device heartbeats and of non-heartbeat signals for queries
(last state per device, availability per day, a facility's signals). It is not the durable
intake record: the SQLite journal is. Writes are exactly-once per batch id, because the
store records each batch id in the same transaction as the batch's rows and skips a batch
id it already holds.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from importlib import resources
from typing import NamedTuple, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from drivers.base import Heartbeat
from gateway.signal import Signal

DEFAULT_RETENTION = dt.timedelta(days=90)

# Batch ids are kept this long, so a batch retried within this time is still recognised.
BATCH_ID_RETENTION = dt.timedelta(days=7)

# Returns a device's expected heartbeat interval in seconds, or None for an unknown device.
HeartbeatIntervalLookup = Callable[[str], float | None]

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class StoreError(Exception):
    """The store rejected a request, and repeating the same request will fail the same way."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or is shutting down, so the same request may succeed later."""


class HeartbeatRecord(msgspec.Struct, kw_only=True, frozen=True):
    """The newest stored heartbeat of one device."""

    device_id: str
    received_at: dt.datetime
    mains: bool | None
    battery_v: float | None
    rssi: int | None
    link: str | None
    panel: str | None


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


class Store(Protocol):
    """Heartbeat and signal history, in TimescaleDB or in an embedded SQLite file."""

    async def start(self) -> None:
        """Prepare connections. A database that is down at this point is not an error."""

    async def close(self) -> None:
        """Release connections and threads."""

    async def migrate(self) -> list[str]:
        """Apply the migrations that are not applied yet, in order, and return their names.

        Applying twice changes nothing and returns an empty list the second time.
        """

    async def write_heartbeats(self, batch: Sequence[Heartbeat], batch_id: str) -> int:
        """Insert the batch and return the number of rows written.

        Returns 0 without writing when `batch_id` was written before, so a retried batch
        whose first attempt committed is not stored twice.
        """

    async def write_signals(self, batch: Sequence[Signal], batch_id: str) -> int:
        """Insert the signals that are not stored yet and return how many were new.

        Returns 0 without writing when `batch_id` was written before.
        """

    async def last_heartbeats(self, device_ids: Sequence[str] | None = None) -> list[HeartbeatRecord]:
        """Return the newest heartbeat of each device, ordered by device id.

        `None` means every device that has a stored heartbeat. Devices without one are left out.
        """

    async def availability(
        self,
        device_id: str,
        start: dt.datetime,
        end: dt.datetime,
        interval_s: float | None = None,
        tz: str = "UTC",
    ) -> list[tuple[dt.date, float]]:
        """Return, for each day of `tz` that overlaps [start, end), the fraction of expected heartbeats received.

        The expected count is the overlap's length divided by `interval_s`, or by the device's
        interval from the store's lookup when `interval_s` is None. Fractions are capped at 1.0.
        """

    async def signals_for_facility(
        self, facility_id: str, start: dt.datetime, end: dt.datetime, limit: int = 1000
    ) -> list[Signal]:
        """Return at most `limit` signals of the facility received in [start, end), newest first."""

    async def apply_retention(self, now: dt.datetime, keep: dt.timedelta) -> int:
        """Delete heartbeats and signals received before `now - keep` and return how many chunks or rows were deleted."""


def require_aware(name: str, value: dt.datetime) -> None:
    """Raise ValueError unless `value` carries a time zone."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {value.isoformat()}")


def check_range(start: dt.datetime, end: dt.datetime) -> None:
    require_aware("start", start)
    require_aware("end", end)
    if end <= start:
        raise ValueError(f"end {end.isoformat()} must be after start {start.isoformat()}")


def zone_info(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ValueError(f"time zone {tz!r} is unknown; use an IANA name such as Asia/Ho_Chi_Minh or UTC") from error


def expected_interval(device_id: str, interval_s: float | None, lookup: HeartbeatIntervalLookup | None) -> float:
    """Return the heartbeat interval to measure availability against, in seconds."""
    if interval_s is None and lookup is not None:
        interval_s = lookup(device_id)
    if interval_s is None:
        raise ValueError(
            f"no heartbeat interval is known for device {device_id!r}; pass interval_s or give the store a lookup"
        )
    if interval_s <= 0:
        raise ValueError(f"heartbeat interval for device {device_id!r} must be positive, got {interval_s}")
    return float(interval_s)


def daily_availability(
    counts: dict[dt.date, int],
    start: dt.datetime,
    end: dt.datetime,
    interval_s: float,
    tz: ZoneInfo,
) -> list[tuple[dt.date, float]]:
    """Turn heartbeat counts per local day into received/expected fractions for every day of [start, end).

    A day that [start, end) covers only partly expects proportionally fewer heartbeats.
    """
    result: list[tuple[dt.date, float]] = []
    day = start.astimezone(tz).date()
    last_day = (end - dt.timedelta(microseconds=1)).astimezone(tz).date()
    while day <= last_day:
        day_start = dt.datetime.combine(day, dt.time(), tzinfo=tz)
        day_end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=tz)
        covered_s = (min(end, day_end) - max(start, day_start)).total_seconds()
        expected = covered_s / interval_s
        received = counts.get(day, 0)
        result.append((day, min(1.0, received / expected) if expected > 0 else 0.0))
        day += dt.timedelta(days=1)
    return result


def load_migrations(folder: str) -> list[Migration]:
    """Read gateway/schema/<folder>/NNNN_name.sql files, ordered by version.

    Raises ValueError for a file name that does not follow the pattern or a repeated version.
    """
    directory = resources.files("gateway.schema").joinpath(folder)
    migrations: dict[int, Migration] = {}
    for item in directory.iterdir():
        if not item.name.endswith(".sql"):
            continue
        match = _MIGRATION_NAME.match(item.name)
        if match is None:
            raise ValueError(f"migration file {folder}/{item.name} must be named NNNN_lowercase_name.sql")
        version = int(match.group(1))
        if version in migrations:
            raise ValueError(f"migrations {migrations[version].name} and {item.name} in {folder} share version {version}")
        migrations[version] = Migration(version, item.name.removesuffix(".sql"), item.read_text(encoding="utf-8"))
    return [migrations[version] for version in sorted(migrations)]
