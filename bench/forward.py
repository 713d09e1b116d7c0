"""Benchmark: what the forwarder adds between the outbox and a command centre, and which HTTP client.

The command centre simulator runs in a child process on 127.0.0.1 and notes, for each event,
when its handler started (the receipt) and how long the handler took. This process writes
outbox rows through the journal at a fixed rate, as the incident engine does, and runs the
forwarder against the child with each HTTP client in turn.

Printed per client:
- raw client throughput: signed POSTs from 8 concurrent tasks for a fixed time, no forwarder;
- forwarder at the offered rate: delivered/s, the backlog left when the producer stops, and
  the latency the forwarder adds, as p50/p99/max in ms, measured two ways:
  - commit -> receipt: from the moment the outbox commit is seen on the event loop (where the
    daemon wakes the forwarder) to the start of the centre's handler;
  - commit -> confirmation - handling: to the forwarder's receipt of the response, minus the
    time the centre's handler took.
Budget: p99 under 10 ms added at 1,000 alarms/s.

    .venv/bin/python bench/forward.py [--rates 1000,200] [--duration 10] [--clients aiohttp,httpx] [--gc-freeze]

Each event is a fire alarm in one of 200 incidents, so every incident gets rate/200 events per
second, delivered strictly in order.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from gateway import event_body, signing
from gateway.destinations import Destination
from gateway.forwarder import ClientFactory, Forwarder, HttpClient, HttpReply, TransportError, aiohttp_client
from gateway.journal import Journal
from gateway.metrics import Metrics
from simulators.command_center import CommandCenter

SECRET = "bench-secret"
INCIDENTS = 200
RAW_CONCURRENCY = 8


# The centre, in a child process


class TimedCommandCenter(CommandCenter):
    """The simulator, noting per event when its handler started and how long it ran."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.timings: dict[str, tuple[float, float]] = {}

    async def _post_event(self, request):
        arrived = time.time()
        started = time.perf_counter()
        response = await super()._post_event(request)
        key = request.headers.get(signing.IDEMPOTENCY_HEADER, "")
        self.timings.setdefault(key, (arrived, time.perf_counter() - started))
        return response


async def serve_child(timings_path: Path) -> None:
    """Serve until stdin closes, then write the timings as JSON to `timings_path`."""
    centre = TimedCommandCenter(secret=SECRET)
    await centre.start()
    # The stand-in centre keeps every event in memory, so its full collections grow with the
    # run and stalled its loop for up to 70 ms, which showed up as forwarder latency. Freezing
    # what exists and making full collections rare keeps the instrument out of the figures.
    gc.freeze()
    gc.set_threshold(700, 10, 1_000_000)
    lags: list[float] = []
    prober = asyncio.create_task(probe_loop_lag(lags))
    sys.stdout.write(f"{centre.port}\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    prober.cancel()
    await centre.stop()
    timings_path.write_text(json.dumps(centre.timings))
    timings_path.with_suffix(".lag.json").write_text(json.dumps(lags))


class CentreProcess:
    def __init__(self, directory: Path) -> None:
        self.timings_path = directory / "timings.json"
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.timings_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        port = int(self.process.stdout.readline())
        self.url = f"http://127.0.0.1:{port}"

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the child so far, from /proc (Linux)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> dict[str, tuple[float, float]]:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)
        return {key: tuple(value) for key, value in json.loads(self.timings_path.read_text()).items()}

    def loop_lags(self) -> list[float]:
        """Return the centre's own event-loop lag samples over its whole life; call it after stop()."""
        return json.loads(self.timings_path.with_suffix(".lag.json").read_text())


# HTTP clients under comparison


class HttpxClient:
    def __init__(self, client) -> None:
        self._client = client

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> HttpReply:
        import httpx

        try:
            response = await self._client.post(url, content=body, headers=headers)
        except httpx.TransportError as error:
            raise TransportError(f"{type(error).__name__}: {error}") from error
        return HttpReply(response.status_code, response.text[:200])


