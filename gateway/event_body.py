"""The JSON body the gateway POSTs to command centres (`POST {base}/v1/events`).

docs/command-center-api.yaml publishes this shape; change both together.
"""

from __future__ import annotations

import datetime as dt

import msgspec


class FacilityBody(msgspec.Struct, kw_only=True):
    id: str
    name: str = ""
    address: str = ""
    commune: str = ""
    province: str = ""
    latitude: float | None = None
    longitude: float | None = None


class IncidentBody(msgspec.Struct, kw_only=True):
    id: str
    state: str
    event_class: str
    opened_at: dt.datetime
    zone_count: int


class DeviceBody(msgspec.Struct, kw_only=True):
    id: str
    source: str


class SignalBody(msgspec.Struct, kw_only=True):
    id: str
    event_class: str
    code: str
    sia_code: str
    qualifier: str
    group: int
    zone: int
    zone_label: str
    text: str


class TimesBody(msgspec.Struct, kw_only=True):
    panel: dt.datetime | None
    received: dt.datetime
    forwarded: dt.datetime | None = None


class EventBody(msgspec.Struct, kw_only=True):
    event_id: str
    kind: str  # "signal" or "incident_update"
    incident: IncidentBody | None
    facility: FacilityBody
    device: DeviceBody
    signal: SignalBody | None
    times: TimesBody
    test: bool = False


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(EventBody)


def encode(body: EventBody) -> bytes:
    return _encoder.encode(body)


def decode(data: bytes) -> EventBody:
    return _decoder.decode(data)


def stamp_forwarded(stored: bytes, forwarded_at: dt.datetime) -> bytes:
    """Return the stored body with the forwarding time filled in, ready to sign and send."""
    body = _decoder.decode(stored)
    body.times.forwarded = forwarded_at
    return _encoder.encode(body)
