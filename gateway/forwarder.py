"""The forwarder: delivers outbox rows to command centres, one cursor per destination.

Each destination is served by its own task in outbox order, so the events of one incident
arrive in the order they were decided. A 2xx or 409 answer confirms delivery; another 4xx is
permanent and dead-letters the row; 5xx, timeouts and connection errors are retried with
capped, jittered backoff for as long as it takes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence

import aiohttp

from gateway import event_body, signing
from gateway.backoff import Backoff
from gateway.destinations import Destination
from gateway.journal import Journal
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

FETCH_LIMIT = 200


class OutboxRow:
    __slots__ = ("seq", "event_id", "incident_id", "created_at", "body", "attempts")

    def __init__(self, seq: int, event_id: str, incident_id: str, created_at: float, body: bytes, attempts: int) -> None:
        self.seq = seq
        self.event_id = event_id
        self.incident_id = incident_id
        self.created_at = created_at
        self.body = body
        self.attempts = attempts


class Attempt:
    DELIVERED = "delivered"
    PERMANENT = "permanent"
    RETRY = "retry"


def _mark_delivered(seq: int, attempts: int, at: float) -> Callable[[sqlite3.Connection], None]:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            """UPDATE outbox SET state = 'delivered', attempts = ?, delivered_at = ?,
                   first_attempt_at = COALESCE(first_attempt_at, ?) WHERE seq = ?""",
            (attempts, at, at, seq),
        )

    return write


def _mark_failed(seq: int, attempts: int, at: float, error: str, *, dead: bool) -> Callable[[sqlite3.Connection], None]:
    state = "dead" if dead else "pending"

    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            """UPDATE outbox SET state = ?, attempts = ?, last_error = ?,
                   first_attempt_at = COALESCE(first_attempt_at, ?) WHERE seq = ?""",
            (state, attempts, error[:500], at, seq),
        )

    return write


class DestinationLink:
    """Delivery to one command centre, with its own cursor over the outbox."""

    def __init__(self, destination: Destination, journal: Journal, metrics: Metrics) -> None:
        self.destination = destination
        self._journal = journal
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._cursor = 0
        self._backoff = Backoff(initial=0.5, cap=60.0)
        self.delivered = 0

    def wake(self) -> None:
        self._wake.set()

    def _fetch(self) -> list[OutboxRow]:
        rows = self._journal.reader.execute(
            """SELECT seq, event_id, incident_id, created_at, body, attempts FROM outbox
               WHERE destination = ? AND state = 'pending' AND seq > ? ORDER BY seq LIMIT ?""",
            (self.destination.name, self._cursor, FETCH_LIMIT),
        ).fetchall()
        return [OutboxRow(*row) for row in rows]

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.destination.timeout_s)
        connector = aiohttp.TCPConnector(limit=4, keepalive_timeout=60)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            while True:
                rows = self._fetch()
                if not rows:
                    self._wake.clear()
                    # Re-check after clearing: a row committed between the fetch and the clear
                    # would otherwise wait for the next wake.
                    rows = self._fetch()
                    if not rows:
                        try:
                            await asyncio.wait_for(self._wake.wait(), timeout=5.0)
                        except TimeoutError:
                            pass
                        continue
                await self._deliver_in_order(session, rows)

    async def _deliver_in_order(self, session: aiohttp.ClientSession, rows: list[OutboxRow]) -> None:
        for row in rows:
            while True:
                outcome, detail = await self._attempt(session, row)
                row.attempts += 1
                now = time.time()
                if outcome == Attempt.DELIVERED:
                    self._backoff.reset()
                    self._cursor = row.seq
                    self.delivered += 1
                    self._metrics.forward_delivered.labels(self.destination.name).inc()
                    self._metrics.forward_latency.labels(self.destination.name).observe(max(0.0, now - row.created_at))
                    self._journal.submit(_mark_delivered(row.seq, row.attempts, now))
                    break
                if outcome == Attempt.PERMANENT:
                    self._cursor = row.seq
                    self._metrics.forward_dead.labels(self.destination.name).inc()
                    log.error(
                        "command centre %s rejected event %s permanently (%s); dead-lettered, requeue with `gateway outbox requeue`",
                        self.destination.name,
                        row.event_id,
                        detail,
                    )
                    self._journal.submit(_mark_failed(row.seq, row.attempts, now, detail, dead=True))
                    break
                delay = self._backoff.next_delay()
                log.warning(
                    "delivery of event %s to %s failed (%s); retry %d in %.1f s",
                    row.event_id,
                    self.destination.name,
                    detail,
                    row.attempts,
                    delay,
                )
                self._journal.submit(_mark_failed(row.seq, row.attempts, now, detail, dead=False))
                await asyncio.sleep(delay)

    async def _attempt(self, session: aiohttp.ClientSession, row: OutboxRow) -> tuple[str, str]:
        destination = self.destination
        body = event_body.stamp_forwarded(row.body, dt.datetime.now(dt.timezone.utc))
        headers = {"Content-Type": "application/json", signing.IDEMPOTENCY_HEADER: row.event_id}
        if destination.secret:
            headers.update(signing.signed_headers(destination.secret, body))
        if destination.bearer_token:
            headers["Authorization"] = f"Bearer {destination.bearer_token}"
        url = destination.url.rstrip("/") + "/v1/events"
        try:
            async with session.post(url, data=body, headers=headers) as response:
                text = (await response.text())[:200]
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            self._metrics.forward_failures.labels(destination.name, "connection").inc()
            return Attempt.RETRY, f"{type(error).__name__}: {error}"
        if 200 <= status < 300 or status == 409:
            return Attempt.DELIVERED, str(status)
        if 400 <= status < 500 and status not in (408, 429):
            self._metrics.forward_failures.labels(destination.name, "permanent").inc()
            return Attempt.PERMANENT, f"HTTP {status}: {text}"
        self._metrics.forward_failures.labels(destination.name, "http").inc()
        return Attempt.RETRY, f"HTTP {status}: {text}"


class Forwarder:
    def __init__(self, destinations: Sequence[Destination], journal: Journal, metrics: Metrics) -> None:
        self.links = {destination.name: DestinationLink(destination, journal, metrics) for destination in destinations}

    def wake(self) -> None:
        for link in self.links.values():
            link.wake()
