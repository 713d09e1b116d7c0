"""Tests for MQTT protocol v1 decoding: rejected inputs with their reasons, and good inputs."""

from __future__ import annotations

import datetime as dt
import json
import unicodedata

import pytest

from drivers.base import Heartbeat, Rejection
from drivers.contact_id import encode_contact_id
from drivers.mqtt import protocol
from gateway.signal import EventClass, Qualifier, Signal, Source

DEVICE = "DEV-001"
RECEIVED = dt.datetime(2025, 3, 1, 8, 0, 5, tzinfo=dt.timezone.utc)
ICT = dt.timezone(dt.timedelta(hours=7))
ABSENT = object()

EVENT = {"v": 1, "boot": 1, "seq": 7, "ts": "2025-03-01T15:00:00+07:00", "code": "110", "q": "E", "zone": 3, "label": "Kho"}
HEARTBEAT = {
    "v": 1,
    "boot": 1,
    "seq": 8,
    "ts": 1740816000000,
    "mains": True,
    "battery_v": 13.6,
    "rssi": -67,
    "link": "4g",
    "panel": "normal",
}


def payload(base: dict, **changes: object) -> bytes:
    """Return `base` as JSON with `changes` applied; ABSENT removes a key."""
    body = dict(base)
    for key, value in changes.items():
        if value is ABSENT:
            body.pop(key, None)
        else:
            body[key] = value
    return json.dumps(body, ensure_ascii=False).encode()


def decode(topic: str, data: bytes) -> Signal | Heartbeat | bool:
    """Decode one message the way the driver dispatches it by topic kind."""
    parsed = protocol.parse_topic(topic)
    if parsed.kind == "event":
        return protocol.decode_event(parsed, data, RECEIVED)
    if parsed.kind == "heartbeat":
        return protocol.decode_heartbeat(parsed, data, RECEIVED)
    if parsed.kind == "status":
        return protocol.decode_status(data)
    raise AssertionError(f"test topic {topic!r} has no decoder")


def decode_event(data: bytes) -> Signal:
    return protocol.decode_event(protocol.parse_topic(protocol.event_topic(DEVICE)), data, RECEIVED)


EVENT_TOPIC = protocol.event_topic(DEVICE)
HEARTBEAT_TOPIC = protocol.heartbeat_topic(DEVICE)
STATUS_TOPIC = protocol.status_topic(DEVICE)
BAD_CID = "1234 18 1 110 01 015 2"  # the valid checksum digit is 1

