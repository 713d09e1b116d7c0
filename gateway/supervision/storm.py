"""Storm control: one link signal instead of a loss for every device behind a failed link.

A link counts as lost in two ways:
- its driver reports it down (`report(name, False)`) and it stays down for the hold-off;
- it stays up, but when a device's window ends, at least `min_devices` and more than
  `fraction` of the devices behind it became overdue within that window (a carrier or
  concentrator outage beyond the gateway's own connection).
Either way one 350 is emitted for `link:<name>`, and the supervisor holds back the
per-device losses behind the link until it is back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gateway.signal import Qualifier
from gateway.supervision.links import Link
from gateway.supervision.signals import COMMUNICATION_LOSS, link_device_id

log = logging.getLogger(__name__)

# Sends one signal: device id, code, qualifier, text, monotonic time of raising.
Send = Callable[[str, str, Qualifier, str, float], None]

# An inferred link outage ends when fewer than this share of the raising threshold are still
# silent, so that a count hovering at the threshold does not raise and restore by turns.
STORM_CLEAR_RATIO = 0.8


class LinkWatch:
    """The links devices report through, their outages and the link signals."""

    def __init__(self, send: Send, *, grace_end: float, holdoff_s: float, fraction: float, min_devices: int, check_s: float) -> None:
        self._send = send
        self._grace_end = grace_end
        self._holdoff_s = holdoff_s
        self._fraction = fraction
        self._min_devices = min_devices
        self._check_s = check_s
        self._links: dict[str, Link] = {}

    def get(self, name: str) -> Link | None:
        return self._links.get(name)

    def link(self, name: str, now: float) -> Link:
        """Return the link called `name`, creating it (state unknown) on first use."""
        link = self._links.get(name)
        if link is None:
            link = self._links[name] = Link(name, silence_floor=now)
        return link

    def note_raised(self, name: str, now: float) -> None:
        """Count the link signal as raised before a restart, so that the link's return restores it."""
        self.link(name, now).raised = True

    def report(self, name: str, up: bool, now: float) -> None:
        """Take a driver's report that a link went up or down; repeated reports change nothing."""
        link = self.link(name, now)
        if not up:
            if link.up is False:
                return
            link.up = False
            link.down_since = now
            link.silence_floor = now
            link.check_at = None if link.raised else max(now + self._holdoff_s, self._grace_end)
            log.info("link %s reported down; losses of its %d devices are held back", name, link.device_count)
            return

        if link.up is True:
            return
        was_down = link.up is False
        down_since = link.down_since
        link.up = True
        link.down_since = None
        if was_down:
            # The explicit outage ends an inferred one too: both are restored by this report.
            link.resumed_at = now
            link.inferred = False
            link.check_at = None
        if link.raised and not link.inferred:
            outage = f" after {now - down_since:.0f} s" if down_since is not None else ""
            self._restore(link, f"link {name} restored{outage}", now)

    def storm_detected(self, link: Link, window_s: float, heartbeat_s: float, now: float) -> bool:
        """Decide, when a device's window of `window_s` ended, whether its link lost most devices together.

        Raises the link signal and returns True if so.
        """
        if link.device_count < self._min_devices:
            return False
        window_start = now - window_s
        # In the first window after start-up or after the link came back, devices silent
        # since then (or since the outage began) count too, although their silence began
        # more than a window ago: they never had a chance to report.
        if now - max(self._grace_end, link.resumed_at) <= window_s + heartbeat_s:
            window_start = min(window_start, link.silence_floor)
        silent = link.silence.count_between(window_start, now)
        if silent < self._min_devices or silent <= self._fraction * link.device_count:
            return False
        link.inferred = True
        link.storm_from = window_start
        link.check_at = now + self._check_s
        self._raise(
            link,
            f"link {link.name} lost; {silent} devices unreachable: {silent} of {link.device_count} devices behind it "
            f"fell silent within {window_s:.0f} s while the link stayed up",
            now,
        )
        return True

    def tick(self, now: float) -> int:
        """Run the link checks that are due; return how many ran."""
        fired = 0
        for link in self._links.values():
            if link.check_at is not None and now >= link.check_at:
                fired += 1
                self._check(link, now)
        return fired

    def _check(self, link: Link, now: float) -> None:
        link.check_at = None
        if link.up is False:
            self._raise(link, f"link {link.name} lost; {link.device_count} devices unreachable", now)
            return
        if not link.inferred:
            return
        silent = link.silence.count_between(link.storm_from, now)
        clear_below = self._fraction * STORM_CLEAR_RATIO * link.device_count
        if silent >= self._min_devices and silent >= clear_below:
            link.check_at = now + self._check_s
            return
        link.inferred = False
        link.resumed_at = now
        link.silence_floor = now
        self._restore(link, f"link {link.name} restored: {silent} of {link.device_count} devices behind it still silent", now)

    def _raise(self, link: Link, text: str, now: float) -> None:
        if link.raised:
            return
        link.raised = True
        log.warning("%s; per-device communication losses behind it are held back", text)
        self._send(link_device_id(link.name), COMMUNICATION_LOSS, Qualifier.NEW, text, now)

    def _restore(self, link: Link, text: str, now: float) -> None:
        link.raised = False
        log.info("%s; each device behind it has a full window to report", text)
        self._send(link_device_id(link.name), COMMUNICATION_LOSS, Qualifier.RESTORE, text, now)