@asynccontextmanager
async def httpx_client(destination: Destination, tls: ssl.SSLContext | None) -> AsyncIterator[HttpClient]:
    import httpx

    limits = httpx.Limits(max_connections=destination.max_in_flight, max_keepalive_connections=destination.max_in_flight)
    async with httpx.AsyncClient(limits=limits, timeout=destination.timeout_s, verify=tls if tls is not None else True) as client:
        yield HttpxClient(client)


CLIENTS: dict[str, ClientFactory] = {"aiohttp": aiohttp_client, "httpx": httpx_client}


def timing_factory(factory: ClientFactory, confirmed: dict[str, float]) -> ClientFactory:
    """Wrap a client factory so that each response's arrival time is noted by event id."""

    class Timed:
        def __init__(self, client: HttpClient) -> None:
            self._client = client

        async def post(self, url: str, body: bytes, headers: dict[str, str]) -> HttpReply:
            reply = await self._client.post(url, body, headers)
            confirmed.setdefault(headers[signing.IDEMPOTENCY_HEADER], time.time())
            return reply

    @asynccontextmanager
    async def make(destination: Destination, tls: ssl.SSLContext | None) -> AsyncIterator[HttpClient]:
        async with factory(destination, tls) as client:
            yield Timed(client)

    return make


# Workload


def make_body(event_id: str, incident: int) -> bytes:
    now = dt.datetime.now(dt.timezone.utc)
    body = event_body.EventBody(
        event_id=event_id,
        kind="signal",
        incident=event_body.IncidentBody(id=f"inc-{incident}", state="open", event_class="fire", opened_at=now, zone_count=1),
        facility=event_body.FacilityBody(id=f"HN-{incident:04d}", name="Cơ sở thử tải", province="Hà Nội"),
        device=event_body.DeviceBody(id=f"DEV-{incident:04d}", source="mqtt"),
        signal=event_body.SignalBody(
            id=event_id, event_class="fire", code="110", sia_code="FA", qualifier="new", group=0, zone=1, zone_label="Tầng 1", text=""
        ),
        times=event_body.TimesBody(panel=now, received=now),
    )
    return event_body.encode(body)


def insert_rows(rows: list[tuple[str, str, bytes]], created_at: float) -> Callable[[sqlite3.Connection], None]:
    def write(conn: sqlite3.Connection) -> None:
        conn.executemany(
            "INSERT INTO outbox (event_id, destination, incident_id, event_class, created_at, body) VALUES (?, 'central', ?, 'fire', ?, ?)",
            [(event_id, incident_id, created_at, body) for event_id, incident_id, body in rows],
        )

    return write


