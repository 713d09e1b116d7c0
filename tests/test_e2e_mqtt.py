"""End to end: transmitters publish with mosquitto_pub to a real Mosquitto, the gateway runs
as its own process, and the simulated command centre records what arrives."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import subprocess

import pytest

from drivers.mqtt import protocol
from tests.conftest import DEVICE_PASSWORD, FACILITY, mosquitto_pub

pytestmark = pytest.mark.mosquitto


def fire(seq: int, zone: int, qualifier: str = "E", code: str = "110") -> bytes:
    return protocol.encode_event(boot=1, seq=seq, code=code, qualifier=qualifier, zone=zone)


def incident_timeline(data_dir, incident_id: str) -> list[str]:
    with closing(sqlite3.connect(data_dir / "journal.db")) as conn:
        rows = conn.execute("SELECT kind FROM incident_events WHERE incident_id = ? ORDER BY at, rowid", (incident_id,))
        return [row[0] for row in rows]


async def test_fire_alarm_reaches_command_centre(gateway, broker, centre):
    """Test that one fire alarm arrives as one event with facility, zone and zone label."""
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), fire(seq=1, zone=2), user="DEV-001")

    events = await centre.wait_for(lambda events: len(events) >= 1, timeout=10)
    event = events[0]["event"]
    assert event["kind"] == "signal"
    assert event["facility"]["id"] == FACILITY.id
    assert event["facility"]["name"] == FACILITY.name
    assert event["facility"]["province"] == "Hà Nội"
    assert event["signal"]["code"] == "110"
    assert event["signal"]["sia_code"] == "FA"
    assert event["signal"]["zone"] == 2
    assert event["signal"]["zone_label"] == "Tầng hầm B1 - Bãi xe"
    assert event["incident"]["state"] == "open"
    assert events[0]["idempotency_key"] == event["event_id"]
    assert event["times"]["forwarded"] is not None

    with pytest.raises(TimeoutError):
        await centre.wait_for(lambda events: len(events) > 1, timeout=1.0)


async def test_fire_then_restore_one_incident(gateway, broker, centre, data_dir):
    """Test that a fire and its restore form one incident with the restore on its timeline."""
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), fire(seq=1, zone=3), user="DEV-001")
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), fire(seq=2, zone=3, qualifier="R"), user="DEV-001")

    events = await centre.wait_for(lambda events: len(events) >= 2, timeout=10)
    first, second = events[0]["event"], events[1]["event"]
    assert first["signal"]["qualifier"] == "new"
    assert second["signal"]["qualifier"] == "restore"
    assert first["incident"]["id"] == second["incident"]["id"]
    assert second["incident"]["state"] == "open", "a restore must not close a fire incident"
    assert incident_timeline(data_dir, first["incident"]["id"]) == ["opened", "restored"]


async def test_second_zone_joins_incident(gateway, broker, centre, data_dir):
    """Test that a second zone and a second device of the facility join the open fire incident."""
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), fire(seq=1, zone=1), user="DEV-001")
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), fire(seq=2, zone=2), user="DEV-001")
    mosquitto_pub(broker, protocol.event_topic("DEV-002"), fire(seq=1, zone=3), user="DEV-002")

    events = await centre.wait_for(lambda events: len(events) >= 3, timeout=10)
    incident_ids = {entry["event"]["incident"]["id"] for entry in events}
    assert len(incident_ids) == 1
    assert [entry["event"]["incident"]["zone_count"] for entry in events] == [1, 2, 3]
    with closing(sqlite3.connect(data_dir / "journal.db")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM incidents").fetchone()[0] == 1


async def test_heartbeats_open_no_incident(gateway, broker, centre, data_dir):
    """Test that heartbeats alone open no incident and send nothing to the command centre."""
    for seq in range(1, 6):
        mosquitto_pub(broker, protocol.heartbeat_topic("DEV-001"), protocol.encode_heartbeat(boot=1, seq=seq), user="DEV-001", qos=0)
        mosquitto_pub(broker, protocol.heartbeat_topic("DEV-002"), protocol.encode_heartbeat(boot=1, seq=seq), user="DEV-002", qos=1)

    # A fire afterwards proves the heartbeats were processed before it.
    mosquitto_pub(broker, protocol.event_topic("DEV-003"), fire(seq=1, zone=1), user="DEV-003")
    events = await centre.wait_for(lambda events: len(events) >= 1, timeout=10)

    assert [entry["event"]["device"]["id"] for entry in events] == ["DEV-003"]
    assert gateway.metric("gateway_heartbeats_received_total", source="mqtt") == 10
    with closing(sqlite3.connect(data_dir / "journal.db")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM incidents").fetchone()[0] == 1


async def test_redelivered_event_processed_once(gateway, broker, centre):
    """Test that the same event published twice is forwarded once."""
    payload = fire(seq=7, zone=1)
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), payload, user="DEV-001")
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), payload, user="DEV-001")
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), fire(seq=8, zone=2), user="DEV-001")

    events = await centre.wait_for(lambda events: len(events) >= 2, timeout=10)
    assert [entry["event"]["signal"]["zone"] for entry in events] == [1, 2]
    assert gateway.metric("gateway_signals_duplicate_total", source="mqtt") == 1


async def test_acl_blocks_other_device_topic(gateway, broker, centre):
    """Test that the broker ACL drops a device's publish on another device's topic."""
    mosquitto_pub(broker, protocol.event_topic("DEV-002"), fire(seq=1, zone=1), user="DEV-001")
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), fire(seq=2, zone=2), user="DEV-001")

    events = await centre.wait_for(lambda events: len(events) >= 1, timeout=10)
    with pytest.raises(TimeoutError):
        await centre.wait_for(lambda events: len(events) > 1, timeout=1.0)
    assert [entry["event"]["device"]["id"] for entry in events] == ["DEV-001"]


def test_device_credentials_required(broker):
    """Test that the broker refuses a device with a wrong password."""
    completed = subprocess.run(
        ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-u", "DEV-001", "-P", DEVICE_PASSWORD + "x",
         "-q", "1", "-t", protocol.event_topic("DEV-001"), "-m", "{}"],
        capture_output=True,
        timeout=10,
    )
    assert completed.returncode != 0


def incident_set(gateway, incident_id: str, *args: str) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.app", "incident", "set", incident_id, *args, "--http", f"127.0.0.1:{gateway.http_port}"],
        capture_output=True,
        timeout=30,
        env={"GATEWAY_LANG": "en", "PATH": "/usr/bin:/bin"},
    )


async def test_incident_updates_follow_alarm(gateway, broker, centre):
    """Test that acknowledge, resolve and close travel to the command centre after the alarm, in order."""
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), fire(seq=1, zone=1), user="DEV-001")
    events = await centre.wait_for(lambda events: len(events) >= 1, timeout=10)
    incident_id = events[0]["event"]["incident"]["id"]

    steps = [("acknowledged",), ("dispatched",), ("resolved", "--outcome", "false_alarm"), ("closed",)]
    for state, *extra in steps:
        completed = incident_set(gateway, incident_id, state, "--actor", "can-bo-truc-1", *extra)
        assert completed.returncode == 0, completed.stderr.decode()

    events = await centre.wait_for(lambda events: len(events) >= 5, timeout=10)
    updates = [entry["event"] for entry in events[1:]]
    assert [update["kind"] for update in updates] == ["incident_update"] * 4
    assert [update["incident"]["state"] for update in updates] == ["acknowledged", "dispatched", "resolved", "closed"]
    assert {update["incident"]["id"] for update in updates} == {incident_id}


async def test_incident_skipping_states_rejected(gateway, broker, centre):
    """Test that closing an incident that was never resolved is rejected with a clear message."""
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), fire(seq=1, zone=1), user="DEV-001")
    events = await centre.wait_for(lambda events: len(events) >= 1, timeout=10)

    completed = incident_set(gateway, events[0]["event"]["incident"]["id"], "closed", "--actor", "can-bo-truc-1")

    assert completed.returncode == 2
    assert "can move to" in completed.stderr.decode()
