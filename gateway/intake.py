"""Intake: the gateway's side of the driver interface.

A signal is resolved against the registry, made durable in the journal (or recognised as a
duplicate), and only then offered to the routing core; the driver acks its sender after
`submit_signal` returns. Rejected inputs are quarantined with their raw bytes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable

import msgspec

from drivers.base import Admission, Heartbeat, Rejection
from gateway.journal import Journal
from gateway.metrics import Metrics
from gateway.registry import RegistryCache
from gateway.router import Router
from gateway.signal import Signal, Source

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 600.0

_msgpack = msgspec.msgpack.Encoder()
_signal_decoder = msgspec.msgpack.Decoder(Signal)


def encode_signal(signal: Signal) -> bytes:
    return _msgpack.encode(signal)


def decode_signal(data: bytes) -> Signal:
    return _signal_decoder.decode(data)


def _insert_signal(signal: Signal, key: str | None) -> Callable[[sqlite3.Connection], Admission]:
    received = signal.received_at.timestamp()
    body = encode_signal(signal)

    def write(conn: sqlite3.Connection) -> Admission:
        if key is not None:
            seen = conn.execute(
                "SELECT 1 FROM signals WHERE dedup_key = ? AND received_at > ? LIMIT 1",
                (key, received - DUPLICATE_WINDOW_S),
            ).fetchone()
            if seen:
                return Admission.DUPLICATE
        conn.execute(
            """INSERT INTO signals (id, device_id, facility_id, event_class, code, qualifier, zone, received_at, dedup_key, body)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                signal.id,
                signal.device_id,
                signal.facility_id,
                signal.event_class.value,
                signal.code,
                signal.qualifier.value,
                signal.zone,
                received,
                key,
                body,
            ),
        )
        return Admission.ACCEPTED

    return write


def _insert_quarantine(rejection: Rejection, at: float) -> Callable[[sqlite3.Connection], None]:
    row = (
        at,
        rejection.source.value,
        rejection.origin,
        rejection.device_id,
        rejection.reason,
        rejection.message,
        rejection.raw,
    )

    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO quarantine (received_at, source, origin, device_id, reason, detail, raw) VALUES (?, ?, ?, ?, ?, ?, ?)",
            row,
        )

    return write


class Intake:
    """Implements `drivers.base.IntakePort` on the journal, registry and router."""

    def __init__(self, journal: Journal, registry: RegistryCache, router: Router, metrics: Metrics) -> None:
        self._journal = journal
        self._registry = registry
        self._router = router
        self._metrics = metrics
        self.status_listeners: list[Callable[[str, bool, Source], None]] = []
        self.link_listeners: list[Callable[[str, bool], None]] = []

    def resolve(self, signal: Signal) -> Signal:
        """Fill in the facility, the zone label and the test flag from the registry."""
        device = self._registry.device(signal.device_id)
        if device is None:
            raise Rejection(
                "unregistered_device",
                f"device {signal.device_id!r} is not registered; register it with `gateway device add`",
                device_id=signal.device_id,
            )
        facility_id = device.facility_id or ""
        label = signal.zone_label or (self._registry.zone_label(facility_id, signal.zone) if facility_id else "")
        return msgspec.structs.replace(signal, facility_id=facility_id, zone_label=label, test=signal.test or device.test_mode)

    async def submit_signal(self, signal: Signal, dedup_key: str | None) -> Admission:
        return await self._journal_then_route(self.resolve(signal), dedup_key)

    async def submit_internal(self, signal: Signal) -> Admission:
        """Journal and route a signal the gateway raised itself (supervision, forwarding trouble).

        The device need not be registered: link incidents name a link, not a device.
        """
        device = self._registry.device(signal.device_id)
        if device is not None and device.facility_id and not signal.facility_id:
            signal = msgspec.structs.replace(signal, facility_id=device.facility_id, test=signal.test or device.test_mode)
        return await self._journal_then_route(signal, None)

    async def _journal_then_route(self, signal: Signal, dedup_key: str | None) -> Admission:
        started = time.perf_counter()
        future = self._journal.submit(_insert_signal(signal, dedup_key))
        # Routing hangs on the journal future, not on the caller: a driver task cancelled by a
        # lost connection must not leave a durable signal unrouted (its redelivery would be
        # recognised as a duplicate and never routed either).
        future.add_done_callback(lambda done: self._after_commit(done, signal, started))
        return await asyncio.shield(future)

    def _after_commit(self, future: asyncio.Future[Admission], signal: Signal, started: float) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        self._metrics.journal_commit_seconds.observe(time.perf_counter() - started)
        if future.result() is Admission.DUPLICATE:
            self._metrics.signals_duplicate.labels(signal.source.value).inc()
            log.info("duplicate of seq %s from device %s re-acked, not processed again", signal.seq, signal.device_id)
            return
        self._metrics.signals_accepted.labels(signal.source.value, signal.event_class.value).inc()
        self._router.offer_alarm(signal)

    def submit_heartbeat(self, heartbeat: Heartbeat) -> None:
        if self._registry.device(heartbeat.device_id) is None:
            raise Rejection(
                "unregistered_device",
                f"device {heartbeat.device_id!r} is not registered; register it with `gateway device add`",
                device_id=heartbeat.device_id,
            )
        self._metrics.heartbeats.labels(heartbeat.source.value).inc()
        self._router.offer_heartbeat(heartbeat)

    async def quarantine(self, rejection: Rejection) -> None:
        self._metrics.rejected.labels(rejection.source.value, rejection.reason).inc()
        log.warning(
            "rejected input from %s (%s): %s: %s",
            rejection.origin or rejection.source.value,
            rejection.device_id or "unknown device",
            rejection.reason,
            rejection.message,
        )
        await self._journal.submit(_insert_quarantine(rejection, time.time()))

    def device_status(self, device_id: str, online: bool, source: Source) -> None:
        log.info("device %s announced itself %s", device_id, "online" if online else "offline")
        for listener in self.status_listeners:
            listener(device_id, online, source)

    def link_state(self, link: str, up: bool) -> None:
        self._metrics.link_up.labels(link).set(1 if up else 0)
        for listener in self.link_listeners:
            listener(link, up)

    def unrouted(self) -> list[Signal]:
        """Signals made durable but not yet routed, oldest first, for replay at start-up."""
        rows = self._journal.reader.execute("SELECT body FROM signals WHERE routed = 0 ORDER BY received_at").fetchall()
        return [decode_signal(row[0]) for row in rows]
