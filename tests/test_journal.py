"""Tests for the intake journal: group commit, per-operation rollback, durability, migrations.

A writer that must hold still is blocked inside an operation on a `threading.Event`, so the
operations submitted meanwhile are known to share the next batch without any sleep.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path

import pytest

from gateway import journal as journal_module
from gateway.journal import Journal, JournalError

WAIT_S = 10.0


def insert_row(reason: str) -> Callable[[sqlite3.Connection], str]:
    """Return a write operation that stores one quarantine row tagged with `reason`."""

    def write(conn: sqlite3.Connection) -> str:
        conn.execute(
            "INSERT INTO quarantine (received_at, source, reason, detail, raw) VALUES (0, 'mqtt', ?, '', x'')",
            (reason,),
        )
        return reason

    return write


def insert_then_raise(reason: str) -> Callable[[sqlite3.Connection], None]:
    """Return a write operation that stores a row and then fails, so its row must be rolled back."""

    def write(conn: sqlite3.Connection) -> None:
        insert_row(reason)(conn)
        raise ValueError(f"operation {reason} failed on purpose")

    return write


class WriterGate:
    """A write operation that blocks the writer thread until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, conn: sqlite3.Connection) -> None:
        self.entered.set()
        self.release.wait(WAIT_S)

    async def wait_entered(self) -> None:
        entered = await asyncio.to_thread(self.entered.wait, WAIT_S)
        assert entered, "the journal writer did not start the blocking operation"


def stored_reasons(path: Path) -> list[str]:
    with closing(journal_module.connect(path, readonly=True)) as conn:
        return [row[0] for row in conn.execute("SELECT reason FROM quarantine ORDER BY id")]


def schema_objects(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    return conn.execute("SELECT type, name FROM sqlite_master ORDER BY type, name").fetchall()


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    instance = Journal(tmp_path / "journal.db")
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


async def test_write_concurrent_operations_share_commits(journal: Journal):
    """Test that 500 concurrent writes all land with far fewer commits than operations."""
    operations = 500

    results = await asyncio.wait_for(
        asyncio.gather(*(journal.write(insert_row(f"op-{number}")) for number in range(operations))),
        WAIT_S,
    )

    assert results == [f"op-{number}" for number in range(operations)]
    assert journal.committed_ops == operations
    assert journal.commits < operations
    assert journal.commits <= operations // 10
    assert len(stored_reasons(journal.path)) == operations


async def test_write_failing_operation_fails_alone(journal: Journal):
    """Test that an operation that raises fails alone while the rest of its batch commits."""
    gate = WriterGate()
    blocker = journal.submit(gate)
    await gate.wait_entered()

    first = journal.submit(insert_row("first"))
    failing = journal.submit(insert_then_raise("failing"))
    last = journal.submit(insert_row("last"))
    gate.release.set()

    assert await asyncio.wait_for(blocker, WAIT_S) is None
    assert await asyncio.wait_for(first, WAIT_S) == "first"
    with pytest.raises(ValueError, match="operation failing failed on purpose"):
        await asyncio.wait_for(failing, WAIT_S)
    assert await asyncio.wait_for(last, WAIT_S) == "last"
    assert journal.commits == 2
    assert stored_reasons(journal.path) == ["first", "last"]


async def test_close_commits_queued_operations(tmp_path: Path):
    """Test that close() commits the operations still queued behind a busy writer."""
    journal = Journal(tmp_path / "journal.db")
    await journal.start()
    gate = WriterGate()
    journal.submit(gate)
    await gate.wait_entered()
    queued = [journal.submit(insert_row(f"queued-{number}")) for number in range(3)]

    closing_task = asyncio.create_task(journal.close())
    await asyncio.sleep(0)  # let close() queue its stop marker behind the three operations
    gate.release.set()
    await asyncio.wait_for(closing_task, WAIT_S)

    results = [await asyncio.wait_for(future, WAIT_S) for future in queued]
    assert results == ["queued-0", "queued-1", "queued-2"]
    assert stored_reasons(journal.path) == ["queued-0", "queued-1", "queued-2"]


async def test_start_after_close_keeps_rows(tmp_path: Path):
    """Test that rows written before close() are read back by a journal opened on the same file."""
    path = tmp_path / "journal.db"
    first = Journal(path)
    await first.start()
    await asyncio.wait_for(first.write(insert_row("before-restart")), WAIT_S)
    await first.close()

    second = Journal(path)
    await second.start()
    try:
        rows = second.reader.execute("SELECT reason FROM quarantine").fetchall()
        await asyncio.wait_for(second.write(insert_row("after-restart")), WAIT_S)
    finally:
        await second.close()

    assert rows == [("before-restart",)]
    assert stored_reasons(path) == ["before-restart", "after-restart"]


def test_migrate_twice_changes_nothing(tmp_path: Path):
    """Test that a second migrate keeps every table, index and row as they were."""
    with closing(journal_module.connect(tmp_path / "journal.db")) as conn:
        journal_module.migrate(conn)
        before = schema_objects(conn)
        insert_row("kept")(conn)

        journal_module.migrate(conn)

        assert schema_objects(conn) == before
        assert ("table", "signals") in before
        assert ("index", "incidents_open_key") in before
        assert conn.execute("SELECT reason FROM quarantine").fetchall() == [("kept",)]


async def test_submit_before_start_raises(tmp_path: Path):
    """Test that submitting to a journal that was never started raises JournalError."""
    journal = Journal(tmp_path / "journal.db")

    with pytest.raises(JournalError, match="not started"):
        journal.submit(insert_row("too-early"))


async def test_start_unopenable_path_raises(tmp_path: Path):
    """Test that start() on a path that is a folder raises JournalError naming the path."""
    path = tmp_path / "journal.db"
    path.mkdir()
    journal = Journal(path)

    with pytest.raises(JournalError, match="cannot open journal") as excinfo:
        await asyncio.wait_for(journal.start(), WAIT_S)

    assert str(path) in str(excinfo.value)
