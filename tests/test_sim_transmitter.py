"""Tests of the transmitter simulator and the Mosquitto test helper against a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiomqtt
import pytest

from drivers.mqtt.protocol import decode_event, decode_heartbeat, parse_topic
from gateway.signal import Qualifier
from mosquitto_server import BrokerInfo, mosquitto_broker
from simulators.transmitter import ScheduledEvent, TransmitterFleet, parse_schedule

DEVICE_IDS = ["dev-001", "dev-002", "dev-003"]
WAIT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Received:
    at: float
    topic: str
    payload: bytes
    retain: bool
    qos: int

    @property
    def device_id(self) -> str:
        return self.topic.split("/")[2]

    @property
    def kind(self) -> str:
        return self.topic.split("/")[3]


class Recorder:
    """Messages received by a subscriber, with a way to wait for a condition on them."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self._changed = asyncio.Event()

    def add(self, message: Received) -> None:
        self.messages.append(message)
        self._changed.set()
        self._changed = asyncio.Event()

    def of(self, kind: str, device_id: str | None = None) -> list[Received]:
        return [m for m in self.messages if m.kind == kind and (device_id is None or m.device_id == device_id)]

    async def wait_for(self, predicate: Callable[[Recorder], bool], timeout: float = WAIT_TIMEOUT_S) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()


def _client(broker: BrokerInfo, **options) -> aiomqtt.Client:
    return aiomqtt.Client(broker.host, broker.port, timeout=5, **options)


@contextlib.asynccontextmanager
async def subscribed(broker: BrokerInfo, **options) -> AsyncIterator[Recorder]:
    """Subscribe to pccc/v1/# at QoS 1 and record every message until the block ends."""
    recorder = Recorder()
    async with _client(broker, **options) as client:
        await client.subscribe("pccc/v1/#", qos=1)

        async def read() -> None:
            async for message in client.messages:
                recorder.add(
                    Received(time.monotonic(), str(message.topic), bytes(message.payload), message.retain, message.qos)
                )

        reader = asyncio.create_task(read())
        try:
            yield recorder
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


@contextlib.asynccontextmanager
async def running(fleet: TransmitterFleet) -> AsyncIterator[asyncio.Task[None]]:
    """Run the fleet in a task and stop it, bounded, when the block ends."""
    task = asyncio.create_task(fleet.run())
    try:
        yield task
    finally:
        fleet.stop()
        await asyncio.wait_for(task, timeout=WAIT_TIMEOUT_S + 10)


@pytest.fixture
def broker(tmp_path):
    with mosquitto_broker(tmp_path, persistence=False) as info:
        yield info


def _seqs(messages: list[Received]) -> list[int]:
    received_at = dt.datetime.now(dt.timezone.utc)
    seqs = []
    for message in messages:
        topic = parse_topic(message.topic)
        if topic.kind == "event":
            seqs.append(decode_event(topic, message.payload, received_at).seq)
        else:
            seqs.append(decode_heartbeat(topic, message.payload, received_at).seq)
    return seqs


