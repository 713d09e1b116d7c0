"""Supervision of silent transmitters: communication loss, failed to test, heartbeat health
and link storms, for up to a million devices on one timer heap.

`Supervisor` applies the rules, which its module documents. `signals` lists the Contact ID
codes it raises and why, and `presets` lists the named heartbeat/window presets.
"""

from gateway.supervision.clock import Clock, ManualClock, SystemClock
from gateway.supervision.device import DeviceState, DeviceStatus
from gateway.supervision.presets import PRESETS, Preset, preset
from gateway.supervision.signals import PERIODIC_TEST_CODES, link_device_id
from gateway.supervision.supervisor import Supervisor

__all__ = [
    "Clock",
    "DeviceState",
    "DeviceStatus",
    "ManualClock",
    "PERIODIC_TEST_CODES",
    "PRESETS",
    "Preset",
    "Supervisor",
    "SystemClock",
    "link_device_id",
    "preset",
]
