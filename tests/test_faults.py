"""Fault injection: no alarm is lost to a gateway crash or a broker restart."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import paho.mqtt.client as paho
import pytest

from drivers.mqtt import protocol
from tests.conftest import DEVICE_PASSWORD, gateway_args, mosquitto_pub

pytestmark = pytest.mark.mosquitto


def fire(seq: int, zone: int = 1, qualifier: str = "E") -> bytes:
    return protocol.encode_event(boot=1, seq=seq, code="110", qualifier=qualifier, zone=zone)


async def wait_until(predicate, timeout: float, interval: float = 0.1) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(interval)


async def test_sigkill_before_forwarding_delivers_once(gateway_factory, broker, centre):
    """Test that an alarm acked but not yet forwarded is delivered once after SIGKILL and restart."""
    centre.set_mode("down")
    first = gateway_factory(gateway_args(broker, centre.url))
    first.start()

    # The failed delivery attempt below shows the gateway journaled the alarm before the kill.
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), fire(seq=1, zone=2), user="DEV-001")
    await wait_until(lambda: first.metric("gateway_forward_failures_total", destination="central", kind="http") >= 1, timeout=10)
    first.kill()
    assert centre.events == []

    centre.set_mode("normal")
    second = gateway_factory(gateway_args(broker, centre.url))
    second.start()
    events = await centre.wait_for(lambda events: len(events) >= 1, timeout=15)
    with pytest.raises(TimeoutError):
        await centre.wait_for(lambda events: len(events) > 1, timeout=2.0)
    assert events[0]["event"]["signal"]["zone"] == 2
    assert second.terminate() == 0


async def test_events_while_gateway_down_are_kept(gateway_factory, broker, centre):
    """Test that alarms published while the gateway is dead wait in its broker session."""
    first = gateway_factory(gateway_args(broker, centre.url))
    first.start()
    first.kill()

    for seq in range(1, 6):
        mosquitto_pub(broker, protocol.event_topic("DEV-002"), fire(seq=seq, zone=seq % 3 + 1), user="DEV-002")

    second = gateway_factory(gateway_args(broker, centre.url))
    second.start()
    events = await centre.wait_for(lambda events: len(events) >= 5, timeout=15)
    assert sorted(entry["event"]["signal"]["zone"] for entry in events) == sorted(seq % 3 + 1 for seq in range(1, 6))


class StreamingDevice:
    """A transmitter on paho's network thread that keeps QoS 1 events until they are acked."""

    def __init__(self, broker, device_id: str) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=False)
        self.client.username_pw_set(device_id, DEVICE_PASSWORD)
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=1)
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(20)
        self.acked: set[int] = set()
        self.connected = threading.Event()
        self.client.on_publish = lambda client, userdata, mid, reason_code, properties: self.acked.add(mid)
        self.client.on_connect = lambda client, userdata, flags, reason_code, properties: self.connected.set()
        self.client.connect(broker.host, broker.port, keepalive=5)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> int:
        return self.client.publish(topic, payload, qos=1).mid

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_broker_restart_mid_stream_loses_nothing(gateway, broker, centre):
    """Test that a broker restart in the middle of 200 alarms loses none and doubles none."""
    device = StreamingDevice(broker, "DEV-003")
    try:
        assert await asyncio.to_thread(device.connected.wait, 10)
        total = 200
        for seq in range(1, total + 1):
            device.publish(protocol.event_topic("DEV-003"), fire(seq=seq, zone=seq % 3 + 1))
            if seq == total // 2:
                await asyncio.to_thread(broker.restart)
            await asyncio.sleep(0.002)

        events = await centre.wait_for(lambda events: len(events) >= total, timeout=60)
        keys = Counter(entry["idempotency_key"] for entry in events)
        assert len(keys) == total
        assert max(keys.values()) == 1
        await wait_until(lambda: len(device.acked) >= total, timeout=20)
    finally:
        device.close()
    assert gateway.alive
