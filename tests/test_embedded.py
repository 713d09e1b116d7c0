"""Embedded mode: `gateway run` with no configuration brings its own broker."""

from __future__ import annotations

import subprocess
import time

import pytest

from drivers.mqtt import protocol
from tests.conftest import SECRET

EMBEDDED_PORT = 1883  # the documented default of [embedded_broker]


@pytest.mark.timeout(60)
async def test_embedded_gateway_forwards_alarm(gateway_factory, centre):
    """Test that a plain MQTT client's alarm to the embedded broker reaches the command centre."""
    gateway = gateway_factory(["--forward", centre.url, "--forward-secret", SECRET])
    gateway.start()

    payload = protocol.encode_event(boot=1, seq=1, code="110", qualifier="E", zone=3)
    published = time.monotonic()
    completed = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(EMBEDDED_PORT), "-q", "1", "-t", protocol.event_topic("DEV-001"), "-s"],
        input=payload,
        capture_output=True,
        timeout=10,
    )
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")

    events = await centre.wait_for(lambda events: len(events) >= 1, timeout=10)
    print(f"embedded broker: publish to command-centre receipt took {time.monotonic() - published:.3f} s")
    assert events[0]["event"]["signal"]["zone_label"] == "Phòng bơm"
    assert events[0]["event"]["device"]["id"] == "DEV-001"
    assert gateway.terminate() == 0
