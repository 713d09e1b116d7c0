"""Tests for the routing core: alarm priority, heartbeat coalescing and shedding, listener faults."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from drivers.base import Heartbeat
from gateway import codes
from gateway.metrics import Metrics
from gateway.router import HEARTBEAT_BATCH, Router
from gateway.signal import EventClass, Qualifier, Signal, Source

WAIT_S = 5.0
T0 = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.timezone.utc)


def alarm(signal_id: str, code: str, qualifier: Qualifier = Qualifier.NEW, device_id: str = "DEV-001") -> Signal:
    return Signal(
        id=signal_id,
        source=Source.MQTT,
        device_id=device_id,
        event_class=codes.lookup(code).event_class,
        code=code,
        qualifier=qualifier,
        received_at=T0,
    )


def heartbeat(device_id: str, seq: int) -> Heartbeat:
    return Heartbeat(device_id=device_id, source=Source.MQTT, received_at=T0, seq=seq)


def metric(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def test_serve_alarms_by_class_then_arrival(metrics: Metrics):
    """Test that alarms are served fire, supervisory, trouble, restore, test, in arrival order within a class."""
    router = Router(metrics)
    served: list[str] = []
    router.on_alarm(lambda signal: served.append(signal.id))
    arrivals = [
        alarm("test-1", "602"),
        alarm("restore-1", "110", Qualifier.RESTORE),
        alarm("trouble-1", "301"),
        alarm("fire-1", "110"),
        alarm("test-2", "601"),
        alarm("supervisory-1", "200"),
        alarm("fire-2", "115", device_id="DEV-002"),
        alarm("trouble-2", "373"),
        alarm("restore-2", "301", Qualifier.RESTORE),
    ]
    for signal in arrivals:
        router.offer_alarm(signal)

    count = router.serve_alarms()

    assert count == len(arrivals)
    assert served == [
        "fire-1",
        "fire-2",
        "supervisory-1",
        "trouble-1",
        "trouble-2",
        "restore-1",
        "restore-2",
        "test-1",
        "test-2",
    ]
    assert router.alarm_depth == 0


def test_offer_alarm_restore_keeps_class(metrics: Metrics):
    """Test that a fire restore is queued as a restore while its event class stays fire."""
    router = Router(metrics)
    served: list[Signal] = []
    router.on_alarm(served.append)
    router.offer_alarm(alarm("restore-1", "110", Qualifier.RESTORE))
    router.offer_alarm(alarm("trouble-1", "301"))

    router.serve_alarms()

    assert [signal.id for signal in served] == ["trouble-1", "restore-1"]
    assert served[1].event_class is EventClass.FIRE
    assert served[1].lane_class is EventClass.RESTORE


def test_offer_heartbeat_coalesces_per_device(metrics: Metrics):
    """Test that waiting heartbeats keep only the newest per device, ordered by last arrival."""
    router = Router(metrics)
    batches: list[list[Heartbeat]] = []
    router.on_heartbeats(batches.append)

    router.offer_heartbeat(heartbeat("DEV-001", 1))
    router.offer_heartbeat(heartbeat("DEV-002", 1))
    router.offer_heartbeat(heartbeat("DEV-001", 2))
    router.offer_heartbeat(heartbeat("DEV-001", 3))
    depth = router.heartbeat_depth
    count = router.serve_heartbeats()

    assert depth == 2
    assert count == 2
    assert [(item.device_id, item.seq) for item in batches[0]] == [("DEV-002", 1), ("DEV-001", 3)]
    assert metric(metrics, "gateway_heartbeats_coalesced_total") == 2
    assert metric(metrics, "gateway_heartbeats_shed_total") == 0


def test_offer_heartbeat_sheds_oldest_over_capacity(metrics: Metrics):
    """Test that a full heartbeat lane drops the device that waited longest and counts it."""
    router = Router(metrics, heartbeat_capacity=3)
    batches: list[list[Heartbeat]] = []
    router.on_heartbeats(batches.append)

    for device_id in ("DEV-001", "DEV-002", "DEV-003", "DEV-004"):
        router.offer_heartbeat(heartbeat(device_id, 1))
    router.serve_heartbeats()

    assert [item.device_id for item in batches[0]] == ["DEV-002", "DEV-003", "DEV-004"]
    assert metric(metrics, "gateway_heartbeats_shed_total") == 1


def test_offer_heartbeat_full_lane_coalesces(metrics: Metrics):
    """Test that a newer heartbeat from a waiting device replaces it even when the lane is full."""
    router = Router(metrics, heartbeat_capacity=2)
    batches: list[list[Heartbeat]] = []
    router.on_heartbeats(batches.append)

    router.offer_heartbeat(heartbeat("DEV-001", 1))
    router.offer_heartbeat(heartbeat("DEV-002", 1))
    router.offer_heartbeat(heartbeat("DEV-001", 2))
    router.serve_heartbeats()

    assert [(item.device_id, item.seq) for item in batches[0]] == [("DEV-002", 1), ("DEV-001", 2)]
    assert metric(metrics, "gateway_heartbeats_shed_total") == 0
    assert metric(metrics, "gateway_heartbeats_coalesced_total") == 1


def test_offer_alarm_never_shed(metrics: Metrics):
    """Test that the alarm lane keeps every alarm, whatever the heartbeat capacity."""
    router = Router(metrics, heartbeat_capacity=1)

    for number in range(500):
        router.offer_alarm(alarm(f"fire-{number}", "110"))

    assert router.alarm_depth == 500
    assert metric(metrics, "gateway_heartbeats_shed_total") == 0


def test_serve_alarms_contains_failing_listener(metrics: Metrics):
    """Test that an alarm listener that raises neither stops the others nor loses later alarms."""
    router = Router(metrics)
    calls: list[tuple[str, str]] = []

    def failing(signal: Signal) -> None:
        calls.append(("failing", signal.id))
        raise RuntimeError("listener broke")

    router.on_alarm(failing)
    router.on_alarm(lambda signal: calls.append(("healthy", signal.id)))
    router.offer_alarm(alarm("fire-1", "110"))
    router.offer_alarm(alarm("fire-2", "110"))

    count = router.serve_alarms()

    assert count == 2
    assert calls == [("failing", "fire-1"), ("healthy", "fire-1"), ("failing", "fire-2"), ("healthy", "fire-2")]
    assert metric(metrics, "gateway_handler_errors_total", {"lane": "alarm"}) == 2


def test_serve_heartbeats_contains_failing_listener(metrics: Metrics):
    """Test that a heartbeat listener that raises does not stop the next listener and is counted."""
    router = Router(metrics)
    received: list[list[str]] = []

    def failing(batch: list[Heartbeat]) -> None:
        raise RuntimeError("listener broke")

    router.on_heartbeats(failing)
    router.on_heartbeats(lambda batch: received.append([item.device_id for item in batch]))
    router.offer_heartbeat(heartbeat("DEV-001", 1))

    router.serve_heartbeats()

    assert received == [["DEV-001"]]
    assert metric(metrics, "gateway_handler_errors_total", {"lane": "heartbeat"}) == 1


async def test_run_alarms_before_heartbeats(metrics: Metrics):
    """Test that run() serves alarms first, and an alarm offered mid-flood jumps the remaining heartbeats."""
    router = Router(metrics)
    devices = 2 * HEARTBEAT_BATCH + 500
    effects: list[tuple[str, str | int]] = []
    flood_served = asyncio.Event()
    heartbeats_seen = 0

    def on_alarm(signal: Signal) -> None:
        effects.append(("alarm", signal.id))

    def on_heartbeats(batch: list[Heartbeat]) -> None:
        nonlocal heartbeats_seen
        effects.append(("heartbeats", len(batch)))
        if heartbeats_seen == 0:
            router.offer_alarm(alarm("fire-late", "110"))
        heartbeats_seen += len(batch)
        if heartbeats_seen == devices:
            flood_served.set()

    router.on_alarm(on_alarm)
    router.on_heartbeats(on_heartbeats)
    for number in range(devices):
        router.offer_heartbeat(heartbeat(f"DEV-{number:05d}", 1))
    router.offer_alarm(alarm("fire-early", "110"))

    task = asyncio.create_task(router.run())
    try:
        await asyncio.wait_for(flood_served.wait(), WAIT_S)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert effects == [
        ("alarm", "fire-early"),
        ("heartbeats", HEARTBEAT_BATCH),
        ("alarm", "fire-late"),
        ("heartbeats", HEARTBEAT_BATCH),
        ("heartbeats", 500),
    ]
    assert metric(metrics, "gateway_alarm_lane_depth") == 0
    assert metric(metrics, "gateway_heartbeat_lane_depth") == 0


async def test_run_idle_wakes_for_alarm(metrics: Metrics):
    """Test that an idle run() loop serves an alarm offered after it started waiting."""
    router = Router(metrics)
    served: list[str] = []
    delivered = asyncio.Event()

    def on_alarm(signal: Signal) -> None:
        served.append(signal.id)
        delivered.set()

    router.on_alarm(on_alarm)
    task = asyncio.create_task(router.run())
    try:
        await asyncio.sleep(0)  # let run() reach its wait on the empty lanes
        assert served == []
        router.offer_alarm(alarm("fire-1", "110"))
        await asyncio.wait_for(delivered.wait(), WAIT_S)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert served == ["fire-1"]
    assert router.alarm_depth == 0
