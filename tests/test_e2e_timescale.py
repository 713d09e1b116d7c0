"""End to end with TimescaleDB: the gateway as a process with --store, a real Mosquitto, and
simulated transmitters; heartbeats and signals land in the hypertables, and a database outage
in the middle of the run loses and doubles nothing."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from drivers.mqtt import protocol
from simulators.transmitter import TransmitterFleet
from tests.conftest import DEVICE_PASSWORD, DEVICES, gateway_args, mosquitto_pub
from tests.timescale_server import timescale_cluster_handle

pytestmark = [pytest.mark.mosquitto, pytest.mark.timescaledb]


@pytest.fixture
def database(tmp_path):
    with timescale_cluster_handle(tmp_path / "pg") as cluster:
        yield cluster


def query(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(sql).fetchall()


async def wait_for_rows(url: str, sql: str, expected: int, timeout: float) -> int:
    deadline = asyncio.get_running_loop().time() + timeout
    count = -1
    while asyncio.get_running_loop().time() < deadline:
        try:
            count = query(url, sql)[0][0]
        except psycopg.Error:
            # The database is down, or the gateway has not created its tables yet.
            count = -1
        if count >= expected:
            return count
        await asyncio.sleep(0.2)
    return count


async def test_heartbeats_land_in_hypertables(gateway_factory, broker, centre, database):
    """Test that simulator heartbeats and an alarm land in the gateway's TimescaleDB hypertables."""
    gateway = gateway_factory([*gateway_args(broker, centre.url), "--store", database.url])
    gateway.start()

    fleet = TransmitterFleet(broker.url, DEVICES, interval_s=0.5, password=DEVICE_PASSWORD)
    await fleet.run(3.0)
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), protocol.encode_event(boot=1, seq=99, code="110", zone=1), user="DEV-001")
    await centre.wait_for(lambda events: len(events) >= 1, timeout=10)

    hypertables = {row[0] for row in query(database.url, "SELECT hypertable_name FROM timescaledb_information.hypertables")}
    assert {"heartbeats", "signals"} <= hypertables
    assert await wait_for_rows(database.url, "SELECT COUNT(DISTINCT device_id) FROM heartbeats", len(DEVICES), timeout=10) == len(DEVICES)
    assert await wait_for_rows(database.url, "SELECT COUNT(*) FROM signals WHERE code = '110'", 1, timeout=10) == 1
    assert gateway.terminate() == 0


async def test_database_outage_loses_nothing(gateway_factory, broker, centre, database):
    """Test that stopping TimescaleDB mid-run neither blocks alarms nor loses or doubles rows."""
    gateway = gateway_factory([*gateway_args(broker, centre.url), "--store", database.url])
    gateway.start()
    await wait_for_rows(database.url, "SELECT COUNT(*) FROM timescaledb_information.hypertables", 2, timeout=15)

    sent = 0
    for seq in range(1, 11):
        mosquitto_pub(broker, protocol.event_topic("DEV-002"), protocol.encode_event(boot=1, seq=seq, code="110", zone=seq % 3 + 1), user="DEV-002")
        sent += 1
        if seq == 3:
            await asyncio.to_thread(database.stop)
    # Alarms keep flowing to the command centre while the database is down.
    await centre.wait_for(lambda events: len(events) >= sent, timeout=15)

    await asyncio.to_thread(database.start)
    count = await wait_for_rows(database.url, "SELECT COUNT(*) FROM signals WHERE device_id = 'DEV-002'", sent, timeout=60)
    assert count == sent
    distinct = query(database.url, "SELECT COUNT(DISTINCT id) FROM signals WHERE device_id = 'DEV-002'")[0][0]
    assert distinct == sent
    assert gateway.terminate() == 0
