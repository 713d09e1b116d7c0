"""Transmitter MQTT protocol v1: topics and payloads, decoded into canonical signals.

The protocol is specified for device makers in docs/mqtt-protocol.md. Decoding is pure (no
I/O) so that the same code serves the driver, `gateway decode mqtt` and the benchmarks.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import unicodedata
from typing import Annotated, Literal

import msgspec

from drivers.base import Heartbeat, Rejection
from drivers.contact_id import ContactIdError, parse_contact_id
from gateway import codes
from gateway.signal import (
    LETTER_BY_QUALIFIER,
    QUALIFIER_BY_LETTER,
    Signal,
    Source,
    new_signal_id,
)

TOPIC_ROOT = "pccc/v1"
MAX_PAYLOAD_BYTES = 4096
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{3,64}")
TOPIC_KINDS = ("event", "heartbeat", "status", "cmd", "reply")

Seq = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Counter = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Group = Annotated[int, msgspec.Meta(ge=0, le=99)]
Zone = Annotated[int, msgspec.Meta(ge=0, le=9999)]
Label = Annotated[str, msgspec.Meta(max_length=200)]


class EventPayload(msgspec.Struct, kw_only=True, frozen=True):
    v: int
    boot: Counter
    seq: Seq
    ts: str | int
    code: str | None = None
    q: Literal["E", "R", "P"] | None = None
    sia: str | None = None
    cid: Annotated[str, msgspec.Meta(max_length=40)] | None = None
    group: Group = 0
    zone: Zone = 0
    label: Label = ""
    raw: Annotated[str, msgspec.Meta(max_length=1024)] | None = None
    test: bool = False
    device: str | None = None


class HeartbeatPayload(msgspec.Struct, kw_only=True, frozen=True):
    v: int
    boot: Counter
    seq: Seq
    ts: str | int
    mains: bool
    battery_v: Annotated[float, msgspec.Meta(ge=0, le=100)]
    rssi: Annotated[int, msgspec.Meta(ge=-200, le=0)]
    link: Literal["eth", "wifi", "4g"]
    panel: Literal["normal", "alarm", "fault", "disconnected"]
    fw: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    uptime_s: Counter | None = None
    device: str | None = None


_event_decoder = msgspec.json.Decoder(EventPayload)
_heartbeat_decoder = msgspec.json.Decoder(HeartbeatPayload)
_json_encoder = msgspec.json.Encoder()


class Topic(msgspec.Struct, frozen=True):
    device_id: str
    kind: str


def parse_topic(topic: str) -> Topic:
    """Split `pccc/v1/{device_id}/{kind}`; raise `Rejection` for any other shape."""
    parts = topic.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        raise Rejection("bad_topic", f"topic {topic!r} does not match {TOPIC_ROOT}/<device_id>/<kind>")
    device_id, kind = parts[2], parts[3]
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise Rejection(
            "bad_topic",
            f"device id {device_id!r} in topic {topic!r} must be 3 to 64 characters of A-Z a-z 0-9 _ -",
        )
    if kind not in TOPIC_KINDS:
        raise Rejection("bad_topic", f"topic kind {kind!r} is not one of {', '.join(TOPIC_KINDS)}")
    return Topic(device_id, kind)


def parse_timestamp(value: str | int) -> dt.datetime:
    """Read `ts`: RFC 3339 with an offset, or epoch milliseconds."""
    if isinstance(value, int):
        if not 0 <= value < 32503680000000:
            raise Rejection("invalid_field", f"ts {value} is not epoch milliseconds between 1970 and 3000")
        return dt.datetime.fromtimestamp(value / 1000, dt.timezone.utc)
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise Rejection("invalid_field", f"ts {value!r} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise Rejection("invalid_field", f"ts {value!r} has no UTC offset; add one, e.g. +07:00")
    return parsed


def check_size(payload: bytes) -> None:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise Rejection(
            "payload_too_large", f"payload of {len(payload)} bytes exceeds the limit of {MAX_PAYLOAD_BYTES} bytes"
        )


def _decode_json(decoder: msgspec.json.Decoder, payload: bytes):
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as error:
        raise Rejection("invalid_field", f"payload field is invalid: {error}") from None
    except msgspec.DecodeError as error:
        raise Rejection("invalid_json", f"payload is not valid JSON: {error}") from None


def _check_common(payload: EventPayload | HeartbeatPayload, topic: Topic) -> None:
    if payload.v != 1:
        raise Rejection("unsupported_version", f"protocol version v={payload.v} is not supported; send v=1")
    if payload.device is not None and payload.device != topic.device_id:
        raise Rejection(
            "identity_mismatch",
            f"payload names device {payload.device!r} but was published on the topic of {topic.device_id!r}",
        )


def decode_event(topic: Topic, payload: bytes, received_at: dt.datetime) -> Signal:
    """Decode an `event` message into a canonical signal (facility not yet resolved)."""
    check_size(payload)
    event: EventPayload = _decode_json(_event_decoder, payload)
    _check_common(event, topic)
    panel_time = parse_timestamp(event.ts)

    # Exactly one of `code` (with `q`), `sia` or `cid` names the event.
    named = [field for field in ("code", "sia", "cid") if getattr(event, field) is not None]
    if len(named) != 1:
        raise Rejection(
            "invalid_field",
            f"payload must name the event with exactly one of `code` (with `q`), `sia` or `cid`; it has {', '.join(named) or 'none'}",
        )
    group, zone = event.group, event.zone
    try:
        if event.code is not None:
            if event.q is None:
                raise Rejection("invalid_field", f"`code` {event.code!r} needs a qualifier `q` (E, R or P)")
            entry = codes.lookup(event.code)
            qualifier = QUALIFIER_BY_LETTER[event.q]
        elif event.sia is not None:
            entry, qualifier = codes.from_sia(event.sia)
        else:
            message = parse_contact_id(event.cid or "")
            entry, qualifier = codes.lookup(message.code), message.qualifier
            group, zone = message.group, message.zone
    except ContactIdError as error:
        raise Rejection("bad_contact_id", f"`cid` {event.cid!r}: {error}") from None
    except codes.UnknownEventCode as error:
        raise Rejection("unknown_code", str(error)) from None

    return Signal(
        id=new_signal_id(),
        source=Source.MQTT,
        device_id=topic.device_id,
        event_class=entry.event_class,
        code=entry.code,
        qualifier=qualifier,
        sia_code=codes.to_sia(entry.code, qualifier),
        group=group,
        zone=zone,
        zone_label=_nfc(event.label),
        text=entry.label_en,
        panel_time=panel_time,
        received_at=received_at,
        seq=event.seq,
        boot=event.boot,
        raw=payload,
        test=event.test,
    )


def decode_heartbeat(topic: Topic, payload: bytes, received_at: dt.datetime) -> Heartbeat:
    check_size(payload)
    report: HeartbeatPayload = _decode_json(_heartbeat_decoder, payload)
    _check_common(report, topic)
    return Heartbeat(
        device_id=topic.device_id,
        source=Source.MQTT,
        received_at=received_at,
        panel_time=parse_timestamp(report.ts),
        boot=report.boot,
        seq=report.seq,
        mains=report.mains,
        battery_v=report.battery_v,
        rssi=report.rssi,
        link=report.link,
        panel=report.panel,
        fw=report.fw,
        uptime_s=report.uptime_s,
    )


def decode_status(payload: bytes) -> bool:
    """Return True for `online`, False for `offline`."""
    text = payload.strip().decode("ascii", errors="replace")
    if text == "online":
        return True
    if text == "offline":
        return False
    raise Rejection("invalid_field", f"status payload {text[:40]!r} must be `online` or `offline`")


def dedup_key(device_id: str, boot: int | None, seq: int | None, payload: bytes) -> str:
    """Key under which a redelivered or repeated event is recognised as a duplicate."""
    digest = hashlib.blake2b(payload, digest_size=16).hexdigest()
    return f"{device_id}:{boot}:{seq}:{digest}"


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# Encoders used by simulators and tests: the device side of the protocol.


def event_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/{device_id}/event"


def heartbeat_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/{device_id}/heartbeat"


def status_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/{device_id}/status"


def encode_event(
    *,
    boot: int,
    seq: int,
    code: str,
    qualifier: str = "E",
    group: int = 0,
    zone: int = 0,
    label: str = "",
    ts: dt.datetime | None = None,
    test: bool = False,
) -> bytes:
    moment = ts or dt.datetime.now(dt.timezone.utc)
    body: dict[str, object] = {
        "v": 1,
        "boot": boot,
        "seq": seq,
        "ts": moment.isoformat(timespec="milliseconds"),
        "code": code,
        "q": qualifier,
        "group": group,
        "zone": zone,
        "label": label,
    }
    if test:
        body["test"] = True
    return _json_encoder.encode(body)


def encode_heartbeat(
    *,
    boot: int,
    seq: int,
    mains: bool = True,
    battery_v: float = 13.6,
    rssi: int = -67,
    link: str = "4g",
    panel: str = "normal",
    ts: dt.datetime | None = None,
    uptime_s: int | None = None,
) -> bytes:
    moment = ts or dt.datetime.now(dt.timezone.utc)
    body: dict[str, object] = {
        "v": 1,
        "boot": boot,
        "seq": seq,
        "ts": int(moment.timestamp() * 1000),
        "mains": mains,
        "battery_v": battery_v,
        "rssi": rssi,
        "link": link,
        "panel": panel,
    }
    if uptime_s is not None:
        body["uptime_s"] = uptime_s
    return _json_encoder.encode(body)


__all__ = [
    "LETTER_BY_QUALIFIER",
    "MAX_PAYLOAD_BYTES",
    "Topic",
    "decode_event",
    "decode_heartbeat",
    "decode_status",
    "dedup_key",
    "encode_event",
    "encode_heartbeat",
    "parse_topic",
]
