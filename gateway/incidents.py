"""Incidents: signals correlated per facility and class, with their audit timeline.

The engine decides in memory and returns a journal write that records the decision, the
timeline entry, the outbox rows and the signal's `routed` mark in one transaction. Writes run
in submission order, so the journal always contains a prefix of the engine's decisions; after a
crash the engine reloads open incidents and the journal replays the unrouted signals.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import sqlite3
from collections.abc import Callable, Sequence

import msgspec
from msgspec.json import decode as json_loads

from gateway import event_body
from gateway.destinations import Destination, select
from gateway.registry import Facility, RegistryCache
from gateway.signal import EventClass, Qualifier, Signal, new_signal_id

log = logging.getLogger(__name__)

INCIDENT_CLASSES = (EventClass.FIRE, EventClass.SUPERVISORY, EventClass.TROUBLE)


class IncidentState(enum.StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    DISPATCHED = "dispatched"
    ON_SCENE = "on_scene"
    RESOLVED = "resolved"
    CLOSED = "closed"


OPEN_STATES = frozenset({IncidentState.OPEN, IncidentState.ACKNOWLEDGED, IncidentState.DISPATCHED, IncidentState.ON_SCENE})

# The moves a person (or the gateway, for auto-resolve) may make; fire incidents are closed
# only through resolved, with an outcome.
TRANSITIONS: dict[IncidentState, frozenset[IncidentState]] = {
    IncidentState.OPEN: frozenset({IncidentState.ACKNOWLEDGED, IncidentState.DISPATCHED, IncidentState.RESOLVED}),
    IncidentState.ACKNOWLEDGED: frozenset({IncidentState.DISPATCHED, IncidentState.RESOLVED}),
    IncidentState.DISPATCHED: frozenset({IncidentState.ON_SCENE, IncidentState.RESOLVED}),
    IncidentState.ON_SCENE: frozenset({IncidentState.RESOLVED}),
    IncidentState.RESOLVED: frozenset({IncidentState.CLOSED}),
    IncidentState.CLOSED: frozenset(),
}
OUTCOMES = ("real_fire", "false_alarm", "unwanted", "test", "restored")
# "restored" is set by the gateway when a trouble incident resolves itself.
PERSON_OUTCOMES = OUTCOMES[:4]


class TransitionError(ValueError):
    """A state change that the incident's current state does not allow."""


class Incident(msgspec.Struct, kw_only=True):
    id: str
    correlation_key: str
    facility_id: str
    device_id: str
    event_class: EventClass
    state: IncidentState
    opened_at: float
    updated_at: float
    zones: list[int]
    active_conditions: list[str]
    test: bool = False
    outcome: str = ""
    restored_at: float | None = None


def correlation_key(signal: Signal) -> str:
    """Facility (device when unbound) plus class; test traffic never joins live incidents."""
    owner = signal.facility_id or f"device:{signal.device_id}"
    mode = "test" if signal.test else "live"
    return f"{owner}|{signal.event_class.value}|{mode}"


def condition_key(signal: Signal) -> str:
    """What a restore must match: the same device, event code and zone.

    Supervision raises several troubles on zone 0 of one device (communication loss, mains
    lost), so the zone alone would let one restore clear another condition.
    """
    return f"{signal.device_id}:{signal.code}:{signal.zone}"


class Decision(msgspec.Struct, kw_only=True):
    """The outcome of routing one signal, for logs, metrics and tests."""

    signal_id: str
    incident_id: str = ""
    action: str = "recorded"  # opened, attached, restored, recorded
    outbox_count: int = 0


WriteOp = Callable[[sqlite3.Connection], Decision]