@pytest.mark.mosquitto
async def test_fleet_publishes_status_heartbeats_and_schedule(broker):
    """Test that 3 devices publish online, send heartbeats with rising seq and the scheduled fire on time."""
    schedule = [
        ScheduledEvent(at_s=1.0, device_index=0, code="110", qualifier="E", zone=3, label="Tầng 3 - Kho"),
        ScheduledEvent(at_s=2.0, device_index=0, code="110", qualifier="R", zone=3, label="Tầng 3 - Kho"),
    ]
    fleet = TransmitterFleet(broker.url, DEVICE_IDS, interval_s=0.5, schedule=schedule, boot=7)

    async with subscribed(broker) as recorder:
        started = time.monotonic()
        await asyncio.wait_for(fleet.run(duration_s=3.0), timeout=WAIT_TIMEOUT_S + 10)

        # The offline published at a clean stop reaches the subscriber after run() returns.
        await recorder.wait_for(lambda r: len([m for m in r.of("status") if m.payload == b"offline"]) == 3)

    async with subscribed(broker) as late_recorder:
        await late_recorder.wait_for(lambda r: len(r.of("status")) == 3)

    for device_id in DEVICE_IDS:
        statuses = [m.payload for m in recorder.of("status", device_id)]
        assert statuses == [b"online", b"offline"], device_id
        retained = [(m.payload, m.retain) for m in late_recorder.of("status", device_id)]
        assert retained == [(b"offline", True)], device_id

        heartbeats = recorder.of("heartbeat", device_id)
        assert len(heartbeats) >= 3, device_id
        assert {m.qos for m in heartbeats} == {0}, device_id
        heartbeat_seqs = _seqs(heartbeats)
        assert heartbeat_seqs == sorted(set(heartbeat_seqs)), device_id

    received_at = dt.datetime.now(dt.timezone.utc)
    events = recorder.of("event")
    assert [m.device_id for m in events] == ["dev-001", "dev-001"]
    assert [m.qos for m in events] == [1, 1]
    fire = decode_event(parse_topic(events[0].topic), events[0].payload, received_at)
    assert fire.code == "110"
    assert fire.qualifier == Qualifier.NEW
    assert fire.sia_code == "FA"
    assert fire.zone == 3
    assert fire.zone_label == "Tầng 3 - Kho"
    assert fire.boot == 7
    assert 0.8 <= events[0].at - started <= 2.0
    restore = decode_event(parse_topic(events[1].topic), events[1].payload, received_at)
    assert restore.qualifier == Qualifier.RESTORE
    assert restore.sia_code == "FR"
    assert 1.8 <= events[1].at - started <= 3.0

    # Events and heartbeats of a device share one seq counter, so together they rise without repeats.
    device_messages = [m for m in recorder.messages if m.device_id == "dev-001" and m.kind in ("event", "heartbeat")]
    all_seqs = _seqs(device_messages)
    assert all_seqs == list(range(len(all_seqs)))


@pytest.mark.mosquitto
async def test_fleet_publish_event_returns_seq(broker):
    """Test that publish_event sends a QoS 1 event and returns the seq it carries."""
    published: list[tuple[str, str, bytes]] = []
    fleet = TransmitterFleet(
        broker.url, DEVICE_IDS, interval_s=60.0, boot=None, on_publish=lambda *args: published.append(args)
    )

    async with subscribed(broker) as recorder, running(fleet):
        await fleet.wait_connected(timeout=WAIT_TIMEOUT_S)
        publishing = fleet.publish_event(2, "301", "E", zone=0, label="Mất điện lưới")
        seq = await asyncio.wait_for(publishing, timeout=WAIT_TIMEOUT_S)
        await recorder.wait_for(lambda r: len(r.of("event")) == 1)

    event_message = recorder.of("event")[0]
    signal = decode_event(parse_topic(event_message.topic), event_message.payload, dt.datetime.now(dt.timezone.utc))
    assert event_message.device_id == "dev-003"
    assert signal.seq == seq
    assert signal.code == "301"
    assert signal.boot == fleet.devices[2].boot
    assert ("dev-003", "pccc/v1/dev-003/event", event_message.payload) in published


@pytest.mark.mosquitto
async def test_fleet_spreads_first_heartbeats(broker):
    """Test that the first heartbeats of a fleet are spread over the interval, not sent together."""
    device_ids = [f"dev-{index:03d}" for index in range(40)]
    fleet = TransmitterFleet(broker.url, device_ids, interval_s=2.0, heartbeat_qos=1)

    async with subscribed(broker) as recorder, running(fleet):
        await fleet.wait_connected(timeout=WAIT_TIMEOUT_S)
        connected_at = time.monotonic()
        await recorder.wait_for(lambda r: len({m.device_id for m in r.of("heartbeat")}) == len(device_ids))

    first_at: dict[str, float] = {}
    for message in recorder.of("heartbeat"):
        first_at.setdefault(message.device_id, message.at - connected_at)
    offsets = sorted(first_at.values())
    assert offsets[-1] - offsets[0] >= 0.8
    assert offsets[-1] <= 2.5
    assert {m.qos for m in recorder.of("heartbeat")} == {1}


