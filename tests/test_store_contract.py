"""Contract tests of the heartbeat and signal store, run against both backends with the same assertions.

The TimescaleDB backend runs on one throwaway cluster per module, with a fresh database per
test. The embedded backend gets a fresh SQLite file per test.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from typer.testing import CliRunner

from drivers.base import Heartbeat
from gateway.cli import db as db_cli
from gateway.signal import EventClass, Qualifier, Signal, Source, new_signal_id
from gateway.store import EmbeddedStore, Store, TimescaleStore, open_store
from gateway.store.base import HeartbeatRecord, StoreError, StoreUnavailable
from tests.timescale_server import timescale_cluster

UTC = dt.timezone.utc
DAY0 = dt.datetime(2025, 3, 1, tzinfo=UTC)
INTERVALS_S = {"DEV-001": 600.0}
FIRST_MIGRATION = "0001_heartbeats_signals"


class Target:
    """Where one test's store lives: an embedded SQLite file or a TimescaleDB database URL."""

    def __init__(self, kind: str, location: str) -> None:
        self.kind = kind
        self.location = location

    def open(self) -> Store:
        if self.kind == "embedded":
            return EmbeddedStore(Path(self.location), heartbeat_interval=INTERVALS_S.get)
        return TimescaleStore(self.location, heartbeat_interval=INTERVALS_S.get)

    def count(self, table: str) -> int:
        """Count the rows of `table` behind the store's back."""
        if self.kind == "embedded":
            with closing(sqlite3.connect(self.location)) as conn:
                return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        with psycopg.connect(self.location) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.fixture(scope="module")
