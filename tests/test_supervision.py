"""Tests for supervision: silence, restores, link storms, start-up grace, periodic tests and
heartbeat health, all on a hand-driven clock."""

from __future__ import annotations

import datetime as dt
import gc
import sqlite3
import tracemalloc
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

import pytest

from drivers.base import Heartbeat
from gateway import codes, journal, registry
from gateway.intake import _insert_signal
from gateway.signal import EventClass, Qualifier, Signal, Source, new_signal_id
from gateway.supervision import PRESETS, DeviceStatus, ManualClock, Supervisor, link_device_id, preset
from gateway.supervision.restart import note_open_conditions, open_conditions

T0 = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.timezone.utc)
HOUR = 3600.0


class Site:
    """A supervisor on a manual clock, with devices that heartbeat on schedule while `beating`."""

    def __init__(self, devices: int = 1, *, grace_s: float = 0.0, heartbeat_s: float = 60.0, window_s: float = 180.0, **settings: object) -> None:
        self.clock = ManualClock(T0)
        self.emitted: list[Signal] = []
        self.supervisor = Supervisor(self.clock, self.emitted.append, grace_s=grace_s, **settings)  # type: ignore[arg-type]
        self.heartbeat_s = heartbeat_s
        self.device_ids = [f"DEV-{index:05d}" for index in range(devices)]
        for device_id in self.device_ids:
            self.supervisor.add_device(device_id, heartbeat_s, window_s)
        self.beating: set[str] = set(self.device_ids)
        self.elapsed = 0

    def heartbeat(self, device_id: str, **fields: object) -> None:
        self.supervisor.on_heartbeat(Heartbeat(device_id=device_id, source=Source.MQTT, received_at=self.clock.now(), **fields))  # type: ignore[arg-type]

    def run(self, seconds: int) -> None:
        """Advance second by second; each beating device heartbeats once per interval, at its own phase."""
        period = int(self.heartbeat_s)
        for _ in range(seconds):
            self.clock.advance(1.0)
            self.elapsed += 1
            for index, device_id in enumerate(self.device_ids):
                if device_id in self.beating and (self.elapsed + index) % period == 0:
                    self.heartbeat(device_id)
            self.supervisor.tick()

    def signals(self, code: str | None = None, qualifier: Qualifier | None = None) -> list[Signal]:
        return [s for s in self.emitted if (code is None or s.code == code) and (qualifier is None or s.qualifier is qualifier)]


def event(device_id: str, code: str, qualifier: Qualifier = Qualifier.NEW, source: Source = Source.MQTT, received_at: dt.datetime = T0) -> Signal:
    return Signal(
        id=new_signal_id(),
        source=source,
        device_id=device_id,
        event_class=codes.lookup(code).event_class,
        code=code,
        qualifier=qualifier,
        received_at=received_at,
    )


def device_ids_of(signals: Iterable[Signal]) -> list[str]:
    return [signal.device_id for signal in signals]


# Communication loss and restore.


def test_supervisor_silence_raises_one_loss_after_window():
    """Test that a silent device raises exactly one communication loss when its window ends, not before."""
    site = Site(1)
    site.run(300)
    site.beating.clear()
    last_heartbeat_at = 300 - (300 % 60)  # the device heartbeats at multiples of 60 s
    site.run(last_heartbeat_at + 180 - 300 - 1)

    assert site.emitted == []

    site.run(1)
    assert len(site.emitted) == 1

    site.run(3000)
    assert len(site.emitted) == 1
    assert site.supervisor.lost_count == 1
    loss = site.emitted[0]
    assert loss.device_id == "DEV-00000"
    assert loss.code == "350"
    assert loss.qualifier is Qualifier.NEW
    assert "180 s" in loss.text


def test_supervisor_loss_signal_fields():
    """Test that a loss signal is a supervision trouble with its SIA code and the wall-clock time of raising."""
    site = Site(1)
    site.beating.clear()
    site.run(180)

    [loss] = site.emitted
    assert loss.source is Source.SUPERVISION
    assert loss.event_class is EventClass.TROUBLE
    assert loss.sia_code == "YS"
    assert loss.facility_id == ""
    assert loss.received_at == T0 + dt.timedelta(seconds=180)
    assert loss.id


