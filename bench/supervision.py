"""Benchmark: memory per supervised device and the cost of a supervision tick.

Memory is measured in a fresh child process per figure, for devices that each sent one
heartbeat (the supervisor keeps the newest heartbeat of every device):
- tracemalloc, at 100,000 devices: bytes Python allocated for the supervisor, its records,
  timers and the kept heartbeats. Device id strings are made before measuring, because the
  registry already keeps them in memory.
- RSS growth, at 100,000 and 1,000,000 devices: resident set size from /proc/self/statm
  before and after the same work.
Budget: under 2 KB per device.

Tick cost is measured on 1,000,000 devices (heartbeat 60 s, window 180 s) in steady state:
every second a sixtieth of the devices heartbeats (not timed), then one `tick()` is timed.
Two more phases are timed the same way: about 1,000 devices fall silent (too few for a link
storm, so each raises its own loss), then the link goes down and every device's loss comes
due and is held back. The clock is a manual one, so simulated time costs no waiting.

    .venv/bin/python bench/supervision.py [--devices 1000000] [--ticks 180]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from drivers.base import Heartbeat
from gateway.signal import Signal, Source
from gateway.supervision import ManualClock, Supervisor

T0 = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.timezone.utc)
BUDGET_BYTES = 2048
CHILD_TIMEOUT_S = 90
WARM_UP_S = 180  # one window: every device has been checked once and settled on its own phase
PHASE_S = 190  # longer than a window, so that every silent device comes due


def rss_bytes() -> int:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def supervise_with_heartbeats(device_ids: list[str]) -> Supervisor:
    """Add the devices, then give each one heartbeat with its own timestamp and voltage, as a driver would."""
    clock = ManualClock(T0)
    supervisor = Supervisor(clock, lambda signal: None, grace_s=0)
    for device_id in device_ids:
        supervisor.add_device(device_id)
    clock.advance(30)
    for index, device_id in enumerate(device_ids):
        received_at = T0 + dt.timedelta(microseconds=index)
        battery_v = 12.0 + (index % 1000) / 500
        supervisor.on_heartbeat(
            Heartbeat(device_id=device_id, source=Source.MQTT, received_at=received_at, mains=True, battery_v=battery_v, panel="normal", rssi=-67, link="4g")
        )
    return supervisor


def measure_in_child(method: str, devices: int) -> float:
    """Run one memory measurement in a fresh process; return bytes per device."""
    result = subprocess.run(
        [sys.executable, __file__, "--child", method, "--devices", str(devices)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=True,
    )
    return float(result.stdout.strip())


def child(method: str, devices: int) -> None:
    device_ids = [f"BENCH-{index:07d}" for index in range(devices)]
    gc.collect()
    if method == "tracemalloc":
        tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        supervisor = supervise_with_heartbeats(device_ids)
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    else:
        before = rss_bytes()
        supervisor = supervise_with_heartbeats(device_ids)
        gc.collect()
        after = rss_bytes()
    assert supervisor.device_count == devices
    print((after - before) / devices)


class SteadyState:
    """Devices heartbeating every 60 s at spread phases, on a manual clock."""

    def __init__(self, devices: int) -> None:
        self.clock = ManualClock(T0)
        self.emitted: list[Signal] = []
        self.supervisor = Supervisor(self.clock, self.emitted.append, grace_s=0)
        self.device_ids = [f"BENCH-{index:07d}" for index in range(devices)]
        for device_id in self.device_ids:
            self.supervisor.add_device(device_id)
        self.supervisor.on_link("mqtt", True)
        received_at = self.clock.now()
        heartbeats = [Heartbeat(device_id=device_id, source=Source.MQTT, received_at=received_at, mains=True, battery_v=13.2, panel="normal") for device_id in self.device_ids]
        self.by_phase = [heartbeats[phase::60] for phase in range(60)]
        self.second = 0
        self.silent_phases: set[int] = set()
        self.silent_count = 0

    def advance(self) -> list[Heartbeat]:
        """Move one second and deliver that second's heartbeats; return them."""
        self.clock.advance(1.0)
        self.second += 1
        batch = self.by_phase[self.second % 60]
        if self.silent_count and self.second % 60 in self.silent_phases:
            batch = batch[self.silent_count :]
        self.supervisor.on_heartbeats(batch)
        return batch

    def timed_ticks(self, count: int) -> tuple[list[float], list[int]]:
        seconds: list[float] = []
        fired: list[int] = []
        for _ in range(count):
            self.advance()
            started = time.perf_counter()
            fired.append(self.supervisor.tick())
            seconds.append(time.perf_counter() - started)
        return seconds, fired