class IncidentEngine:
    def __init__(self, registry: RegistryCache, destinations: Sequence[Destination], *, trouble_holdoff_s: float = 60.0) -> None:
        self._registry = registry
        self._destinations = list(destinations)
        self._open: dict[str, Incident] = {}
        self._resolved: dict[str, Incident] = {}
        self.trouble_holdoff_s = trouble_holdoff_s

    @property
    def open_incidents(self) -> list[Incident]:
        return list(self._open.values())

    def load(self, conn: sqlite3.Connection) -> int:
        """Load open and resolved (not yet closed) incidents from the journal; return how many are open."""
        self._open.clear()
        self._resolved.clear()
        rows = conn.execute(
            """SELECT id, correlation_key, facility_id, device_id, event_class, state, opened_at, updated_at,
                      zones, active_conditions, test, outcome, restored_at
               FROM incidents WHERE state IN ('open', 'acknowledged', 'dispatched', 'on_scene', 'resolved')"""
        )
        for row in rows:
            incident = Incident(
                id=row[0],
                correlation_key=row[1],
                facility_id=row[2],
                device_id=row[3],
                event_class=EventClass(row[4]),
                state=IncidentState(row[5]),
                opened_at=row[6],
                updated_at=row[7],
                zones=json_loads(row[8]),
                active_conditions=json_loads(row[9]),
                test=bool(row[10]),
                outcome=row[11],
                restored_at=row[12],
            )
            if incident.state is IncidentState.RESOLVED:
                self._resolved[incident.id] = incident
            else:
                self._open[incident.correlation_key] = incident
        return len(self._open)

    def route(self, signal: Signal) -> WriteOp:
        """Correlate `signal` into incidents and return the journal write that records it."""
        if signal.event_class not in INCIDENT_CLASSES:
            return _mark_routed(Decision(signal_id=signal.id))
        key = correlation_key(signal)
        now = signal.received_at.timestamp()
        incident = self._open.get(key)

        if signal.qualifier is Qualifier.RESTORE:
            if incident is None:
                log.info("restore %s from device %s matches no open incident", signal.code, signal.device_id)
                return _mark_routed(Decision(signal_id=signal.id))
            condition = condition_key(signal)
            if condition in incident.active_conditions:
                incident.active_conditions.remove(condition)
            if not incident.active_conditions:
                incident.restored_at = now
            incident.updated_at = now
            return self._record(incident, signal, "restored", created=False)

        if incident is None:
            incident = Incident(
                id=new_signal_id(),
                correlation_key=key,
                facility_id=signal.facility_id,
                device_id=signal.device_id,
                event_class=signal.event_class,
                state=IncidentState.OPEN,
                opened_at=now,
                updated_at=now,
                zones=[signal.zone],
                active_conditions=[condition_key(signal)],
                test=signal.test,
            )
            self._open[key] = incident
            return self._record(incident, signal, "opened", created=True)

        if signal.zone not in incident.zones:
            incident.zones.append(signal.zone)
        condition = condition_key(signal)
        if condition not in incident.active_conditions:
            incident.active_conditions.append(condition)
        incident.restored_at = None
        incident.updated_at = now
        return self._record(incident, signal, "attached", created=False)

    def due_auto_resolve(self, now: float) -> list[Incident]:
        """Trouble incidents whose signals all restored at least the hold-off ago."""
        return [
            incident
            for incident in self._open.values()
            if incident.event_class is EventClass.TROUBLE
            and incident.restored_at is not None
            and now - incident.restored_at >= self.trouble_holdoff_s
        ]

    def change_state(
        self, incident_id: str, state: IncidentState, *, at: dt.datetime, actor: str, outcome: str = ""
    ) -> Callable[[sqlite3.Connection], Decision]:
        """Move an incident to `state`; the update travels to the command centres like an alarm.

        Raises LookupError for an unknown or closed incident and TransitionError for a move
        that its current state does not allow.
        """
        incident = self._resolved.get(incident_id) or next((item for item in self._open.values() if item.id == incident_id), None)
        if incident is None:
            raise LookupError(f"incident {incident_id} not found, or already closed")
        if state not in TRANSITIONS[incident.state]:
            allowed = ", ".join(sorted(TRANSITIONS[incident.state])) or "none"
            raise TransitionError(f"incident {incident_id} is {incident.state.value}; it can move to: {allowed}")
        allowed_outcomes = OUTCOMES if actor == "gateway" else PERSON_OUTCOMES
        if state is IncidentState.RESOLVED and outcome not in allowed_outcomes:
            raise TransitionError(f"resolving incident {incident_id} needs an outcome, one of: {', '.join(allowed_outcomes)}")

        previous = incident.state
        incident.state = state
        incident.outcome = outcome or incident.outcome
        incident.updated_at = at.timestamp()
        if previous in OPEN_STATES and state not in OPEN_STATES:
            del self._open[incident.correlation_key]
        if state is IncidentState.RESOLVED:
            self._resolved[incident.id] = incident
        elif state is IncidentState.CLOSED:
            self._resolved.pop(incident.id, None)
        return self._record_state(incident, at=at, actor=actor)

    def find(self, incident_id: str) -> Incident | None:
        """Return an open or resolved incident by id."""
        return self._resolved.get(incident_id) or next((item for item in self._open.values() if item.id == incident_id), None)

    def _outbox_rows(self, incident: Incident, body: event_body.EventBody) -> list[tuple[str, bytes]]:
        facility = self._registry.facility(incident.facility_id) if incident.facility_id else None
        encoded = event_body.encode(body)
        return [(name, encoded) for name in select(self._destinations, facility)]

    def _record(self, incident: Incident, signal: Signal, action: str, *, created: bool) -> WriteOp:
        body = self._signal_body(incident, signal)
        outbox = self._outbox_rows(incident, body)
        snapshot = _incident_row(incident)
        timeline = (new_signal_id(), incident.id, signal.received_at.timestamp(), action, signal.id, _json_text({"zone": signal.zone, "code": signal.code}))
        decision = Decision(signal_id=signal.id, incident_id=incident.id, action=action, outbox_count=len(outbox))

        def write(conn: sqlite3.Connection) -> Decision:
            _save_incident(conn, snapshot, created)
            conn.execute("INSERT INTO incident_events (id, incident_id, at, kind, signal_id, detail) VALUES (?, ?, ?, ?, ?, ?)", timeline)
            _insert_outbox(conn, body.event_id, incident.id, incident.event_class, signal.received_at.timestamp(), outbox)
            conn.execute("UPDATE signals SET routed = 1 WHERE id = ?", (signal.id,))
            return decision

        return write

    def _record_state(self, incident: Incident, *, at: dt.datetime, actor: str) -> Callable[[sqlite3.Connection], Decision]:
        facility = self._facility_body(incident.facility_id, incident.device_id)
        body = event_body.EventBody(
            event_id=new_signal_id(),
            kind="incident_update",
            incident=_incident_body(incident),
            facility=facility,
            device=event_body.DeviceBody(id=incident.device_id, source=""),
            signal=None,
            times=event_body.TimesBody(panel=None, received=at),
            test=incident.test,
        )
        outbox = self._outbox_rows(incident, body)
        snapshot = _incident_row(incident)
        timeline = (new_signal_id(), incident.id, at.timestamp(), "state", None, _json_text({"state": incident.state.value, "outcome": incident.outcome, "actor": actor}))
        decision = Decision(signal_id="", incident_id=incident.id, action=incident.state.value, outbox_count=len(outbox))

        def write(conn: sqlite3.Connection) -> Decision:
            _save_incident(conn, snapshot, False)
            conn.execute("INSERT INTO incident_events (id, incident_id, at, kind, signal_id, detail) VALUES (?, ?, ?, ?, ?, ?)", timeline)
            _insert_outbox(conn, body.event_id, incident.id, incident.event_class, at.timestamp(), outbox)
            return decision

        return write

    def _facility_body(self, facility_id: str, device_id: str) -> event_body.FacilityBody:
        facility: Facility | None = self._registry.facility(facility_id) if facility_id else None
        if facility is None:
            return event_body.FacilityBody(id=facility_id)
        return event_body.FacilityBody(
            id=facility.id,
            name=facility.name,
            address=facility.address,
            commune=facility.commune,
            province=facility.province,
            latitude=facility.latitude,
            longitude=facility.longitude,
        )

    def _signal_body(self, incident: Incident, signal: Signal) -> event_body.EventBody:
        return event_body.EventBody(
            event_id=signal.id,
            kind="signal",
            incident=_incident_body(incident),
            facility=self._facility_body(signal.facility_id, signal.device_id),
            device=event_body.DeviceBody(id=signal.device_id, source=signal.source.value),
            signal=event_body.SignalBody(
                id=signal.id,
                event_class=signal.event_class.value,
                code=signal.code,
                sia_code=signal.sia_code,
                qualifier=signal.qualifier.value,
                group=signal.group,
                zone=signal.zone,
                zone_label=signal.zone_label,
                text=signal.text,
            ),
            times=event_body.TimesBody(panel=signal.panel_time, received=signal.received_at),
            test=signal.test,
        )