def test_supervisor_two_heartbeats_on_time_restore():
    """Test that a lost device restores at its second on-time heartbeat after coming back, not at the first."""
    site = Site(1)
    site.beating.clear()
    site.run(200)
    assert len(site.signals("350", Qualifier.NEW)) == 1

    site.heartbeat("DEV-00000")  # ends the silence; never on time
    site.clock.advance(60)
    site.heartbeat("DEV-00000")  # first on time
    site.supervisor.tick()
    assert site.signals("350", Qualifier.RESTORE) == []

    site.clock.advance(60)
    site.heartbeat("DEV-00000")  # second on time
    restores = site.signals("350", Qualifier.RESTORE)
    assert len(restores) == 1
    assert restores[0].sia_code == "YK"
    assert site.supervisor.state("DEV-00000").status is DeviceStatus.ONLINE
    assert site.supervisor.lost_count == 0


def test_supervisor_heartbeat_batch_counts_each():
    """Test that a routing-core batch of heartbeats counts as life for every device in it."""
    site = Site(3)
    site.beating.clear()
    for _ in range(10):
        site.clock.advance(60)
        site.supervisor.on_heartbeats([Heartbeat(device_id=device_id, source=Source.MQTT, received_at=T0) for device_id in site.device_ids])
        site.supervisor.tick()

    assert site.emitted == []


def test_supervisor_late_heartbeat_restarts_restore_count():
    """Test that a heartbeat later than 1.5 intervals after the previous message restarts the restore count."""
    site = Site(1)
    site.beating.clear()
    site.run(200)

    site.heartbeat("DEV-00000")
    site.clock.advance(60)
    site.heartbeat("DEV-00000")  # on time: count 1
    site.clock.advance(100)
    site.heartbeat("DEV-00000")  # 100 s > 90 s: late, count 0
    site.clock.advance(60)
    site.heartbeat("DEV-00000")  # count 1
    assert site.signals("350", Qualifier.RESTORE) == []

    site.clock.advance(60)
    site.heartbeat("DEV-00000")  # count 2
    assert len(site.signals("350", Qualifier.RESTORE)) == 1


def test_supervisor_lost_again_after_restore():
    """Test that a device that restored and falls silent again raises a second loss."""
    site = Site(1)
    site.beating.clear()
    site.run(200)
    site.beating.add("DEV-00000")
    site.run(300)
    assert len(site.signals("350", Qualifier.RESTORE)) == 1

    site.beating.clear()
    site.run(300)
    assert len(site.signals("350", Qualifier.NEW)) == 2


def test_supervisor_any_message_counts_as_life():
    """Test that events and a status `online` keep a device alive without heartbeats."""
    site = Site(1)
    site.beating.clear()
    for _ in range(10):
        site.run(100)
        site.supervisor.on_signal(event("DEV-00000", "110"))
        site.run(100)
        site.supervisor.on_status("DEV-00000", True, Source.MQTT)

    assert site.emitted == []


def test_supervisor_own_signals_are_not_life():
    """Test that a supervision signal naming the device does not count as a message from it."""
    site = Site(1)
    site.beating.clear()
    for _ in range(5):
        site.run(60)
        site.supervisor.on_signal(event("DEV-00000", "350", source=Source.SUPERVISION))

    assert len(site.signals("350", Qualifier.NEW)) == 1


def test_supervisor_offline_status_waits_for_window():
    """Test that a status `offline` raises nothing by itself and a quick reconnect raises nothing at all."""
    site = Site(1)
    site.run(120)  # last heartbeat at 120 s
    site.beating.clear()
    site.supervisor.on_status("DEV-00000", False, Source.MQTT)
    assert site.supervisor.state("DEV-00000").announced_offline

    site.run(30)
    site.supervisor.on_status("DEV-00000", True, Source.MQTT)
    site.beating.add("DEV-00000")
    site.run(600)
    assert site.emitted == []


def test_supervisor_offline_status_then_silence_raises_at_window():
    """Test that a device that announced `offline` and stays away raises when the window from its last message ends."""
    site = Site(1)
    site.run(120)
    site.beating.clear()
    site.supervisor.on_status("DEV-00000", False, Source.MQTT)

    site.run(179)
    assert site.emitted == []
    site.run(1)
    assert len(site.signals("350", Qualifier.NEW)) == 1