# (case, topic, payload, reason)
BAD_INPUTS = [
    ("json_truncated", EVENT_TOPIC, b'{"v": 1, "boot": ', "invalid_json"),
    ("json_not_utf8", EVENT_TOPIC, b"\xff\xfe{}", "invalid_json"),
    ("json_heartbeat", HEARTBEAT_TOPIC, b"mains=on", "invalid_json"),
    ("seq_string", EVENT_TOPIC, payload(EVENT, seq="7"), "invalid_field"),
    ("seq_negative", EVENT_TOPIC, payload(EVENT, seq=-1), "invalid_field"),
    ("zone_negative", EVENT_TOPIC, payload(EVENT, zone=-1), "invalid_field"),
    ("group_too_large", EVENT_TOPIC, payload(EVENT, group=100), "invalid_field"),
    ("label_too_long", EVENT_TOPIC, payload(EVENT, label="x" * 201), "invalid_field"),
    ("q_unknown", EVENT_TOPIC, payload(EVENT, q="X"), "invalid_field"),
    ("q_missing", EVENT_TOPIC, payload(EVENT, q=ABSENT), "invalid_field"),
    ("boot_missing", EVENT_TOPIC, payload(EVENT, boot=ABSENT), "invalid_field"),
    ("battery_v_string", HEARTBEAT_TOPIC, payload(HEARTBEAT, battery_v="13.6"), "invalid_field"),
    ("rssi_positive", HEARTBEAT_TOPIC, payload(HEARTBEAT, rssi=5), "invalid_field"),
    ("link_unknown", HEARTBEAT_TOPIC, payload(HEARTBEAT, link="lora"), "invalid_field"),
    ("event_5_kib", EVENT_TOPIC, payload(EVENT, raw="x" * 5 * 1024), "payload_too_large"),
    ("heartbeat_5_kib", HEARTBEAT_TOPIC, b" " * 5 * 1024, "payload_too_large"),
    ("device_other", EVENT_TOPIC, payload(EVENT, device="DEV-002"), "identity_mismatch"),
    ("heartbeat_device_other", HEARTBEAT_TOPIC, payload(HEARTBEAT, device="DEV-002"), "identity_mismatch"),
    ("topic_wrong_root", "alarm/v1/DEV-001/event", payload(EVENT), "bad_topic"),
    ("topic_wrong_version", "pccc/v2/DEV-001/event", payload(EVENT), "bad_topic"),
    ("topic_extra_level", "pccc/v1/DEV-001/event/extra", payload(EVENT), "bad_topic"),
    ("topic_device_dot", "pccc/v1/DEV.001/event", payload(EVENT), "bad_topic"),
    ("topic_device_space", "pccc/v1/DEV 001/event", payload(EVENT), "bad_topic"),
    ("topic_device_short", "pccc/v1/AB/event", payload(EVENT), "bad_topic"),
    ("topic_device_long", f"pccc/v1/{'D' * 65}/event", payload(EVENT), "bad_topic"),
    ("topic_device_trailing_newline", "pccc/v1/DEV-001\n/event", payload(EVENT), "bad_topic"),
    ("topic_kind_unknown", "pccc/v1/DEV-001/alarm", payload(EVENT), "bad_topic"),
    ("code_unknown", EVENT_TOPIC, payload(EVENT, code="999"), "unknown_code"),
    ("code_burglary", EVENT_TOPIC, payload(EVENT, code="130"), "unknown_code"),
    ("sia_unknown", EVENT_TOPIC, payload(EVENT, code=ABSENT, q=ABSENT, sia="ZZ"), "unknown_code"),
    ("cid_bad_checksum", EVENT_TOPIC, payload(EVENT, code=ABSENT, q=ABSENT, cid=BAD_CID), "bad_contact_id"),
    ("cid_short", EVENT_TOPIC, payload(EVENT, code=ABSENT, q=ABSENT, cid="1234181110"), "bad_contact_id"),
    ("version_2", EVENT_TOPIC, payload(EVENT, v=2), "unsupported_version"),
    ("heartbeat_version_2", HEARTBEAT_TOPIC, payload(HEARTBEAT, v=2), "unsupported_version"),
    ("ts_without_offset", EVENT_TOPIC, payload(EVENT, ts="2025-03-01T15:00:00"), "invalid_field"),
    ("ts_not_a_time", EVENT_TOPIC, payload(EVENT, ts="yesterday"), "invalid_field"),
    ("ts_epoch_negative", EVENT_TOPIC, payload(EVENT, ts=-1), "invalid_field"),
    ("heartbeat_ts_without_offset", HEARTBEAT_TOPIC, payload(HEARTBEAT, ts="2025-03-01T15:00:00"), "invalid_field"),
    ("code_and_sia", EVENT_TOPIC, payload(EVENT, sia="FA"), "invalid_field"),
    ("code_and_cid", EVENT_TOPIC, payload(EVENT, cid=encode_contact_id("1234", Qualifier.NEW, "110", 1, 15)), "invalid_field"),
    ("no_event_code", EVENT_TOPIC, payload(EVENT, code=ABSENT, q=ABSENT), "invalid_field"),
    ("status_unknown", STATUS_TOPIC, b"sleeping", "invalid_field"),
]


