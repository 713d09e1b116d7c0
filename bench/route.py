"""Benchmark: decode, normalize and route without I/O, on one core.

Prints heartbeats/s through MQTT decoding, registry resolution and the coalescing lane, and
the per-alarm time from payload bytes to a routing decision (incident engine included, the
journal write excluded). Budget on a 2-core machine: at least 100,000 heartbeats/s and an
alarm routing p99 under 100 µs.

    .venv/bin/python bench/route.py [--devices 10000] [--heartbeats 300000] [--alarms 20000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import sqlite3
import statistics
import time

from drivers.mqtt import protocol
from gateway import journal, registry
from gateway.destinations import Destination
from gateway.incidents import IncidentEngine
from gateway.intake import Intake
from gateway.metrics import Metrics
from gateway.router import Router


def build_registry(devices: int) -> tuple[registry.RegistryCache, list[str]]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    journal.migrate(conn)
    device_ids = [f"BENCH-{index:06d}" for index in range(devices)]
    conn.execute("BEGIN")
    for index in range(0, devices, 10):
        facility = registry.Facility(id=f"F{index:06d}", name=f"Facility {index}", province="Hà Nội")
        registry.add_facility(conn, facility, {1: "Tầng 1", 2: "Tầng 2", 3: "Kho"})
    for index, device_id in enumerate(device_ids):
        registry.add_device(conn, registry.make_device(id=device_id, facility_id=f"F{index - index % 10:06d}"))
    conn.execute("COMMIT")
    cache = registry.RegistryCache(conn)
    cache.load()
    return cache, device_ids


def bench_heartbeats(intake: Intake, router: Router, device_ids: list[str], count: int) -> float:
    payloads = [
        (protocol.Topic(device_ids[index % len(device_ids)], "heartbeat"), protocol.encode_heartbeat(boot=1, seq=index))
        for index in range(count)
    ]
    received_at = dt.datetime.now(dt.timezone.utc)
    gc.collect()
    started = time.perf_counter()
    for topic, payload in payloads:
        intake.submit_heartbeat(protocol.decode_heartbeat(topic, payload, received_at))
        if router.heartbeat_depth >= 1000:
            router.serve_heartbeats()
    while router.heartbeat_depth:
        router.serve_heartbeats()
    return count / (time.perf_counter() - started)


def bench_alarms(intake: Intake, router: Router, device_ids: list[str], count: int) -> list[float]:
    samples: list[float] = []
    for index in range(count):
        device_id = device_ids[index % len(device_ids)]
        qualifier = "E" if (index // len(device_ids)) % 2 == 0 else "R"
        payload = protocol.encode_event(boot=1, seq=index, code="110", qualifier=qualifier, zone=1 + index % 3)
        topic = protocol.Topic(device_id, "event")
        started = time.perf_counter_ns()
        signal = intake.resolve(protocol.decode_event(topic, payload, dt.datetime.now(dt.timezone.utc)))
        router.offer_alarm(signal)
        router.serve_alarms()
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--heartbeats", type=int, default=300_000)
    parser.add_argument("--alarms", type=int, default=20_000)
    args = parser.parse_args()

    cache, device_ids = build_registry(args.devices)
    metrics = Metrics()
    router = Router(metrics)
    intake = Intake(journal=None, registry=cache, router=router, metrics=metrics)  # type: ignore[arg-type]
    engine = IncidentEngine(cache, [Destination(name="central", url="http://127.0.0.1:1")])
    decisions: list[object] = []
    router.on_alarm(lambda signal: decisions.append(engine.route(signal)))
    router.on_heartbeats(lambda batch: None)

    # As the daemon does after loading the registry.
    gc.collect()
    gc.freeze()

    rate = bench_heartbeats(intake, router, device_ids, args.heartbeats)
    bench_alarms(intake, router, device_ids, 2_000)  # warm-up
    decisions.clear()
    samples = sorted(bench_alarms(intake, router, device_ids, args.alarms))
    p50 = statistics.median(samples)
    p99 = samples[int(len(samples) * 0.99) - 1]

    print(f"devices                      {args.devices}")
    print(f"heartbeats decoded+routed/s  {rate:,.0f}   (budget >= 100,000)")
    print(f"alarm decode+route p50       {p50:.1f} µs")
    print(f"alarm decode+route p99       {p99:.1f} µs   (budget < 100 µs)")
    print(f"alarm decisions made         {len(decisions)}; open incidents {len(engine.open_incidents)}")


if __name__ == "__main__":
    main()