@pytest.mark.mosquitto
async def test_fleet_reconnects_after_broker_restart(tmp_path):
    """Test that devices reconnect after a broker restart and an event published meanwhile arrives."""
    with mosquitto_broker(tmp_path) as broker:
        fleet = TransmitterFleet(broker.url, DEVICE_IDS, interval_s=60.0)
        async with running(fleet):
            await fleet.wait_connected(timeout=WAIT_TIMEOUT_S)
            port = broker.port

            await asyncio.to_thread(broker.stop)
            async with asyncio.timeout(WAIT_TIMEOUT_S):
                while fleet.connected_count:
                    await asyncio.sleep(0.05)
            pending_event = asyncio.create_task(fleet.publish_event(1, "110", zone=5))
            await asyncio.to_thread(broker.start)

            async with subscribed(broker) as recorder:
                await fleet.wait_connected(timeout=WAIT_TIMEOUT_S)
                seq = await asyncio.wait_for(pending_event, timeout=WAIT_TIMEOUT_S)
                await recorder.wait_for(lambda r: len(r.of("event")) == 1)

    assert broker.port == port
    assert fleet.connection_failures >= 3
    event_message = recorder.of("event")[0]
    assert event_message.device_id == "dev-002"
    signal = decode_event(parse_topic(event_message.topic), event_message.payload, dt.datetime.now(dt.timezone.utc))
    assert signal.seq == seq
    assert signal.zone == 5


@pytest.mark.mosquitto
async def test_fleet_uses_device_credentials(tmp_path):
    """Test that each device logs in with its own password and the ACL limits it to its own topics."""
    password_file = tmp_path / "passwords"
    for user, password in [("dev-001", "right-1"), ("dev-002", "right-2"), ("gateway", "gateway-pw")]:
        subprocess.run(
            ["mosquitto_passwd", "-b", *([] if password_file.exists() else ["-c"]), str(password_file), user, password],
            check=True,
            capture_output=True,
            timeout=10,
        )
    acl_file = tmp_path / "acl"
    acl_file.write_text("user gateway\ntopic read pccc/v1/#\n\npattern readwrite pccc/v1/%u/#\n", encoding="utf-8")

    with mosquitto_broker(tmp_path, password_file=password_file, acl_file=acl_file, persistence=False) as broker:
        passwords = {"dev-001": "right-1", "dev-002": "wrong"}
        fleet = TransmitterFleet(broker.url, ["dev-001", "dev-002"], passwords=passwords)
        async with subscribed(broker, username="gateway", password="gateway-pw") as recorder, running(fleet):
            await recorder.wait_for(lambda r: len(r.of("status")) >= 1)
            async with asyncio.timeout(WAIT_TIMEOUT_S):
                while fleet.connection_failures == 0:
                    await asyncio.sleep(0.05)
            connected = fleet.connected_count

            # Under MQTT 3.1.1 Mosquitto acknowledges a publish that the ACL denies and drops it,
            # so a later publish on the device's own topic marks when the first would have arrived.
            async with _client(broker, username="dev-001", password="right-1") as device:
                await device.publish("pccc/v1/dev-002/event", b"forged", qos=1)
                await device.publish("pccc/v1/dev-001/reply", b"marker", qos=1)
            await recorder.wait_for(lambda r: len(r.of("reply")) == 1)

        with pytest.raises(aiomqtt.MqttError):
            async with _client(broker, username="dev-002", password="wrong"):
                pass

    assert connected == 1
    assert [(m.device_id, m.payload) for m in recorder.of("status")][0] == ("dev-001", b"online")
    assert [m.device_id for m in recorder.messages if m.device_id != "dev-001"] == []


@pytest.mark.mosquitto
async def test_mosquitto_restart_keeps_queued_messages(tmp_path):
    """Test that a restart keeps QoS 1 messages queued for a persistent session that is offline."""
    with mosquitto_broker(tmp_path) as broker:
        async with _client(broker, identifier="gateway-test", clean_session=False) as subscriber:
            await subscriber.subscribe("pccc/v1/#", qos=1)
        async with _client(broker, identifier="publisher") as publisher:
            await publisher.publish("pccc/v1/dev-001/event", b"queued", qos=1)

        port = broker.port
        broker.restart()
        assert broker.port == port

        async with _client(broker, identifier="gateway-test", clean_session=False) as subscriber:
            async with asyncio.timeout(WAIT_TIMEOUT_S):
                message = await anext(aiter(subscriber.messages))

    assert str(message.topic) == "pccc/v1/dev-001/event"
    assert message.payload == b"queued"
    assert not broker.running


