"""Tests for the incident engine: correlation, restores, jurisdiction, uniqueness and restarts.

Each test registers two facilities in a temporary journal database, stores the signal row
first, then applies the engine's write inside BEGIN/COMMIT, as the journal writer does.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import TypeVar

import pytest

from gateway import codes, event_body, registry
from gateway import journal as journal_module
from gateway.destinations import Destination
from gateway.incidents import Decision, IncidentEngine, IncidentState, TransitionError
from gateway.intake import _insert_signal
from gateway.registry import RegistryCache
from gateway.signal import EventClass, Qualifier, Signal, Source, new_signal_id

T = TypeVar("T")
T0 = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.timezone.utc)
HOLDOFF_S = 60.0

HANOI = registry.Facility(
    id="HN-0001",
    name="Chung cư Sông Hồng",
    address="12 Đường Thanh Niên",
    commune="Phường Tây Hồ",
    province="Hà Nội",
    latitude=21.0503,
    longitude=105.8372,
    team="HN-DOI-02",
)
SAIGON = registry.Facility(
    id="HCM-0001",
    name="Nhà máy dệt Tân Bình",
    province="Thành phố Hồ Chí Minh",
    team="HCM-DOI-07",
)
DESTINATIONS = [
    Destination(name="c07", url="http://127.0.0.1:1", scope="central"),
    Destination(name="pc07-hanoi", url="http://127.0.0.1:2", scope="province:Hà Nội"),
    Destination(name="team-hn02", url="http://127.0.0.1:3", scope="team:HN-DOI-02"),
    Destination(name="pc07-hcm", url="http://127.0.0.1:4", scope="province:Thành phố Hồ Chí Minh"),
    Destination(name="team-hcm07", url="http://127.0.0.1:5", scope="team:HCM-DOI-07"),
]
FACILITY_OF_DEVICE = {"DEV-001": HANOI.id, "DEV-002": HANOI.id, "DEV-101": SAIGON.id, "DEV-900": ""}


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    with closing(journal_module.connect(tmp_path / "journal.db")) as connection:
        journal_module.migrate(connection)
        connection.execute("BEGIN")
        registry.add_facility(connection, HANOI, {1: "Tầng 1 - Sảnh", 2: "Tầng hầm B1"})
        registry.add_facility(connection, SAIGON, {1: "Xưởng dệt"})
        for device_id, facility_id in FACILITY_OF_DEVICE.items():
            registry.add_device(connection, registry.make_device(id=device_id, facility_id=facility_id or None))
        connection.execute("COMMIT")
        yield connection


@pytest.fixture
def registry_cache(conn: sqlite3.Connection) -> RegistryCache:
    cache = RegistryCache(conn)
    cache.load()
    return cache


@pytest.fixture
def engine(registry_cache: RegistryCache) -> IncidentEngine:
    return IncidentEngine(registry_cache, DESTINATIONS, trouble_holdoff_s=HOLDOFF_S)


def make_signal(code: str, *, device_id: str = "DEV-001", zone: int = 1, qualifier: Qualifier = Qualifier.NEW,
                at_s: float = 0.0, test: bool = False) -> Signal:
    """Build a resolved signal received `at_s` seconds after T0."""
    return Signal(
        id=new_signal_id(),
        source=Source.MQTT,
        device_id=device_id,
        facility_id=FACILITY_OF_DEVICE[device_id],
        event_class=codes.lookup(code).event_class,
        code=code,
        qualifier=qualifier,
        zone=zone,
        received_at=T0 + dt.timedelta(seconds=at_s),
        test=test,
    )


def apply(conn: sqlite3.Connection, write: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN")
    try:
        result = write(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def route(conn: sqlite3.Connection, engine: IncidentEngine, signal: Signal) -> Decision:
    """Store the signal row, then record the engine's decision about it."""
    apply(conn, _insert_signal(signal, None))
    return apply(conn, engine.route(signal))


def incident_rows(conn: sqlite3.Connection) -> list[dict]:
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute("SELECT * FROM incidents ORDER BY opened_at, id")]
    finally:
        conn.row_factory = None


def timeline(conn: sqlite3.Connection, incident_id: str) -> list[str]:
    rows = conn.execute("SELECT kind FROM incident_events WHERE incident_id = ? ORDER BY at, rowid", (incident_id,))
    return [row[0] for row in rows]


