"""Bad input over the real broker: each message is rejected with its reason, quarantined
with its raw bytes and counted, and the gateway stays up and keeps forwarding alarms."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing

import pytest

from drivers.mqtt import protocol
from tests.conftest import BRIDGE_USER, mosquitto_pub

pytestmark = pytest.mark.mosquitto

GOOD = protocol.encode_event(boot=1, seq=1, code="110", qualifier="E", zone=1)

# (case, publishing user, topic, payload, expected reason)
BAD_INPUTS = [
    ("invalid JSON", "DEV-001", "pccc/v1/DEV-001/event", b'{"v":1,"boot":1,', "invalid_json"),
    ("wrong type", "DEV-001", "pccc/v1/DEV-001/event",
     b'{"v":1,"boot":1,"seq":"seven","ts":1764818102120,"code":"110","q":"E"}', "invalid_field"),
    ("5 KiB payload", "DEV-001", "pccc/v1/DEV-001/event", b'{"v":1,"pad":"' + b"x" * 5120 + b'"}', "payload_too_large"),
    ("topic naming another device", BRIDGE_USER, "pccc/v1/DEV-001/event",
     b'{"v":1,"boot":1,"seq":3,"ts":1764818102120,"code":"110","q":"E","device":"DEV-002"}', "identity_mismatch"),
    ("unregistered device", "DEV-999", "pccc/v1/DEV-999/event", GOOD, "unregistered_device"),
    ("unknown code", "DEV-001", "pccc/v1/DEV-001/event",
     b'{"v":1,"boot":1,"seq":4,"ts":1764818102120,"code":"999","q":"E"}', "unknown_code"),
    ("Contact ID with bad checksum", "DEV-001", "pccc/v1/DEV-001/event",
     b'{"v":1,"boot":1,"seq":5,"ts":1764818102120,"cid":"1234 18 1 110 01 015 4"}', "bad_contact_id"),
    ("malformed heartbeat", "DEV-001", "pccc/v1/DEV-001/heartbeat",
     b'{"v":1,"boot":1,"seq":6,"ts":1764818102120,"mains":"yes"}', "invalid_field"),
]


def quarantine_rows(data_dir) -> list[tuple[str, str, str, bytes]]:
    with closing(sqlite3.connect(data_dir / "journal.db")) as conn:
        return conn.execute("SELECT reason, origin, detail, raw FROM quarantine ORDER BY id").fetchall()


async def test_bad_inputs_quarantined_and_counted(gateway, broker, centre, data_dir):
    """Test that every bad input is quarantined with reason and raw bytes, counted, and survived."""
    for _case, user, topic, payload, _reason in BAD_INPUTS:
        mosquitto_pub(broker, topic, payload, user=user)

    deadline = asyncio.get_running_loop().time() + 10
    while len(quarantine_rows(data_dir)) < len(BAD_INPUTS):
        assert asyncio.get_running_loop().time() < deadline, f"only {len(quarantine_rows(data_dir))} rows quarantined"
        await asyncio.sleep(0.1)

    rows = quarantine_rows(data_dir)
    by_raw = {raw: (reason, origin, detail) for reason, origin, detail, raw in rows}
    for case, _user, topic, payload, reason in BAD_INPUTS:
        assert payload in by_raw, f"{case}: raw bytes not kept"
        stored_reason, origin, detail = by_raw[payload]
        assert stored_reason == reason, case
        assert origin == topic, case
        assert detail, case

    for reason in {reason for *_, reason in BAD_INPUTS}:
        expected = sum(1 for *_, item in BAD_INPUTS if item == reason)
        assert gateway.metric("gateway_inputs_rejected_total", source="mqtt", reason=reason) == expected, reason

    assert gateway.alive
    assert gateway.health()["status"] == "ok"
    assert centre.events == []

    mosquitto_pub(broker, protocol.event_topic("DEV-001"), GOOD, user="DEV-001")
    events = await centre.wait_for(lambda events: len(events) >= 1, timeout=10)
    assert events[0]["event"]["signal"]["code"] == "110"