def test_supervisor_preset_window_applies():
    """Test that a device on the en50136-20s preset raises after 20 s of silence."""
    site = Site(0)
    site.supervisor.add_device("FAST-1", preset_name="en50136-20s")
    site.supervisor.on_heartbeat(Heartbeat(device_id="FAST-1", source=Source.MQTT, received_at=T0))

    site.clock.advance(19)
    site.supervisor.tick()
    assert site.emitted == []
    site.clock.advance(1)
    site.supervisor.tick()
    assert device_ids_of(site.emitted) == ["FAST-1"]


def test_presets_table():
    """Test that the presets carry the documented windows and at least three heartbeats per window."""
    assert preset("default").window_s == 180
    assert preset("en50136-180s").window_s == 180
    assert preset("en50136-90s").window_s == 90
    assert preset("en50136-20s").window_s == 20
    assert preset("nfpa72-single-ip").window_s == 3600
    for name, values in PRESETS.items():
        assert values.window_s >= 3 * values.heartbeat_s, name


def test_preset_unknown_rejected():
    """Test that an unknown preset name is rejected with the list of known ones."""
    with pytest.raises(ValueError, match="en50136-90s"):
        preset("en50136-dp9")


def test_supervisor_window_shorter_than_heartbeat_rejected():
    """Test that a window shorter than the heartbeat interval is rejected, naming the device."""
    site = Site(0)
    with pytest.raises(ValueError, match="DEV-BAD.*shorter than its heartbeat interval"):
        site.supervisor.add_device("DEV-BAD", heartbeat_s=60, window_s=30)


def test_supervisor_load_from_registry_uses_device_settings():
    """Test that registry devices are supervised with their own heartbeat interval and window."""
    site = Site(0)
    devices = [
        registry.make_device(id="REG-001", heartbeat_s=30, window_s=90),
        registry.make_device(id="REG-002"),
    ]
    assert site.supervisor.load_from_registry(devices) == 2

    site.clock.advance(90)
    site.supervisor.tick()
    assert device_ids_of(site.emitted) == ["REG-001"]
    site.clock.advance(90)
    site.supervisor.tick()
    assert device_ids_of(site.emitted) == ["REG-001", "REG-002"]
    assert site.supervisor.state("REG-001").link == "mqtt"


def test_supervisor_load_from_registry_reports_invalid():
    """Test that a registry device with a window shorter than its interval is named and the others are still supervised."""
    site = Site(0)
    devices = [
        registry.make_device(id="REG-BAD", heartbeat_s=60, window_s=30),
        registry.make_device(id="REG-GOOD"),
    ]
    with pytest.raises(ValueError, match="invalid supervision settings in 1 registry device.*REG-BAD"):
        site.supervisor.load_from_registry(devices)

    assert site.supervisor.state("REG-GOOD") is not None
    assert site.supervisor.state("REG-BAD") is None


def test_supervisor_device_lookup_adds_new_device():
    """Test that a device registered while the gateway runs is supervised from its first message."""
    clock = ManualClock(T0)
    emitted: list[Signal] = []
    registered = {"NEW-001": registry.make_device(id="NEW-001", heartbeat_s=30, window_s=90)}
    supervisor = Supervisor(clock, emitted.append, grace_s=0, device_lookup=registered.get)

    supervisor.on_heartbeat(Heartbeat(device_id="NEW-001", source=Source.MQTT, received_at=T0))
    supervisor.on_heartbeat(Heartbeat(device_id="UNKNOWN-1", source=Source.MQTT, received_at=T0))
    assert supervisor.device_count == 1
    assert supervisor.state("NEW-001").status is DeviceStatus.ONLINE

    clock.advance(90)
    supervisor.tick()
    assert device_ids_of(emitted) == ["NEW-001"]


def test_supervisor_removed_device_raises_nothing():
    """Test that a removed device raises nothing although its timer entry is still scheduled."""
    site = Site(2)
    site.beating.clear()
    assert site.supervisor.remove_device("DEV-00001")
    assert not site.supervisor.remove_device("DEV-00001")

    site.run(400)
    assert device_ids_of(site.emitted) == ["DEV-00000"]
    assert site.supervisor.state("DEV-00001") is None


def test_supervisor_tick_limits_checks_per_call():
    """Test that one tick runs at most max_timers_per_tick device checks and the rest follow in later ticks."""
    site = Site(50, max_timers_per_tick=20, storm_min_devices=1000)
    site.beating.clear()
    site.clock.advance(400)

    assert site.supervisor.tick() == 20
    assert len(site.emitted) == 20
    site.supervisor.tick()
    site.supervisor.tick()
    assert len(site.emitted) == 50


