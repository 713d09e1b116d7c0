"""Links that devices report through, and the silence count used for storm control.

A link is whatever a group of devices shares on its way to the gateway: the broker connection
(`mqtt`), a Modbus bus, a serial receiver. When the link fails, every device behind it falls
silent at once, and supervision raises one link signal instead of one loss per device.
"""

from __future__ import annotations

BUCKET_S = 5.0


class SilenceHistogram:
    """Count of devices by the moment each becomes overdue, in buckets of `BUCKET_S` seconds.

    A device is overdue once its last message is older than its on-time limit. Moving a
    device when it is heard costs two dict updates, so the count of devices that fell silent
    in a time range is available without scanning the devices.
    """

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}

    def add(self, overdue_at: float) -> None:
        key = int(overdue_at // BUCKET_S)
        self._counts[key] = self._counts.get(key, 0) + 1

    def remove(self, overdue_at: float) -> None:
        key = int(overdue_at // BUCKET_S)
        left = self._counts[key] - 1
        if left:
            self._counts[key] = left
        else:
            del self._counts[key]

    def move(self, old_overdue_at: float, new_overdue_at: float) -> None:
        if int(old_overdue_at // BUCKET_S) != int(new_overdue_at // BUCKET_S):
            self.remove(old_overdue_at)
            self.add(new_overdue_at)

    def count_between(self, start: float, end: float) -> int:
        """Return how many devices became overdue from `start` to `end`.

        Only whole buckets count, so a device that became overdue less than `BUCKET_S`
        seconds before `end` may be left out. The cost grows with the number of distinct
        buckets in use, not with the number of devices.
        """
        first = int(start // BUCKET_S)
        stop = int(end // BUCKET_S)
        return sum(count for key, count in self._counts.items() if first <= key < stop)


class Link:
    """The supervision state of one link.

    `up` is None until the driver first reports the link. `inferred` is set when most devices
    behind an up link fell silent together. `raised` is True while a link signal is open.
    `resumed_at` is the monotonic time at which suppression last ended: every device behind
    the link gets a full window from then on before its own loss can be raised.
    `silence_floor` is the start of the last outage (or of supervision): in the first window
    after `resumed_at`, devices silent since then count toward a storm.
    """

    __slots__ = (
        "name",
        "up",
        "down_since",
        "check_at",
        "raised",
        "inferred",
        "storm_from",
        "resumed_at",
        "silence_floor",
        "device_count",
        "silence",
    )

    def __init__(self, name: str, *, silence_floor: float) -> None:
        self.name = name
        self.up: bool | None = None
        self.down_since: float | None = None
        self.check_at: float | None = None
        self.raised = False
        self.inferred = False
        self.storm_from = 0.0
        self.resumed_at = float("-inf")
        self.silence_floor = silence_floor
        self.device_count = 0
        self.silence = SilenceHistogram()

    @property
    def suppressing(self) -> bool:
        """True while per-device losses behind this link are held back."""
        return self.up is False or self.inferred
