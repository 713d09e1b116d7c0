"""Tests for intake: registry resolution, store before offer, duplicates and quarantine.

Every test runs a real journal in a temporary folder, with a registry written through
`gateway.registry` before the journal starts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import msgspec
import pytest

from drivers.base import Admission, Heartbeat, Rejection
from drivers.mqtt import protocol
from gateway import journal as journal_module
from gateway import registry
from gateway.incidents import IncidentEngine
from gateway.intake import Intake, decode_signal
from gateway.journal import Journal
from gateway.metrics import Metrics
from gateway.registry import RegistryCache
from gateway.router import Router
from gateway.signal import Signal, Source

WAIT_S = 10.0
T0 = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.timezone.utc)
FACILITY = registry.Facility(id="HN-0001", name="Chung cư Sông Hồng", province="Hà Nội", team="HN-DOI-02")
ZONES = {1: "Tầng 1 - Sảnh", 2: "Tầng hầm B1 - Bãi xe"}


class Site:
    """The objects one intake test works with."""

    def __init__(self, journal: Journal, registry_cache: RegistryCache, router: Router, metrics: Metrics, intake: Intake) -> None:
        self.journal = journal
        self.registry = registry_cache
        self.router = router
        self.metrics = metrics
        self.intake = intake

    def stored_signals(self) -> list[tuple[str, str, int]]:
        return self.journal.reader.execute("SELECT id, facility_id, routed FROM signals ORDER BY received_at").fetchall()

    def metric(self, name: str, labels: dict[str, str]) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def register(path: Path) -> None:
    with closing(journal_module.connect(path)) as conn:
        journal_module.migrate(conn)
        conn.execute("BEGIN")
        registry.add_facility(conn, FACILITY, ZONES)
        registry.add_device(conn, registry.make_device(id="DEV-001", facility_id=FACILITY.id))
        registry.add_device(conn, registry.make_device(id="DEV-TEST", facility_id=FACILITY.id, test_mode=True))
        conn.execute("COMMIT")


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    path = tmp_path / "journal.db"
    register(path)
    journal = Journal(path)
    await journal.start()
    registry_cache = RegistryCache(journal.reader)
    registry_cache.load()
    metrics = Metrics()
    router = Router(metrics)
    try:
        yield Site(journal, registry_cache, router, metrics, Intake(journal, registry_cache, router, metrics))
    finally:
        await journal.close()


def fire_event(device_id: str = "DEV-001", *, boot: int = 1, seq: int = 7, zone: int = 2, label: str = "",
               received_at: dt.datetime = T0) -> tuple[Signal, str]:
    """Decode a fire alarm as the MQTT driver would; return the signal and its dedup key."""
    payload = protocol.encode_event(boot=boot, seq=seq, code="110", zone=zone, label=label, ts=T0)
    topic = protocol.parse_topic(protocol.event_topic(device_id))
    signal = protocol.decode_event(topic, payload, received_at)
    return signal, protocol.dedup_key(device_id, boot, seq, payload)


async def submit(site: Site, signal: Signal, key: str | None) -> Admission:
    return await asyncio.wait_for(site.intake.submit_signal(signal, key), WAIT_S)


async def test_submit_signal_stores_and_offers_alarm(site: Site):
    """Test that an event from a registered device is stored, then offered to the alarm lane."""
    signal, key = fire_event()

    admission = await submit(site, signal, key)

    assert admission is Admission.ACCEPTED
    assert site.router.alarm_depth == 1
    assert site.stored_signals() == [(signal.id, "HN-0001", 0)]
    assert site.metric("gateway_signals_accepted_total", {"source": "mqtt", "event_class": "fire"}) == 1


async def test_submit_signal_fills_registry_fields(site: Site):
    """Test that the offered and the stored signal carry the registry's facility and zone label."""
    signal, key = fire_event(zone=2)
    offered: list[Signal] = []
    site.router.on_alarm(offered.append)

    await submit(site, signal, key)
    site.router.serve_alarms()

    assert [item.id for item in offered] == [signal.id]
    assert offered[0].facility_id == "HN-0001"
    assert offered[0].zone_label == "Tầng hầm B1 - Bãi xe"
    body = site.journal.reader.execute("SELECT body FROM signals WHERE id = ?", (signal.id,)).fetchone()[0]
    stored = decode_signal(body)
    assert stored.facility_id == "HN-0001"
    assert stored.zone_label == "Tầng hầm B1 - Bãi xe"


async def test_submit_signal_keeps_device_label(site: Site):
    """Test that a zone label sent in the payload wins over the registry's label."""
    signal, key = fire_event(zone=2, label="Bãi xe tầng hầm")
    offered: list[Signal] = []
    site.router.on_alarm(offered.append)

    await submit(site, signal, key)
    site.router.serve_alarms()

    assert offered[0].zone_label == "Bãi xe tầng hầm"


async def test_submit_signal_marks_test_mode_device(site: Site):
    """Test that a signal from a device registered in test mode is flagged as a test."""
    signal, key = fire_event("DEV-TEST")
    offered: list[Signal] = []
    site.router.on_alarm(offered.append)

    await submit(site, signal, key)
    site.router.serve_alarms()

    assert signal.test is False
    assert offered[0].test is True


