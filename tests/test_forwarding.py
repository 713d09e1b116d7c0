"""Forwarding to command centres: nothing lost, nothing doubled, order kept per incident.

The first group runs the forwarder in the test's event loop against simulators on 127.0.0.1
(tampering, dead letters, mutual TLS, the 100 s confirmation limit, the circuit breaker). The
second group runs `gateway run` as a subprocess with a real Mosquitto, kills it with SIGKILL
and checks what the simulated centres recorded.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import logging
import random
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import aiohttp
import paho.mqtt.client as paho
import pytest
import trustme
from aiohttp import web
from typer.testing import CliRunner

from drivers.mqtt import protocol
from gateway import journal, registry
from gateway.cli import outbox as outbox_cli
from gateway.backoff import Backoff
from gateway.forwarder import (
    TROUBLE_CODE,
    Circuit,
    CircuitBreaker,
    HttpReply,
    Outcome,
    TroubleKind,
    TroubleReporter,
    _retry_after,
    classify,
    forward_metrics,
    trouble_signal,
)
from gateway.journal import Journal
from gateway.metrics import Metrics
from gateway.signal import EventClass, Qualifier, Source, new_signal_id
from simulators.command_center import CommandCenter, server_tls_context
from tests.conftest import (
    BRIDGE_USER,
    DEVICE_PASSWORD,
    FACILITY,
    GATEWAY_PASSWORD,
    GATEWAY_USER,
    SECRET,
    ZONES,
    gateway_args,
    mosquitto_pub,
)
from tests.forwarding_rig import FACILITIES, FakeClock, ForwardingRig, destination, journal_connection

# In-process forwarder


@pytest.fixture
async def rig_factory(tmp_path):
    rigs: list[ForwardingRig] = []

    async def make(destinations, **options) -> ForwardingRig:
        rig = ForwardingRig(tmp_path, destinations, **options)
        await rig.start()
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.stop()


class TamperingProxy:
    """A loopback HTTP proxy that flips one byte of each request body on its way to the centre."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.tampered = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/events", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.Response:
        body = bytearray(await request.read())
        # "kind":"signal" becomes "kind":"Signal": still valid JSON, one byte changed.
        position = body.index(b'"signal"') + 1
        body[position] ^= 0x20
        self.tampered += 1
        headers = {key: value for key, value in request.headers.items() if key.lower() not in ("host", "content-length")}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.post(f"{self.target}/v1/events", data=bytes(body), headers=headers) as response:
                return web.Response(status=response.status, body=await response.read(), content_type="application/json")


async def test_forwarder_tampered_body_fails_signature(rig_factory, centre):
    """Test that a body changed in transit gets 401 at the centre and is dead-lettered, not recorded."""
    proxy = TamperingProxy(centre.url)
    await proxy.start()
    try:
        rig = await rig_factory([destination("central", proxy.url)])
        signal = await rig.alarm(FACILITIES[0].id)
        await rig.wait_until(lambda: rig.outbox(signal.id, "central")["state"] == "dead", 10, "dead letter")
    finally:
        await proxy.stop()

    assert proxy.tampered == 1
    assert centre.status_counts[401] == 1
    assert centre.events == []
    row = rig.outbox(signal.id, "central")
    assert row["attempts"] == 1
    assert "401" in row["last_error"]
    assert "signature does not match" in row["last_error"]


