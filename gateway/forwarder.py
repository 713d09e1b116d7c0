"""The forwarder: delivers outbox rows to command centres over `POST {base}/v1/events`.

Each destination has its own link, cursor and connection pool, so a slow or dead centre never
delays another. Within a destination the rows are grouped by incident: the events of one
incident go strictly one after another in outbox order, while up to `max_in_flight` different
incidents are in flight at once, fire alarms first. A stuck event therefore holds back only the
later events of its own incident.

Responses: any 2xx or 409 confirms delivery. 408, 429, 5xx, timeouts and connection errors are
retried with capped, jittered exponential backoff, without limit. Every other 4xx is permanent:
the row is dead-lettered and a forwarding trouble is raised; `gateway outbox requeue` sends it
again.

A circuit breaker per destination stops the traffic after `BREAKER_THRESHOLD` consecutive
failed attempts. While it is open, one probe at a time, spaced by backoff, tests the centre, and
the first success resumes delivery at full rate.

A fire alarm that no destination confirmed within `CONFIRM_LIMIT_S` of its receipt raises a
forwarding trouble once. The trouble is restored when a destination confirms the alarm.
EN 54-21:2006, clause 5.3, requires a fault warning when the acknowledgement of a fire alarm
does not arrive within 100 s for type 1 routing equipment.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import enum
import heapq
import logging
import sqlite3
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import aiohttp
import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway import event_body, signing
from gateway.backoff import Backoff
from gateway.destinations import Destination
from gateway.journal import Journal
from gateway.metrics import Metrics
from gateway.supervision.signals import supervision_signal
from gateway.signal import PRIORITY, EventClass, Qualifier, Signal

log = logging.getLogger(__name__)

FETCH_LIMIT = 500
# Rows held in memory per destination; more stay in the outbox until these are delivered.
# NOTE: a fire alarm still waiting in the outbox beyond this many rows is not yet watched for
# the confirmation limit; it is watched, with its original deadline, once a link loads it.
MAX_BUFFERED = 10_000
# How often a link looks for rows requeued by `gateway outbox requeue` and refreshes its gauges.
POLL_INTERVAL_S = 1.0
CONFIRM_LIMIT_S = 100.0
BREAKER_THRESHOLD = 5
# Retry delays of one event, and the spacing of circuit breaker probes, in seconds.
RETRY_INITIAL_S = 0.5
RETRY_CAP_S = 30.0
PROBE_INITIAL_S = 0.5
PROBE_CAP_S = 10.0
# A failed probe is logged at warning level once per this many probes; the others at debug.
PROBE_LOG_EVERY = 10
ERROR_TEXT_LIMIT = 500

TROUBLE_CODE = "354"  # Contact ID: failure to communicate event
DEAD_LETTER_ZONE = 1
UNCONFIRMED_ZONE = 2
TROUBLE_DEVICE_PREFIX = "forward:"

EmitTrouble = Callable[[Signal], None]


class ForwarderError(Exception):
    """A destination cannot be served as configured, for example an unreadable certificate."""


# HTTP


class TransportError(Exception):
    """A request got no HTTP response: connection refused or reset, TLS failure, timeout."""


@dataclasses.dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    text: str
    retry_after_s: float | None = None


class HttpClient(Protocol):
    """One destination's HTTP client; it reuses connections between requests."""

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> HttpReply:
        """Send one request; raise TransportError when no response arrives."""
        ...


ClientFactory = Callable[[Destination, "ssl.SSLContext | None"], AbstractAsyncContextManager[HttpClient]]


def tls_context(destination: Destination) -> ssl.SSLContext | None:
    """Build the client TLS context of `destination`, or None for plain HTTP without TLS files.

    Raises ForwarderError when a CA, certificate or key file cannot be loaded.
    """
    uses_tls = destination.url.startswith("https:") or destination.ca_file or destination.client_cert
    if not uses_tls:
        return None
    try:
        context = ssl.create_default_context(cafile=destination.ca_file or None)
        if destination.client_cert:
            context.load_cert_chain(destination.client_cert, destination.client_key or None)
    except (OSError, ssl.SSLError) as error:
        raise ForwarderError(
            f"destination {destination.name}: cannot load TLS files (ca_file={destination.ca_file!r}, "
            f"client_cert={destination.client_cert!r}, client_key={destination.client_key!r}): {error}"
        ) from error
    return context


class AiohttpClient:
    """HttpClient on an aiohttp session with a keep-alive connection pool."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> HttpReply:
        try:
            # No redirects: a signed request or a bearer token must not follow a redirect elsewhere.
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                text = (await response.read())[:200].decode("utf-8", errors="replace")
                return HttpReply(response.status, text, _retry_after(response.headers.get("Retry-After")))
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise TransportError(f"{type(error).__name__}: {error}") from error


@asynccontextmanager
async def aiohttp_client(destination: Destination, tls: ssl.SSLContext | None) -> AsyncIterator[HttpClient]:
    """Open an AiohttpClient for `destination` and close its connections on exit."""
    timeout = aiohttp.ClientTimeout(total=destination.timeout_s)
    connector = aiohttp.TCPConnector(limit=destination.max_in_flight, keepalive_timeout=60, ssl=tls if tls is not None else True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        yield AiohttpClient(session)


def _retry_after(value: str | None) -> float | None:
    """Seconds of a Retry-After header in its delay form; the HTTP-date form is ignored."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