def verdict(bytes_per_device: float) -> str:
    return "within budget" if bytes_per_device < BUDGET_BYTES else "OVER BUDGET"


def describe(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000
    return f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {ordered[-1] * 1000:.2f} ms"


def bench_ticks(devices: int, ticks: int) -> None:
    started = time.perf_counter()
    state = SteadyState(devices)
    elapsed = time.perf_counter() - started
    print(f"add_device: {elapsed / devices * 1e6:.1f} µs per device ({devices:,} devices in {elapsed:.1f} s, heartbeat objects included)")

    heartbeat_seconds = 0.0
    heartbeat_count = 0
    for _ in range(WARM_UP_S):
        started = time.perf_counter()
        heartbeat_count += len(state.advance())
        heartbeat_seconds += time.perf_counter() - started
        state.supervisor.tick()
    print(f"on_heartbeat: {heartbeat_seconds / heartbeat_count * 1e6:.2f} µs per heartbeat ({heartbeat_count:,} heartbeats)")

    seconds, fired = state.timed_ticks(ticks)
    print(f"steady tick, {devices:,} devices: {describe(seconds)}; timers fired per tick: mean {statistics.mean(fired):,.0f}, max {max(fired):,}")
    print(f"  signals emitted in steady state: {len(state.emitted)} (expected 0); timer entries {state.supervisor.timer_count:,}")

    # About 1,000 devices fall silent behind an up link: too few for a storm, so each raises its own loss.
    state.silent_phases = set(range(60))
    state.silent_count = -(-1000 // 60)  # the first devices of every phase
    silent_seconds, silent_fired = state.timed_ticks(PHASE_S)
    print(f"ticks while {state.silent_count * 60:,} devices fall silent: {describe(silent_seconds)}; timers fired per tick: max {max(silent_fired):,}")
    print(f"  communication losses emitted: {len(state.emitted):,}")
    state.silent_count = 0
    state.emitted.clear()

    # The whole link goes down: every device's loss comes due and is held back.
    state.supervisor.on_link("mqtt", False)
    state.silent_count = len(state.by_phase[0])
    down_seconds, down_fired = state.timed_ticks(PHASE_S)
    print(f"ticks with the link down ({devices:,} devices held back): {describe(down_seconds)}; timers fired per tick: max {max(down_fired):,}")
    print(f"  signals emitted: {len(state.emitted)} ({', '.join(sorted({s.device_id for s in state.emitted}))})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1_000_000, help="devices in the tick benchmark (and the largest memory run)")
    parser.add_argument("--ticks", type=int, default=180, help="steady-state ticks to time (180 covers one window, the period of the load)")
    parser.add_argument("--child", choices=("tracemalloc", "rss"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.devices)
        return
    # The link-down phase logs one warning by design; keep the printed figures readable.
    logging.getLogger("gateway.supervision").setLevel(logging.ERROR)

    started = time.perf_counter()
    print("memory per supervised device, each with one kept heartbeat (budget < 2,048 bytes):")
    traced = measure_in_child("tracemalloc", 100_000)
    print(f"  {100_000:>9,} devices: tracemalloc {traced:,.0f} B  ({verdict(traced)})")
    for devices in sorted({100_000, args.devices}):
        rss = measure_in_child("rss", devices)
        print(f"  {devices:>9,} devices: RSS growth  {rss:,.0f} B  ({verdict(rss)})")
    bench_ticks(args.devices, args.ticks)
    print(f"total run time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