@pytest.mark.parametrize(("topic", "data", "reason"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_decode_bad_input_rejected(topic: str, data: bytes, reason: str):
    """Test that each bad topic or payload raises Rejection with its stable reason."""
    with pytest.raises(Rejection) as excinfo:
        decode(topic, data)

    assert excinfo.value.reason == reason
    assert excinfo.value.message


def test_decode_event_mismatch_names_devices():
    """Test that the identity mismatch message names the payload's device and the topic's."""
    with pytest.raises(Rejection) as excinfo:
        decode_event(payload(EVENT, device="DEV-002"))

    assert "DEV-002" in excinfo.value.message
    assert DEVICE in excinfo.value.message


def test_decode_event_bad_checksum_digit():
    """Test that a `cid` with a bad checksum gives the expected checksum digit."""
    with pytest.raises(Rejection) as excinfo:
        decode_event(payload(EVENT, code=ABSENT, q=ABSENT, cid=BAD_CID))

    assert "should be '1'" in excinfo.value.message


def test_decode_event_code_with_qualifier():
    """Test that `code` with `q` gives the class, qualifier, SIA code and zone of the event."""
    signal = decode_event(payload(EVENT))

    assert signal.source is Source.MQTT
    assert signal.device_id == DEVICE
    assert signal.facility_id == ""
    assert signal.event_class is EventClass.FIRE
    assert signal.code == "110"
    assert signal.qualifier is Qualifier.NEW
    assert signal.sia_code == "FA"
    assert signal.zone == 3
    assert signal.zone_label == "Kho"
    assert signal.seq == 7
    assert signal.boot == 1
    assert signal.received_at == RECEIVED
    assert signal.raw == payload(EVENT)


@pytest.mark.parametrize(
    ("sia", "code", "qualifier", "event_class"),
    [
        ("FA", "110", Qualifier.NEW, EventClass.FIRE),
        ("FR", "110", Qualifier.RESTORE, EventClass.FIRE),
        ("FT", "373", Qualifier.NEW, EventClass.TROUBLE),
        ("RP", "602", Qualifier.NEW, EventClass.TEST),
    ],
)
def test_decode_event_sia_code(sia: str, code: str, qualifier: Qualifier, event_class: EventClass):
    """Test that an SIA two-letter code maps to its Contact ID code and qualifier."""
    signal = decode_event(payload(EVENT, code=ABSENT, q=ABSENT, sia=sia))

    assert signal.code == code
    assert signal.qualifier is qualifier
    assert signal.event_class is event_class
    assert signal.sia_code == sia


def test_decode_event_sia_restore_lane_class():
    """Test that a fire restore from SIA FR keeps class fire and is routed as a restore."""
    signal = decode_event(payload(EVENT, code=ABSENT, q=ABSENT, sia="FR"))

    assert signal.event_class is EventClass.FIRE
    assert signal.lane_class is EventClass.RESTORE


def test_decode_event_contact_id():
    """Test that a valid `cid` gives the code, qualifier, group and zone of the Contact ID message."""
    cid = encode_contact_id("1234", Qualifier.RESTORE, "301", 2, 15)

    signal = decode_event(payload(EVENT, code=ABSENT, q=ABSENT, zone=ABSENT, cid=cid))

    assert len(cid) == 16
    assert signal.code == "301"
    assert signal.qualifier is Qualifier.RESTORE
    assert signal.event_class is EventClass.TROUBLE
    assert signal.group == 2
    assert signal.zone == 15


def test_decode_event_epoch_milliseconds():
    """Test that an integer `ts` is read as epoch milliseconds in UTC."""
    signal = decode_event(payload(EVENT, ts=1740816000250))

    assert signal.panel_time == dt.datetime(2025, 3, 1, 8, 0, 0, 250000, tzinfo=dt.timezone.utc)


def test_decode_event_rfc3339_offset():
    """Test that an RFC 3339 `ts` keeps its +07:00 offset and names the right instant."""
    signal = decode_event(payload(EVENT, ts="2025-03-01T15:00:00.500+07:00"))

    assert signal.panel_time is not None
    assert signal.panel_time.utcoffset() == dt.timedelta(hours=7)
    assert signal.panel_time == dt.datetime(2025, 3, 1, 8, 0, 0, 500000, tzinfo=dt.timezone.utc)


def test_decode_event_label_normalized_to_nfc():
    """Test that a Vietnamese label sent in NFD comes out in NFC."""
    label = "Tầng hầm B1 - Bãi xe"
    decomposed = unicodedata.normalize("NFD", label)
    assert decomposed != label

    signal = decode_event(payload(EVENT, label=decomposed))

    assert signal.zone_label == unicodedata.normalize("NFC", label)
    assert unicodedata.is_normalized("NFC", signal.zone_label)


def test_encode_event_round_trip():
    """Test that an event encoded by the device side decodes to the same fields."""
    moment = dt.datetime(2025, 3, 1, 15, 0, 0, 123000, tzinfo=ICT)
    data = protocol.encode_event(boot=3, seq=42, code="301", qualifier="R", group=1, zone=9, label="Phòng bơm", ts=moment, test=True)

    signal = decode_event(data)

    assert signal.code == "301"
    assert signal.qualifier is Qualifier.RESTORE
    assert signal.event_class is EventClass.TROUBLE
    assert signal.group == 1
    assert signal.zone == 9
    assert signal.zone_label == "Phòng bơm"
    assert signal.panel_time == moment
    assert signal.boot == 3
    assert signal.seq == 42
    assert signal.test is True
    assert signal.raw == data


def test_encode_heartbeat_round_trip():
    """Test that a heartbeat encoded by the device side decodes to the same fields."""
    moment = dt.datetime(2025, 3, 1, 8, 0, 1, tzinfo=dt.timezone.utc)
    data = protocol.encode_heartbeat(boot=2, seq=99, mains=False, battery_v=11.9, rssi=-80, link="wifi", panel="fault", ts=moment, uptime_s=3600)

    report = protocol.decode_heartbeat(protocol.parse_topic(HEARTBEAT_TOPIC), data, RECEIVED)

    assert report == Heartbeat(
        device_id=DEVICE,
        source=Source.MQTT,
        received_at=RECEIVED,
        panel_time=moment,
        boot=2,
        seq=99,
        mains=False,
        battery_v=11.9,
        rssi=-80,
        link="wifi",
        panel="fault",
        uptime_s=3600,
    )


@pytest.mark.parametrize(("data", "online"), [(b"online", True), (b"offline", False), (b"online\n", True)])
def test_decode_status(data: bytes, online: bool):
    """Test that the status payloads `online` and `offline` decode to True and False."""
    assert protocol.decode_status(data) is online


def test_parse_topic_splits_device_and_kind():
    """Test that a valid topic gives its device id and kind."""
    topic = protocol.parse_topic("pccc/v1/Dev_01-a/reply")

    assert topic.device_id == "Dev_01-a"
    assert topic.kind == "reply"


def test_dedup_key_depends_on_boot_and_payload():
    """Test that the dedup key repeats for the same message and changes with boot or payload."""
    data = payload(EVENT)

    same = protocol.dedup_key(DEVICE, 1, 7, data)

    assert protocol.dedup_key(DEVICE, 1, 7, data) == same
    assert protocol.dedup_key(DEVICE, 2, 7, data) != same
    assert protocol.dedup_key(DEVICE, 1, 7, payload(EVENT, zone=4)) != same