def outbox(conn: sqlite3.Connection, event_id: str | None = None) -> list[tuple[str, event_body.EventBody]]:
    if event_id is None:
        rows = conn.execute("SELECT destination, body FROM outbox ORDER BY seq").fetchall()
    else:
        rows = conn.execute("SELECT destination, body FROM outbox WHERE event_id = ? ORDER BY seq", (event_id,)).fetchall()
    return [(destination, event_body.decode(body)) for destination, body in rows]


def is_routed(conn: sqlite3.Connection, signal: Signal) -> bool:
    return conn.execute("SELECT routed FROM signals WHERE id = ?", (signal.id,)).fetchone()[0] == 1


def test_route_fire_opens_incident(conn, engine):
    """Test that a fire alarm opens one incident with its timeline entry and marks the signal routed."""
    fire = make_signal("110", zone=1)

    decision = route(conn, engine, fire)

    rows = incident_rows(conn)
    assert decision.action == "opened"
    assert len(rows) == 1
    assert rows[0]["id"] == decision.incident_id
    assert rows[0]["state"] == "open"
    assert rows[0]["event_class"] == "fire"
    assert rows[0]["facility_id"] == "HN-0001"
    assert json.loads(rows[0]["zones"]) == [1]
    assert timeline(conn, decision.incident_id) == ["opened"]
    assert is_routed(conn, fire)
    assert [incident.id for incident in engine.open_incidents] == [decision.incident_id]


def test_route_second_zone_attaches(conn, engine):
    """Test that a fire in a second zone of the facility attaches and raises the zone count to 2."""
    first = make_signal("110", zone=1)
    second = make_signal("111", zone=2, at_s=5)

    opened = route(conn, engine, first)
    attached = route(conn, engine, second)

    rows = incident_rows(conn)
    assert attached.action == "attached"
    assert attached.incident_id == opened.incident_id
    assert len(rows) == 1
    assert json.loads(rows[0]["zones"]) == [1, 2]
    assert json.loads(rows[0]["active_conditions"]) == ["DEV-001:110:1", "DEV-001:111:2"]
    bodies = [body for _, body in outbox(conn, second.id)]
    assert bodies
    assert {body.incident.zone_count for body in bodies} == {2}
    assert {body.incident.id for body in bodies} == {opened.incident_id}
    assert timeline(conn, opened.incident_id) == ["opened", "attached"]


def test_route_fire_from_other_device_attaches(conn, engine):
    """Test that a fire from another device of the same facility joins the open fire incident."""
    opened = route(conn, engine, make_signal("110", device_id="DEV-001", zone=1))
    attached = route(conn, engine, make_signal("115", device_id="DEV-002", zone=3, at_s=2))

    assert attached.action == "attached"
    assert attached.incident_id == opened.incident_id
    assert len(incident_rows(conn)) == 1


def test_route_classes_open_separate_incidents(conn, engine):
    """Test that fire, supervisory and trouble of one facility each open their own incident."""
    decisions = [
        route(conn, engine, make_signal("110", zone=1)),
        route(conn, engine, make_signal("200", zone=1, at_s=1)),
        route(conn, engine, make_signal("301", zone=0, at_s=2)),
    ]

    rows = incident_rows(conn)
    assert [decision.action for decision in decisions] == ["opened", "opened", "opened"]
    assert len({decision.incident_id for decision in decisions}) == 3
    assert [row["event_class"] for row in rows] == ["fire", "supervisory", "trouble"]


def test_route_restore_annotates_fire(conn, engine):
    """Test that a fire restore adds a 'restored' timeline entry and leaves the fire incident open."""
    opened = route(conn, engine, make_signal("110", zone=1))

    restored = route(conn, engine, make_signal("110", zone=1, qualifier=Qualifier.RESTORE, at_s=30))

    rows = incident_rows(conn)
    assert restored.action == "restored"
    assert restored.incident_id == opened.incident_id
    assert rows[0]["state"] == "open"
    assert json.loads(rows[0]["active_conditions"]) == []
    assert timeline(conn, opened.incident_id) == ["opened", "restored"]
    assert [incident.id for incident in engine.open_incidents] == [opened.incident_id]
    assert engine.due_auto_resolve(T0.timestamp() + 30 + 10 * HOLDOFF_S) == []


