"""The canonical signal: one shape for everything a device, panel or person reports.

Every driver turns its bytes into `Signal` values; everything after intake (journal,
routing core, incidents, supervision, store, forwarder) reads only this model.
"""

from __future__ import annotations

import datetime as dt
import enum

import msgspec
import uuid_utils


class Source(enum.StrEnum):
    MQTT = "mqtt"
    MODBUS = "modbus"
    SERIAL = "serial"
    DC09 = "dc09"
    APP114 = "app114"
    HOTLINE = "hotline"
    SUPERVISION = "supervision"


class EventClass(enum.StrEnum):
    """Event classes; `PRIORITY` gives their fixed order, most urgent first."""

    FIRE = "fire"
    SUPERVISORY = "supervisory"
    TROUBLE = "trouble"
    RESTORE = "restore"
    TEST = "test"
    HEARTBEAT = "heartbeat"


# Lower number = served first. Fire alarm > supervisory > trouble > restore > test > heartbeat.
PRIORITY: dict[EventClass, int] = {cls: rank for rank, cls in enumerate(EventClass)}


class Qualifier(enum.StrEnum):
    """Contact ID qualifier: 1/E new event, 3/R restore, 6/P still present (status)."""

    NEW = "new"
    RESTORE = "restore"
    STATUS = "status"


QUALIFIER_BY_LETTER: dict[str, Qualifier] = {"E": Qualifier.NEW, "R": Qualifier.RESTORE, "P": Qualifier.STATUS}
QUALIFIER_BY_DIGIT: dict[str, Qualifier] = {"1": Qualifier.NEW, "3": Qualifier.RESTORE, "6": Qualifier.STATUS}
LETTER_BY_QUALIFIER: dict[Qualifier, str] = {q: letter for letter, q in QUALIFIER_BY_LETTER.items()}


class Signal(msgspec.Struct, kw_only=True, frozen=True):
    """One normalized signal.

    `event_class` is the class of the event code itself (a restore of a fire alarm keeps
    `event_class == FIRE` with `qualifier == RESTORE`); `lane_class` gives the class the
    routing core and the incident engine act on.
    """

    id: str
    source: Source
    device_id: str
    facility_id: str = ""
    event_class: EventClass
    code: str = ""
    qualifier: Qualifier = Qualifier.NEW
    sia_code: str = ""
    group: int = 0
    zone: int = 0
    zone_label: str = ""
    text: str = ""
    panel_time: dt.datetime | None = None
    received_at: dt.datetime
    seq: int | None = None
    boot: int | None = None
    raw: bytes = b""
    test: bool = False

    @property
    def lane_class(self) -> EventClass:
        if self.qualifier is Qualifier.RESTORE and self.event_class is not EventClass.HEARTBEAT:
            return EventClass.RESTORE
        return self.event_class

    @property
    def is_alarm_lane(self) -> bool:
        """True for every signal that must be journaled before ack and never shed."""
        return self.event_class is not EventClass.HEARTBEAT


def new_signal_id() -> str:
    """Return a new UUIDv7: sortable by creation time, unique without coordination."""
    return str(uuid_utils.uuid7())


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
