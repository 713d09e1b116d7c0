"""Named supervision presets: a heartbeat interval and a supervision window.

The window is the reporting time: how long a device may stay silent before the gateway raises
communication loss. The heartbeat interval is what the device is configured to send. Every
preset fits at least three heartbeats in its window, so one lost heartbeat does not raise
communication loss.

| name               | heartbeat | window  | basis |
| ------------------ | --------- | ------- | ----- |
| `default`          | 60 s      | 180 s   | the gateway's own default |
| `en50136-180s`     | 60 s      | 180 s   | EN 50136-style class, 180 s reporting time |
| `en50136-90s`      | 30 s      | 90 s    | EN 50136-style class, 90 s reporting time |
| `en50136-20s`      | 5 s       | 20 s    | EN 50136-style class, 20 s reporting time |
| `nfpa72-single-ip` | 1200 s    | 3600 s  | NFPA 72 style single communication path over IP, 60 min |

NOTE: the three EN 50136-style reporting times (180 s, 90 s, 20 s) and the NFPA 72 60-minute
limit are the values commonly quoted for EN 50136-1 reporting-time classes and NFPA 72
single-path supervision. They were not checked against the standards' text, and the heartbeat
intervals are this gateway's choice, not the standards'. A preset is no claim of conformance.
"""

from __future__ import annotations

import msgspec


class Preset(msgspec.Struct, frozen=True):
    """A heartbeat interval and a supervision window, both in seconds."""

    heartbeat_s: float
    window_s: float


PRESETS: dict[str, Preset] = {
    "default": Preset(heartbeat_s=60.0, window_s=180.0),
    "en50136-180s": Preset(heartbeat_s=60.0, window_s=180.0),
    "en50136-90s": Preset(heartbeat_s=30.0, window_s=90.0),
    "en50136-20s": Preset(heartbeat_s=5.0, window_s=20.0),
    "nfpa72-single-ip": Preset(heartbeat_s=1200.0, window_s=3600.0),
}


def preset(name: str) -> Preset:
    """Return the preset called `name`; raise ValueError naming the known presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"supervision preset {name!r} is unknown; use one of {', '.join(PRESETS)}") from None