def test_route_restore_without_incident(conn, engine):
    """Test that a restore matching no open incident is marked routed and writes no outbox row."""
    restore = make_signal("301", zone=0, qualifier=Qualifier.RESTORE)

    decision = route(conn, engine, restore)

    assert decision.action == "recorded"
    assert decision.incident_id == ""
    assert decision.outbox_count == 0
    assert is_routed(conn, restore)
    assert outbox(conn) == []
    assert incident_rows(conn) == []


def test_route_test_signal_separate_incident(conn, engine):
    """Test that a test-flagged fire opens its own test incident beside the live one."""
    live = route(conn, engine, make_signal("110", zone=1))
    test = route(conn, engine, make_signal("110", zone=2, at_s=1, test=True))
    live_again = route(conn, engine, make_signal("110", zone=3, at_s=2))

    rows = {row["id"]: row for row in incident_rows(conn)}
    assert test.action == "opened"
    assert test.incident_id != live.incident_id
    assert rows[test.incident_id]["test"] == 1
    assert rows[live.incident_id]["test"] == 0
    assert live_again.incident_id == live.incident_id
    assert json.loads(rows[live.incident_id]["zones"]) == [1, 3]


@pytest.mark.parametrize(
    ("code", "event_class"),
    [("602", EventClass.TEST), ("601", EventClass.TEST), ("", EventClass.HEARTBEAT)],
)
def test_route_test_classes_open_nothing(conn, engine, code, event_class):
    """Test that test-class codes and heartbeat signals open no incident and write no outbox row."""
    signal = Signal(
        id=new_signal_id(),
        source=Source.MQTT,
        device_id="DEV-001",
        facility_id="HN-0001",
        event_class=event_class,
        code=code,
        received_at=T0,
    )

    decision = route(conn, engine, signal)

    assert decision.action == "recorded"
    assert is_routed(conn, signal)
    assert incident_rows(conn) == []
    assert outbox(conn) == []
    assert engine.open_incidents == []


@pytest.mark.parametrize(
    ("device_id", "expected"),
    [
        ("DEV-001", ["c07", "pc07-hanoi", "team-hn02"]),
        ("DEV-101", ["c07", "pc07-hcm", "team-hcm07"]),
        ("DEV-900", ["c07"]),
    ],
)
def test_route_outbox_follows_jurisdiction(conn, engine, device_id, expected):
    """Test that central gets every event, a province or team only its own facilities' events."""
    fire = make_signal("110", device_id=device_id, zone=1)

    decision = route(conn, engine, fire)

    rows = outbox(conn, fire.id)
    assert [destination for destination, _ in rows] == expected
    assert decision.outbox_count == len(expected)
    assert {body.facility.id for _, body in rows} == {FACILITY_OF_DEVICE[device_id]}
    assert {body.kind for _, body in rows} == {"signal"}


def test_route_outbox_body_fields(conn, engine):
    """Test that the stored event body names the facility, device, signal and incident."""
    fire = make_signal("110", zone=2)

    decision = route(conn, engine, fire)

    _, body = outbox(conn, fire.id)[0]
    assert body.event_id == fire.id
    assert body.facility.name == HANOI.name
    assert body.facility.province == "Hà Nội"
    assert body.facility.latitude == pytest.approx(21.0503)
    assert body.device.id == "DEV-001"
    assert body.signal is not None
    assert body.signal.code == "110"
    assert body.signal.zone == 2
    assert body.incident is not None
    assert body.incident.id == decision.incident_id
    assert body.incident.state == "open"
    assert body.times.received == T0
    assert body.times.forwarded is None


def test_route_duplicate_open_incident_rejected(conn, registry_cache):
    """Test that the database rejects a second open incident with the same correlation key."""
    first_instance = IncidentEngine(registry_cache, DESTINATIONS)
    second_instance = IncidentEngine(registry_cache, DESTINATIONS)
    first_fire = make_signal("110", zone=1)
    second_fire = make_signal("110", zone=2, at_s=1)

    route(conn, first_instance, first_fire)
    apply(conn, _insert_signal(second_fire, None))
    with pytest.raises(sqlite3.IntegrityError):
        apply(conn, second_instance.route(second_fire))

    assert len(incident_rows(conn)) == 1
    assert not is_routed(conn, second_fire)
    assert outbox(conn, second_fire.id) == []