def steal_seconds() -> float:
    """Return the CPU time the hypervisor took from this VM so far (the `steal` column of /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


async def probe_loop_lag(lags: list[float], period: float = 0.005) -> None:
    """Record how late the event loop wakes a task that sleeps `period` s: its own stalls."""
    loop = asyncio.get_running_loop()
    while True:
        planned = loop.time() + period
        await asyncio.sleep(period)
        lags.append(max(0.0, loop.time() - planned))


async def run_forwarder(client_name: str, url: str, rate: int, duration: float, directory: Path, in_flight: int) -> dict:
    """Offer `rate` events/s for `duration` s and wait for the backlog to drain (at most 30 s)."""
    journal = Journal(directory / f"journal-{client_name}-{rate}.db")
    await journal.start()
    confirmed: dict[str, float] = {}
    committed: dict[str, float] = {}
    destination = Destination(name="central", url=url, secret=SECRET, max_in_flight=in_flight)
    forwarder = Forwarder([destination], journal, Metrics(), client_factory=timing_factory(CLIENTS[client_name], confirmed))
    link = forwarder.links["central"]
    task = asyncio.create_task(link.run())
    lags: list[float] = []
    prober = asyncio.create_task(probe_loop_lag(lags))
    steal_before = steal_seconds()

    def on_commit(event_ids: list[str]) -> Callable[[asyncio.Future], None]:
        def done(future: asyncio.Future) -> None:
            at = time.time()
            if future.exception() is not None:
                print(f"outbox insert failed: {future.exception()}", file=sys.stderr)
                return
            for event_id in event_ids:
                committed[event_id] = at
            forwarder.wake()

        return done

    tick = 0.01
    per_tick = max(1, round(rate * tick))
    loop = asyncio.get_running_loop()
    started = loop.time()
    sequence = 0
    ticks = int(duration / tick)
    for index in range(ticks):
        rows = []
        for _ in range(per_tick):
            event_id = f"{client_name}-{rate}-{sequence:07d}"
            incident = sequence % INCIDENTS
            rows.append((event_id, f"inc-{client_name}-{incident}", make_body(event_id, incident)))
            sequence += 1
        journal.submit(insert_rows(rows, time.time())).add_done_callback(on_commit([row[0] for row in rows]))
        await asyncio.sleep(max(0.0, started + (index + 1) * tick - loop.time()))
    produced_for = loop.time() - started
    backlog_at_stop = sequence - link.delivered
    drain_deadline = loop.time() + 30
    while link.delivered < sequence and loop.time() < drain_deadline:
        await asyncio.sleep(0.05)
    finished = loop.time()
    task.cancel()
    prober.cancel()
    await asyncio.gather(task, prober, return_exceptions=True)
    await journal.close()
    return {
        "offered": sequence,
        "offered_per_s": sequence / produced_for,
        "delivered": link.delivered,
        "delivered_per_s": link.delivered / (finished - started),
        "backlog_at_stop": backlog_at_stop,
        "committed": committed,
        "confirmed": confirmed,
        "loop_lag": lags,
        "steal_s": steal_seconds() - steal_before,
    }


async def raw_throughput(client_name: str, url: str, seconds: float) -> float:
    """Signed POSTs per second from RAW_CONCURRENCY tasks on one client, no forwarder."""
    destination = Destination(name="central", url=url, secret=SECRET, max_in_flight=RAW_CONCURRENCY)
    body = make_body(f"raw-{client_name}", 0)
    count = 0
    async with CLIENTS[client_name](destination, None) as client:
        deadline = time.perf_counter() + seconds

        async def worker(worker_id: int) -> None:
            nonlocal count
            sequence = 0
            while time.perf_counter() < deadline:
                key = f"raw-{client_name}-{worker_id}-{sequence}"
                headers = {"Content-Type": "application/json", signing.IDEMPOTENCY_HEADER: key, **signing.signed_headers(SECRET, body)}
                reply = await client.post(f"{url}/v1/events", body, headers)
                assert reply.status in (201, 409), reply
                sequence += 1
                count += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(index) for index in range(RAW_CONCURRENCY)))
        return count / (time.perf_counter() - started)


def percentiles(values: list[float]) -> str:
    if not values:
        return "no samples"
    ordered = sorted(values)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, max {ordered[-1] * 1000:.2f} ms"


def added_latencies(result: dict, timings: dict[str, tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Per event: commit -> receipt, and commit -> confirmation minus the centre's handling."""
    receipt, round_trip = [], []
    for event_id, committed_at in result["committed"].items():
        timing = timings.get(event_id)
        confirmed_at = result["confirmed"].get(event_id)
        if timing is None or confirmed_at is None:
            continue
        arrived_at, handling_s = timing
        receipt.append(arrived_at - committed_at)
        round_trip.append(confirmed_at - committed_at - handling_s)
    return receipt, round_trip


