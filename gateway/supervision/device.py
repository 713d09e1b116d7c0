"""Per-device supervision records, and the snapshot `Supervisor.state` returns."""

from __future__ import annotations

import datetime as dt
import enum

import msgspec

from drivers.base import Heartbeat
from gateway.supervision.links import Link

# A heartbeat is on time when it arrives within this many heartbeat intervals of the
# device's previous message: the interval plus half an interval of tolerance for jitter.
ON_TIME_FACTOR = 1.5


class PanelCondition(enum.Enum):
    """A panel state from the heartbeat that is raised as a trouble."""

    FAULT = "fault"
    DISCONNECTED = "disconnected"
    ALARM_WITHOUT_EVENT = "alarm_without_event"


class DeviceRecord:
    """Everything supervision keeps for one device; times are monotonic seconds.

    `__slots__` keeps the record near 200 bytes. `seen` starts at the time the device was
    added, so a device that never reported is silent since then. `armed` is the whole-second slot of
    the device's live timer entry, or None when it has none.
    """

    __slots__ = (
        "device_id",
        "link",
        "heartbeat_s",
        "window_s",
        "test_period_s",
        "battery_low_v",
        "added_at",
        "seen",
        "reported",
        "armed",
        "lost",
        "on_time_count",
        "announced_offline",
        "last_heartbeat",
        "mains_lost",
        "battery_low",
        "panel_condition",
        "panel_alarm_since",
        "alarm_event_at",
        "last_test_at",
        "failed_test",
    )

    def __init__(
        self,
        device_id: str,
        link: Link,
        *,
        heartbeat_s: float,
        window_s: float,
        test_period_s: float,
        battery_low_v: float | None,
        added_at: float,
    ) -> None:
        self.device_id = device_id
        self.link = link
        self.heartbeat_s = heartbeat_s
        self.window_s = window_s
        self.test_period_s = test_period_s
        self.battery_low_v = battery_low_v
        self.added_at = added_at
        self.seen = added_at
        self.reported = False
        self.armed: int | None = None
        self.lost = False
        self.on_time_count = 0
        self.announced_offline = False
        self.last_heartbeat: Heartbeat | None = None
        self.mains_lost = False
        self.battery_low = False
        self.panel_condition: PanelCondition | None = None
        self.panel_alarm_since: float | None = None
        self.alarm_event_at: float | None = None
        self.last_test_at: float | None = None
        self.failed_test = False

    @property
    def on_time_s(self) -> float:
        return self.heartbeat_s * ON_TIME_FACTOR

    @property
    def overdue_at(self) -> float:
        """The moment the device has missed a heartbeat, counting from its last message."""
        return self.seen + self.heartbeat_s * ON_TIME_FACTOR


class DeviceStatus(enum.StrEnum):
    ONLINE = "online"
    LATE = "late"  # last message older than the on-time limit, window not yet over
    NEVER_HEARD = "never_heard"  # nothing received since supervision of the device started
    LINK_DOWN = "link_down"  # its link is down; its own loss is held back
    LOST = "lost"  # communication loss raised and not yet restored


class DeviceState(msgspec.Struct, kw_only=True, frozen=True):
    """A snapshot of one device's supervision, for `gateway device status` and the status API.

    `raised` lists the Contact ID codes raised for the device and not yet restored.
    `last_heartbeat` is the newest heartbeat as received (mains, battery, panel, rssi, fw).
    """

    device_id: str
    link: str
    status: DeviceStatus
    online: bool
    last_seen: dt.datetime | None
    silent_s: float
    heartbeat_s: float
    window_s: float
    announced_offline: bool
    test_period_s: float
    last_test: dt.datetime | None
    raised: tuple[str, ...]
    last_heartbeat: Heartbeat | None