def test_route_after_resolve_opens_new_incident(conn, engine):
    """Test that once a fire incident is resolved, the next fire opens a new one."""
    first = route(conn, engine, make_signal("110", zone=1))
    apply(conn, engine.change_state(first.incident_id, IncidentState.RESOLVED, at=T0 + dt.timedelta(minutes=5), actor="officer-1", outcome="false_alarm"))

    second = route(conn, engine, make_signal("110", zone=1, at_s=600))

    assert second.action == "opened"
    assert second.incident_id != first.incident_id
    assert [row["state"] for row in incident_rows(conn)] == ["resolved", "open"]


def test_load_restores_open_incidents(conn, registry_cache, engine):
    """Test that an engine started on the journal attaches a new fire to the incident opened before."""
    opened = route(conn, engine, make_signal("110", zone=1))
    route(conn, engine, make_signal("301", zone=0, at_s=1))

    restarted = IncidentEngine(registry_cache, DESTINATIONS, trouble_holdoff_s=HOLDOFF_S)
    loaded = restarted.load(conn)
    fire = make_signal("110", zone=2, at_s=60)
    attached = route(conn, restarted, fire)

    assert loaded == 2
    assert attached.action == "attached"
    assert attached.incident_id == opened.incident_id
    assert len(incident_rows(conn)) == 2
    assert {body.incident.zone_count for _, body in outbox(conn, fire.id)} == {2}


def test_load_skips_resolved_incidents(conn, registry_cache, engine):
    """Test that a resolved incident is not loaded as open after a restart."""
    opened = route(conn, engine, make_signal("110", zone=1))
    apply(conn, engine.change_state(opened.incident_id, IncidentState.RESOLVED, at=T0 + dt.timedelta(minutes=1), actor="officer-1", outcome="false_alarm"))

    restarted = IncidentEngine(registry_cache, DESTINATIONS)

    assert restarted.load(conn) == 0
    assert restarted.open_incidents == []


def test_due_auto_resolve_needs_full_restore(conn, engine):
    """Test that a trouble incident is due only after every zone restored and the hold-off passed."""
    opened = route(conn, engine, make_signal("373", zone=1))
    route(conn, engine, make_signal("373", zone=2, at_s=5))
    start = T0.timestamp()

    route(conn, engine, make_signal("373", zone=1, qualifier=Qualifier.RESTORE, at_s=10))
    one_zone_left = engine.due_auto_resolve(start + 10 + 10 * HOLDOFF_S)
    route(conn, engine, make_signal("373", zone=2, qualifier=Qualifier.RESTORE, at_s=20))
    inside_holdoff = engine.due_auto_resolve(start + 20 + HOLDOFF_S - 1)
    after_holdoff = engine.due_auto_resolve(start + 20 + HOLDOFF_S)

    assert one_zone_left == []
    assert inside_holdoff == []
    assert [incident.id for incident in after_holdoff] == [opened.incident_id]


def test_due_auto_resolve_new_fault_within_holdoff(conn, engine):
    """Test that a fault that returns within the hold-off keeps the trouble incident open."""
    opened = route(conn, engine, make_signal("373", zone=1))
    route(conn, engine, make_signal("373", zone=1, qualifier=Qualifier.RESTORE, at_s=10))
    again = route(conn, engine, make_signal("373", zone=1, at_s=20))

    assert again.incident_id == opened.incident_id
    assert engine.due_auto_resolve(T0.timestamp() + 20 + 10 * HOLDOFF_S) == []


def test_due_auto_resolve_after_restart(conn, registry_cache, engine):
    """Test that a trouble incident fully restored before a restart still auto-resolves after it."""
    opened = route(conn, engine, make_signal("373", zone=1))
    route(conn, engine, make_signal("373", zone=1, qualifier=Qualifier.RESTORE, at_s=10))

    restarted = IncidentEngine(registry_cache, DESTINATIONS, trouble_holdoff_s=HOLDOFF_S)
    restarted.load(conn)
    due = restarted.due_auto_resolve(T0.timestamp() + 10 + HOLDOFF_S)

    assert [incident.id for incident in due] == [opened.incident_id]