# Outcomes and the circuit breaker


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    PERMANENT = "permanent"
    RETRY = "retry"


@dataclasses.dataclass(frozen=True, slots=True)
class AttemptResult:
    outcome: Outcome
    status: int | None
    detail: str
    retry_after_s: float | None = None


def classify(reply: HttpReply) -> AttemptResult:
    """Map a response to the delivery contract: 2xx/409 delivered, other 4xx permanent, the rest retried.

    408 and 429 are retried like 5xx. A 1xx or 3xx status is retried too, because a redirect
    is not followed and dropping an alarm is never the safe choice.
    """
    status = reply.status
    if 200 <= status < 300 or status == 409:
        return AttemptResult(Outcome.DELIVERED, status, f"HTTP {status}")
    detail = f"HTTP {status}: {reply.text}".strip()
    if 400 <= status < 500 and status not in (408, 429):
        return AttemptResult(Outcome.PERMANENT, status, detail)
    return AttemptResult(Outcome.RETRY, status, detail, reply.retry_after_s)


class Circuit(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CIRCUIT_GAUGE_VALUE = {Circuit.CLOSED: 0, Circuit.HALF_OPEN: 1, Circuit.OPEN: 2}


class CircuitBreaker:
    """Closed: send freely. Open: send nothing until the probe time. Half open: one probe.

    Times are monotonic seconds. `on_transition(old, new, reason)` runs on every state change.
    """

    def __init__(
        self,
        threshold: int,
        probe_backoff: Backoff,
        on_transition: Callable[[Circuit, Circuit, str], None],
    ) -> None:
        self.threshold = threshold
        self.state = Circuit.CLOSED
        self.consecutive_failures = 0
        self.failed_probes = 0
        self.probe_at = 0.0
        self.probe_in_flight = False
        self._backoff = probe_backoff
        self._on_transition = on_transition

    def admits(self, now: float) -> bool:
        """Return whether a request may start now. An open breaker turns half open at its probe time."""
        if self.state is Circuit.OPEN and now >= self.probe_at:
            self._move(Circuit.HALF_OPEN, "probe time reached")
        if self.state is Circuit.HALF_OPEN:
            return not self.probe_in_flight
        return self.state is Circuit.CLOSED

    def started(self) -> bool:
        """Note that a request starts; return True when it is the half-open probe."""
        if self.state is Circuit.HALF_OPEN:
            self.probe_in_flight = True
            return True
        return False

    def succeeded(self) -> None:
        self.consecutive_failures = 0
        self.probe_in_flight = False
        if self.state is not Circuit.CLOSED:
            self.failed_probes = 0
            self._backoff.reset()
            self._move(Circuit.CLOSED, "the command centre responded")

    def failed(self, now: float, *, probe: bool, detail: str) -> None:
        self.consecutive_failures += 1
        if probe:
            self.probe_in_flight = False
            self.failed_probes += 1
            self._open(now, f"probe failed: {detail}")
        elif self.state is Circuit.CLOSED and self.consecutive_failures >= self.threshold:
            self._open(now, f"{self.consecutive_failures} consecutive failures, last: {detail}")

    def _open(self, now: float, reason: str) -> None:
        self.probe_at = now + self._backoff.next_delay()
        self._move(Circuit.OPEN, reason)

    def _move(self, new: Circuit, reason: str) -> None:
        old, self.state = self.state, new
        if old is not new:
            self._on_transition(old, new, reason)


# Metrics that gateway/metrics.py does not define


class ForwardMetrics:
    """Circuit and trouble metrics, registered once per Prometheus registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.circuit_state = Gauge(
            "gateway_forward_circuit_state", "Circuit breaker per destination: 0 closed, 1 half open, 2 open",
            ["destination"], registry=registry,
        )
        self.circuit_transitions = Counter(
            "gateway_forward_circuit_transitions", "Circuit breaker state changes", ["destination", "state"], registry=registry,
        )
        self.oldest_pending = Gauge(
            "gateway_forward_oldest_pending_seconds", "Age of the oldest undelivered event per destination",
            ["destination"], registry=registry,
        )
        self.troubles = Counter(
            "gateway_forward_troubles", "Forwarding troubles raised", ["kind"], registry=registry,
        )


_forward_metrics: weakref.WeakKeyDictionary[CollectorRegistry, ForwardMetrics] = weakref.WeakKeyDictionary()


def forward_metrics(metrics: Metrics) -> ForwardMetrics:
    registry = metrics.registry
    if registry not in _forward_metrics:
        _forward_metrics[registry] = ForwardMetrics(registry)
    return _forward_metrics[registry]


# Journal writes


def _write_delivered(seq: int, at: float, status: int | None) -> Callable[[sqlite3.Connection], None]:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            """UPDATE outbox SET state = 'delivered', attempts = attempts + 1, delivered_at = ?, next_attempt_at = 0,
                   first_attempt_at = COALESCE(first_attempt_at, ?) WHERE seq = ?""",
            (at, at, seq),
        )
        _upsert_delivery(conn, seq, at, status, confirmed=True)

    return write


def _write_failed(seq: int, at: float, result: AttemptResult, next_attempt_at: float) -> Callable[[sqlite3.Connection], None]:
    error = result.detail[:ERROR_TEXT_LIMIT]

    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            """UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?,
                   first_attempt_at = COALESCE(first_attempt_at, ?) WHERE seq = ?""",
            (error, next_attempt_at, at, seq),
        )
        _upsert_delivery(conn, seq, at, result.status, confirmed=False)

    return write


def _write_dead(seq: int, event_id: str, destination: str, at: float, result: AttemptResult) -> Callable[[sqlite3.Connection], None]:
    error = result.detail[:ERROR_TEXT_LIMIT]

    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            """UPDATE outbox SET state = 'dead', attempts = attempts + 1, last_error = ?, next_attempt_at = 0,
                   first_attempt_at = COALESCE(first_attempt_at, ?) WHERE seq = ?""",
            (error, at, seq),
        )
        _upsert_delivery(conn, seq, at, result.status, confirmed=False)
        conn.execute(
            "INSERT INTO dead_letters (seq, event_id, destination, dead_at, status, reason) VALUES (?, ?, ?, ?, ?, ?)",
            (seq, event_id, destination, at, result.status, error),
        )

    return write


def _upsert_delivery(conn: sqlite3.Connection, seq: int, at: float, status: int | None, *, confirmed: bool) -> None:
    conn.execute(
        """INSERT INTO deliveries (seq, last_attempt_at, last_status, confirmed_status) VALUES (?, ?, ?, ?)
           ON CONFLICT (seq) DO UPDATE SET last_attempt_at = excluded.last_attempt_at,
               last_status = excluded.last_status, confirmed_status = excluded.confirmed_status""",
        (seq, at, status, status if confirmed else None),
    )


def _write_circuit(destination: str, circuit: Circuit, at: float, error: str) -> Callable[[sqlite3.Connection], None]:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            """INSERT INTO destination_status (destination, circuit, changed_at, last_error) VALUES (?, ?, ?, ?)
               ON CONFLICT (destination) DO UPDATE SET circuit = excluded.circuit, changed_at = excluded.changed_at,
                   last_error = excluded.last_error""",
            (destination, circuit.value, at, error[:ERROR_TEXT_LIMIT]),
        )

    return write


def _log_write_failure(description: str) -> Callable[[asyncio.Future], None]:
    def check(future: asyncio.Future) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            log.error("journal write failed: %s: %s", description, error)

    return check


class WriteBatcher:
    """Collects a link's journal writes for up to `delay_s` into one journal operation.

    Under load this turns a write per delivery into a few writes per second. The writes run in
    the order they were added. When one raises, the whole batch is rolled back and logged, so
    its rows are sent again after a restart and the centres respond with 409.
    """

    def __init__(self, journal: Journal, delay_s: float = 0.01) -> None:
        self._journal = journal
        self._delay_s = delay_s
        self._ops: list[tuple[Callable[[sqlite3.Connection], None], str]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, op: Callable[[sqlite3.Connection], None], description: str) -> None:
        self._ops.append((op, description))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._ops:
            return
        ops, self._ops = self._ops, []

        def write(conn: sqlite3.Connection) -> None:
            for op, _ in ops:
                op(conn)

        described = ops[0][1] if len(ops) == 1 else f"{ops[0][1]} and {len(ops) - 1} more delivery records"
        self._journal.submit(write).add_done_callback(_log_write_failure(described))


# Forwarding troubles


class TroubleKind(enum.StrEnum):
    DEAD_LETTER = "dead_letter"
    UNCONFIRMED = "unconfirmed"


class TroubleReporter:
    """Raises and restores forwarding troubles (Contact ID 354) and records them in the journal.

    Several events can be in trouble on one pseudo-device and kind at once, but the incident
    engine sees them as one condition (same device, code and zone). So the signal goes out for
    the first event that raises the condition and its restore for the last one that clears it.

    The signal goes out before its record is durable, so a crash in between raises it once more
    after the restart. The gateway accepts that repeat because the alternative risks a trouble
    that is never raised.
    """

    def __init__(self, emit: EmitTrouble | None, journal: Journal, metrics: ForwardMetrics, clock: Callable[[], float]) -> None:
        self._emit = emit
        self._journal = journal
        self._metrics = metrics
        self._clock = clock
        self._open: dict[tuple[str, TroubleKind], set[str]] | None = None

    def _open_troubles(self) -> dict[tuple[str, TroubleKind], set[str]]:
        """Return the events in trouble per (device, kind), loaded from the journal on first use."""
        if self._open is None:
            self._open = collections.defaultdict(set)
            rows = self._journal.reader.execute("SELECT event_id, kind, device_id FROM forward_troubles WHERE restored_at IS NULL")
            for event_id, kind, device_id in rows:
                self._open[(device_id, TroubleKind(kind))].add(event_id)
        return self._open

    def raised(self, event_id: str, kind: TroubleKind, device_id: str) -> bool:
        """Return whether a trouble of `kind` for `event_id` is raised and not yet restored."""
        return event_id in self._open_troubles().get((device_id, kind), ())

    def raise_trouble(self, event_id: str, kind: TroubleKind, device_id: str, text: str) -> None:
        now = self._clock()
        log.error("forwarding trouble on %s: %s", device_id, text)
        self._metrics.troubles.labels(kind.value).inc()
        events = self._open_troubles()[(device_id, kind)]
        if not events:
            self._send(device_id, kind, Qualifier.NEW, text, now)
        events.add(event_id)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                """INSERT INTO forward_troubles (event_id, kind, device_id, raised_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT (event_id, kind, device_id) DO UPDATE SET raised_at = excluded.raised_at, restored_at = NULL""",
                (event_id, kind.value, device_id, now),
            )

        self._journal.submit(write).add_done_callback(_log_write_failure(f"record trouble for event {event_id}"))

    def restore_trouble(self, event_id: str, kind: TroubleKind, device_id: str, text: str) -> None:
        now = self._clock()
        log.info("forwarding trouble on %s restored: %s", device_id, text)
        events = self._open_troubles()[(device_id, kind)]
        events.discard(event_id)
        if not events:
            self._send(device_id, kind, Qualifier.RESTORE, text, now)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE forward_troubles SET restored_at = ? WHERE event_id = ? AND kind = ? AND device_id = ?",
                (now, event_id, kind.value, device_id),
            )

        self._journal.submit(write).add_done_callback(_log_write_failure(f"record trouble restore for event {event_id}"))

    def _send(self, device_id: str, kind: TroubleKind, qualifier: Qualifier, text: str, now: float) -> None:
        if self._emit is None:
            return
        signal = trouble_signal(device_id, kind, qualifier, text, dt.datetime.fromtimestamp(now, dt.timezone.utc))
        try:
            self._emit(signal)
        except Exception:
            log.exception("emitting forwarding trouble signal %s for %s failed", signal.id, device_id)


def trouble_signal(device_id: str, kind: TroubleKind, qualifier: Qualifier, text: str, at: dt.datetime) -> Signal:
    """Build a forwarding trouble: Contact ID 354 from the pseudo-device forward:<destinations>."""
    zone = DEAD_LETTER_ZONE if kind is TroubleKind.DEAD_LETTER else UNCONFIRMED_ZONE
    return supervision_signal(device_id, TROUBLE_CODE, qualifier, text, at, zone=zone)


def is_forwarding_trouble(device_id: str) -> bool:
    return device_id.startswith(TROUBLE_DEVICE_PREFIX)


# Outbox rows in memory


class _BodySummary(msgspec.Struct):
    kind: str
    device: event_body.DeviceBody
    signal: event_body.SignalBody | None
    test: bool = False


_summary_decoder = msgspec.json.Decoder(_BodySummary)


class OutboxRow:
    """One pending outbox row of one destination, with its retry state."""

    __slots__ = ("seq", "event_id", "incident_id", "event_class", "created_at", "body", "attempts", "ready_at", "backoff", "device_id", "fire_alarm")

    def __init__(self, seq: int, event_id: str, incident_id: str, event_class: str, created_at: float, body: bytes, attempts: int) -> None:
        self.seq = seq
        self.event_id = event_id
        self.incident_id = incident_id
        self.event_class = event_class
        self.created_at = created_at
        self.body = body
        self.attempts = attempts
        self.ready_at = 0.0
        self.backoff: Backoff | None = None
        summary = _summarise(body)
        self.device_id = summary.device.id if summary else ""
        self.fire_alarm = bool(
            summary
            and event_class == EventClass.FIRE.value
            and summary.kind == "signal"
            and summary.signal is not None
            and summary.signal.qualifier != Qualifier.RESTORE.value
            and not summary.test
        )

    @property
    def queue_key(self) -> str:
        """Rows with one key go strictly in order: the incident, or the event alone."""
        return self.incident_id or f"event:{self.event_id}"

    @property
    def priority(self) -> int:
        try:
            return PRIORITY[EventClass(self.event_class)]
        except ValueError:
            return len(PRIORITY)


def _summarise(body: bytes) -> _BodySummary | None:
    try:
        return _summary_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("outbox body is not a valid event; it is sent as stored")
        return None


_ROW_COLUMNS = "seq, event_id, incident_id, event_class, created_at, body, attempts"


# The 100 s confirmation limit


@dataclasses.dataclass
class _Watched:
    event_id: str
    device_id: str
    deadline: float
    destinations: set[str]
    trouble_device: str = ""


class ConfirmationWatch:
    """Raises a trouble for each fire alarm that no destination confirmed within the limit.

    Links report the fire alarms they load and the events they deliver. `check` runs from every
    link's loop, so the watch needs no task of its own and fires within POLL_INTERVAL_S of the
    deadline. Deadlines count from the outbox row's `created_at`, the signal's receipt.
    """

    RECENT_LIMIT = 100_000

    def __init__(self, limit_s: float, journal: Journal, troubles: TroubleReporter, started_at: float) -> None:
        self.limit_s = limit_s
        self._started_at = started_at
        self._journal = journal
        self._troubles = troubles
        self._watched: dict[str, _Watched] = {}
        self._deadlines: list[tuple[float, str]] = []
        # Events confirmed lately, so that a link loading the row late does not watch it again.
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()

    def track(self, row: OutboxRow, destination: str) -> None:
        entry = self._watched.get(row.event_id)
        if entry is not None:
            entry.destinations.add(destination)
            return
        if row.event_id in self._recent:
            return
        # Only an event from before this start can have been confirmed, or have had its trouble
        # raised, outside this process's memory.
        earlier = row.created_at < self._started_at
        if earlier and self._delivered_anywhere(row.event_id):
            return
        entry = _Watched(row.event_id, row.device_id, row.created_at + self.limit_s, {destination})
        entry.trouble_device = self._raised_device(row.event_id) if earlier else ""
        self._watched[row.event_id] = entry
        heapq.heappush(self._deadlines, (entry.deadline, row.event_id))

    def confirmed(self, event_id: str, destination: str) -> None:
        self._recent[event_id] = None
        if len(self._recent) > self.RECENT_LIMIT:
            self._recent.popitem(last=False)
        entry = self._watched.pop(event_id, None)
        if entry is None or not entry.trouble_device:
            return
        self._troubles.restore_trouble(
            event_id,
            TroubleKind.UNCONFIRMED,
            entry.trouble_device,
            f"fire alarm {event_id} from device {entry.device_id} confirmed by command centre {destination}",
        )

    def check(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, event_id = heapq.heappop(self._deadlines)
            entry = self._watched.get(event_id)
            if entry is None or entry.trouble_device:
                continue
            entry.trouble_device = TROUBLE_DEVICE_PREFIX + ",".join(sorted(entry.destinations))
            self._troubles.raise_trouble(
                event_id,
                TroubleKind.UNCONFIRMED,
                entry.trouble_device,
                f"fire alarm {event_id} from device {entry.device_id} not confirmed by any command centre "
                f"within {self.limit_s:.0f} s ({', '.join(sorted(entry.destinations))})",
            )

    def _delivered_anywhere(self, event_id: str) -> bool:
        row = self._journal.reader.execute(
            "SELECT 1 FROM outbox WHERE event_id = ? AND state = 'delivered' LIMIT 1", (event_id,)
        ).fetchone()
        return row is not None

    def _raised_device(self, event_id: str) -> str:
        row = self._journal.reader.execute(
            "SELECT device_id FROM forward_troubles WHERE event_id = ? AND kind = ? AND restored_at IS NULL LIMIT 1",
            (event_id, TroubleKind.UNCONFIRMED.value),
        ).fetchone()
        return row[0] if row else ""


# One destination


class DestinationLink:
    """Delivery to one command centre: a cursor over the outbox, per-incident queues, a breaker."""

    def __init__(
        self,
        destination: Destination,
        journal: Journal,
        metrics: Metrics,
        *,
        watch: ConfirmationWatch | None = None,
        troubles: TroubleReporter | None = None,
        client_factory: ClientFactory = aiohttp_client,
        clock: Callable[[], float] = time.time,
        breaker_threshold: int = BREAKER_THRESHOLD,
    ) -> None:
        if destination.max_in_flight < 1:
            raise ForwarderError(f"destination {destination.name}: max_in_flight {destination.max_in_flight} must be 1 or more")
        self.destination = destination
        self._journal = journal
        self._metrics = metrics
        self._forward_metrics = forward_metrics(metrics)
        self._tls = tls_context(destination)
        self._client_factory = client_factory
        self._clock = clock
        self._watch = watch
        self._troubles = troubles or TroubleReporter(None, journal, self._forward_metrics, clock)
        self._url = destination.url.rstrip("/") + "/v1/events"
        self._writes = WriteBatcher(journal)
        self._wake = asyncio.Event()
        self._fetch_due = True
        self.breaker = CircuitBreaker(breaker_threshold, Backoff(PROBE_INITIAL_S, PROBE_CAP_S), self._circuit_changed)
        self._forward_metrics.circuit_state.labels(destination.name).set(0)
        self._delivered_counter = metrics.forward_delivered.labels(destination.name)
        self._latency_histogram = metrics.forward_latency.labels(destination.name)
        self.delivered = 0
        self._reset()

    def _reset(self) -> None:
        self._cursor = 0
        self._queues: dict[str, collections.deque[OutboxRow]] = {}
        self._known: set[int] = set()
        self._dead_troubles: set[int] = set()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        # Heads ready to send: (priority, seq, queue key); heads waiting to retry: (ready_at, seq, key).
        self._ready: list[tuple[int, int, str]] = []
        self._delayed: list[tuple[float, int, str]] = []
        self._last_error = ""
        self.breaker.probe_in_flight = False
        self._fetch_due = True

    def wake(self) -> None:
        """Note that new outbox rows may be committed, and let the link fetch them."""
        self._fetch_due = True
        self._wake.set()

    @property
    def backlog(self) -> int:
        """Rows of this destination held in memory, not yet delivered or dead-lettered."""
        return len(self._known)

    async def run(self) -> None:
        """Deliver until cancelled; a restart after a crash starts again from the outbox."""
        self._reset()
        loop = asyncio.get_running_loop()
        # Recorded at start so that `gateway outbox` lists every configured destination.
        self._writes.add(
            _write_circuit(self.destination.name, self.breaker.state, self._clock(), ""), f"record circuit state of {self.destination.name}"
        )
        async with self._client_factory(self.destination, self._tls) as client:
            try:
                next_poll = 0.0
                while True:
                    self._wake.clear()
                    now = loop.time()
                    # A completed attempt wakes the loop too, but only wake() or the poll
                    # interval can mean new rows.
                    if self._fetch_due or now >= next_poll:
                        self._fetch_due = False
                        self._fetch_new(now)
                    if now >= next_poll:
                        self._fetch_requeued(now)
                        self._update_gauges()
                        next_poll = now + POLL_INTERVAL_S
                    if self._watch is not None:
                        self._watch.check(self._clock())
                    self._dispatch(client, now)
                    timeout = max(0.0, min(next_poll, self._next_timer()) - loop.time())
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=timeout)
                    except TimeoutError:
                        pass
            finally:
                tasks = list(self._in_flight.values())
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self._writes.flush()

    # Loading rows

    def _fetch_new(self, now: float) -> None:
        while len(self._known) < MAX_BUFFERED:
            limit = min(FETCH_LIMIT, MAX_BUFFERED - len(self._known))
            rows = self._journal.reader.execute(
                f"""SELECT {_ROW_COLUMNS} FROM outbox
                    WHERE destination = ? AND state = 'pending' AND seq > ? ORDER BY seq LIMIT ?""",
                (self.destination.name, self._cursor, limit),
            ).fetchall()
            for values in rows:
                self._add(OutboxRow(*values), now)
                self._cursor = values[0]
            if len(rows) < limit:
                return

    def _fetch_requeued(self, now: float) -> None:
        marks = self._journal.reader.execute(
            """SELECT r.seq, o.state FROM outbox_requeue r JOIN outbox o ON o.seq = r.seq
               WHERE o.destination = ? ORDER BY r.seq""",
            (self.destination.name,),
        ).fetchall()
        if not marks:
            return
        for seq, state in marks:
            if state != "pending" or seq in self._known or seq > self._cursor:
                continue
            values = self._journal.reader.execute(f"SELECT {_ROW_COLUMNS} FROM outbox WHERE seq = ?", (seq,)).fetchone()
            row = OutboxRow(*values)
            log.info("event %s requeued for %s; sending it again", row.event_id, self.destination.name)
            self._add(row, now)
        done = [seq for seq, _ in marks]

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM outbox_requeue WHERE seq = ?", [(seq,) for seq in done])

        self._writes.add(write, "delete requeue marks")

    def _add(self, row: OutboxRow, now: float) -> None:
        self._known.add(row.seq)
        if row.attempts and self._troubles.raised(row.event_id, TroubleKind.DEAD_LETTER, self._trouble_device):
            self._dead_troubles.add(row.seq)
        if row.fire_alarm and self._watch is not None:
            self._watch.track(row, self.destination.name)
        queue = self._queues.get(row.queue_key)
        if queue is None:
            queue = self._queues[row.queue_key] = collections.deque()
        # A requeued row may be older than rows already queued, so it goes in seq order, behind
        # the head when the head is in flight.
        position = len(queue)
        floor = 1 if row.queue_key in self._in_flight else 0
        while position > floor and queue[position - 1].seq > row.seq:
            position -= 1
        queue.insert(position, row)
        if position == 0:
            self._schedule_head(row.queue_key, now)

    def _schedule_head(self, key: str, now: float) -> None:
        head = self._queues[key][0]
        if head.ready_at <= now:
            heapq.heappush(self._ready, (head.priority, head.seq, key))
        else:
            heapq.heappush(self._delayed, (head.ready_at, head.seq, key))

    def _is_current(self, key: str, seq: int) -> bool:
        """Return whether a heap entry still names the idle head of its queue."""
        queue = self._queues.get(key)
        return queue is not None and queue[0].seq == seq and key not in self._in_flight

    # Sending

    def _dispatch(self, client: HttpClient, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, seq, key = heapq.heappop(self._delayed)
            if self._is_current(key, seq):
                head = self._queues[key][0]
                heapq.heappush(self._ready, (head.priority, seq, key))
        while len(self._in_flight) < self.destination.max_in_flight and self.breaker.admits(now):
            key = self._next_key()
            if key is None:
                return
            probe = self.breaker.started()
            row = self._queues[key][0]
            self._in_flight[key] = asyncio.create_task(self._deliver(client, key, row, probe))

    def _next_key(self) -> str | None:
        while self._ready:
            _, seq, key = heapq.heappop(self._ready)
            if self._is_current(key, seq):
                return key
        if self.breaker.state is not Circuit.HALF_OPEN:
            return None
        # A probe need not wait for its row's own retry time: the breaker already spaced it.
        while self._delayed:
            _, seq, key = heapq.heappop(self._delayed)
            if self._is_current(key, seq):
                return key
        return None

    def _next_timer(self) -> float:
        candidates = [float("inf")]
        if self._delayed and self.breaker.state is Circuit.CLOSED:
            candidates.append(self._delayed[0][0])
        if self.breaker.state is Circuit.OPEN:
            candidates.append(self.breaker.probe_at)
        return min(candidates)

    async def _deliver(self, client: HttpClient, key: str, row: OutboxRow, probe: bool) -> None:
        try:
            result = await self._attempt(client, row)
            row.attempts += 1
            self._settle(key, row, result, probe)
        finally:
            self._in_flight.pop(key, None)
            queue = self._queues.get(key)
            if queue:
                self._schedule_head(key, asyncio.get_running_loop().time())
            self._wake.set()

    async def _attempt(self, client: HttpClient, row: OutboxRow) -> AttemptResult:
        destination = self.destination
        # The forwarding time and the signature use the real clock, which the receiver checks.
        body = event_body.stamp_forwarded(row.body, dt.datetime.now(dt.timezone.utc))
        headers = {"Content-Type": "application/json", signing.IDEMPOTENCY_HEADER: row.event_id}
        if destination.secret:
            headers.update(signing.signed_headers(destination.secret, body))
        if destination.bearer_token:
            headers["Authorization"] = f"Bearer {destination.bearer_token}"
        try:
            reply = await client.post(self._url, body, headers)
        except TransportError as error:
            self._metrics.forward_failures.labels(destination.name, "connection").inc()
            return AttemptResult(Outcome.RETRY, None, str(error))
        result = classify(reply)
        if result.outcome is Outcome.PERMANENT:
            self._metrics.forward_failures.labels(destination.name, "permanent").inc()
        elif result.outcome is Outcome.RETRY:
            self._metrics.forward_failures.labels(destination.name, "http").inc()
        return result

    def _settle(self, key: str, row: OutboxRow, result: AttemptResult, probe: bool) -> None:
        now = self._clock()
        if result.outcome is Outcome.RETRY:
            self._last_error = result.detail
            self.breaker.failed(asyncio.get_running_loop().time(), probe=probe, detail=result.detail)
            self._schedule_retry(row, result, now, probe)
            return
        self.breaker.succeeded()
        self._remove_head(key, row)
        if result.outcome is Outcome.DELIVERED:
            self._confirm(row, result, now)
        else:
            self._dead_letter(row, result, now)

    def _schedule_retry(self, row: OutboxRow, result: AttemptResult, now: float, probe: bool) -> None:
        if row.backoff is None:
            row.backoff = Backoff(RETRY_INITIAL_S, RETRY_CAP_S)
        delay = row.backoff.next_delay()
        if result.retry_after_s is not None:
            delay = max(delay, min(result.retry_after_s, RETRY_CAP_S))
        row.ready_at = asyncio.get_running_loop().time() + delay
        self._writes.add(_write_failed(row.seq, now, result, now + delay), f"record failed attempt of event {row.event_id}")
        if probe and self.breaker.failed_probes % PROBE_LOG_EVERY != 1:
            log.debug("probe of %s with event %s failed (%s)", self.destination.name, row.event_id, result.detail)
            return
        log.warning(
            "delivery of event %s to %s failed (%s); attempt %d, next in %.1f s%s",
            row.event_id,
            self.destination.name,
            result.detail,
            row.attempts,
            delay,
            f"; circuit open, {self.breaker.failed_probes} probes failed" if probe else "",
        )

    def _remove_head(self, key: str, row: OutboxRow) -> None:
        queue = self._queues[key]
        queue.popleft()
        if not queue:
            del self._queues[key]
        self._known.discard(row.seq)

    def _confirm(self, row: OutboxRow, result: AttemptResult, now: float) -> None:
        name = self.destination.name
        self.delivered += 1
        self._delivered_counter.inc()
        self._latency_histogram.observe(max(0.0, now - row.created_at))
        self._writes.add(_write_delivered(row.seq, now, result.status), f"record delivery of event {row.event_id}")
        log.debug("event %s delivered to %s (%s, attempt %d)", row.event_id, name, result.detail, row.attempts)
        if self._watch is not None:
            self._watch.confirmed(row.event_id, name)
        if row.seq in self._dead_troubles:
            self._dead_troubles.discard(row.seq)
            self._troubles.restore_trouble(
                row.event_id, TroubleKind.DEAD_LETTER, self._trouble_device, f"event {row.event_id} delivered to {name} after requeue"
            )

    def _dead_letter(self, row: OutboxRow, result: AttemptResult, now: float) -> None:
        name = self.destination.name
        self._dead_troubles.discard(row.seq)
        self._metrics.forward_dead.labels(name).inc()
        self._writes.add(_write_dead(row.seq, row.event_id, name, now, result), f"dead-letter event {row.event_id}")
        log.error(
            "command centre %s rejected event %s permanently (%s); dead-lettered, send it again with "
            "`gateway outbox requeue %s --destination %s`",
            name,
            row.event_id,
            result.detail,
            row.event_id,
            name,
        )
        # A forwarding trouble about a forwarding trouble would loop when a centre rejects everything.
        if is_forwarding_trouble(row.device_id):
            return
        self._troubles.raise_trouble(
            row.event_id,
            TroubleKind.DEAD_LETTER,
            self._trouble_device,
            f"command centre {name} rejected event {row.event_id} from device {row.device_id}: {result.detail}",
        )

    @property
    def _trouble_device(self) -> str:
        return TROUBLE_DEVICE_PREFIX + self.destination.name

    # State reporting

    def _circuit_changed(self, old: Circuit, new: Circuit, reason: str) -> None:
        name = self.destination.name
        self._forward_metrics.circuit_state.labels(name).set(CIRCUIT_GAUGE_VALUE[new])
        self._forward_metrics.circuit_transitions.labels(name, new.value).inc()
        if new is Circuit.HALF_OPEN:
            log.debug("circuit to %s half open: %s", name, reason)
            return
        if new is Circuit.OPEN and old is Circuit.HALF_OPEN:
            log.debug("circuit to %s open again: %s", name, reason)
            return
        if new is Circuit.OPEN:
            log.warning("circuit to %s opened (%s); sending one probe at a time until it responds", name, reason)
        else:
            log.info("circuit to %s closed: %s; delivering %d waiting events", name, reason, len(self._known))
            self._release_delayed()
        self._writes.add(_write_circuit(name, new, self._clock(), self._last_error if new is Circuit.OPEN else ""), f"record circuit state of {name}")

    def _release_delayed(self) -> None:
        """Make every waiting head ready at once: their failures were the centre's outage."""
        now = asyncio.get_running_loop().time()
        delayed, self._delayed = self._delayed, []
        for _, seq, key in delayed:
            if self._is_current(key, seq):
                head = self._queues[key][0]
                head.ready_at = now
                if head.backoff is not None:
                    head.backoff.reset()
                heapq.heappush(self._ready, (head.priority, seq, key))

    def _update_gauges(self) -> None:
        name = self.destination.name
        row = self._journal.reader.execute(
            "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE destination = ? AND state = 'pending'", (name,)
        ).fetchone()
        self._metrics.outbox_pending.labels(name).set(row[0])
        self._forward_metrics.oldest_pending.labels(name).set(0.0 if row[1] is None else max(0.0, self._clock() - row[1]))


class Forwarder:
    """The links to every destination, the shared confirmation watch and trouble reporting.

    `emit_trouble` receives each forwarding trouble signal and must not block; without it the
    troubles are only logged and recorded.
    """

    def __init__(
        self,
        destinations: Sequence[Destination],
        journal: Journal,
        metrics: Metrics,
        emit_trouble: EmitTrouble | None = None,
        *,
        confirm_limit_s: float = CONFIRM_LIMIT_S,
        clock: Callable[[], float] = time.time,
        client_factory: ClientFactory = aiohttp_client,
        breaker_threshold: int = BREAKER_THRESHOLD,
    ) -> None:
        self.troubles = TroubleReporter(emit_trouble, journal, forward_metrics(metrics), clock)
        self.watch = ConfirmationWatch(confirm_limit_s, journal, self.troubles, clock())
        self.links = {
            destination.name: DestinationLink(
                destination,
                journal,
                metrics,
                watch=self.watch,
                troubles=self.troubles,
                client_factory=client_factory,
                clock=clock,
                breaker_threshold=breaker_threshold,
            )
            for destination in destinations
        }

    def wake(self) -> None:
        for link in self.links.values():
            link.wake()