def timescale_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with timescale_cluster(tmp_path_factory.mktemp("timescale")) as url:
        yield url


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@pytest.fixture(params=["embedded", pytest.param("timescale", marks=pytest.mark.timescaledb)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    if request.param == "embedded":
        yield Target("embedded", str(tmp_path / "store.db"))
        return
    server_url: str = request.getfixturevalue("timescale_url")
    database = f"store_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    yield Target("timescale", _with_database(server_url, database))
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{database}" WITH (FORCE)')


@pytest.fixture
async def unmigrated_store(target: Target) -> AsyncIterator[Store]:
    store = target.open()
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def store(unmigrated_store: Store) -> Store:
    await unmigrated_store.migrate()
    return unmigrated_store


def heartbeat(device_id: str, received_at: dt.datetime, **fields: object) -> Heartbeat:
    values: dict[str, object] = {"mains": True, "battery_v": 13.1, "rssi": -70, "link": "4g", "panel": "normal"}
    values.update(fields)
    return Heartbeat(device_id=device_id, source=Source.MQTT, received_at=received_at, seq=1, **values)  # type: ignore[arg-type]


def signal(facility_id: str, received_at: dt.datetime, *, zone: int = 1, device_id: str = "DEV-001") -> Signal:
    return Signal(
        id=new_signal_id(),
        source=Source.MQTT,
        device_id=device_id,
        facility_id=facility_id,
        event_class=EventClass.FIRE,
        code="110",
        qualifier=Qualifier.NEW,
        sia_code="FA",
        zone=zone,
        zone_label="Tầng 1 - Sảnh",
        text="Fire alarm",
        panel_time=received_at - dt.timedelta(seconds=2),
        received_at=received_at,
        seq=zone,
        boot=1,
        raw=b'{"code":"110"}',
    )


async def test_migrate_twice_noop(unmigrated_store: Store, target: Target):
    """Test that migrate applies the schema once and a second run applies nothing."""
    first = await unmigrated_store.migrate()
    second = await unmigrated_store.migrate()

    assert first == [FIRST_MIGRATION]
    assert second == []
    assert target.count("schema_migrations") == 1
    assert target.count("heartbeats") == 0


async def test_heartbeats_last_per_device(store: Store):
    """Test that last_heartbeats returns the newest heartbeat of each device, ordered by device id."""
    batch = [
        heartbeat("DEV-002", DAY0, battery_v=12.0),
        heartbeat("DEV-001", DAY0 + dt.timedelta(seconds=60), mains=False, battery_v=11.5, rssi=-90, link="wifi", panel="fault"),
        heartbeat("DEV-001", DAY0, battery_v=12.9),
        heartbeat("DEV-002", DAY0 + dt.timedelta(seconds=30), battery_v=12.5, fw="1.2.0\x00beta"),
        heartbeat("DEV-003", DAY0 - dt.timedelta(days=3), mains=None, battery_v=None, rssi=None, link=None, panel=None),
    ]

    written = await store.write_heartbeats(batch, "batch-1")
    everyone = await store.last_heartbeats(None)
    some = await store.last_heartbeats(["DEV-002", "DEV-404"])
    none = await store.last_heartbeats([])

    assert written == 5
    assert [record.device_id for record in everyone] == ["DEV-001", "DEV-002", "DEV-003"]
    assert everyone[0] == HeartbeatRecord(
        device_id="DEV-001",
        received_at=DAY0 + dt.timedelta(seconds=60),
        mains=False,
        battery_v=11.5,
        rssi=-90,
        link="wifi",
        panel="fault",
    )
    assert everyone[1].received_at == DAY0 + dt.timedelta(seconds=30)
    assert everyone[1].battery_v == 12.5
    assert everyone[2] == HeartbeatRecord(
        device_id="DEV-003",
        received_at=DAY0 - dt.timedelta(days=3),
        mains=None,
        battery_v=None,
        rssi=None,
        link=None,
        panel=None,
    )
    assert some == [everyone[1]]
    assert none == []


async def test_heartbeats_batch_id_once(store: Store, target: Target):
    """Test that a heartbeat batch written again under the same batch id adds no rows."""
    batch = [heartbeat(f"DEV-{index:03d}", DAY0 + dt.timedelta(seconds=index)) for index in range(50)]

    first = await store.write_heartbeats(batch, "batch-retried")
    retried = await store.write_heartbeats(batch, "batch-retried")
    empty = await store.write_heartbeats([], "batch-empty")

    assert first == 50
    assert retried == 0
    assert empty == 0
    assert target.count("heartbeats") == 50


async def test_heartbeats_invalid_batch_rejected(store: Store, target: Target):
    """Test that a batch with a naive received_at raises StoreError, not StoreUnavailable, and writes nothing."""
    batch = [heartbeat("DEV-001", DAY0), heartbeat("DEV-002", DAY0.replace(tzinfo=None))]

    with pytest.raises(StoreError) as raised:
        await store.write_heartbeats(batch, "batch-invalid")

    assert not isinstance(raised.value, StoreUnavailable)
    assert target.count("heartbeats") == 0
    assert target.count("ingest_batches") == 0


async def test_signals_for_facility_newest_first(store: Store):
    """Test that signals_for_facility returns the facility's signals in the range, newest first, up to the limit."""
    inside = [signal("HN-0001", DAY0 + dt.timedelta(minutes=minute), zone=minute) for minute in (1, 5, 3)]
    other_facility = signal("HN-0002", DAY0 + dt.timedelta(minutes=2))
    too_early = signal("HN-0001", DAY0 - dt.timedelta(minutes=1))
    at_end = signal("HN-0001", DAY0 + dt.timedelta(hours=1))

    written = await store.write_signals([*inside, other_facility, too_early, at_end], "signals-1")
    found = await store.signals_for_facility("HN-0001", DAY0, DAY0 + dt.timedelta(hours=1))
    limited = await store.signals_for_facility("HN-0001", DAY0, DAY0 + dt.timedelta(hours=1), limit=2)

    assert written == 6
    assert found == [inside[1], inside[2], inside[0]]
    assert found[0].zone_label == "Tầng 1 - Sảnh"
    assert found[0].raw == b'{"code":"110"}'
    assert limited == [inside[1], inside[2]]


async def test_signals_batch_id_once(store: Store, target: Target):
    """Test that signals are stored once, whether retried under the same batch id or a new one."""
    batch = [signal("HN-0001", DAY0 + dt.timedelta(seconds=second)) for second in range(10)]

    first = await store.write_signals(batch, "signals-retried")
    retried = await store.write_signals(batch, "signals-retried")
    rebatched = await store.write_signals(batch[5:], "signals-other-boundaries")

    assert first == 10
    assert retried == 0
    assert rebatched == 0
    assert target.count("signals") == 10


async def test_availability_fraction_per_day(store: Store):
    """Test that availability gives received/expected heartbeats per UTC day, zero for a silent day."""
    interval = dt.timedelta(minutes=10)
    full_day = [heartbeat("DEV-001", DAY0 + interval * index) for index in range(144)]
    half_day = [heartbeat("DEV-001", DAY0 + dt.timedelta(days=1) + interval * index * 2) for index in range(72)]
    other_device = [heartbeat("DEV-002", DAY0 + interval * index) for index in range(10)]
    await store.write_heartbeats(full_day + half_day + other_device, "availability")

    by_lookup = await store.availability("DEV-001", DAY0, DAY0 + dt.timedelta(days=3))
    explicit = await store.availability("DEV-001", DAY0, DAY0 + dt.timedelta(days=3), interval_s=300)

    assert by_lookup == [
        (dt.date(2025, 3, 1), 1.0),
        (dt.date(2025, 3, 2), 0.5),
        (dt.date(2025, 3, 3), 0.0),
    ]
    assert explicit == [
        (dt.date(2025, 3, 1), 0.5),
        (dt.date(2025, 3, 2), 0.25),
        (dt.date(2025, 3, 3), 0.0),
    ]


async def test_availability_partial_day_and_zone(store: Store):
    """Test that a partly covered day expects proportionally fewer heartbeats and days follow the time zone."""
    interval = dt.timedelta(minutes=10)
    await store.write_heartbeats([heartbeat("DEV-001", DAY0 + interval * index) for index in range(144)], "day")

    afternoon = await store.availability("DEV-001", DAY0 + dt.timedelta(hours=12), DAY0 + dt.timedelta(days=1))
    hanoi = await store.availability("DEV-001", DAY0, DAY0 + dt.timedelta(days=1), tz="Asia/Ho_Chi_Minh")

    assert afternoon == [(dt.date(2025, 3, 1), 1.0)]
    # 00:00 UTC is 07:00 in Hanoi: 17 hours of 1 March and 7 hours of 2 March, all covered.
    assert hanoi == [(dt.date(2025, 3, 1), 1.0), (dt.date(2025, 3, 2), 1.0)]


async def test_availability_unknown_interval_raises(store: Store):
    """Test that availability raises ValueError for a device with no known interval."""
    with pytest.raises(ValueError, match="DEV-404"):
        await store.availability("DEV-404", DAY0, DAY0 + dt.timedelta(days=1))


async def test_retention_drops_old_rows(store: Store, target: Target):
    """Test that apply_retention removes heartbeats and signals older than keep and leaves newer ones."""
    now = dt.datetime.now(UTC).replace(microsecond=0)
    old = now - dt.timedelta(days=30)
    await store.write_heartbeats([heartbeat("DEV-OLD", old), heartbeat("DEV-NEW", now - dt.timedelta(hours=1))], "hb")
    old_signal = signal("HN-0001", old)
    new_signal = signal("HN-0001", now - dt.timedelta(minutes=5))
    await store.write_signals([old_signal, new_signal], "signals")
    chunks_before = _chunk_count(target)

    dropped = await store.apply_retention(now, dt.timedelta(days=7))

    assert dropped > 0
    assert [record.device_id for record in await store.last_heartbeats(None)] == ["DEV-NEW"]
    assert await store.signals_for_facility("HN-0001", old - dt.timedelta(days=1), now) == [new_signal]
    assert target.count("heartbeats") == 1
    assert target.count("signals") == 1
    if target.kind == "timescale":
        assert _hypertables(target) == ["heartbeats", "signals"]
        assert _license(target) == "apache"
        assert dropped == 2
        assert _chunk_count(target) == chunks_before - 2


def _hypertables(target: Target) -> list[str]:
    with psycopg.connect(target.location) as conn:
        rows = conn.execute("SELECT hypertable_name FROM timescaledb_information.hypertables ORDER BY 1").fetchall()
    return [name for (name,) in rows]


def _license(target: Target) -> str:
    with psycopg.connect(target.location) as conn:
        return conn.execute("SHOW timescaledb.license").fetchone()[0]


def _chunk_count(target: Target) -> int:
    if target.kind != "timescale":
        return 0
    with psycopg.connect(target.location) as conn:
        return conn.execute("SELECT count(*) FROM timescaledb_information.chunks").fetchone()[0]


def test_open_store_chooses_backend(tmp_path: Path):
    """Test that open_store picks TimescaleDB for a postgresql URL, the embedded store for None, and rejects others."""
    embedded = open_store(None, tmp_path)
    timescale = open_store("postgresql://gateway@127.0.0.1:5432/gateway", tmp_path)

    assert isinstance(embedded, EmbeddedStore)
    assert embedded.path == tmp_path / "store.db"
    assert isinstance(timescale, TimescaleStore)
    with pytest.raises(ValueError, match="mysql://root:\\*\\*\\*@db"):
        open_store("mysql://root:secret@db/gateway", tmp_path)


def test_db_migrate_cli_idempotent(target: Target, tmp_path: Path):
    """Test that `gateway db migrate` prints the applied migration once and nothing the second time."""
    if target.kind == "embedded":
        args = ["migrate", "--data-dir", str(Path(target.location).parent)]
    else:
        args = ["migrate", "--store", target.location]
    runner = CliRunner()

    first = runner.invoke(db_cli.app, args, env={"GATEWAY_LANG": "en"})
    second = runner.invoke(db_cli.app, args, env={"GATEWAY_LANG": "en"})

    assert first.exit_code == 0, first.output
    assert FIRST_MIGRATION in first.output
    assert second.exit_code == 0, second.output
    assert FIRST_MIGRATION not in second.output
    assert "up to date" in second.output
    assert target.count("schema_migrations") == 1


def test_db_migrate_cli_unreachable(tmp_path: Path):
    """Test that `gateway db migrate` exits with status 1 and names the host when the database is down."""
    url = "postgresql://gateway:secret@127.0.0.1:9/gateway"

    result = CliRunner().invoke(db_cli.app, ["migrate", "--store", url], env={"GATEWAY_LANG": "en"})

    assert result.exit_code == 1
    assert "127.0.0.1:9" in result.output
    assert "secret" not in result.output
