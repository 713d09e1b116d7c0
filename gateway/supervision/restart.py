"""Carry raised supervision troubles across a gateway restart, from the journal.

The supervisor keeps its state in memory only. Without this, a device that was in
communication loss when the gateway stopped and came back while it was down would never get
its 350 restore, and its trouble incident would stay open until someone closed it by hand.
"""

from __future__ import annotations

import sqlite3

import msgspec

from gateway.signal import Qualifier, Signal, Source
from gateway.supervision.signals import (
    BATTERY_LOW,
    COMMUNICATION_LOSS,
    FAILED_TO_TEST,
    MAINS_LOST,
    PANEL_DISCONNECTED,
    PANEL_TROUBLE,
)
from gateway.supervision.supervisor import Supervisor

SUPERVISION_CODES = (COMMUNICATION_LOSS, FAILED_TO_TEST, MAINS_LOST, BATTERY_LOW, PANEL_TROUBLE, PANEL_DISCONNECTED)

_signal_decoder = msgspec.msgpack.Decoder(Signal)


def open_conditions(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """Return `(device_id, code)` for every supervision trouble whose last journaled signal is a new event.

    Devices report some of the same codes themselves (a panel's own 301 event), so only
    signals whose source is supervision count.
    NOTE: this reads every trouble signal with one of these codes in the journal, so its cost
    grows with the journal's size.
    """
    placeholders = ", ".join("?" for _ in SUPERVISION_CODES)
    rows = conn.execute(
        f"""SELECT device_id, code, qualifier, body FROM signals
            WHERE event_class = 'trouble' AND code IN ({placeholders})
            ORDER BY received_at, id""",
        SUPERVISION_CODES,
    )
    last_qualifier: dict[tuple[str, str], str] = {}
    for device_id, code, qualifier, body in rows:
        if _signal_decoder.decode(body).source is not Source.SUPERVISION:
            continue
        last_qualifier[(device_id, code)] = qualifier
    return [key for key, qualifier in last_qualifier.items() if qualifier == Qualifier.NEW.value]


def note_open_conditions(supervisor: Supervisor, conn: sqlite3.Connection) -> int:
    """Tell the supervisor which of its troubles are still open in the journal; return how many it took.

    Call it after the devices are added and before drivers start. Conditions of devices that
    are no longer supervised are skipped.
    """
    noted = 0
    for device_id, code in open_conditions(conn):
        if supervisor.note_raised(device_id, code):
            noted += 1
    return noted
