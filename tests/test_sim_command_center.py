"""Tests of the command centre simulator over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import time

import aiohttp
import msgspec
import pytest

from gateway import event_body
from gateway.signing import IDEMPOTENCY_HEADER, TIMESTAMP_HEADER, signed_headers
from simulators.command_center import CommandCenter, Faults, serve_forever

SECRET = "test-secret"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=5)


def make_body(event_id: str = "evt-0001", *, zone: int = 3, zone_label: str = "Tầng 3 - Kho") -> bytes:
    opened = dt.datetime(2025, 3, 1, 8, 30, tzinfo=dt.timezone.utc)
    body = event_body.EventBody(
        event_id=event_id,
        kind="signal",
        incident=event_body.IncidentBody(id="inc-1", state="open", event_class="fire", opened_at=opened, zone_count=1),
        facility=event_body.FacilityBody(id="fac-1", name="Kho Long Biên", province="Hà Nội"),
        device=event_body.DeviceBody(id="dev-001", source="mqtt"),
        signal=event_body.SignalBody(
            id="sig-1",
            event_class="fire",
            code="110",
            sia_code="FA",
            qualifier="E",
            group=0,
            zone=zone,
            zone_label=zone_label,
            text="Fire",
        ),
        times=event_body.TimesBody(panel=opened, received=opened, forwarded=opened),
    )
    return event_body.encode(body)


async def post_event(
    session: aiohttp.ClientSession,
    center: CommandCenter,
    body: bytes,
    *,
    key: str | None = "evt-0001",
    secret: str | None = SECRET,
) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers[IDEMPOTENCY_HEADER] = key
    if secret is not None:
        headers.update(signed_headers(secret, body))
    async with session.post(f"{center.url}/v1/events", data=body, headers=headers) as response:
        return response.status, await response.json()


async def set_control(session: aiohttp.ClientSession, center: CommandCenter, request: dict) -> tuple[int, dict]:
    async with session.post(f"{center.url}/control", json=request) as response:
        return response.status, await response.json()


def read_records(center_path) -> list[dict]:
    if not center_path.exists():
        return []
    return [json.loads(line) for line in center_path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def record_path(tmp_path):
    return tmp_path / "events.jsonl"


@pytest.fixture
async def center(record_path):
    simulator = CommandCenter(secret=SECRET, record_path=record_path)
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as client:
        yield client


async def test_command_center_records_signed_event(center, session, record_path):
    """Test that a valid signed event gets 201, is kept in memory and written to the record file."""
    body = make_body()

    status, reply = await post_event(session, center, body)

    assert status == 201
    assert reply == {"status": "recorded"}
    assert center.url == f"http://127.0.0.1:{center.port}"
    assert len(center.events) == 1
    entry = center.events[0]
    assert entry["idempotency_key"] == "evt-0001"
    assert entry["event"] == json.loads(body)
    received_at = dt.datetime.fromisoformat(entry["received_at"])
    assert received_at.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - received_at).total_seconds()) < 10

    records = read_records(record_path)
    assert records == [entry]
    assert records[0]["event"]["signal"]["zone_label"] == "Tầng 3 - Kho"


async def test_command_center_repeated_key_returns_409(center, session, record_path):
    """Test that a repeated Idempotency-Key gets 409, is counted and not recorded again."""
    body = make_body()

    first_status, _ = await post_event(session, center, body)
    second_status, second_reply = await post_event(session, center, body)

    assert first_status == 201
    assert second_status == 409
    assert second_reply == {"status": "duplicate"}
    assert center.duplicates == 1
    assert len(center.events) == 1
    assert len(read_records(record_path)) == 1


async def test_command_center_changed_body_returns_401(center, session, record_path):
    """Test that a body changed after signing gets 401 with the reason and not recorded."""
    body = make_body(zone=3)
    headers = {IDEMPOTENCY_HEADER: "evt-0001", **signed_headers(SECRET, body)}
    changed = make_body(zone=4)

    async with session.post(f"{center.url}/v1/events", data=changed, headers=headers) as response:
        status = response.status
        reply = await response.json()

    assert status == 401
    assert reply == {"error": "signature does not match the body"}
    assert center.events == []
    assert read_records(record_path) == []


@pytest.mark.parametrize(
    ("secret", "missing_header"),
    [(None, TIMESTAMP_HEADER), ("wrong-secret", None)],
)
async def test_command_center_bad_signature_returns_401(center, session, record_path, secret, missing_header):
    """Test that a missing or wrongly keyed signature gets 401 and is not recorded."""
    status, reply = await post_event(session, center, make_body(), secret=secret)

    assert status == 401
    if missing_header is not None:
        assert missing_header in reply["error"]
    assert center.events == []
    assert read_records(record_path) == []


async def test_command_center_stale_timestamp_returns_401(center, session):
    """Test that a signature timestamp far from the receiver's clock gets 401."""
    body = make_body()
    headers = {IDEMPOTENCY_HEADER: "evt-0001", **signed_headers(SECRET, body, now=time.time() - 3600)}

    async with session.post(f"{center.url}/v1/events", data=body, headers=headers) as response:
        status = response.status
        reply = await response.json()

    assert status == 401
    assert "receiver's clock" in reply["error"]
    assert center.events == []