# Start-up grace.


def test_supervisor_grace_raises_nothing_during_grace():
    """Test that devices silent since start-up raise nothing during grace and raise once grace plus window ended."""
    site = Site(5, grace_s=120)
    site.beating.clear()

    site.run(120 + 180 - 1)
    assert site.emitted == []

    site.run(1)
    assert sorted(device_ids_of(site.signals("350", Qualifier.NEW))) == site.device_ids


def test_supervisor_grace_reporting_devices_raise_nothing():
    """Test that devices that report after a restart raise nothing, through grace and after it."""
    site = Site(100, grace_s=120)
    site.run(1200)
    assert site.emitted == []


def test_supervisor_grace_holds_back_link_down():
    """Test that a link reported down during grace raises only once grace is over."""
    site = Site(30, grace_s=120, link_holdoff_s=10)
    site.supervisor.on_link("mqtt", False)

    site.run(119)
    assert site.emitted == []
    site.run(1)
    assert device_ids_of(site.emitted) == [link_device_id("mqtt")]


def test_supervisor_silent_after_restart_raises_link():
    """Test that when no device behind a link reports after a restart, one link signal replaces the per-device losses."""
    site = Site(1000, grace_s=120)
    site.supervisor.on_link("mqtt", True)
    site.beating.clear()

    site.run(1200)
    assert device_ids_of(site.emitted) == [link_device_id("mqtt")]
    assert "1000 devices unreachable" in site.emitted[0].text


# Storm control.


def test_supervisor_dropped_link_raises_one_link_signal():
    """Test that 1,000 devices behind a dropped link give one link signal and no per-device loss."""
    site = Site(1000)
    site.supervisor.on_link("mqtt", True)
    site.run(300)
    site.supervisor.on_link("mqtt", False)
    site.supervisor.on_link("mqtt", False)  # the driver repeats it at every failed reconnect
    site.beating.clear()

    site.run(3600)

    assert len(site.emitted) == 1
    link_signal = site.emitted[0]
    assert link_signal.device_id == "link:mqtt"
    assert link_signal.code == "350"
    assert link_signal.qualifier is Qualifier.NEW
    assert link_signal.text == "link mqtt lost; 1000 devices unreachable"
    assert site.supervisor.state("DEV-00000").status is DeviceStatus.LINK_DOWN
    assert site.supervisor.link_state("mqtt") == (False, True)
    assert site.supervisor.lost_count == 0


def test_supervisor_short_link_drop_raises_nothing():
    """Test that a link back within the hold-off raises nothing."""
    site = Site(100, link_holdoff_s=10)
    site.supervisor.on_link("mqtt", True)
    site.run(300)
    site.supervisor.on_link("mqtt", False)
    site.run(9)
    site.supervisor.on_link("mqtt", True)
    site.run(600)

    assert site.emitted == []


def test_supervisor_link_back_restores_link_signal():
    """Test that the link coming back restores its signal, and per-device losses resume afterwards."""
    site = Site(1000)
    site.supervisor.on_link("mqtt", True)
    site.run(300)
    site.supervisor.on_link("mqtt", False)
    site.beating.clear()
    site.run(1800)

    site.supervisor.on_link("mqtt", True)
    site.beating.update(site.device_ids)
    site.run(10)
    restores = site.signals("350", Qualifier.RESTORE)
    assert device_ids_of(restores) == ["link:mqtt"]
    assert "restored after 1800 s" in restores[0].text

    site.run(1200)
    assert len(site.emitted) == 2
    assert site.supervisor.link_state("mqtt") == (True, False)

    site.beating.discard("DEV-00007")
    site.run(300)
    assert device_ids_of(site.emitted[2:]) == ["DEV-00007"]


def test_supervisor_silent_after_link_back_raises_link():
    """Test that devices still silent a window after their link came back raise one new link signal."""
    site = Site(1000)
    site.supervisor.on_link("mqtt", True)
    site.run(300)
    site.supervisor.on_link("mqtt", False)
    site.beating.clear()
    site.run(600)
    site.supervisor.on_link("mqtt", True)

    site.run(600)
    assert [(s.device_id, s.qualifier) for s in site.emitted] == [
        ("link:mqtt", Qualifier.NEW),
        ("link:mqtt", Qualifier.RESTORE),
        ("link:mqtt", Qualifier.NEW),
    ]


