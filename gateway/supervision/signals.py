"""The Contact ID codes supervision raises, and the `Signal` values it emits.

| condition                                   | code | SIA new/restore | restored when |
| ------------------------------------------- | ---- | --------------- | ------------- |
| communication loss of a device              | 350  | YS / YK         | two heartbeats arrive on time |
| link lost (device id `link:<name>`)         | 350  | YS / YK         | the link is back |
| failed to test (no periodic test in time)   | 354  | YC / YK         | a test report arrives, however late |
| mains power lost (heartbeat `mains` false)  | 301  | AT / AR         | a heartbeat reports mains true |
| battery low (heartbeat `battery_v`)         | 302  | YT / YR         | voltage at or above threshold + hysteresis |
| panel reports `fault`                       | 300  | YX / YZ         | the panel state changes |
| panel reports `alarm` with no alarm event   | 300  | YX / YZ         | the state changes or an alarm event arrives |
| transmitter reports panel `disconnected`    | 330  | ET / ER         | the panel state changes |

Why these codes:
- Contact ID has no "failed to test" code. 354 "failure to communicate event" is the nearest
  meaning (a report the panel owed did not arrive), and keeping it apart from 350 means a 350
  restore can only ever mean that communication came back.
- A heartbeat's `fault` reports only that the panel shows a fault, not which one, so it maps to
  the generic 300 "system trouble" instead of 373 "fire loop trouble", which names a cause.
- `disconnected` means the transmitter lost its panel, a peripheral on the panel side. 330
  "system peripheral trouble" keeps it apart from 350, which supervision owns.
- A heartbeat that reports `alarm` never becomes a fire alarm: only the panel's own event
  may open a fire incident. It raises a 300 trouble so that an operator checks the site.
"""

from __future__ import annotations

import datetime as dt

from gateway import codes
from gateway.signal import Qualifier, Signal, Source, new_signal_id

COMMUNICATION_LOSS = "350"
FAILED_TO_TEST = "354"
MAINS_LOST = "301"
BATTERY_LOW = "302"
PANEL_TROUBLE = "300"
PANEL_DISCONNECTED = "330"

# Test reports that prove the reporting path end to end: 601 manual test, 602 periodic test,
# 603 periodic RF transmission, 608 periodic test with trouble present. The other 6xx codes
# (fire test, walk test, point tested, listen-in) come from on-site maintenance, not from
# the panel's test schedule, so they do not reset the failed-to-test deadline.
PERIODIC_TEST_CODES = frozenset({"601", "602", "603", "608"})

LINK_PREFIX = "link:"


def link_device_id(link: str) -> str:
    """Return the device id that link signals carry, e.g. `link:mqtt`."""
    return f"{LINK_PREFIX}{link}"


def supervision_signal(
    device_id: str, code: str, qualifier: Qualifier, text: str, received_at: dt.datetime, *, zone: int = 0
) -> Signal:
    """Build a signal the gateway raises itself for `code`; the facility is left for intake to fill in."""
    entry = codes.lookup(code)
    return Signal(
        id=new_signal_id(),
        source=Source.SUPERVISION,
        device_id=device_id,
        event_class=entry.event_class,
        code=code,
        qualifier=qualifier,
        sia_code=codes.to_sia(code, qualifier),
        zone=zone,
        text=text,
        received_at=received_at,
    )