async def test_command_center_missing_key_returns_400(center, session):
    """Test that an event without an Idempotency-Key header gets 400."""
    status, reply = await post_event(session, center, make_body(), key=None)

    assert status == 400
    assert IDEMPOTENCY_HEADER in reply["error"]
    assert center.events == []


@pytest.mark.parametrize(
    "body",
    [b"not json", b"{}", json.dumps({"event_id": 5}).encode()],
    ids=["not-json", "empty-object", "wrong-type"],
)
async def test_command_center_invalid_body_returns_400(center, session, body):
    """Test that a body that does not decode as an event gets 400 with the reason."""
    status, reply = await post_event(session, center, body)

    assert status == 400
    assert reply["error"].startswith("body is not a valid event")
    assert center.events == []


async def test_command_center_without_secret_accepts_unsigned(record_path, session):
    """Test that a centre with no secret records an unsigned event."""
    simulator = CommandCenter(record_path=record_path)
    await simulator.start()
    try:
        status, _ = await post_event(session, simulator, make_body(), secret=None)
    finally:
        await simulator.stop()

    assert status == 201
    assert len(read_records(record_path)) == 1


async def test_command_center_down_returns_503(center, session):
    """Test that mode down responds 503 without recording, and mode normal records again."""
    control_status, faults = await set_control(session, center, {"mode": "down"})
    assert control_status == 200
    assert faults["down"] is True

    status, _ = await post_event(session, center, make_body())
    assert status == 503
    assert center.events == []

    await set_control(session, center, {"mode": "normal"})
    status, _ = await post_event(session, center, make_body())
    assert status == 201
    assert len(center.events) == 1


async def test_command_center_down_at_start(session):
    """Test that faults given to the constructor apply from the first request."""
    simulator = CommandCenter(secret=SECRET, faults=Faults(down=True))
    await simulator.start()
    try:
        status, _ = await post_event(session, simulator, make_body())
    finally:
        await simulator.stop()

    assert status == 503
    assert simulator.events == []


async def test_command_center_fail_next_returns_500(center, session, record_path):
    """Test that fail_next responds 500 to exactly the next N events, then records the retry once."""
    await set_control(session, center, {"mode": "fail_next", "count": 2})
    body = make_body()

    statuses = [(await post_event(session, center, body))[0] for _ in range(4)]

    assert statuses == [500, 500, 201, 409]
    assert center.status_counts[500] == 2
    assert len(center.events) == 1
    assert len(read_records(record_path)) == 1


async def test_command_center_reject_event_returns_400(center, session):
    """Test that reject_event responds 400 to that event id only."""
    await set_control(session, center, {"mode": "reject_event", "event_id": "evt-bad"})

    rejected_status, rejected_reply = await post_event(session, center, make_body("evt-bad"), key="evt-bad")
    accepted_status, _ = await post_event(session, center, make_body("evt-good"), key="evt-good")

    assert rejected_status == 400
    assert "evt-bad" in rejected_reply["error"]
    assert accepted_status == 201
    assert [entry["idempotency_key"] for entry in center.events] == ["evt-good"]