async def test_forwarder_400_dead_letter_and_requeue(rig_factory, centre):
    """Test that a 400 dead-letters the event, raises one trouble, and a requeue delivers and restores it."""
    rig = await rig_factory([destination("central", centre.url)])
    rejected_id = new_signal_id()
    centre.set_mode("reject_event", event_id=rejected_id)
    rejected = await rig.alarm(FACILITIES[0].id, zone=1, signal_id=rejected_id)
    await rig.wait_until(lambda: rig.outbox(rejected.id, "central")["state"] == "dead", 10, "dead letter")

    troubles = await rig.troubles.wait_for(lambda signals: len(signals) >= 1, timeout=5)
    trouble = troubles[0]
    assert trouble.code == TROUBLE_CODE
    assert trouble.source is Source.SUPERVISION
    assert trouble.event_class is EventClass.TROUBLE
    assert trouble.qualifier is Qualifier.NEW
    assert trouble.device_id == "forward:central"
    assert rejected.id in trouble.text

    # The next alarm of the same incident is not held back by the dead letter.
    follower = await rig.alarm(FACILITIES[0].id, zone=2)
    await centre.wait_for(lambda events: any(entry["idempotency_key"] == follower.id for entry in events), timeout=10)
    assert rig.outbox(rejected.id, "central")["state"] == "dead"
    assert "HTTP 400" in rig.outbox(rejected.id, "central")["last_error"]

    centre.set_mode("normal")
    runner = CliRunner()
    result = await asyncio.to_thread(
        runner.invoke, outbox_cli.app, ["requeue", rejected.id, "--data-dir", str(rig.directory)], env={"GATEWAY_LANG": "en"}
    )
    assert result.exit_code == 0, result.output
    assert "requeued for central" in result.output

    await centre.wait_for(lambda events: any(entry["idempotency_key"] == rejected.id for entry in events), timeout=10)
    restored = await rig.troubles.wait_for(lambda signals: len(signals) >= 2, timeout=5)
    assert restored[1].qualifier is Qualifier.RESTORE
    assert restored[1].device_id == "forward:central"
    assert len(restored) == 2
    await rig.wait_until(lambda: rig.outbox(rejected.id, "central")["state"] == "delivered", 5, "delivered state")
    assert rig.query("SELECT requeued_at IS NOT NULL FROM dead_letters WHERE event_id = ?", rejected.id) == [(1,)]
    assert rig.query("SELECT COUNT(*) FROM outbox_requeue") == [(0,)]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    server = authority.issue_cert("127.0.0.1")
    client = authority.issue_cert("gateway.client.invalid")
    files = {
        "ca": directory / "ca.pem",
        "server": directory / "server.pem",
        "client": directory / "client.pem",
    }
    authority.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_and_cert_chain_pem.write_to_path(str(files["server"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    return files


async def test_forwarder_mutual_tls_client_certificate(rig_factory, tls_files):
    """Test that mutual TLS delivers with the client certificate and retries, without dead letter, without it."""
    context = server_tls_context(tls_files["server"], tls_files["server"], client_ca_file=tls_files["ca"])
    secure_centre = CommandCenter(secret=SECRET, ssl_context=context)
    await secure_centre.start()
    try:
        assert secure_centre.url.startswith("https://127.0.0.1:")
        rig = await rig_factory(
            [
                destination("with-cert", secure_centre.url, ca_file=str(tls_files["ca"]), client_cert=str(tls_files["client"])),
                destination("no-cert", secure_centre.url, ca_file=str(tls_files["ca"])),
            ]
        )
        signal = await rig.alarm(FACILITIES[0].id)
        events = await secure_centre.wait_for(lambda events: len(events) >= 1, timeout=10)
        await rig.wait_until(lambda: rig.outbox(signal.id, "no-cert")["attempts"] >= 2, 10, "two failed attempts without a certificate")
    finally:
        await secure_centre.stop()

    assert [entry["idempotency_key"] for entry in events] == [signal.id]
    await rig.wait_until(lambda: rig.outbox(signal.id, "with-cert")["state"] == "delivered", 5, "delivered state")
    without = rig.outbox(signal.id, "no-cert")
    assert without["state"] == "pending"
    assert without["last_error"] != ""
    assert rig.query("SELECT COUNT(*) FROM dead_letters") == [(0,)]
    assert rig.troubles.signals == []


async def test_forwarder_unconfirmed_fire_alarm_trouble(rig_factory, centre):
    """Test that a fire alarm unconfirmed past the limit raises one trouble, restored on confirmation."""
    clock = FakeClock()
    rig = await rig_factory([destination("central", centre.url)], clock=clock)
    centre.set_mode("down")
    fire = await rig.alarm(FACILITIES[0].id)
    trouble = await rig.alarm(FACILITIES[1].id, code="301", event_class=EventClass.TROUBLE)
    restore = await rig.alarm(FACILITIES[0].id, qualifier=Qualifier.RESTORE)
    await rig.wait_until(lambda: centre.status_counts[503] >= 1, 5, "first failed attempt")
    assert rig.troubles.signals == []

    clock.offset = 101.0
    raised = await rig.troubles.wait_for(lambda signals: len(signals) >= 1, timeout=5)
    assert raised[0].device_id == "forward:central"
    assert raised[0].qualifier is Qualifier.NEW
    assert raised[0].code == TROUBLE_CODE
    assert fire.id in raised[0].text
    assert trouble.id not in raised[0].text
    assert restore.id not in raised[0].text

    # Later checks of the watch, and a forwarder restart, raise nothing more. The restart comes
    # after the trouble's record is durable; a crash before that raises it once more, by design.
    await rig.wait_until(lambda: rig.query("SELECT COUNT(*) FROM forward_troubles") == [(1,)], 5, "trouble recorded")
    await rig.stop_forwarder()
    rig.start_forwarder()
    seen = centre.status_counts[503]
    await rig.wait_until(lambda: centre.status_counts[503] >= seen + 2, 15, "two more failed attempts")
    assert len(rig.troubles.signals) == 1

    centre.set_mode("normal")
    restored = await rig.troubles.wait_for(lambda signals: len(signals) >= 2, timeout=15)
    assert restored[1].qualifier is Qualifier.RESTORE
    assert restored[1].device_id == "forward:central"
    assert fire.id in restored[1].text
    await centre.wait_for(lambda events: len(events) >= 3, timeout=10)
    assert len(rig.troubles.signals) == 2
    await rig.wait_until(lambda: rig.query("SELECT restored_at IS NOT NULL FROM forward_troubles") == [(1,)], 5, "restore recorded")
    assert rig.query("SELECT kind, device_id FROM forward_troubles") == [("unconfirmed", "forward:central")]


async def test_forwarder_one_confirmation_is_enough(rig_factory, centre):
    """Test that a fire alarm confirmed by one of two destinations raises no trouble when the other is down."""
    clock = FakeClock()
    down_centre = CommandCenter(secret=SECRET)
    await down_centre.start()
    try:
        down_centre.set_mode("down")
        rig = await rig_factory([destination("central", centre.url), destination("hanoi", down_centre.url)], clock=clock)
        fire = await rig.alarm(FACILITIES[0].id)
        await centre.wait_for(lambda events: len(events) >= 1, timeout=10)
        await rig.wait_until(lambda: down_centre.status_counts[503] >= 1, 5, "failed attempt at the down centre")
        clock.offset = 101.0
        seen = down_centre.status_counts[503]
        await rig.wait_until(lambda: down_centre.status_counts[503] >= seen + 2, 15, "two more failed attempts")
    finally:
        await down_centre.stop()
    assert rig.outbox(fire.id, "central")["state"] == "delivered"
    assert rig.troubles.signals == []


async def test_forwarder_stuck_event_blocks_own_incident(rig_factory, centre):
    """Test that an event failing again and again delays its own incident only, and order is kept."""
    rig = await rig_factory([destination("central", centre.url)])
    first_id = new_signal_id()
    centre.set_mode("fail_event", event_id=first_id)
    first = await rig.alarm(FACILITIES[0].id, zone=1, signal_id=first_id)
    second = await rig.alarm(FACILITIES[0].id, zone=2)
    others = [await rig.alarm(FACILITIES[1].id, zone=zone) for zone in (1, 2, 1)]

    events = await centre.wait_for(lambda events: len(events) >= 3, timeout=10)
    assert [entry["idempotency_key"] for entry in events] == [signal.id for signal in others]
    await rig.wait_until(lambda: rig.outbox(first.id, "central")["attempts"] >= 2, 10, "retries of the stuck event")
    assert rig.outbox(second.id, "central")["state"] == "pending"
    assert rig.outbox(second.id, "central")["attempts"] == 0

    centre.set_mode("normal")
    events = await centre.wait_for(lambda events: len(events) >= 5, timeout=20)
    keys = [entry["idempotency_key"] for entry in events]
    assert keys[3:] == [first.id, second.id]


async def test_forwarder_circuit_opens_once_and_closes(rig_factory, centre, caplog):
    """Test that the breaker opens after consecutive failures, probes sparingly, and closes on success."""
    caplog.set_level(logging.DEBUG, logger="gateway.forwarder")
    rig = await rig_factory([destination("central", centre.url)], breaker_threshold=3)
    centre.set_mode("down")
    signals = [await rig.alarm(facility.id, code="200", event_class=EventClass.SUPERVISORY) for facility in FACILITIES]
    signals += [await rig.alarm(facility.id, code="301", event_class=EventClass.TROUBLE) for facility in FACILITIES]

    def circuit_state() -> float:
        return rig.metrics.registry.get_sample_value("gateway_forward_circuit_state", {"destination": "central"})

    await rig.wait_until(lambda: circuit_state() == 2, 10, "circuit open")
    link = rig.forwarder.links["central"]
    await rig.wait_until(lambda: link.breaker.failed_probes >= 2, 15, "two failed probes")
    # Before opening, at most the threshold plus the requests already in flight reach the centre,
    # then one probe at a time.
    assert centre.status_counts[503] <= 3 + link.destination.max_in_flight + link.breaker.failed_probes

    centre.set_mode("normal")
    events = await centre.wait_for(lambda events: len(events) >= len(signals), timeout=20)
    assert {entry["idempotency_key"] for entry in events} == {signal.id for signal in signals}
    assert link.breaker.state is Circuit.CLOSED
    assert circuit_state() == 0
    messages = [record.getMessage() for record in caplog.records if record.name == "gateway.forwarder"]
    assert sum("circuit to central opened" in message for message in messages) == 1
    assert sum("circuit to central closed" in message for message in messages) == 1
    await rig.wait_until(
        lambda: rig.query("SELECT circuit FROM destination_status WHERE destination = 'central'") == [("closed",)], 5, "closed circuit recorded"
    )


async def test_forwarder_429_is_retried(rig_factory, centre):
    """Test that 429 is retried and the attempt is recorded with its status."""
    rig = await rig_factory([destination("central", centre.url)])
    centre.set_mode("fail_next", count=1, status=429)
    signal = await rig.alarm(FACILITIES[0].id)
    await centre.wait_for(lambda events: len(events) >= 1, timeout=10)
    await rig.wait_until(lambda: rig.outbox(signal.id, "central")["state"] == "delivered", 5, "delivered state")
    row = rig.outbox(signal.id, "central")
    assert row["attempts"] == 2
    assert "HTTP 429" in row["last_error"]
    assert row["first_attempt_at"] <= row["delivered_at"]
    assert rig.query("SELECT last_status, confirmed_status FROM deliveries") == [(201, 201)]


# The gateway as a subprocess, with Mosquitto


class BridgePublisher:
    """A concentrator on paho's network thread that publishes QoS 1 events for many devices."""

    def __init__(self, broker, client_id: str) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.username_pw_set(BRIDGE_USER, DEVICE_PASSWORD)
        self.client.max_inflight_messages_set(50)
        self.client.max_queued_messages_set(0)
        self.connected = threading.Event()
        self.all_acked = threading.Event()
        self._lock = threading.Lock()
        self._acked = 0
        self._expected = 0
        self.client.on_connect = lambda client, userdata, flags, reason_code, properties: self.connected.set()
        self.client.on_publish = self._on_publish
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self._acked += 1
            if self._acked >= self._expected:
                self.all_acked.set()

    def publish_all(self, messages: list[tuple[str, bytes]]) -> None:
        with self._lock:
            self._expected += len(messages)
            self.all_acked.clear()
        for topic, payload in messages:
            self.client.publish(topic, payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def event(seq: int, code: str, zone: int) -> bytes:
    return protocol.encode_event(boot=1, seq=seq, code=code, qualifier="E", zone=zone)


def register_sites(data_dir: Path, facilities: int, devices_per_facility: int) -> list[str]:
    """Register facilities HN-1001... with devices FWD-001...; return the device ids."""
    device_ids: list[str] = []
    data_dir.mkdir(parents=True, exist_ok=True)
    with closing(journal.connect(data_dir / "journal.db")) as conn:
        journal.migrate(conn)
        conn.execute("BEGIN")
        for index in range(facilities):
            facility = registry.Facility(
                id=f"HN-{1001 + index}", name=f"Cơ sở {index + 1}", province=FACILITY.province, commune=FACILITY.commune
            )
            registry.add_facility(conn, facility, ZONES)
            for _ in range(devices_per_facility):
                device_id = f"FWD-{len(device_ids) + 1:03d}"
                registry.add_device(conn, registry.make_device(id=device_id, facility_id=facility.id))
                device_ids.append(device_id)
        conn.execute("COMMIT")
    return device_ids


async def publish_events(broker, messages: list[tuple[str, bytes]], clients: int, timeout: float) -> None:
    """Publish `messages` over several bridge connections and wait until the broker acked all."""
    publishers = [BridgePublisher(broker, f"bridge-{index}") for index in range(clients)]
    try:
        for publisher in publishers:
            assert await asyncio.to_thread(publisher.connected.wait, 10), "bridge did not connect to Mosquitto"
        for index, publisher in enumerate(publishers):
            publisher.publish_all(messages[index::clients])
        for publisher in publishers:
            assert await asyncio.to_thread(publisher.all_acked.wait, timeout), "Mosquitto did not ack every event"
    finally:
        for publisher in publishers:
            publisher.close()


async def wait_for_signals(data_dir: Path, count: int, timeout: float) -> None:
    """Wait until the gateway's journal contains `count` signals from FWD devices.

    The broker acks the publisher on receipt, before the gateway stored the message, so the
    test polls the journal, the only place that shows the gateway has it.
    """
    deadline = time.monotonic() + timeout
    stored = 0
    while time.monotonic() < deadline:
        with closing(journal_connection(data_dir / "journal.db")) as conn:
            stored = conn.execute("SELECT COUNT(*) FROM signals WHERE device_id LIKE 'FWD-%'").fetchone()[0]
        if stored >= count:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the gateway stored {stored} of {count} signals within {timeout} s")


def device_events(events: list[dict]) -> list[dict]:
    """The recorded entries that came from devices, without troubles the gateway raised itself."""
    return [entry for entry in events if not entry["event"]["device"]["id"].startswith("forward:")]


def outbox_order(data_dir: Path, destination_name: str) -> dict[str, list[str]]:
    """Event ids per incident in outbox order: the order in which the gateway decided them."""
    order: dict[str, list[str]] = collections.defaultdict(list)
    with closing(journal_connection(data_dir / "journal.db")) as conn:
        rows = conn.execute(
            "SELECT incident_id, event_id FROM outbox WHERE destination = ? ORDER BY seq", (destination_name,)
        ).fetchall()
    for incident_id, event_id in rows:
        order[incident_id].append(event_id)
    return order


def arrival_order(events: list[dict]) -> dict[str, list[str]]:
    order: dict[str, list[str]] = collections.defaultdict(list)
    for entry in events:
        order[entry["event"]["incident"]["id"]].append(entry["idempotency_key"])
    return order


def run_outbox_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.outbox", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"GATEWAY_LANG": "en", "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.mosquitto
@pytest.mark.timeout(300)
async def test_forwarding_outage_and_sigkill_lose_nothing(tmp_path, broker, centre, gateway_factory):
    """Test that 1,000 alarms survive a 30 s outage, a slow centre and SIGKILL, once each and in order."""
    site = tmp_path / "site"
    device_ids = register_sites(site, facilities=10, devices_per_facility=5)
    assert len(device_ids) == 50
    messages = [
        (protocol.event_topic(device_id), event(seq, "110" if seq % 2 else "200", seq % 3 + 1))
        for seq in range(1, 21)
        for device_id in device_ids
    ]
    assert len(messages) == 1000

    await centre.stop()
    outage_started = time.monotonic()
    first = gateway_factory(gateway_args(broker, centre.url), directory=site)
    first.start()
    await publish_events(broker, messages, clients=5, timeout=60)
    await wait_for_signals(site, 1000, timeout=30)

    # The outage lasts 30 s whatever the publishing took; the forwarder keeps probing meanwhile.
    await asyncio.sleep(max(0.0, 30.0 - (time.monotonic() - outage_started)))
    assert first.metric("gateway_forward_failures_total", destination="central", kind="connection") >= 1
    assert centre.events == []

    centre.set_mode("slow", seconds=0.05)
    await centre.start()
    await centre.wait_for(lambda events: len(device_events(events)) >= 300, timeout=90)
    first.kill()
    centre.set_mode("normal")

    second = gateway_factory(gateway_args(broker, centre.url), directory=site)
    second.start()
    events = await centre.wait_for(lambda events: len(device_events(events)) >= 1000, timeout=120)
    assert second.terminate() == 0

    keys = collections.Counter(entry["idempotency_key"] for entry in events)
    assert max(keys.values()) == 1
    with closing(journal_connection(site / "journal.db")) as conn:
        expected = {row[0] for row in conn.execute("SELECT id FROM signals WHERE device_id LIKE 'FWD-%'")}
        undelivered = conn.execute("SELECT COUNT(*) FROM outbox WHERE state != 'delivered'").fetchone()[0]
    assert {entry["idempotency_key"] for entry in device_events(events)} == expected
    assert undelivered == 0

    decided = outbox_order(site, "central")
    arrived = arrival_order(events)
    assert len(arrived) == 20
    for incident_id, event_ids in arrived.items():
        assert event_ids == decided[incident_id], f"incident {incident_id} arrived out of order"


@pytest.mark.mosquitto
@pytest.mark.timeout(180)
async def test_forwarding_two_destinations_one_down(tmp_path, broker, centre, gateway_factory):
    """Test that the central centre gets everything on time while the province centre is down, which then catches up."""
    site = tmp_path / "site"
    device_ids = register_sites(site, facilities=4, devices_per_facility=1)
    province_centre = CommandCenter(secret=SECRET)
    await province_centre.start()
    await province_centre.stop()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[[destinations]]
name = "central"
url = "{centre.url}"
secret = "{SECRET}"

[[destinations]]
name = "hanoi"
url = "{province_centre.url}"
scope = "province:{FACILITY.province}"
secret = "{SECRET}"
""",
        encoding="utf-8",
    )
    args = ["--config", str(config), "--mqtt", f"mqtt://{GATEWAY_USER}:{GATEWAY_PASSWORD}@{broker.host}:{broker.port}"]
    gateway = gateway_factory(args, directory=site)
    gateway.start()
    try:
        messages = [
            (protocol.event_topic(device_id), event(seq, "110" if seq % 2 else "200", seq % 3 + 1))
            for seq in range(1, 11)
            for device_id in device_ids
        ]
        await publish_events(broker, messages, clients=2, timeout=30)
        await wait_for_signals(site, 40, timeout=15)
        central_events = await centre.wait_for(lambda events: len(events) >= 40, timeout=15)
        for entry in central_events:
            received = dt.datetime.fromisoformat(entry["event"]["times"]["received"])
            recorded = dt.datetime.fromisoformat(entry["received_at"])
            assert (recorded - received).total_seconds() < 5.0, f"event {entry['idempotency_key']} arrived late"
        deadline = time.monotonic() + 10
        while gateway.metric("gateway_forward_circuit_state", destination="hanoi") != 2:
            assert time.monotonic() < deadline, "circuit to the down province centre not open within 10 s"
            await asyncio.sleep(0.1)

        await province_centre.start()
        province_events = await province_centre.wait_for(lambda events: len(events) >= 40, timeout=60)
        assert gateway.terminate() == 0
    finally:
        await province_centre.stop()

    assert {entry["idempotency_key"] for entry in province_events} == {entry["idempotency_key"] for entry in central_events}
    assert arrival_order(province_events) == outbox_order(site, "hanoi")
    assert arrival_order(central_events) == outbox_order(site, "central")


@pytest.mark.mosquitto
@pytest.mark.timeout(120)
def forward_trouble(entry: dict, qualifier: str) -> bool:
    signal = entry["event"]["signal"] or {}
    return entry["event"]["device"]["id"] == "forward:central" and signal.get("qualifier") == qualifier


async def test_forwarding_dead_letter_requeue_with_cli(data_dir, broker, centre, gateway):
    """Test that a 400 dead-letters the event, `gateway outbox` shows it, and requeue delivers it."""
    centre.set_mode("down")
    mosquitto_pub(broker, protocol.event_topic("DEV-001"), event(1, "110", 1), user="DEV-001")
    deadline = time.monotonic() + 10
    rows: list[tuple[str]] = []
    while not rows:
        assert time.monotonic() < deadline, "no outbox row 10 s after publishing"
        await asyncio.sleep(0.05)
        with closing(journal_connection(data_dir / "journal.db")) as conn:
            rows = conn.execute("SELECT event_id FROM outbox WHERE destination = 'central'").fetchall()
    assert len(rows) == 1
    rejected_id = rows[0][0]
    centre.set_mode("normal")
    centre.set_mode("reject_event", event_id=rejected_id)

    deadline = time.monotonic() + 20
    while run_outbox_cli(data_dir, "dead", "--json").stdout.count(rejected_id) == 0:
        assert time.monotonic() < deadline, "event not dead-lettered within 20 s"
        await asyncio.sleep(0.2)
    listed = json.loads(run_outbox_cli(data_dir, "dead", "--json").stdout)["dead_letters"]
    assert [item["event_id"] for item in listed] == [rejected_id]
    assert listed[0]["status"] == 400
    assert gateway.metric("gateway_forward_dead_letters_total", destination="central") == 1

    # The dead letter raises a forwarding trouble, which reaches the centre as an event itself.
    events = await centre.wait_for(lambda events: any(forward_trouble(entry, "new") for entry in events), timeout=15)
    trouble = next(entry["event"] for entry in events if forward_trouble(entry, "new"))
    assert trouble["signal"]["code"] == "354"
    assert trouble["signal"]["event_class"] == "trouble"

    mosquitto_pub(broker, protocol.event_topic("DEV-002"), event(1, "110", 2), user="DEV-002")
    events = await centre.wait_for(lambda events: len(device_events(events)) >= 1, timeout=15)
    assert rejected_id not in {entry["idempotency_key"] for entry in events}

    status = json.loads(run_outbox_cli(data_dir, "--json").stdout)["destinations"]
    assert [(item["destination"], item["dead"], item["pending"]) for item in status] == [("central", 1, 0)]

    centre.set_mode("normal")
    requeued = run_outbox_cli(data_dir, "requeue", rejected_id)
    assert requeued.returncode == 0, requeued.stderr
    events = await centre.wait_for(lambda events: len(device_events(events)) >= 2, timeout=15)
    assert device_events(events)[1]["idempotency_key"] == rejected_id
    await centre.wait_for(lambda events: any(forward_trouble(entry, "restore") for entry in events), timeout=15)

    deadline = time.monotonic() + 10
    while json.loads(run_outbox_cli(data_dir, "--json").stdout)["destinations"][0]["dead"] != 0:
        assert time.monotonic() < deadline, "dead letter still listed 10 s after delivery"
        await asyncio.sleep(0.2)
    again = run_outbox_cli(data_dir, "requeue", rejected_id)
    assert again.returncode == 1
    assert "not dead-lettered" in again.stderr


# Units without I/O


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (201, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (409, Outcome.DELIVERED),
        (400, Outcome.PERMANENT),
        (401, Outcome.PERMANENT),
        (403, Outcome.PERMANENT),
        (404, Outcome.PERMANENT),
        (422, Outcome.PERMANENT),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (503, Outcome.RETRY),
        (302, Outcome.RETRY),
    ],
)
def test_classify_status(status, outcome):
    """Test that each response status maps to the delivery contract of the API."""
    assert classify(HttpReply(status, "")).outcome is outcome


def test_classify_keeps_retry_after():
    """Test that a Retry-After in seconds reaches the retry decision, and an HTTP date is ignored."""
    assert classify(HttpReply(429, "", retry_after_s=7.0)).retry_after_s == 7.0
    assert _retry_after("12") == 12.0
    assert _retry_after(" 3 ") == 3.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert _retry_after(None) is None


def test_circuit_breaker_transitions():
    """Test that the breaker opens at the threshold, admits one probe when due, and closes on success."""
    transitions: list[tuple[Circuit, Circuit]] = []
    breaker = CircuitBreaker(3, Backoff(1.0, 1.0, rng=random.Random(1)), lambda old, new, reason: transitions.append((old, new)))

    assert breaker.admits(0.0)
    breaker.failed(0.0, probe=breaker.started(), detail="HTTP 503")
    breaker.failed(0.0, probe=breaker.started(), detail="HTTP 503")
    assert breaker.state is Circuit.CLOSED
    breaker.failed(0.0, probe=breaker.started(), detail="HTTP 503")
    assert breaker.state is Circuit.OPEN
    assert not breaker.admits(breaker.probe_at - 0.01)

    assert breaker.admits(breaker.probe_at)
    assert breaker.started() is True
    assert not breaker.admits(breaker.probe_at)
    breaker.failed(breaker.probe_at, probe=True, detail="HTTP 503")
    assert breaker.state is Circuit.OPEN
    assert breaker.failed_probes == 1

    assert breaker.admits(breaker.probe_at)
    assert breaker.started() is True
    breaker.succeeded()
    assert breaker.state is Circuit.CLOSED
    assert breaker.admits(breaker.probe_at)
    assert transitions == [
        (Circuit.CLOSED, Circuit.OPEN),
        (Circuit.OPEN, Circuit.HALF_OPEN),
        (Circuit.HALF_OPEN, Circuit.OPEN),
        (Circuit.OPEN, Circuit.HALF_OPEN),
        (Circuit.HALF_OPEN, Circuit.CLOSED),
    ]


def test_trouble_signal_fields():
    """Test that a forwarding trouble is Contact ID 354 from supervision, with SIA codes for raise and restore."""
    at = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    raised = trouble_signal("forward:central", TroubleKind.DEAD_LETTER, Qualifier.NEW, "rejected", at)
    restored = trouble_signal("forward:central", TroubleKind.UNCONFIRMED, Qualifier.RESTORE, "confirmed", at)

    assert raised.code == "354"
    assert raised.source is Source.SUPERVISION
    assert raised.event_class is EventClass.TROUBLE
    assert raised.sia_code == "YC"
    assert raised.zone == 1
    assert raised.received_at == at
    assert restored.sia_code == "YK"
    assert restored.zone == 2
    assert raised.id != restored.id


async def test_trouble_reporter_aggregates_events(tmp_path):
    """Test that one trouble condition is raised for the first event and restored after the last."""
    sent: list[tuple[str, Qualifier]] = []
    store = Journal(tmp_path / "journal.db")
    await store.start()
    try:
        reporter = TroubleReporter(lambda signal: sent.append((signal.device_id, signal.qualifier)), store, forward_metrics(Metrics()), time.time)
        reporter.raise_trouble("event-1", TroubleKind.DEAD_LETTER, "forward:central", "rejected")
        reporter.raise_trouble("event-2", TroubleKind.DEAD_LETTER, "forward:central", "rejected")
        reporter.restore_trouble("event-1", TroubleKind.DEAD_LETTER, "forward:central", "delivered")
        still_raised = reporter.raised("event-2", TroubleKind.DEAD_LETTER, "forward:central")
        reporter.restore_trouble("event-2", TroubleKind.DEAD_LETTER, "forward:central", "delivered")
        await store.write(lambda conn: None)

        restarted = TroubleReporter(None, store, forward_metrics(Metrics()), time.time)
        assert not restarted.raised("event-2", TroubleKind.DEAD_LETTER, "forward:central")
    finally:
        await store.close()

    assert still_raised
    assert sent == [("forward:central", Qualifier.NEW), ("forward:central", Qualifier.RESTORE)]