class CpuMeter:
    """CPU seconds of this process (all threads) and of the centre over one phase."""

    def __init__(self, centre: CentreProcess) -> None:
        self._centre = centre
        self._wall = time.perf_counter()
        self._own = time.process_time()
        self._child = centre.cpu_seconds()

    def read(self) -> tuple[float, float, float]:
        """Return (wall seconds, own CPU seconds, centre CPU seconds) since the meter started."""
        return time.perf_counter() - self._wall, time.process_time() - self._own, self._centre.cpu_seconds() - self._child


async def main(options: argparse.Namespace) -> None:
    if options.gc_freeze:
        # This moves every object created so far out of the collector's generations, as a daemon
        # may do after start-up. A full collection then has fewer objects to walk.
        gc.freeze()
    print(
        f"forward benchmark: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start, "
        f"Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, gc.freeze: {'yes' if options.gc_freeze else 'no'}"
    )
    raw: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp)
        centre = CentreProcess(directory)
        runs = []
        try:
            for client_name in options.clients:
                meter = CpuMeter(centre)
                raw[client_name] = await raw_throughput(client_name, centre.url, options.raw_seconds)
                wall, own, child = meter.read()
                requests = raw[client_name] * wall
                print(
                    f"[{client_name}] raw client: {raw[client_name]:,.0f} signed POSTs/s with {RAW_CONCURRENCY} concurrent requests; "
                    f"client CPU {own / requests * 1e6:,.0f} µs/request, centre CPU {child / requests * 1e6:,.0f} µs/request, "
                    f"centre busy {child / wall:.0%}"
                )
            for rate in options.rates:
                for client_name in options.clients:
                    meter = CpuMeter(centre)
                    result = await run_forwarder(client_name, centre.url, rate, options.duration, directory, options.in_flight)
                    runs.append((client_name, rate, result, meter.read()))
        finally:
            timings = centre.stop()
            centre_lags = centre.loop_lags()

    for client_name, rate, result, (wall, own, child) in runs:
        print(
            f"\n[{client_name} @ {rate}/s] offered {result['offered']:,} events at {result['offered_per_s']:,.0f}/s, "
            f"delivered {result['delivered']:,} at {result['delivered_per_s']:,.0f}/s, "
            f"backlog when the producer stopped: {result['backlog_at_stop']}"
        )
        print(
            f"[{client_name} @ {rate}/s] gateway CPU {own / max(1, result['delivered']) * 1e6:,.0f} µs/event "
            f"(forwarder, journal and producer), centre busy {child / wall:.0%}"
        )
        receipt, round_trip = added_latencies(result, timings)
        print(f"[{client_name} @ {rate}/s] commit -> receipt:                 {percentiles(receipt)}")
        print(f"[{client_name} @ {rate}/s] commit -> confirmation - handling: {percentiles(round_trip)}")
        print(
            f"[{client_name} @ {rate}/s] event-loop lag of a 5 ms sleeper:   {percentiles(result['loop_lag'])}; "
            f"CPU stolen by the hypervisor during the run: {result['steal_s']:.2f} s"
        )
    print(f"\ncentre's own event-loop lag over the whole benchmark: {percentiles(centre_lags)}")
    if {"aiohttp", "httpx"} <= set(options.clients):
        print(f"\nraw throughput aiohttp / httpx: {raw['aiohttp'] / raw['httpx']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        asyncio.run(serve_child(Path(sys.argv[2])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=lambda text: [int(item) for item in text.split(",")], default=[1000, 200], help="comma-separated events per second offered to the outbox, one run each")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of offered load per client")
    parser.add_argument("--in-flight", type=int, default=Destination(name="", url="").max_in_flight, help="requests in flight per destination")
    parser.add_argument("--gc-freeze", action="store_true", help="call gc.freeze() after start-up before measuring")
    parser.add_argument("--raw-seconds", type=float, default=5.0, help="seconds of the raw client comparison per client")
    parser.add_argument("--clients", type=lambda text: text.split(","), default=["aiohttp", "httpx"], help="comma-separated: aiohttp, httpx")
    asyncio.run(main(parser.parse_args()))
