"""The supervisor: silence, periodic tests, heartbeat health and link storms for all devices.

Rules, all times measured on the monotonic clock at the moment a message reaches the
supervisor (not the device's or the driver's timestamp):

- Life. Any message from a device counts: a heartbeat, an event, or a status `online`.
  Signals that supervision raised itself never count.
- Communication loss. When a device stays silent for its window (default 180 s), one 350
  trouble is emitted. Nothing more is emitted for that device while it stays lost.
- Restore. A heartbeat is on time when it arrives within 1.5 heartbeat intervals of the
  device's previous message. After a loss, the first message ends the silence but is never
  on time. The 350 restore is emitted at the second consecutive on-time heartbeat after it,
  about two intervals after the device came back. A late heartbeat or a status `offline`
  starts the count again.
- Status `offline` (an MQTT last will) is a hint, neither life nor an alarm. The window
  keeps running from the last real message, so a short reconnect raises nothing, and a
  device that stays away raises when its window ends, as if no status had arrived.
- Start-up grace. For `grace_s` after the supervisor is created, silence raises nothing:
  every window starts at the end of the grace period at the earliest, so a device silent
  since start-up raises at grace + window. Heartbeat health (mains, battery, panel) is
  reported by the device itself and is raised during grace too.
- Failed to test. A test report (601, 602, 603 or 608) is expected every `test_period_s`
  (default 24 h) plus `test_tolerance_s`; a missing one raises one 354 trouble, which stays
  open, without repeats, until a test report arrives, however late. It is held back while
  the device is in communication loss or its link is down, because those already explain
  the missing test.
- Storm control. Every device reports through a named link (default `mqtt`). When the
  driver reports the link down for longer than `link_holdoff_s`, one 350 is emitted for
  `link:<name>`. A link also counts as lost when, at the moment a device's window ends, at
  least `storm_min_devices` and more than `storm_fraction` of the devices behind it became
  overdue within that device's window while the link itself stayed up. While a link is lost,
  per-device losses behind it are held back; when it is back, its 350 is restored and every
  device behind it gets a full window before its own loss can be raised.

Timers: one structure for all devices (see `timers`), one live entry per device at most,
at whole-second resolution; `tick` processes what is due and is meant to run once per second.

Not kept across restarts: which conditions were raised. `note_raised` (or
`restart.note_open_conditions`, which reads the journal) tells the supervisor at start-up
which supervision troubles are still open, so that their restores are emitted when the
conditions clear.

A message from a device that is not supervised is ignored, unless `device_lookup` finds it
in the registry: then the device is added with its registry settings and the message counts.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable, Iterable

from drivers.base import Heartbeat
from gateway.registry import Device
from gateway.signal import EventClass, Qualifier, Signal, Source
from gateway.supervision import health
from gateway.supervision.clock import Clock
from gateway.supervision.device import ON_TIME_FACTOR, DeviceRecord, DeviceState, DeviceStatus, PanelCondition
from gateway.supervision.links import Link
from gateway.supervision.presets import Preset, preset
from gateway.supervision.signals import (
    BATTERY_LOW,
    COMMUNICATION_LOSS,
    FAILED_TO_TEST,
    LINK_PREFIX,
    MAINS_LOST,
    PANEL_DISCONNECTED,
    PANEL_TROUBLE,
    PERIODIC_TEST_CODES,
    supervision_signal,
)
from gateway.supervision.storm import LinkWatch
from gateway.supervision.timers import TimerSlots

log = logging.getLogger(__name__)

Emit = Callable[[Signal], None]
DeviceLookup = Callable[[str], Device | None]

INFINITY = math.inf
RESTORE_AFTER_ON_TIME = 2
_GOLDEN_RATIO_FRACTION = 0.6180339887498949
_ALARM_CLASSES = (EventClass.FIRE, EventClass.SUPERVISORY)


class Supervisor:
    """Supervises devices on one timer structure and emits trouble signals through `emit`.

    Every method is synchronous, cheap and meant to run on the event loop. `emit` must only
    hand the signal on, for example to a task that calls `Intake.submit_internal`. An
    exception from it is logged and counted in `emit_errors`, and that signal is lost.
    """

    def __init__(
        self,
        clock: Clock,
        emit: Emit,
        *,
        grace_s: float = 120.0,
        default_preset: str = "default",
        test_period_s: float = 86_400.0,
        test_tolerance_s: float = 3_600.0,
        battery_low_v: float = 11.5,
        battery_hysteresis_v: float = 0.5,
        link_holdoff_s: float = 10.0,
        storm_fraction: float = 0.5,
        storm_min_devices: int = 20,
        storm_check_s: float = 10.0,
        max_timers_per_tick: int = 20_000,
        device_lookup: DeviceLookup | None = None,
    ) -> None:
        _check_range("grace_s", grace_s, 0, None)
        _check_range("test_period_s", test_period_s, 0, None)
        _check_range("test_tolerance_s", test_tolerance_s, 0, None)
        _check_range("battery_hysteresis_v", battery_hysteresis_v, 0, None)
        _check_range("link_holdoff_s", link_holdoff_s, 0, None)
        _check_range("storm_fraction", storm_fraction, 0, 1)
        _check_range("storm_min_devices", storm_min_devices, 1, None)
        _check_range("storm_check_s", storm_check_s, 0.001, None)
        _check_range("max_timers_per_tick", max_timers_per_tick, 1, None)

        self._clock = clock
        self._emit = emit
        self._default: Preset = preset(default_preset)
        self._test_period_s = test_period_s
        self._test_tolerance_s = test_tolerance_s
        self._battery_low_v = battery_low_v
        self._battery_hysteresis_v = battery_hysteresis_v
        self._max_timers_per_tick = max_timers_per_tick
        self._device_lookup = device_lookup
        self._rejected: set[str] = set()  # registered devices whose settings add_device rejected
        self._grace_end = clock.monotonic() + grace_s

        self._devices: dict[str, DeviceRecord] = {}
        self._links = LinkWatch(
            self._send,
            grace_end=self._grace_end,
            holdoff_s=link_holdoff_s,
            fraction=storm_fraction,
            min_devices=storm_min_devices,
            check_s=storm_check_s,
        )
        self._timers = TimerSlots()
        self._spread = 0.0
        self.lost_count = 0
        self.emit_errors = 0

    # Registration.

    def add_device(
        self,
        device_id: str,
        heartbeat_s: float | None = None,
        window_s: float | None = None,
        *,
        preset_name: str | None = None,
        link: str = "mqtt",
        test_period_s: float | None = None,
        battery_low_v: float | None = None,
    ) -> None:
        """Supervise a device, or change the settings of one already supervised.

        Values left out come from `preset_name`, else from the supervisor's default preset.
        `test_period_s=0` turns the periodic test check off for this device. Raises
        ValueError when the window is shorter than the heartbeat interval.
        """
        base = preset(preset_name) if preset_name is not None else self._default
        heartbeat = float(heartbeat_s if heartbeat_s is not None else base.heartbeat_s)
        window = float(window_s if window_s is not None else base.window_s)
        test_period = float(test_period_s if test_period_s is not None else self._test_period_s)
        if heartbeat <= 0:
            raise ValueError(f"device {device_id}: heartbeat interval {heartbeat} s must be positive")
        if window < heartbeat:
            raise ValueError(
                f"device {device_id}: supervision window {window:g} s is shorter than its heartbeat interval "
                f"{heartbeat:g} s, so every heartbeat would arrive late; set the window to at least the interval "
                f"(three intervals is usual)"
            )
        if test_period < 0:
            raise ValueError(f"device {device_id}: test period {test_period} s must be 0 (off) or positive")

        now = self._clock.monotonic()
        record = self._devices.get(device_id)
        if record is not None:
            self._update_device(record, heartbeat, window, test_period, battery_low_v, self._links.link(link, now))
            return
        record = DeviceRecord(
            device_id,
            self._links.link(link, now),
            heartbeat_s=heartbeat,
            window_s=window,
            test_period_s=test_period,
            battery_low_v=battery_low_v,
            added_at=now,
        )
        self._devices[device_id] = record
        record.link.device_count += 1
        record.link.silence.add(record.overdue_at)
        # Devices added together would all come due in the same tick. Spreading the first
        # check over the second half of the window lets each one settle on its own phase.
        first_check = max(now, self._grace_end) + window * self._next_spread()
        self._arm(record, first_check)

    def _update_device(self, record: DeviceRecord, heartbeat: float, window: float, test_period: float, battery_low_v: float | None, link: Link) -> None:
        record.link.silence.remove(record.overdue_at)
        record.link.device_count -= 1
        record.link = link
        record.heartbeat_s = heartbeat
        record.window_s = window
        record.test_period_s = test_period
        record.battery_low_v = battery_low_v
        link.device_count += 1
        link.silence.add(record.overdue_at)
        deadline = self._next_deadline(record)
        if deadline is not None:
            self._arm(record, deadline)

    def remove_device(self, device_id: str) -> bool:
        """Stop supervising a device; return False if it was not supervised.

        Conditions raised for it stay as they are: no restore is emitted.
        """
        record = self._devices.pop(device_id, None)
        if record is None:
            return False
        record.link.silence.remove(record.overdue_at)
        record.link.device_count -= 1
        if record.lost:
            self.lost_count -= 1
        return True

    def load_from_registry(self, devices: Iterable[Device], *, link_of: Callable[[Device], str] | None = None) -> int:
        """Supervise every registry device with its own heartbeat and window; return how many.

        A device's link is its protocol name unless `link_of` returns another one. A device
        with invalid settings does not stop the others: after adding every valid device,
        this raises one ValueError that names each rejected device, and the caller decides
        whether to start without supervising them.
        """
        count = 0
        rejected: list[str] = []
        for device in devices:
            link = link_of(device) if link_of is not None else device.protocol
            try:
                self.add_device(device.id, device.heartbeat_s, device.window_s, link=link)
            except ValueError as error:
                rejected.append(str(error))
                continue
            count += 1
        if rejected:
            raise ValueError(f"invalid supervision settings in {len(rejected)} registry device(s), which are not supervised: " + "; ".join(rejected))
        return count

    def _adopt(self, device_id: str) -> DeviceRecord | None:
        """Start supervising a device that is not supervised yet if the registry has it; return its record."""
        if self._device_lookup is None:
            return None
        device = self._device_lookup(device_id)
        if device is None or device_id in self._rejected:
            return None
        try:
            self.add_device(device.id, device.heartbeat_s, device.window_s, link=device.protocol)
        except ValueError as error:
            self._rejected.add(device_id)
            log.error("device %s is registered but not supervised: %s", device_id, error)
            return None
        log.info("device %s registered while running; supervising it with heartbeat %d s, window %d s", device.id, device.heartbeat_s, device.window_s)
        return self._devices.get(device_id)

    def note_raised(self, device_id: str, code: str) -> bool:
        """Record that `code` was raised for a device or `link:<name>` before a restart.

        The condition then counts as raised, so its restore is emitted when it clears.
        Returns False for a device that is not supervised; raises ValueError for a code that
        supervision does not raise.
        """
        if device_id.startswith(LINK_PREFIX):
            if code != COMMUNICATION_LOSS:
                raise ValueError(f"link signals use code {COMMUNICATION_LOSS}, not {code!r}")
            self._links.note_raised(device_id.removeprefix(LINK_PREFIX), self._clock.monotonic())
            return True
        record = self._devices.get(device_id)
        if record is None:
            return False
        if code == COMMUNICATION_LOSS:
            if not record.lost:
                record.lost = True
                record.on_time_count = 0
                self.lost_count += 1
        elif code == FAILED_TO_TEST:
            record.failed_test = True
        elif code == MAINS_LOST:
            record.mains_lost = True
        elif code == BATTERY_LOW:
            record.battery_low = True
        elif code == PANEL_TROUBLE:
            record.panel_condition = PanelCondition.FAULT
        elif code == PANEL_DISCONNECTED:
            record.panel_condition = PanelCondition.DISCONNECTED
        else:
            raised = ", ".join((COMMUNICATION_LOSS, FAILED_TO_TEST, MAINS_LOST, BATTERY_LOW, PANEL_TROUBLE, PANEL_DISCONNECTED))
            raise ValueError(f"supervision does not raise code {code!r}; it raises {raised}")
        return True

    # Input from drivers and the routing core.

    def on_heartbeat(self, heartbeat: Heartbeat) -> None:
        """Count a heartbeat as life and turn changes of its health fields into signals."""
        record = self._devices.get(heartbeat.device_id) or self._adopt(heartbeat.device_id)
        if record is None:
            return
        now = self._clock.monotonic()
        self._record_message(record, now, is_heartbeat=True)
        record.last_heartbeat = heartbeat
        for code, qualifier, text in health.heartbeat_changes(record, heartbeat, now, self._battery_low_v, self._battery_hysteresis_v):
            self._send(record.device_id, code, qualifier, text, now)

    def on_heartbeats(self, batch: list[Heartbeat]) -> None:
        """`on_heartbeat` for each heartbeat of a routing-core batch."""
        for heartbeat in batch:
            self.on_heartbeat(heartbeat)

    def on_signal(self, signal: Signal) -> None:
        """Count a device's signal as life, and track periodic tests and alarm events."""
        if signal.source is Source.SUPERVISION:
            return
        record = self._devices.get(signal.device_id) or self._adopt(signal.device_id)
        if record is None:
            return
        now = self._clock.monotonic()
        self._record_message(record, now, is_heartbeat=False)
        if signal.qualifier is Qualifier.RESTORE:
            return
        if signal.event_class is EventClass.TEST and signal.code in PERIODIC_TEST_CODES:
            self._tested(record, signal.code, now)
        elif signal.event_class in _ALARM_CLASSES and signal.qualifier is Qualifier.NEW:
            for code, qualifier, text in health.alarm_event_changes(record, now):
                self._send(record.device_id, code, qualifier, text, now)

    def on_status(self, device_id: str, online: bool, source: Source | None = None) -> None:
        """Take a device's own status announcement; `online` is life, `offline` only a hint.

        `source` is accepted so that the method fits `Intake.status_listeners`; it is not used.
        """
        record = self._devices.get(device_id) or self._adopt(device_id)
        if record is None:
            return
        if online:
            self._record_message(record, self._clock.monotonic(), is_heartbeat=False)
            return
        record.announced_offline = True
        record.on_time_count = 0

    def on_link(self, name: str, up: bool) -> None:
        """Take a driver's report that a link went up or down; repeated reports change nothing."""
        self._links.report(name, up, self._clock.monotonic())

    # Timers.

    def tick(self, now: float | None = None) -> int:
        """Process every due timer; return how many fired (device checks and link checks).

        At most `max_timers_per_tick` device checks run per call, so a burst of due devices
        is spread over several ticks instead of stalling the event loop.
        """
        if now is None:
            now = self._clock.monotonic()
        fired = self._links.tick(now)
        checked = 0
        devices = self._devices
        while checked < self._max_timers_per_tick:
            due = self._timers.pop_due(now)
            if due is None:
                break
            slot, device_ids = due
            for index, device_id in enumerate(device_ids):
                if checked >= self._max_timers_per_tick:
                    self._timers.put_back(slot, device_ids[index:])
                    break
                record = devices.get(device_id)
                if record is None or record.armed != slot:
                    continue  # stale entry: the device was removed or re-armed earlier
                record.armed = None
                checked += 1
                self._check_device(record, now)
        return fired + checked

    # Queries.

    @property
    def device_count(self) -> int:
        return len(self._devices)

    @property
    def timer_count(self) -> int:
        """Timer entries scheduled, live and stale."""
        return len(self._timers)

    def state(self, device_id: str) -> DeviceState | None:
        """Return a snapshot of a device's supervision, or None when it is not supervised."""
        record = self._devices.get(device_id)
        if record is None:
            return None
        now = self._clock.monotonic()
        silent_s = now - record.seen
        late = silent_s > record.heartbeat_s * ON_TIME_FACTOR
        if record.lost:
            status = DeviceStatus.LOST
        elif record.link.suppressing and late:
            status = DeviceStatus.LINK_DOWN
        elif not record.reported:
            status = DeviceStatus.NEVER_HEARD
        elif late:
            status = DeviceStatus.LATE
        else:
            status = DeviceStatus.ONLINE
        return DeviceState(
            device_id=device_id,
            link=record.link.name,
            status=status,
            online=status in (DeviceStatus.ONLINE, DeviceStatus.LATE),
            last_seen=self._wall(record.seen) if record.reported else None,
            silent_s=silent_s,
            heartbeat_s=record.heartbeat_s,
            window_s=record.window_s,
            announced_offline=record.announced_offline,
            test_period_s=record.test_period_s,
            last_test=self._wall(record.last_test_at) if record.last_test_at is not None else None,
            raised=_raised_codes(record),
            last_heartbeat=record.last_heartbeat,
        )

    def link_state(self, name: str) -> tuple[bool | None, bool]:
        """Return (reported up, link signal raised) for a link; (None, False) when unknown."""
        link = self._links.get(name)
        if link is None:
            return None, False
        return link.up, link.raised

    # Device checks.

    def _record_message(self, record: DeviceRecord, now: float, *, is_heartbeat: bool) -> None:
        previous = record.seen
        on_time_s = record.heartbeat_s * ON_TIME_FACTOR
        record.link.silence.move(previous + on_time_s, now + on_time_s)
        record.seen = now
        record.reported = True
        record.announced_offline = False
        if not record.lost or not is_heartbeat:
            return
        if now - previous <= on_time_s:
            record.on_time_count += 1
        else:
            record.on_time_count = 0
        if record.on_time_count >= RESTORE_AFTER_ON_TIME:
            record.lost = False
            record.on_time_count = 0
            self.lost_count -= 1
            self._send(
                record.device_id,
                COMMUNICATION_LOSS,
                Qualifier.RESTORE,
                f"communication restored: {RESTORE_AFTER_ON_TIME} consecutive heartbeats on time",
                now,
            )
            deadline = self._next_deadline(record)
            if deadline is not None:
                self._arm(record, deadline)

    def _tested(self, record: DeviceRecord, code: str, now: float) -> None:
        record.last_test_at = now
        if record.failed_test:
            record.failed_test = False
            self._send(record.device_id, FAILED_TO_TEST, Qualifier.RESTORE, f"periodic test report ({code}) received after failed to test", now)
        if record.test_period_s > 0:
            self._arm(record, self._test_deadline(record))

    def _check_device(self, record: DeviceRecord, now: float) -> None:
        """Raise what is due for a device whose timer fired, then re-arm it."""
        link = record.link
        next_at = INFINITY
        if not record.lost:
            loss_at = self._loss_deadline(record)
            if now < loss_at:
                next_at = loss_at
            elif link.suppressing or self._links.storm_detected(link, record.window_s, record.heartbeat_s, now):
                next_at = now + record.window_s * self._next_spread()
            else:
                self._raise_loss(record, now)

        if record.test_period_s > 0 and not record.failed_test:
            test_at = self._test_deadline(record)
            if now < test_at:
                next_at = min(next_at, test_at)
            elif record.lost or link.suppressing:
                next_at = min(next_at, now + record.window_s)
            else:
                self._raise_failed_test(record, now)

        if next_at < INFINITY:
            self._arm(record, next_at)

    def _loss_deadline(self, record: DeviceRecord) -> float:
        return max(record.seen, self._grace_end, record.link.resumed_at) + record.window_s

    def _test_deadline(self, record: DeviceRecord) -> float:
        last = record.last_test_at if record.last_test_at is not None else record.added_at
        return max(last, self._grace_end) + record.test_period_s + self._test_tolerance_s

    def _next_deadline(self, record: DeviceRecord) -> float | None:
        deadlines = []
        if not record.lost:
            deadlines.append(self._loss_deadline(record))
        if record.test_period_s > 0 and not record.failed_test:
            deadlines.append(self._test_deadline(record))
        return min(deadlines, default=None)

    def _arm(self, record: DeviceRecord, deadline: float) -> None:
        """Make sure the device is checked at `deadline` or up to a second later.

        A later deadline needs no new entry: the earlier one re-arms the device when it fires.
        """
        if record.armed is not None and record.armed <= math.ceil(deadline):
            return
        record.armed = self._timers.schedule(deadline, record.device_id)

    def _next_spread(self) -> float:
        """Return a factor in [0.5, 1): a low-discrepancy sequence, so it is even and repeatable."""
        self._spread = (self._spread + _GOLDEN_RATIO_FRACTION) % 1.0
        return 0.5 + 0.5 * self._spread

    def _raise_loss(self, record: DeviceRecord, now: float) -> None:
        record.lost = True
        record.on_time_count = 0
        self.lost_count += 1
        if record.reported:
            text = f"communication loss: no message for {now - record.seen:.0f} s (supervision window {record.window_s:.0f} s)"
        else:
            text = f"communication loss: no message since supervision started {now - record.added_at:.0f} s ago (supervision window {record.window_s:.0f} s)"
        self._send(record.device_id, COMMUNICATION_LOSS, Qualifier.NEW, text, now)

    def _raise_failed_test(self, record: DeviceRecord, now: float) -> None:
        record.failed_test = True
        hours = record.test_period_s / 3600
        if record.last_test_at is None:
            text = f"failed to test: no periodic test report since supervision started; one is expected every {hours:g} h"
        else:
            text = f"failed to test: last periodic test report {(now - record.last_test_at) / 3600:.1f} h ago; one is expected every {hours:g} h"
        self._send(record.device_id, FAILED_TO_TEST, Qualifier.NEW, text, now)

    # Output.

    def _wall(self, monotonic: float) -> dt.datetime:
        return self._clock.now() + dt.timedelta(seconds=monotonic - self._clock.monotonic())

    def _send(self, device_id: str, code: str, qualifier: Qualifier, text: str, now: float) -> None:
        signal = supervision_signal(device_id, code, qualifier, text, self._wall(now))
        try:
            self._emit(signal)
        except Exception:
            self.emit_errors += 1
            log.exception("emitting supervision signal %s (%s %s for %s) failed; the signal is lost", signal.id, code, qualifier.value, device_id)


def _raised_codes(record: DeviceRecord) -> tuple[str, ...]:
    raised = []
    if record.lost:
        raised.append(COMMUNICATION_LOSS)
    if record.failed_test:
        raised.append(FAILED_TO_TEST)
    if record.mains_lost:
        raised.append(MAINS_LOST)
    if record.battery_low:
        raised.append(BATTERY_LOW)
    if record.panel_condition is not None:
        raised.append(health.PANEL_CODES[record.panel_condition])
    return tuple(raised)


def _check_range(name: str, value: float, low: float, high: float | None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
        raise ValueError(f"supervision setting {name} = {value!r} is out of range; it must be {bound}")
