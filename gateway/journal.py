"""The intake journal and outbox: a local SQLite database in WAL mode with group commit.

One writer thread owns the write connection. Callers submit write operations, which are functions
of a connection. The thread runs every operation that is waiting in one transaction, commits
once, and then resolves all their futures. An operation therefore waits for at most the commit that
is in progress plus its own, and many operations share one fsync under load.

Each operation runs inside its own SAVEPOINT, so one failing operation is rolled back and
reported to its caller alone while the rest of the batch commits.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteOp = Callable[[sqlite3.Connection], Any]

_STOP = object()
MAX_BATCH = 2000


class JournalError(Exception):
    """The journal could not be opened or written; nothing submitted since is durable."""


def _schema_sql() -> str:
    """Return the journal's DDL: journal.sql first, then every journal_*.sql in name order."""
    folder = resources.files("gateway.schema")
    extra = sorted(item.name for item in folder.iterdir() if item.name.startswith("journal_") and item.name.endswith(".sql"))
    return "\n".join(folder.joinpath(name).read_text(encoding="utf-8") for name in ["journal.sql", *extra])


def connect(path: Path, *, synchronous: str = "FULL", readonly: bool = False) -> sqlite3.Connection:
    """Open the journal database with the pragmas every connection needs."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Create or upgrade the journal's tables; applying it twice changes nothing."""
    conn.executescript(_schema_sql())


class Journal:
    """Group-committing writer over the journal database, plus a reader connection."""

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._reader: sqlite3.Connection | None = None
        self.commits = 0
        self.committed_ops = 0
        self.last_commit_seconds = 0.0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run_writer, name="journal-writer", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait)
        if self._open_error is not None:
            raise JournalError(f"cannot open journal {self.path}: {self._open_error}") from self._open_error
        self._reader = connect(self.path, synchronous=self._synchronous)

    @property
    def reader(self) -> sqlite3.Connection:
        """A connection for short reads on the event loop; in WAL mode readers do not block the writer."""
        if self._reader is None:
            raise JournalError("journal is not started")
        return self._reader

    def submit(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue `op` for the next group commit; the future resolves once it is durable."""
        if self._loop is None or self._thread is None:
            raise JournalError("journal is not started")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((op, future))
        return future

    async def write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return await self.submit(op)

    async def close(self) -> None:
        """Commit what is queued, then stop the writer thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join, 30)
        if self._thread.is_alive():
            log.warning("journal writer did not stop within 30 s; pending writes may not be durable")
        self._thread = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _run_writer(self) -> None:
        try:
            conn = connect(self.path, synchronous=self._synchronous)
            migrate(conn)
        except BaseException as error:  # reported to start() through _open_error
            self._open_error = error
            self._ready.set()
            return
        self._ready.set()
        try:
            self._serve(conn)
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _STOP or _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            if batch:
                self._commit_batch(conn, batch)

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[tuple[WriteOp, asyncio.Future[Any]]]) -> None:
        started = time.perf_counter()
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    result = op(conn)
                except Exception as error:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((future, None, error))
                    continue
                conn.execute("RELEASE op")
                outcomes.append((future, result, None))
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            log.error("journal commit of %d operations failed: %s", len(batch), error)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = JournalError(f"journal commit failed: {error}")
            outcomes = [(future, None, failure) for _, future in batch]
        self.commits += 1
        self.committed_ops += len(batch)
        self.last_commit_seconds = time.perf_counter() - started
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve_all, outcomes)
        except RuntimeError:
            log.debug("event loop closed before %d journal results were delivered", len(outcomes))


def _resolve_all(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in outcomes:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