def test_supervisor_silent_majority_infers_link_loss():
    """Test that most devices of an up link falling silent together raise one link signal, restored when they return."""
    site = Site(1000)
    site.supervisor.on_link("mqtt", True)
    site.run(300)
    site.beating.difference_update(site.device_ids[:600])

    site.run(1200)
    assert device_ids_of(site.emitted) == ["link:mqtt"]
    assert "600 of 1000 devices" in site.emitted[0].text

    site.beating.update(site.device_ids)
    site.run(600)
    assert [(s.device_id, s.qualifier) for s in site.emitted] == [("link:mqtt", Qualifier.NEW), ("link:mqtt", Qualifier.RESTORE)]


def test_supervisor_few_silent_devices_raise_own_losses():
    """Test that a few silent devices behind a healthy link raise their own losses and no link signal."""
    site = Site(1000)
    site.supervisor.on_link("mqtt", True)
    site.run(300)
    silent = site.device_ids[100:110]
    site.beating.difference_update(silent)

    site.run(600)
    assert sorted(device_ids_of(site.emitted)) == silent


def test_supervisor_small_link_never_infers_storm():
    """Test that a link with fewer devices than storm_min_devices raises per-device losses only."""
    site = Site(10)
    site.supervisor.on_link("mqtt", True)
    site.run(300)
    site.beating.clear()

    site.run(600)
    assert sorted(device_ids_of(site.emitted)) == site.device_ids


# Failed to test.


def test_supervisor_missing_periodic_test_raises_once():
    """Test that a missing periodic test raises one failed-to-test trouble, and a late test restores it."""
    site = Site(1, heartbeat_s=600, window_s=1800)
    site.supervisor.on_signal(event("DEV-00000", "602"))

    site.run(int(24 * HOUR + HOUR) - 1)
    assert site.emitted == []
    site.run(1)
    [failed] = site.emitted
    assert failed.code == "354"
    assert failed.qualifier is Qualifier.NEW
    assert failed.text.startswith("failed to test")
    assert site.supervisor.state("DEV-00000").raised == ("354",)

    site.run(int(3 * 24 * HOUR))
    assert len(site.emitted) == 1

    site.supervisor.on_signal(event("DEV-00000", "602"))
    restores = site.signals("354", Qualifier.RESTORE)
    assert len(restores) == 1
    assert site.supervisor.state("DEV-00000").raised == ()


def test_supervisor_daily_tests_raise_nothing():
    """Test that a periodic test every 24 h keeps failed to test quiet for a week, and a walk test does not count."""
    site = Site(2, heartbeat_s=600, window_s=1800)
    for _ in range(7):
        site.supervisor.on_signal(event("DEV-00000", "602"))
        site.supervisor.on_signal(event("DEV-00001", "614"))  # fire zone walk-tested: not a periodic test
        site.run(int(24 * HOUR))

    assert device_ids_of(site.signals("354")) == ["DEV-00001"]


def test_supervisor_failed_to_test_held_back_while_lost():
    """Test that a device in communication loss raises no failed to test on top of it."""
    site = Site(1, heartbeat_s=600, window_s=1800)
    site.beating.clear()
    site.run(int(30 * HOUR))

    assert [s.code for s in site.emitted] == ["350"]


def test_supervisor_test_period_zero_turns_check_off():
    """Test that test_period_s=0 turns the failed-to-test check off for a device."""
    site = Site(0)
    site.supervisor.add_device("NO-TEST", 600, 1800, test_period_s=0)
    for _ in range(int(48 * HOUR / 600)):
        site.clock.advance(600)
        site.supervisor.on_heartbeat(Heartbeat(device_id="NO-TEST", source=Source.MQTT, received_at=T0))
        site.supervisor.tick()

    assert site.emitted == []


# Heartbeat health.


def test_supervisor_mains_changes():
    """Test that mains on to off raises 301 once and off to on restores it once."""
    site = Site(1)
    for mains in (True, True, False, False, False, True, True):
        site.heartbeat("DEV-00000", mains=mains)

    assert [(s.code, s.qualifier) for s in site.emitted] == [("301", Qualifier.NEW), ("301", Qualifier.RESTORE)]
    assert site.emitted[0].sia_code == "AT"
    assert site.emitted[1].sia_code == "AR"


