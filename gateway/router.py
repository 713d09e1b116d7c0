"""The routing core: an alarm lane that is never shed and a coalescing heartbeat lane.

Alarm-class signals are served first, most urgent class first and in arrival order within a
class. Heartbeats are kept as the newest per device; when more devices are waiting than the
lane holds, the oldest waiting heartbeat is dropped and counted.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable

from drivers.base import Heartbeat
from gateway.metrics import Metrics
from gateway.signal import PRIORITY, Signal

log = logging.getLogger(__name__)

AlarmListener = Callable[[Signal], None]
HeartbeatListener = Callable[[list[Heartbeat]], None]

HEARTBEAT_BATCH = 1000


class Router:
    def __init__(self, metrics: Metrics, *, heartbeat_capacity: int = 200_000) -> None:
        self._metrics = metrics
        self._alarms: list[tuple[int, int, Signal]] = []
        self._arrival = itertools.count()
        self._heartbeats: dict[str, Heartbeat] = {}
        self._heartbeat_capacity = heartbeat_capacity
        self._wake = asyncio.Event()
        self._alarm_listeners: list[AlarmListener] = []
        self._heartbeat_listeners: list[HeartbeatListener] = []

    def on_alarm(self, listener: AlarmListener) -> None:
        self._alarm_listeners.append(listener)

    def on_heartbeats(self, listener: HeartbeatListener) -> None:
        self._heartbeat_listeners.append(listener)

    @property
    def alarm_depth(self) -> int:
        return len(self._alarms)

    @property
    def heartbeat_depth(self) -> int:
        return len(self._heartbeats)

    def offer_alarm(self, signal: Signal) -> None:
        heapq.heappush(self._alarms, (PRIORITY[signal.lane_class], next(self._arrival), signal))
        self._wake.set()

    def offer_heartbeat(self, heartbeat: Heartbeat) -> None:
        lane = self._heartbeats
        if heartbeat.device_id in lane:
            # Re-insert so the device moves to the back: the lane stays ordered by last arrival.
            del lane[heartbeat.device_id]
            self._metrics.heartbeats_coalesced.inc()
        elif len(lane) >= self._heartbeat_capacity:
            del lane[next(iter(lane))]
            self._metrics.heartbeats_shed.inc()
        lane[heartbeat.device_id] = heartbeat
        self._wake.set()

    def serve_alarms(self) -> int:
        """Dispatch every waiting alarm to the listeners; return how many."""
        served = 0
        while self._alarms:
            _, _, signal = heapq.heappop(self._alarms)
            served += 1
            for listener in self._alarm_listeners:
                try:
                    listener(signal)
                except Exception:
                    self._metrics.handler_errors.labels("alarm").inc()
                    log.exception("alarm listener %r failed on signal %s; it stays unrouted in the journal", listener, signal.id)
        return served

    def serve_heartbeats(self, limit: int = HEARTBEAT_BATCH) -> int:
        lane = self._heartbeats
        if not lane:
            return 0
        batch = [lane.pop(device_id) for device_id in list(itertools.islice(lane, limit))]
        for listener in self._heartbeat_listeners:
            try:
                listener(batch)
            except Exception:
                self._metrics.handler_errors.labels("heartbeat").inc()
                log.exception("heartbeat listener %r failed on a batch of %d", listener, len(batch))
        return len(batch)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._alarms or self._heartbeats:
                self.serve_alarms()
                self.serve_heartbeats()
                self._metrics.alarm_lane_depth.set(len(self._alarms))
                self._metrics.heartbeat_lane_depth.set(len(self._heartbeats))
                # Let drivers run between batches so that new alarms can jump the heartbeat queue.
                await asyncio.sleep(0)
