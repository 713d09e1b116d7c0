"""One timer structure for every supervised device: keys bucketed by whole second.

A deadline is rounded up to the next whole second (its slot) and the key is appended to that
slot's list, so scheduling costs one list append and firing costs one list walk, however
many devices are supervised. A small heap orders the slots in use. Timers therefore fire at
whole-second resolution: never early, and at most one second late for a once-per-second tick.

Deletion is lazy: the owner keeps, per key, the slot of its live timer, and skips an entry
whose slot differs. A deadline that moves later (a device was heard) needs no operation at
all: the entry fires at the old slot, the owner finds the device alive and schedules the new
deadline. So a healthy device costs one append and one visit per supervision window,
whatever its heartbeat rate.
"""

from __future__ import annotations

import heapq
import math


class TimerSlots:
    """Keys scheduled by whole-second slot, earliest slot first."""

    __slots__ = ("_slots", "_order", "_count")

    def __init__(self) -> None:
        self._slots: dict[int, list[str]] = {}
        self._order: list[int] = []
        self._count = 0

    def __len__(self) -> int:
        """Entries scheduled, live and stale."""
        return self._count

    def schedule(self, deadline: float, key: str) -> int:
        """Schedule `key` at `deadline` rounded up to a whole second; return that slot."""
        slot = math.ceil(deadline)
        keys = self._slots.get(slot)
        if keys is None:
            self._slots[slot] = [key]
            heapq.heappush(self._order, slot)
        else:
            keys.append(key)
        self._count += 1
        return slot

    def pop_due(self, now: float) -> tuple[int, list[str]] | None:
        """Remove and return the earliest slot at or before `now` with its keys, or None."""
        order = self._order
        if not order or order[0] > now:
            return None
        slot = heapq.heappop(order)
        keys = self._slots.pop(slot)
        self._count -= len(keys)
        return slot, keys

    def put_back(self, slot: int, keys: list[str]) -> None:
        """Return keys taken by `pop_due` but not processed; they stay due."""
        if not keys:
            return
        existing = self._slots.get(slot)
        if existing is None:
            self._slots[slot] = keys
            heapq.heappush(self._order, slot)
        else:
            existing.extend(keys)
        self._count += len(keys)