def test_supervisor_battery_hysteresis():
    """Test that a battery hovering at the threshold raises once and restores only above threshold plus hysteresis."""
    site = Site(1, battery_low_v=11.5, battery_hysteresis_v=0.5)
    for volts in (12.8, 11.4, 11.6, 11.4, 11.6, 11.9, 11.4):
        site.heartbeat("DEV-00000", battery_v=volts)
    assert [(s.code, s.qualifier) for s in site.emitted] == [("302", Qualifier.NEW)]
    assert "11.40 V" in site.emitted[0].text

    site.heartbeat("DEV-00000", battery_v=12.0)
    site.heartbeat("DEV-00000", battery_v=11.6)
    assert [(s.code, s.qualifier) for s in site.emitted] == [("302", Qualifier.NEW), ("302", Qualifier.RESTORE)]


def test_supervisor_battery_threshold_per_device():
    """Test that a per-device battery threshold (a 24 V panel) overrides the default."""
    site = Site(0, battery_low_v=11.5)
    site.supervisor.add_device("PANEL-24V", battery_low_v=23.0)
    site.supervisor.on_heartbeat(Heartbeat(device_id="PANEL-24V", source=Source.MQTT, received_at=T0, battery_v=22.5))

    assert [(s.device_id, s.code) for s in site.emitted] == [("PANEL-24V", "302")]


def test_supervisor_missing_health_fields_change_nothing():
    """Test that a heartbeat without mains, battery or panel fields raises nothing."""
    site = Site(1)
    site.heartbeat("DEV-00000", mains=False, battery_v=10.0, panel="fault")
    emitted = len(site.emitted)
    site.heartbeat("DEV-00000")

    assert len(site.emitted) == emitted


def test_supervisor_panel_fault_and_disconnected():
    """Test that panel fault raises 300, disconnected raises 330, and each change restores the previous one."""
    site = Site(1)
    for panel in ("normal", "fault", "fault", "disconnected", "disconnected", "normal", "normal"):
        site.heartbeat("DEV-00000", panel=panel)

    assert [(s.code, s.qualifier) for s in site.emitted] == [
        ("300", Qualifier.NEW),
        ("300", Qualifier.RESTORE),
        ("330", Qualifier.NEW),
        ("330", Qualifier.RESTORE),
    ]


def test_supervisor_panel_alarm_without_event_raises_trouble():
    """Test that a panel alarm state with no alarm event raises one trouble from the second heartbeat and never a fire alarm."""
    site = Site(1)
    site.heartbeat("DEV-00000", panel="alarm")
    assert site.emitted == []

    site.clock.advance(60)
    site.heartbeat("DEV-00000", panel="alarm")
    site.clock.advance(60)
    site.heartbeat("DEV-00000", panel="alarm")

    assert [(s.code, s.qualifier, s.event_class) for s in site.emitted] == [("300", Qualifier.NEW, EventClass.TROUBLE)]
    assert "no fire or supervisory event" in site.emitted[0].text

    site.supervisor.on_signal(event("DEV-00000", "110"))
    assert [(s.code, s.qualifier) for s in site.emitted] == [("300", Qualifier.NEW), ("300", Qualifier.RESTORE)]


def test_supervisor_panel_alarm_with_event_raises_nothing():
    """Test that a panel alarm state explained by a fire event, before or after the first heartbeat, raises nothing."""
    site = Site(2)
    site.supervisor.on_signal(event("DEV-00000", "111"))
    site.heartbeat("DEV-00001", panel="alarm")
    site.supervisor.on_signal(event("DEV-00001", "110"))
    for _ in range(3):
        site.clock.advance(60)
        site.heartbeat("DEV-00000", panel="alarm")
        site.heartbeat("DEV-00001", panel="alarm")

    assert site.emitted == []


# State, restarts and memory.


def test_supervisor_state_reports_last_heartbeat():
    """Test that state() gives status, last seen time and the newest heartbeat fields."""
    site = Site(1)
    assert site.supervisor.state("DEV-00000").status is DeviceStatus.NEVER_HEARD
    site.clock.advance(5)
    site.heartbeat("DEV-00000", mains=True, battery_v=13.1, panel="normal", rssi=-70)
    site.clock.advance(100)

    state = site.supervisor.state("DEV-00000")
    assert state.status is DeviceStatus.LATE
    assert state.online
    assert state.last_seen == T0 + dt.timedelta(seconds=5)
    assert state.silent_s == pytest.approx(100)
    assert state.last_heartbeat.battery_v == 13.1
    assert state.last_heartbeat.rssi == -70
    assert state.heartbeat_s == 60
    assert state.window_s == 180


