"""Heartbeat and signal history: TimescaleDB when a database URL is configured, else embedded SQLite."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from gateway.store.base import (
    DEFAULT_RETENTION,
    HeartbeatIntervalLookup,
    HeartbeatRecord,
    Store,
    StoreError,
    StoreUnavailable,
)
from gateway.store.embedded import EmbeddedStore
from gateway.store.timescale import TimescaleStore

__all__ = [
    "DEFAULT_RETENTION",
    "EMBEDDED_FILE",
    "EmbeddedStore",
    "HeartbeatRecord",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TimescaleStore",
    "open_store",
    "redact_url",
]

EMBEDDED_FILE = "store.db"


def open_store(
    url: str | None,
    data_dir: Path,
    *,
    retention: dt.timedelta = DEFAULT_RETENTION,
    heartbeat_interval: HeartbeatIntervalLookup | None = None,
) -> Store:
    """Return the store for `url`: TimescaleDB for a postgresql:// URL, the embedded SQLite store for None.

    The store is not started yet: call `start()` and then `migrate()`. `retention` sets the
    retention policy that `migrate` adds on TimescaleDB editions that support policies.
    Raises ValueError for any other URL scheme.
    """
    if not url:
        return EmbeddedStore(data_dir / EMBEDDED_FILE, retention=retention, heartbeat_interval=heartbeat_interval)
    scheme = urlsplit(url).scheme
    if scheme in ("postgresql", "postgres"):
        return TimescaleStore(url, retention=retention, heartbeat_interval=heartbeat_interval)
    raise ValueError(
        f"store URL {redact_url(url)!r} is not supported; use postgresql://USER@HOST:PORT/DATABASE, "
        "or configure no URL for the embedded store"
    )


def redact_url(url: str) -> str:
    """Return `url` with its password replaced by ***, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
