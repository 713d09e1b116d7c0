"""Benchmark: heartbeat rows per second into TimescaleDB through the store, against a bare COPY.

Starts its own throwaway TimescaleDB cluster (tests/timescale_server.py), then writes the
same heartbeats three ways, each into an empty table with the same columns and indexes:

- bare: one binary COPY of prepared tuples over a plain psycopg connection;
- store: `TimescaleStore.write_heartbeats` in batches, each with its batch-id bookkeeping;
- writer: `StoreWriter`, from `offer_heartbeats` until the store confirmed every row.

Budget on a 2-core machine: at least 100,000 rows/s through the store, and at least half
of the bare COPY's rate measured in the same run.

    .venv/bin/python bench/store_ingest.py [--rows 500000] [--devices 100000] [--batch 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.base import Heartbeat  # noqa: E402
from gateway.journal import Journal  # noqa: E402
from gateway.signal import Source  # noqa: E402
from gateway.store.timescale import TimescaleStore  # noqa: E402
from gateway.store.writer import StoreWriter  # noqa: E402
from tests.timescale_server import timescale_cluster  # noqa: E402

MAX_ROWS = 2_000_000
MAX_ROUNDS = 10
RUN_TIMEOUT_S = 300.0
BARE_TABLE = "heartbeats_bare"
COLUMNS = "received_at, device_id, source, panel_time, boot, seq, mains, battery_v, rssi, link, panel, fw, uptime_s"
TYPES = ["timestamptz", "text", "text", "timestamptz", "int8", "int8", "bool", "float8", "int4", "text", "text", "text", "int8"]


def make_heartbeats(rows: int, devices: int) -> list[Heartbeat]:
    """Build heartbeats as the heartbeat lane delivers them: one per device per round, 1 ms apart."""
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(milliseconds=rows)
    return [
        Heartbeat(
            device_id=f"DEV-{index % devices:06d}",
            source=Source.MQTT,
            received_at=start + dt.timedelta(milliseconds=index),
            panel_time=start + dt.timedelta(milliseconds=index - 1500),
            boot=3,
            seq=index // devices,
            mains=index % 97 != 0,
            battery_v=12.0 + (index % 20) / 10,
            rssi=-50 - index % 40,
            link="4g",
            panel="normal",
            fw="2.1.0",
            uptime_s=86_400 + index // devices * 60,
        )
        for index in range(rows)
    ]


def as_row(heartbeat: Heartbeat) -> tuple:
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
        heartbeat.link,
        heartbeat.panel,
        heartbeat.fw,
        heartbeat.uptime_s,
    )


async def prepare(conn: psycopg.AsyncConnection) -> None:
    """Create the bare table as a copy of `heartbeats`: same columns, same index, same chunk interval."""
    await conn.execute(f"CREATE TABLE {BARE_TABLE} (LIKE heartbeats INCLUDING ALL)")
    await conn.execute(
        f"SELECT create_hypertable('{BARE_TABLE}', by_range('received_at', INTERVAL '1 day'), create_default_indexes => false)"
    )


async def reset(conn: psycopg.AsyncConnection) -> None:
    """Empty every table and checkpoint, so that each run starts from the same state."""
    await conn.execute(f"TRUNCATE heartbeats, {BARE_TABLE}, ingest_batches")
    await conn.execute("CHECKPOINT")


async def check_rows(conn: psycopg.AsyncConnection, table: str, expected: int) -> None:
    """Raise SystemExit unless `table` has exactly `expected` rows."""
    cursor = await conn.execute(f"SELECT count(*) FROM {table}")
    row = await cursor.fetchone()
    stored = int(row[0]) if row else 0
    if stored != expected:
        raise SystemExit(f"{table} has {stored} rows after the run instead of {expected}")


async def run_bare(url: str, rows: list[tuple]) -> float:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        started = time.perf_counter()
        async with conn.cursor().copy(f"COPY {BARE_TABLE} ({COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(TYPES)
            for row in rows:
                await copy.write_row(row)
        await conn.commit()
        return time.perf_counter() - started


async def run_store(store: TimescaleStore, heartbeats: list[Heartbeat], batch: int) -> float:
    started = time.perf_counter()
    for number, offset in enumerate(range(0, len(heartbeats), batch)):
        await store.write_heartbeats(heartbeats[offset : offset + batch], f"bench-{number}")
    return time.perf_counter() - started


async def run_writer(store: TimescaleStore, heartbeats: list[Heartbeat], batch: int, data_dir: Path) -> float:
    """Offer every heartbeat to a fresh StoreWriter and return the seconds until the store confirmed them all."""
    journal = Journal(data_dir / "journal.db", synchronous="NORMAL")
    await journal.start()
    registry = CollectorRegistry()
    # The buffer takes the whole run, so the figure measures the store path and not the spool.
    writer = StoreWriter(store, journal, registry, batch_size=batch, buffer_limit=len(heartbeats), migrate_on_start=False)
    task = asyncio.create_task(writer.run())
    try:
        started = time.perf_counter()
        for offset in range(0, len(heartbeats), 1000):
            writer.offer_heartbeats(heartbeats[offset : offset + 1000])
        deadline = started + RUN_TIMEOUT_S
        while (registry.get_sample_value("gateway_store_rows_written_total", {"kind": "heartbeats"}) or 0) < len(heartbeats):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the store writer did not write {len(heartbeats)} rows within {RUN_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.01)
        return time.perf_counter() - started
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await writer.close()
        await journal.close()


async def bench(url: str, args: argparse.Namespace, data_dir: Path) -> None:
    heartbeats = make_heartbeats(args.rows, args.devices)
    tuples = [as_row(heartbeat) for heartbeat in heartbeats]
    store = TimescaleStore(url)
    await store.start()
    await store.migrate()
    seconds: dict[str, list[float]] = {"bare": [], "store": [], "writer": []}
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
            await prepare(admin)
            # Interleaved rounds, so that a burst of load from elsewhere hits every path alike.
            for round_number in range(args.rounds):
                await reset(admin)
                seconds["bare"].append(await run_bare(url, tuples))
                await check_rows(admin, BARE_TABLE, args.rows)

                await reset(admin)
                seconds["store"].append(await run_store(store, heartbeats, args.batch))
                await check_rows(admin, "heartbeats", args.rows)

                await reset(admin)
                seconds["writer"].append(await run_writer(store, heartbeats, args.batch, data_dir / f"round-{round_number}"))
                await check_rows(admin, "heartbeats", args.rows)
    finally:
        await store.close()

    rates = {name: args.rows / statistics.median(values) for name, values in seconds.items()}
    print(f"rows per run                     {args.rows:,} from {args.devices:,} devices, store batches of {args.batch:,}")
    print(f"rounds                           {args.rounds}, median rate of each path shown")
    print(f"bare binary COPY                 {rates['bare']:,.0f} rows/s")
    print(f"TimescaleStore.write_heartbeats  {rates['store']:,.0f} rows/s   ratio to bare {rates['store'] / rates['bare']:.2f}")
    print(f"StoreWriter, offer to confirmed  {rates['writer']:,.0f} rows/s   ratio to bare {rates['writer'] / rates['bare']:.2f}")
    print("budget                           >= 100,000 rows/s through the store and a ratio >= 0.50")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000, help=f"heartbeat rows per run, at most {MAX_ROWS:,}")
    parser.add_argument("--devices", type=int, default=100_000, help="distinct device ids")
    parser.add_argument("--batch", type=int, default=5000, help="rows per store batch")
    parser.add_argument("--rounds", type=int, default=3, help=f"measurements of each path, at most {MAX_ROUNDS}")
    args = parser.parse_args()
    if not 1 <= args.rows <= MAX_ROWS:
        parser.error(f"--rows must be between 1 and {MAX_ROWS:,}")
    if not 1 <= args.rounds <= MAX_ROUNDS:
        parser.error(f"--rounds must be between 1 and {MAX_ROUNDS}")
    if args.devices < 1 or args.batch < 1:
        parser.error("--devices and --batch must be at least 1")

    with tempfile.TemporaryDirectory(prefix="store-bench-") as scratch:
        with timescale_cluster(scratch) as url:
            asyncio.run(bench(url, args, Path(scratch)))


if __name__ == "__main__":
    main()