def test_supervisor_note_raised_restores_after_restart():
    """Test that a loss noted as raised before a restart is restored by two on-time heartbeats."""
    site = Site(1, grace_s=120)
    assert site.supervisor.note_raised("DEV-00000", "350")
    assert site.supervisor.note_raised("link:mqtt", "350")
    site.supervisor.on_link("mqtt", True)

    site.run(300)
    assert [(s.device_id, s.code, s.qualifier) for s in site.emitted] == [
        ("link:mqtt", "350", Qualifier.RESTORE),
        ("DEV-00000", "350", Qualifier.RESTORE),
    ]


def test_supervisor_note_raised_rejects_foreign_code():
    """Test that noting a code supervision never raises is rejected."""
    site = Site(1)
    with pytest.raises(ValueError, match="does not raise code '110'"):
        site.supervisor.note_raised("DEV-00000", "110")
    assert not site.supervisor.note_raised("DEV-UNKNOWN", "350")


def test_supervisor_emit_failure_is_contained():
    """Test that an emit callback that raises is counted and does not stop the tick."""
    clock = ManualClock(T0)
    calls: list[Signal] = []

    def emit(signal: Signal) -> None:
        calls.append(signal)
        raise RuntimeError("queue closed")

    supervisor = Supervisor(clock, emit, grace_s=0)
    supervisor.add_device("DEV-A")
    supervisor.add_device("DEV-B")
    clock.advance(200)
    supervisor.tick()

    assert len(calls) == 2
    assert supervisor.emit_errors == 2


def test_supervisor_memory_per_device_under_budget():
    """Test that 100,000 supervised devices that each sent a heartbeat take under 2 KB each (tracemalloc)."""
    device_ids = [f"MEM-{index:06d}" for index in range(100_000)]
    clock = ManualClock(T0)
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        supervisor = Supervisor(clock, lambda signal: None, grace_s=0)
        for device_id in device_ids:
            supervisor.add_device(device_id)
        clock.advance(30)
        received_at = clock.now()
        for device_id in device_ids:
            supervisor.on_heartbeat(
                Heartbeat(device_id=device_id, source=Source.MQTT, received_at=received_at, mains=True, battery_v=13.2, panel="normal", rssi=-67, link="4g")
            )
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    per_device = (after - before) / len(device_ids)
    assert supervisor.device_count == 100_000
    assert per_device < 2048, f"{per_device:.0f} bytes per device"


@pytest.fixture
def journal_conn(tmp_path: Path) -> Iterable[sqlite3.Connection]:
    with closing(journal.connect(tmp_path / "journal.db")) as connection:
        journal.migrate(connection)
        yield connection


def test_restart_open_conditions_from_journal(journal_conn: sqlite3.Connection):
    """Test that only supervision troubles whose last journaled signal is new are reported open."""
    history = [
        ("DEV-A", "350", Qualifier.NEW, Source.SUPERVISION),
        ("DEV-A", "350", Qualifier.RESTORE, Source.SUPERVISION),
        ("DEV-B", "350", Qualifier.NEW, Source.SUPERVISION),
        ("DEV-B", "301", Qualifier.NEW, Source.SUPERVISION),
        ("DEV-C", "301", Qualifier.NEW, Source.MQTT),  # the panel's own mains event, not supervision's
        ("link:mqtt", "350", Qualifier.NEW, Source.SUPERVISION),
    ]
    for index, (device_id, code, qualifier, source) in enumerate(history):
        signal = event(device_id, code, qualifier, source, received_at=T0 + dt.timedelta(seconds=index))
        _insert_signal(signal, None)(journal_conn)

    assert sorted(open_conditions(journal_conn)) == [("DEV-B", "301"), ("DEV-B", "350"), ("link:mqtt", "350")]

    site = Site(0)
    site.supervisor.add_device("DEV-B")
    assert note_open_conditions(site.supervisor, journal_conn) == 3
    assert site.supervisor.state("DEV-B").raised == ("350", "301")
    assert site.supervisor.link_state("mqtt") == (None, True)