_json_encoder = msgspec.json.Encoder()


def _json_text(value: object) -> str:
    return _json_encoder.encode(value).decode()


def _incident_body(incident: Incident) -> event_body.IncidentBody:
    return event_body.IncidentBody(
        id=incident.id,
        state=incident.state.value,
        event_class=incident.event_class.value,
        opened_at=dt.datetime.fromtimestamp(incident.opened_at, dt.timezone.utc),
        zone_count=len(incident.zones),
    )


def _incident_row(incident: Incident) -> tuple:
    return (
        incident.id,
        incident.correlation_key,
        incident.facility_id,
        incident.device_id,
        incident.event_class.value,
        incident.state.value,
        incident.outcome,
        incident.opened_at,
        incident.updated_at,
        _json_text(incident.zones),
        _json_text(incident.active_conditions),
        int(incident.test),
        incident.restored_at,
    )


def _save_incident(conn: sqlite3.Connection, row: tuple, created: bool) -> None:
    if created:
        conn.execute(
            """INSERT INTO incidents (id, correlation_key, facility_id, device_id, event_class, state, outcome,
                                      opened_at, updated_at, zones, active_conditions, test, restored_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            row,
        )
        return
    conn.execute(
        "UPDATE incidents SET state = ?, outcome = ?, updated_at = ?, zones = ?, active_conditions = ?, restored_at = ? WHERE id = ?",
        (row[5], row[6], row[8], row[9], row[10], row[12], row[0]),
    )


def _insert_outbox(
    conn: sqlite3.Connection, event_id: str, incident_id: str, event_class: EventClass, created_at: float, rows: list[tuple[str, bytes]]
) -> None:
    conn.executemany(
        """INSERT INTO outbox (event_id, destination, incident_id, event_class, created_at, body)
           VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (event_id, destination) DO NOTHING""",
        [(event_id, destination, incident_id, event_class.value, created_at, body) for destination, body in rows],
    )


def _mark_routed(decision: Decision) -> WriteOp:
    def write(conn: sqlite3.Connection) -> Decision:
        conn.execute("UPDATE signals SET routed = 1 WHERE id = ?", (decision.signal_id,))
        return decision

    return write
