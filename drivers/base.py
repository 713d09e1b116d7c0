"""The interface between drivers and the gateway core.

A driver turns bytes into canonical signals and hands them to an `IntakePort`. It acks its
sender only after `submit_signal` returned, because that is when the signal is durable.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Protocol

import msgspec

from gateway.signal import Signal, Source


class Admission(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"


class Heartbeat(msgspec.Struct, kw_only=True, frozen=True):
    """A device's health report; coalesced per device and never journaled before ack."""

    device_id: str
    source: Source
    received_at: dt.datetime
    panel_time: dt.datetime | None = None
    boot: int | None = None
    seq: int | None = None
    mains: bool | None = None
    battery_v: float | None = None
    rssi: int | None = None
    link: str | None = None
    panel: str | None = None
    fw: str | None = None
    uptime_s: int | None = None


class Rejection(Exception):
    """Input that cannot become a signal; it is quarantined with its raw bytes.

    `reason` is a short stable token used in metrics and the quarantine table; the message
    states what was wrong and, where possible, what was expected.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        raw: bytes = b"",
        source: Source = Source.MQTT,
        origin: str = "",
        device_id: str = "",
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.raw = raw
        self.source = source
        self.origin = origin
        self.device_id = device_id

    def with_context(self, *, raw: bytes, source: Source, origin: str, device_id: str = "") -> Rejection:
        self.raw = raw
        self.source = source
        self.origin = origin
        self.device_id = self.device_id or device_id
        return self


class IntakePort(Protocol):
    """The interface the gateway core offers a driver."""

    async def submit_signal(self, signal: Signal, dedup_key: str | None) -> Admission:
        """Make `signal` durable, or recognise it as a duplicate; raise `Rejection` if it cannot be taken."""

    def submit_heartbeat(self, heartbeat: Heartbeat) -> None:
        """Offer a heartbeat to the coalescing lane; raise `Rejection` for an unknown device."""

    async def quarantine(self, rejection: Rejection) -> None:
        """Keep a rejected input durably, with its reason and raw bytes, and count it."""

    def device_status(self, device_id: str, online: bool, source: Source) -> None:
        """Note a device's own online/offline announcement (MQTT birth and last will)."""

    def link_state(self, link: str, up: bool) -> None:
        """Note that a driver's link (a broker connection, a bus, a line) went up or down."""