async def test_command_center_duplicate_confirm_records_new_event(center, session, record_path):
    """Test that duplicate_confirm records a new event but responds 409."""
    center.set_mode("duplicate_confirm")

    status, reply = await post_event(session, center, make_body())

    assert status == 409
    assert reply == {"status": "duplicate"}
    assert len(center.events) == 1
    assert len(read_records(record_path)) == 1
    assert center.duplicates == 0


async def test_command_center_slow_delays_response(center, session):
    """Test that slow delays the response by the given seconds."""
    center.set_mode("slow", seconds=0.3)

    started = time.monotonic()
    status, _ = await post_event(session, center, make_body())
    elapsed = time.monotonic() - started

    assert status == 201
    assert elapsed >= 0.3


@pytest.mark.parametrize(
    ("request_body", "expected_text"),
    [
        ({"mode": "explode"}, "explode"),
        ({"mode": "fail_next", "count": -1}, "count"),
        ({"mode": "slow", "seconds": -2}, "slow"),
        ({"mode": "reject_event"}, "event_id"),
        ({"mode": "down", "colour": "red"}, "colour"),
    ],
)
async def test_command_center_control_rejects_invalid(center, session, request_body, expected_text):
    """Test that an invalid control request gets 400 and changes no fault."""
    status, reply = await set_control(session, center, request_body)

    assert status == 400
    assert expected_text in reply["error"]
    assert center.faults == Faults()


def test_command_center_set_mode_rejects_unknown():
    """Test that set_mode raises ValueError naming an unknown mode and the valid ones."""
    simulator = CommandCenter()

    with pytest.raises(ValueError, match="'explode' is unknown; use one of normal, down"):
        simulator.set_mode("explode")


async def test_command_center_lists_events_and_health(center, session):
    """Test that GET /v1/events lists the recorded entries and GET /healthz reports ok."""
    await post_event(session, center, make_body())

    async with session.get(f"{center.url}/v1/events") as response:
        listed = await response.json()
    async with session.get(f"{center.url}/healthz") as response:
        health_status = response.status
        health = await response.json()

    assert listed == center.events
    assert health_status == 200
    assert health == {"status": "ok", "events": 1}


async def test_command_center_wait_for_returns_events(center, session):
    """Test that wait_for returns once an event arriving later meets the predicate."""
    waiter = asyncio.create_task(center.wait_for(lambda events: len(events) >= 1, timeout=5))
    await asyncio.sleep(0)
    assert not waiter.done()

    await post_event(session, center, make_body())
    events = await asyncio.wait_for(waiter, timeout=5)

    assert [entry["idempotency_key"] for entry in events] == ["evt-0001"]


async def test_command_center_wait_for_times_out(center):
    """Test that wait_for raises TimeoutError when the predicate stays false."""
    with pytest.raises(TimeoutError, match="0 events recorded"):
        await center.wait_for(lambda events: len(events) > 0, timeout=0.2)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_serve_forever_calls_on_event(record_path, session):
    """Test that serve_forever records events, calls on_event for each, and stops when cancelled."""
    port = _free_port()
    seen: list[dict] = []
    server = asyncio.create_task(serve_forever("127.0.0.1", port, SECRET, record_path, seen.append))
    url = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(5):
            while True:
                try:
                    async with session.get(f"{url}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)

        body = make_body()
        headers = {IDEMPOTENCY_HEADER: "evt-0001", **signed_headers(SECRET, body)}
        async with session.post(f"{url}/v1/events", data=body, headers=headers) as response:
            status = response.status
    finally:
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(server, timeout=5)

    assert status == 201
    assert [entry["idempotency_key"] for entry in seen] == ["evt-0001"]
    assert read_records(record_path) == seen
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(f"{url}/healthz"):
            pass


async def test_command_center_on_event_failure_keeps_event(session):
    """Test that an on_event callback that raises does not lose the event or fail the request."""

    def broken(entry: dict) -> None:
        raise RuntimeError("display failed")

    simulator = CommandCenter(secret=SECRET, on_event=broken)
    await simulator.start()
    try:
        status, _ = await post_event(session, simulator, make_body())
    finally:
        await simulator.stop()

    assert status == 201
    assert len(simulator.events) == 1


def test_make_body_is_valid_event():
    """Test that the body used by these tests decodes as an EventBody."""
    decoded = msgspec.json.decode(make_body(), type=event_body.EventBody)

    assert decoded.signal is not None
    assert decoded.signal.zone == 3
