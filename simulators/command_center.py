"""A stand-in for a fire-police command centre: an HTTP server that records forwarded events.

It implements the receiving side of `POST /v1/events` as the gateway's forwarder expects it:
an `Idempotency-Key` header, an optional HMAC signature, and a body that decodes as
`gateway.event_body.EventBody`. A first-time key is recorded and gets 201 Created, a repeated
key gets 409 Conflict and is not recorded again. Faults (outage, 5xx, slowness, rejected events) are
injected at start or at run time through `POST /control`, so tests can drive the forwarder's
retry and dead-letter paths against a real HTTP server. With an `ssl_context` it serves HTTPS;
`server_tls_context` builds one that demands a client certificate, for mutual TLS.

Endpoints:
    POST /v1/events   receive one event
    GET  /v1/events   the recorded entries, oldest first
    GET  /healthz     liveness
    POST /control     set a fault mode: {"mode": "fail_next", "count": 3}

NOTE: `/control` has no authentication, so bind the simulator only to loopback or a test network.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import logging
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Literal

import msgspec
from aiohttp import web

from gateway import event_body
from gateway.signing import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

log = logging.getLogger(__name__)

EVENTS_PATH = "/v1/events"
FAULT_MODES = ("normal", "down", "fail_next", "fail_event", "slow", "reject_event", "duplicate_confirm")
# Statuses that `fail_next` may respond with, which are the ones the gateway retries.
RETRYABLE_STATUSES = frozenset({408, 429, *range(500, 600)})

# Seconds that stop() lets a request in progress, such as one delayed by `slow`, finish.
SHUTDOWN_TIMEOUT_S = 1.0

Entry = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One `POST /v1/events` request and the response to it, as the server saw them."""

    headers: dict[str, str]
    body: bytes
    status: int
    response_headers: dict[str, str]
    response_body: bytes


@dataclasses.dataclass
class Faults:
    """Faults injected into responses to `POST /v1/events`; several can be active at once."""

    down: bool = False
    """Respond 503 to every event."""
    fail_next: int = 0
    """Respond `fail_status` to this many of the next events."""
    fail_status: int = 500
    """The status of the `fail_next` responses."""
    fail_event_ids: set[str] = dataclasses.field(default_factory=set)
    """Respond 500 to events with these event ids, every time, until cleared."""
    slow_s: float = 0.0
    """Delay every response to an event by this many seconds."""
    reject_event_ids: set[str] = dataclasses.field(default_factory=set)
    """Respond 400 to events with these event ids."""
    duplicate_confirm: bool = False
    """Record new events as usual but respond 409 instead of 201."""

    def to_json(self) -> dict[str, Any]:
        return {
            "down": self.down,
            "fail_next": self.fail_next,
            "fail_status": self.fail_status,
            "fail_event_ids": sorted(self.fail_event_ids),
            "slow_s": self.slow_s,
            "reject_event_ids": sorted(self.reject_event_ids),
            "duplicate_confirm": self.duplicate_confirm,
        }


class ControlRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of `POST /control`; `count`, `status`, `seconds` and `event_id` go with their modes."""

    mode: Literal["normal", "down", "fail_next", "fail_event", "slow", "reject_event", "duplicate_confirm"]
    count: int = 1
    status: int = 500
    seconds: float = 0.0
    event_id: str = ""


_control_decoder = msgspec.json.Decoder(ControlRequest)
_entry_encoder = msgspec.json.Encoder()


class CommandCenter:
    """An HTTP server that records the events the gateway forwards, with fault injection."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        secret: str = "",
        record_path: Path | None = None,
        faults: Faults | None = None,
        on_event: Callable[[Entry], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        record_exchanges: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.duplicates = 0
        self.status_counts: collections.Counter[int] = collections.Counter()
        self._secret = secret
        self._record_path = record_path
        self._faults = Faults()
        if faults is not None:
            # A copy, so that set_mode does not change the caller's object.
            self._faults = _copy_faults(faults)
        self._on_event = on_event
        self._ssl_context = ssl_context
        self.exchanges: list[Exchange] | None = [] if record_exchanges else None
        """Every request to `POST /v1/events` with its response, when `record_exchanges` is set."""
        self._events: list[Entry] = []
        self._keys: set[str] = set()
        self._changed = asyncio.Event()
        self._record_file: BinaryIO | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def events(self) -> list[Entry]:
        """A copy of the recorded entries, oldest first."""
        return list(self._events)

    @property
    def faults(self) -> Faults:
        """A copy of the active faults."""
        return _copy_faults(self._faults)

    async def start(self) -> None:
        """Open the record file and bind the server; `port` is then the bound port.

        After `stop`, `start` binds the same port again and keeps the recorded events, so a
        test can take the centre down and bring it back at the same URL.
        """
        if self._runner is not None:
            raise RuntimeError(f"command centre simulator is already running at {self.url}")
        if self._record_path is not None:
            self._record_file = self._record_path.open("ab")

        app = web.Application()
        app.router.add_post(EVENTS_PATH, self._post_event)
        app.router.add_get(EVENTS_PATH, self._get_events)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_post("/control", self._post_control)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, ssl_context=self._ssl_context)
            await site.start()
        except OSError:
            await runner.cleanup()
            self._close_record_file()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("command centre simulator listening at %s, recording to %s", self.url, self._record_path)

    async def stop(self) -> None:
        if self._runner is None:
            return
        await self._runner.cleanup()
        self._runner = None
        self._close_record_file()
        log.info(
            "command centre simulator at %s stopped after recording %d events and %d duplicates",
            self.url,
            len(self._events),
            self.duplicates,
        )

    async def wait_for(self, predicate: Callable[[list[Entry]], bool], timeout: float) -> list[Entry]:
        """Wait until `predicate(events)` is true and return the events.

        Raises TimeoutError when the predicate is still false after `timeout` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self._events):
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"condition on the recorded events is still false after {timeout} s; "
                f"{len(self._events)} events recorded"
            ) from None
        return list(self._events)

    def set_mode(self, mode: str, *, count: int = 1, seconds: float = 0.0, event_id: str = "", status: int = 500) -> None:
        """Turn on a fault mode, or clear all faults with "normal".

        Modes:
            "down": 503 to every event.
            "fail_next": `status` (500 by default) to the next `count` events.
            "fail_event": 500 to every attempt of the event `event_id`, adding to earlier ids.
            "slow": delay every response by `seconds`.
            "reject_event": 400 to the event `event_id`, adding to earlier ids.
            "duplicate_confirm": record new events but respond 409.
        Raises ValueError for an unknown mode or an invalid argument.
        """
        if mode == "normal":
            self._faults = Faults()
        elif mode == "down":
            self._faults.down = True
        elif mode == "fail_next":
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"fail_next count {count!r} is invalid; give a whole number 0 or more")
            if status not in RETRYABLE_STATUSES:
                raise ValueError(f"fail_next status {status!r} is invalid; give 408, 429 or 500-599")
            self._faults.fail_next = count
            self._faults.fail_status = status
        elif mode == "fail_event":
            if not event_id:
                raise ValueError("fail_event needs the event_id of the event to fail")
            self._faults.fail_event_ids.add(event_id)
        elif mode == "slow":
            if not 0 <= seconds <= 3600:
                raise ValueError(f"slow delay {seconds!r} s is invalid; give seconds from 0 to 3600")
            self._faults.slow_s = seconds
        elif mode == "reject_event":
            if not event_id:
                raise ValueError("reject_event needs the event_id of the event to reject")
            self._faults.reject_event_ids.add(event_id)
        elif mode == "duplicate_confirm":
            self._faults.duplicate_confirm = True
        else:
            raise ValueError(f"fault mode {mode!r} is unknown; use one of {', '.join(FAULT_MODES)}")
        log.info("command centre simulator faults set to %s", self._faults.to_json())

    # HTTP handlers

    async def _post_event(self, request: web.Request) -> web.Response:
        # The delay comes first, so that a slow centre is slow for every response, errors included.
        if self._faults.slow_s > 0:
            await asyncio.sleep(self._faults.slow_s)
        body = await request.read()
        status, reply = self._receive(request.headers, body)
        self.status_counts[status] += 1
        response = web.json_response(reply, status=status)
        if self.exchanges is not None:
            assert isinstance(response.body, bytes)
            self.exchanges.append(Exchange(dict(request.headers), body, status, dict(response.headers), response.body))
        return response

    async def _get_events(self, request: web.Request) -> web.Response:
        return web.json_response(self._events)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "events": len(self._events)})

    async def _post_control(self, request: web.Request) -> web.Response:
        try:
            control = _control_decoder.decode(await request.read())
            self.set_mode(
                control.mode, count=control.count, seconds=control.seconds, event_id=control.event_id, status=control.status
            )
        except (msgspec.DecodeError, ValueError) as error:
            return web.json_response({"error": f"invalid control request: {error}"}, status=400)
        return web.json_response(self._faults.to_json())

    # Receiving an event

    def _receive(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """Check and record one event; return the HTTP status and the JSON response body."""
        if self._faults.down:
            return 503, {"error": "command centre is down (fault mode `down`)"}
        if self._faults.fail_next > 0:
            self._faults.fail_next -= 1
            return self._faults.fail_status, {"error": "injected server error (fault mode `fail_next`)"}

        key = headers.get(IDEMPOTENCY_HEADER, "")
        if not key:
            log.warning("event rejected: missing %s header", IDEMPOTENCY_HEADER)
            return 400, {"error": f"missing {IDEMPOTENCY_HEADER} header"}
        if self._secret:
            reason = self._check_signature(headers, body)
            if reason is not None:
                log.warning("event with key %s rejected: %s", key, reason)
                return 401, {"error": reason}
        try:
            event = event_body.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            log.warning("event with key %s rejected: body is invalid: %s", key, error)
            return 400, {"error": f"body is not a valid event: {error}"}

        if event.event_id in self._faults.fail_event_ids:
            return 500, {"error": f"event {event.event_id} failed (fault mode `fail_event`)"}
        if event.event_id in self._faults.reject_event_ids:
            return 400, {"error": f"event {event.event_id} rejected (fault mode `reject_event`)"}
        if key in self._keys:
            self.duplicates += 1
            return 409, {"status": "duplicate"}

        self._record(key, event)
        if self._faults.duplicate_confirm:
            return 409, {"status": "duplicate"}
        return 201, {"status": "recorded"}

    def _check_signature(self, headers: Mapping[str, str], body: bytes) -> str | None:
        timestamp = headers.get(TIMESTAMP_HEADER)
        if timestamp is None:
            return f"missing {TIMESTAMP_HEADER} header"
        signature = headers.get(SIGNATURE_HEADER)
        if signature is None:
            return f"missing {SIGNATURE_HEADER} header"
        return verify(self._secret, timestamp, body, signature)

    def _record(self, key: str, event: event_body.EventBody) -> None:
        entry: Entry = {
            "received_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "idempotency_key": key,
            "event": msgspec.to_builtins(event),
        }
        self._keys.add(key)
        self._events.append(entry)
        if self._record_file is not None:
            self._record_file.write(_entry_encoder.encode(entry) + b"\n")
            self._record_file.flush()

        # Waiters hold the old event, so setting it wakes them and later waits use a fresh one.
        self._changed.set()
        self._changed = asyncio.Event()

        if self._on_event is not None:
            try:
                self._on_event(entry)
            except Exception:
                log.exception("on_event callback failed for event with key %s; the event stays recorded", key)

    def _close_record_file(self) -> None:
        if self._record_file is not None:
            self._record_file.close()
            self._record_file = None


def _copy_faults(faults: Faults) -> Faults:
    return dataclasses.replace(faults, reject_event_ids=set(faults.reject_event_ids), fail_event_ids=set(faults.fail_event_ids))


def server_tls_context(cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> ssl.SSLContext:
    """Build a server TLS context; with `client_ca_file` a client must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca_file)
    return context


async def serve_forever(
    host: str = "127.0.0.1",
    port: int = 0,
    secret: str = "",
    record_path: Path | None = None,
    on_event: Callable[[Entry], None] | None = None,
    *,
    faults: Faults | None = None,
) -> None:
    """Run a command centre simulator until cancelled, calling `on_event` for each new entry."""
    center = CommandCenter(
        host=host, port=port, secret=secret, record_path=record_path, faults=faults, on_event=on_event
    )
    await center.start()
    try:
        await asyncio.Event().wait()
    finally:
        await center.stop()
