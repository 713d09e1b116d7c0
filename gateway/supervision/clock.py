"""Time sources for supervision: a monotonic clock for deadlines and a wall clock for signals."""

from __future__ import annotations

import datetime as dt
import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds for every deadline, and UTC wall-clock time for `received_at`."""

    def monotonic(self) -> float: ...

    def now(self) -> dt.datetime: ...


class SystemClock:
    """The process clocks: `time.monotonic` and the UTC wall clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)


class ManualClock:
    """A clock that moves only when `advance` is called; for tests, benchmarks and simulations."""

    def __init__(self, start: dt.datetime | None = None, monotonic_start: float = 1000.0) -> None:
        self._wall_start = start or dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
        self._monotonic_start = monotonic_start
        self._elapsed = 0.0

    def monotonic(self) -> float:
        return self._monotonic_start + self._elapsed

    def now(self) -> dt.datetime:
        return self._wall_start + dt.timedelta(seconds=self._elapsed)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back; advance by {seconds} s is negative")
        self._elapsed += seconds