def test_change_state_resolved_notifies(conn, engine):
    """Test that resolving an incident drops it from the open set and queues an incident_update."""
    opened = route(conn, engine, make_signal("110", zone=1))
    resolved_at = T0 + dt.timedelta(minutes=20)

    decision = apply(
        conn,
        engine.change_state(opened.incident_id, IncidentState.RESOLVED, at=resolved_at, actor="officer-1", outcome="false_alarm"),
    )

    row = incident_rows(conn)[0]
    assert decision.action == "resolved"
    assert engine.open_incidents == []
    assert row["state"] == "resolved"
    assert row["outcome"] == "false_alarm"
    assert timeline(conn, opened.incident_id) == ["opened", "state"]
    detail = conn.execute(
        "SELECT detail FROM incident_events WHERE incident_id = ? AND kind = 'state'", (opened.incident_id,)
    ).fetchone()[0]
    assert json.loads(detail) == {"state": "resolved", "outcome": "false_alarm", "actor": "officer-1"}
    updates = [(destination, body) for destination, body in outbox(conn) if body.kind == "incident_update"]
    assert [destination for destination, _ in updates] == ["c07", "pc07-hanoi", "team-hn02"]
    assert {body.incident.state for _, body in updates} == {"resolved"}
    assert {body.signal for _, body in updates} == {None}
    assert {body.times.received for _, body in updates} == {resolved_at}
    assert decision.outbox_count == 3


def test_change_state_acknowledged_stays_open(conn, engine):
    """Test that acknowledging keeps the incident open, so a new fire still attaches."""
    opened = route(conn, engine, make_signal("110", zone=1))
    apply(conn, engine.change_state(opened.incident_id, IncidentState.ACKNOWLEDGED, at=T0 + dt.timedelta(minutes=1), actor="officer-1", outcome="false_alarm"))

    attached = route(conn, engine, make_signal("110", zone=2, at_s=120))

    assert attached.incident_id == opened.incident_id
    assert incident_rows(conn)[0]["state"] == "acknowledged"


def test_change_state_unknown_incident_raises(engine):
    """Test that changing the state of an incident that is not open raises LookupError."""
    with pytest.raises(LookupError, match="not found"):
        engine.change_state("no-such-incident", IncidentState.RESOLVED, at=T0, actor="officer-1", outcome="false_alarm")


def test_change_state_rejects_skipped_steps(conn, engine):
    """Test that a transition the current state does not allow is rejected and changes nothing."""
    opened = route(conn, engine, make_signal("110", zone=1))

    with pytest.raises(TransitionError):
        engine.change_state(opened.incident_id, IncidentState.CLOSED, at=T0, actor="officer-1")
    with pytest.raises(TransitionError):
        engine.change_state(opened.incident_id, IncidentState.RESOLVED, at=T0, actor="officer-1")

    assert engine.find(opened.incident_id).state is IncidentState.OPEN


def test_change_state_closes_resolved_incident(conn, engine):
    """Test that a resolved incident can be closed, and that a closed one can no longer change."""
    opened = route(conn, engine, make_signal("110", zone=1))
    apply(conn, engine.change_state(opened.incident_id, IncidentState.ACKNOWLEDGED, at=T0, actor="officer-1"))
    apply(conn, engine.change_state(opened.incident_id, IncidentState.RESOLVED, at=T0, actor="officer-1", outcome="real_fire"))
    apply(conn, engine.change_state(opened.incident_id, IncidentState.CLOSED, at=T0, actor="officer-1"))

    assert engine.find(opened.incident_id) is None
    assert [row["state"] for row in incident_rows(conn)] == ["closed"]
    with pytest.raises(LookupError):
        engine.change_state(opened.incident_id, IncidentState.OPEN, at=T0, actor="officer-1")


def test_restore_matches_device_code_and_zone(conn, engine):
    """Test that a mains restore does not clear a communication loss on the same device and zone."""
    route(conn, engine, make_signal("350", zone=0))
    route(conn, engine, make_signal("301", zone=0, at_s=1))
    route(conn, engine, make_signal("301", zone=0, qualifier=Qualifier.RESTORE, at_s=2))

    assert engine.due_auto_resolve(T0.timestamp() + 10_000) == []
    rows = incident_rows(conn)
    assert json.loads(rows[0]["active_conditions"]) == ["DEV-001:350:0"]
