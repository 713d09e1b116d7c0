"""Health fields of heartbeats (mains, battery, panel state) turned into trouble changes.

Each function updates a `DeviceRecord` and returns the changes to emit as `(code,
qualifier, text)`. A field missing from a heartbeat (None) changes nothing. The first
heartbeat after a gateway start is compared with a normal state, so a condition that was
already present before the restart is raised again. The incident engine attaches that
repeat to the incident that is still open.
"""

from __future__ import annotations

import logging

from drivers.base import Heartbeat
from gateway.signal import Qualifier
from gateway.supervision.device import DeviceRecord, PanelCondition
from gateway.supervision.signals import BATTERY_LOW, MAINS_LOST, PANEL_DISCONNECTED, PANEL_TROUBLE

log = logging.getLogger(__name__)

Change = tuple[str, Qualifier, str]

PANEL_CODES: dict[PanelCondition, str] = {
    PanelCondition.FAULT: PANEL_TROUBLE,
    PanelCondition.DISCONNECTED: PANEL_DISCONNECTED,
    PanelCondition.ALARM_WITHOUT_EVENT: PANEL_TROUBLE,
}

_PANEL_TEXT: dict[PanelCondition, tuple[str, str]] = {
    PanelCondition.FAULT: ("panel reports a fault in its heartbeat", "panel no longer reports a fault"),
    PanelCondition.DISCONNECTED: (
        "transmitter reports that it lost its connection to the panel",
        "transmitter reports that it is connected to the panel again",
    ),
    PanelCondition.ALARM_WITHOUT_EVENT: (
        "panel reports an alarm state in consecutive heartbeats, but no fire or supervisory event "
        "arrived from this device; check the site",
        "panel alarm state ended or its alarm event arrived",
    ),
}

_PANEL_STATES: dict[str, PanelCondition | None] = {
    "normal": None,
    "fault": PanelCondition.FAULT,
    "disconnected": PanelCondition.DISCONNECTED,
}


def heartbeat_changes(record: DeviceRecord, heartbeat: Heartbeat, now: float, battery_low_v: float, battery_hysteresis_v: float) -> list[Change]:
    """Compare a heartbeat with the device's raised conditions and return what changed."""
    changes: list[Change] = []
    _mains(record, heartbeat.mains, changes)
    _battery(record, heartbeat.battery_v, battery_low_v, battery_hysteresis_v, changes)
    _panel(record, heartbeat.panel, now, changes)
    return changes


def alarm_event_changes(record: DeviceRecord, now: float) -> list[Change]:
    """Note a fire or supervisory event from the device; it explains a panel alarm state."""
    record.alarm_event_at = now
    if record.panel_condition is not PanelCondition.ALARM_WITHOUT_EVENT:
        return []
    changes: list[Change] = []
    _set_panel_condition(record, None, changes)
    return changes


def _mains(record: DeviceRecord, mains: bool | None, changes: list[Change]) -> None:
    if mains is None or (not mains) == record.mains_lost:
        return
    record.mains_lost = not mains
    if record.mains_lost:
        changes.append((MAINS_LOST, Qualifier.NEW, "mains power lost: heartbeat reports mains off"))
    else:
        changes.append((MAINS_LOST, Qualifier.RESTORE, "mains power restored: heartbeat reports mains on"))


def _battery(record: DeviceRecord, volts: float | None, default_low_v: float, hysteresis_v: float, changes: list[Change]) -> None:
    if volts is None:
        return
    low_v = record.battery_low_v if record.battery_low_v is not None else default_low_v
    if not record.battery_low and volts < low_v:
        record.battery_low = True
        changes.append((BATTERY_LOW, Qualifier.NEW, f"battery low: {volts:.2f} V, below {low_v:.2f} V"))
    elif record.battery_low and volts >= low_v + hysteresis_v:
        record.battery_low = False
        changes.append((BATTERY_LOW, Qualifier.RESTORE, f"battery restored: {volts:.2f} V, at or above {low_v + hysteresis_v:.2f} V"))


def _panel(record: DeviceRecord, panel: str | None, now: float, changes: list[Change]) -> None:
    if panel is None:
        return
    if panel == "alarm":
        _set_panel_condition(record, _alarm_condition(record, now), changes)
        return
    record.panel_alarm_since = None
    if panel not in _PANEL_STATES:
        log.debug("device %s reports unknown panel state %r; its panel condition is unchanged", record.device_id, panel)
        return
    _set_panel_condition(record, _PANEL_STATES[panel], changes)


def _alarm_condition(record: DeviceRecord, now: float) -> PanelCondition | None:
    """Raise only from the second consecutive alarm heartbeat, and only when no alarm event
    arrived from one window before the first of them onwards: an event and a heartbeat sent
    together may arrive in either order."""
    if record.panel_alarm_since is None:
        record.panel_alarm_since = now
        return None
    explained = record.alarm_event_at is not None and record.alarm_event_at >= record.panel_alarm_since - record.window_s
    return None if explained else PanelCondition.ALARM_WITHOUT_EVENT


def _set_panel_condition(record: DeviceRecord, target: PanelCondition | None, changes: list[Change]) -> None:
    current = record.panel_condition
    if target is current:
        return
    if current is not None:
        changes.append((PANEL_CODES[current], Qualifier.RESTORE, _PANEL_TEXT[current][1]))
    if target is not None:
        changes.append((PANEL_CODES[target], Qualifier.NEW, _PANEL_TEXT[target][0]))
    record.panel_condition = target