@pytest.mark.mosquitto
def test_mosquitto_broker_stops_when_body_raises(tmp_path):
    """Test that the broker is stopped when the block raises."""
    with pytest.raises(ZeroDivisionError):
        with mosquitto_broker(tmp_path, persistence=False) as broker:
            assert broker.running
            1 / 0

    assert not broker.running
    with pytest.raises(OSError):
        socket.create_connection((broker.host, broker.port), timeout=1).close()


def test_parse_schedule_reads_items():
    """Test that parse_schedule reads times, indexes, codes, zones and labels with colons."""
    parsed = parse_schedule(["10:0:110:E:3:Tầng 3 - Kho", "40.5:2:110:R:3", "5:1:301:E:0:Nhà A: cửa 2"])

    assert parsed == [
        ScheduledEvent(10.0, 0, "110", "E", 3, "Tầng 3 - Kho"),
        ScheduledEvent(40.5, 2, "110", "R", 3, ""),
        ScheduledEvent(5.0, 1, "301", "E", 0, "Nhà A: cửa 2"),
    ]


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ("10:0:110:E", "4 fields"),
        ("soon:0:110:E:3", "time 'soon'"),
        ("-1:0:110:E:3", "time '-1'"),
        ("10:x:110:E:3", "device index 'x'"),
        ("10:0:11:E:3", "event code '11'"),
        ("10:0:110:X:3", "qualifier 'X'"),
        ("10:0:110:E:10000", "zone '10000'"),
    ],
)
def test_parse_schedule_rejects_invalid(item, reason):
    """Test that parse_schedule names the invalid item, the reason and the expected form."""
    with pytest.raises(ValueError) as raised:
        parse_schedule(["1:0:110:E:1", item])

    message = str(raised.value)
    assert repr(item) in message
    assert reason in message
    assert "AT_S:DEVICE_INDEX:CODE:QUALIFIER:ZONE[:LABEL]" in message


@pytest.mark.parametrize(
    ("options", "expected_text"),
    [
        ({"schedule": [ScheduledEvent(1.0, 3)]}, "device index 3"),
        ({"heartbeat_qos": 2}, "QoS 2"),
        ({"interval_s": 0}, "interval 0"),
    ],
)
async def test_fleet_rejects_invalid_settings(options, expected_text):
    """Test that the fleet raises ValueError for invalid settings before connecting."""
    with pytest.raises(ValueError, match=expected_text):
        TransmitterFleet("mqtt://127.0.0.1:1883", DEVICE_IDS, **options)


@pytest.mark.parametrize(
    ("url", "device_ids", "expected_text"),
    [
        ("mqtts://127.0.0.1:8883", DEVICE_IDS, "TLS"),
        ("mqtt://user:pw@127.0.0.1:1883", DEVICE_IDS, "credentials"),
        ("mqtt://127.0.0.1:1883", ["dev/1"], "dev/1"),
        ("mqtt://127.0.0.1:1883", ["dev-1", "dev-1"], "twice"),
        ("mqtt://127.0.0.1:1883", [], "at least one"),
    ],
)
async def test_fleet_rejects_invalid_url_or_ids(url, device_ids, expected_text):
    """Test that the fleet raises ValueError for an invalid broker URL or device ids."""
    with pytest.raises(ValueError, match=expected_text):
        TransmitterFleet(url, device_ids)


async def test_fleet_publish_event_requires_running():
    """Test that publish_event raises RuntimeError when the fleet is not running."""
    fleet = TransmitterFleet("mqtt://127.0.0.1:1883", DEVICE_IDS)

    with pytest.raises(RuntimeError, match="not running"):
        await fleet.publish_event(0, "110")