async def test_submit_signal_duplicate_within_window(site: Site):
    """Test that the same dedup key within 10 minutes is a duplicate, stored and offered once."""
    first, key = fire_event(received_at=T0)
    again, again_key = fire_event(received_at=T0 + dt.timedelta(minutes=9, seconds=59))
    assert again_key == key

    assert await submit(site, first, key) is Admission.ACCEPTED
    assert await submit(site, again, again_key) is Admission.DUPLICATE

    assert site.router.alarm_depth == 1
    assert [row[0] for row in site.stored_signals()] == [first.id]
    assert site.metric("gateway_signals_duplicate_total", {"source": "mqtt"}) == 1


async def test_submit_signal_same_key_after_window(site: Site):
    """Test that the same dedup key more than 10 minutes later is accepted as a new signal."""
    first, key = fire_event(received_at=T0)
    later, later_key = fire_event(received_at=T0 + dt.timedelta(minutes=11))

    assert await submit(site, first, key) is Admission.ACCEPTED
    assert await submit(site, later, later_key) is Admission.ACCEPTED

    assert site.router.alarm_depth == 2


async def test_submit_signal_new_boot_same_seq(site: Site):
    """Test that a sequence number repeated after a reboot (new `boot`) is not a duplicate."""
    before_reboot, first_key = fire_event(boot=1, seq=1)
    after_reboot, second_key = fire_event(boot=2, seq=1)

    assert await submit(site, before_reboot, first_key) is Admission.ACCEPTED
    assert await submit(site, after_reboot, second_key) is Admission.ACCEPTED

    assert first_key != second_key
    assert site.router.alarm_depth == 2
    assert len(site.stored_signals()) == 2


async def test_submit_signal_cancelled_caller_still_offered(site: Site):
    """Test that a signal whose submitting task is cancelled before the commit is still offered once durable."""
    entered = threading.Event()
    release = threading.Event()

    def block_writer(conn) -> None:
        entered.set()
        release.wait(WAIT_S)

    site.journal.submit(block_writer)
    assert await asyncio.to_thread(entered.wait, WAIT_S)
    signal, key = fire_event()
    submitting = asyncio.create_task(site.intake.submit_signal(signal, key))
    await asyncio.sleep(0)  # let the task queue its journal write behind the blocked one
    submitting.cancel()
    release.set()

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(submitting, WAIT_S)
    # The journal resolves futures in submission order, so once this write is done the
    # signal's commit and its routing callback have run.
    await asyncio.wait_for(site.journal.write(lambda conn: None), WAIT_S)

    assert site.router.alarm_depth == 1
    assert [row[0] for row in site.stored_signals()] == [signal.id]


async def test_submit_signal_unregistered_device(site: Site):
    """Test that a signal from an unregistered device raises Rejection and is neither stored nor offered."""
    signal, key = fire_event("DEV-999")

    with pytest.raises(Rejection) as excinfo:
        await submit(site, signal, key)

    assert excinfo.value.reason == "unregistered_device"
    assert excinfo.value.device_id == "DEV-999"
    assert "DEV-999" in excinfo.value.message
    assert site.router.alarm_depth == 0
    assert site.stored_signals() == []


async def test_submit_heartbeat_checks_registry(site: Site):
    """Test that a registered device's heartbeat enters the heartbeat lane and an unknown one raises."""
    known = Heartbeat(device_id="DEV-001", source=Source.MQTT, received_at=T0, seq=1)
    unknown = Heartbeat(device_id="DEV-999", source=Source.MQTT, received_at=T0, seq=1)

    site.intake.submit_heartbeat(known)
    with pytest.raises(Rejection) as excinfo:
        site.intake.submit_heartbeat(unknown)

    assert site.router.heartbeat_depth == 1
    assert excinfo.value.reason == "unregistered_device"
    assert site.metric("gateway_heartbeats_received_total", {"source": "mqtt"}) == 1


async def test_quarantine_stores_rejection_and_counts(site: Site):
    """Test that quarantine keeps reason, detail, origin and raw bytes, and counts the reason."""
    raw = b'{"v":1,"seq":'
    rejection = Rejection(
        "invalid_json",
        "payload is not valid JSON: truncated",
        raw=raw,
        source=Source.MQTT,
        origin="pccc/v1/DEV-001/event",
        device_id="DEV-001",
    )

    await asyncio.wait_for(site.intake.quarantine(rejection), WAIT_S)

    rows = site.journal.reader.execute("SELECT source, origin, device_id, reason, detail, raw FROM quarantine").fetchall()
    assert rows == [("mqtt", "pccc/v1/DEV-001/event", "DEV-001", "invalid_json", "payload is not valid JSON: truncated", raw)]
    assert site.metric("gateway_inputs_rejected_total", {"source": "mqtt", "reason": "invalid_json"}) == 1


async def test_unrouted_lists_signal_until_routed(site: Site):
    """Test that unrouted() returns a stored signal until the routing write marks it routed."""
    signal, key = fire_event()
    await submit(site, signal, key)
    offered: list[Signal] = []
    site.router.on_alarm(offered.append)
    site.router.serve_alarms()

    pending = site.intake.unrouted()

    assert [item.id for item in pending] == [signal.id]
    assert pending[0] == msgspec.structs.replace(signal, facility_id="HN-0001", zone_label="Tầng hầm B1 - Bãi xe")

    engine = IncidentEngine(site.registry, [])
    decision = await asyncio.wait_for(site.journal.write(engine.route(offered[0])), WAIT_S)

    assert decision.action == "opened"
    assert site.intake.unrouted() == []
