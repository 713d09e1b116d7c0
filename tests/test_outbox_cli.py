"""`gateway outbox`: status, dead letters and requeue on a journal written by hand."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway import journal
from gateway.cli import outbox

def insert_row(conn: sqlite3.Connection, event_id: str, destination: str, state: str, *, age_s: float, error: str = "") -> int:
    cursor = conn.execute(
        """INSERT INTO outbox (event_id, destination, incident_id, event_class, created_at, body, state, attempts, last_error)
           VALUES (?, ?, 'inc-1', 'fire', ?, x'7b7d', ?, ?, ?)""",
        (event_id, destination, time.time() - age_s, state, 0 if state == "pending" and not error else 1, error),
    )
    return cursor.lastrowid


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    with closing(journal.connect(tmp_path / "journal.db")) as conn:
        journal.migrate(conn)
        insert_row(conn, "evt-old", "central", "pending", age_s=125.0, error="HTTP 503: down")
        insert_row(conn, "evt-new", "central", "pending", age_s=5.0)
        dead_seq = insert_row(conn, "evt-dead", "central", "dead", age_s=60.0, error="HTTP 400: bad zone")
        conn.execute(
            "INSERT INTO dead_letters (seq, event_id, destination, dead_at, status, reason) VALUES (?, 'evt-dead', 'central', ?, 400, 'HTTP 400: bad zone')",
            (dead_seq, time.time() - 50.0),
        )
        insert_row(conn, "evt-dead", "hanoi", "dead", age_s=60.0, error="HTTP 422: unknown facility")
        insert_row(conn, "evt-done", "hanoi", "delivered", age_s=30.0)
        insert_row(conn, "evt-done", "team-2", "delivered", age_s=30.0)
        conn.execute("INSERT INTO destination_status (destination, circuit, changed_at, last_error) VALUES ('central', 'open', 0, 'HTTP 503: down')")
        conn.execute("INSERT INTO destination_status (destination, circuit, changed_at, last_error) VALUES ('team-2', 'closed', 0, '')")
    return tmp_path


def invoke(*args: str, language: str = "en"):
    return CliRunner().invoke(outbox.app, list(args), env={"GATEWAY_LANG": language, "COLUMNS": "200"})


def read(data_dir: Path, sql: str, *parameters: object) -> list[tuple]:
    with closing(journal.connect(data_dir / "journal.db", readonly=True)) as conn:
        return conn.execute(sql, parameters).fetchall()


def test_outbox_status_json_per_destination(data_dir):
    """Test that the status lists backlog, oldest age, dead letters and circuit for every known destination."""
    result = invoke("--data-dir", str(data_dir), "--json")

    assert result.exit_code == 0, result.output
    rows = {row["destination"]: row for row in json.loads(result.output)["destinations"]}
    assert sorted(rows) == ["central", "hanoi", "team-2"]
    assert rows["central"]["pending"] == 2
    assert rows["central"]["oldest_pending_s"] == pytest.approx(125.0, abs=5.0)
    assert rows["central"]["dead"] == 1
    assert rows["central"]["circuit"] == "open"
    assert rows["central"]["last_error"] == "HTTP 503: down"
    assert rows["hanoi"]["pending"] == 0
    assert rows["hanoi"]["oldest_pending_s"] is None
    assert rows["hanoi"]["dead"] == 1
    assert rows["team-2"] == {"destination": "team-2", "circuit": "closed", "pending": 0, "oldest_pending_s": None, "dead": 0, "last_error": ""}


def test_outbox_status_table_in_vietnamese(data_dir):
    """Test that the status table speaks Vietnamese by default and formats the age."""
    result = invoke("--data-dir", str(data_dir), language="vi")

    assert result.exit_code == 0, result.output
    assert "Hàng đợi gửi đi" in result.output
    assert "2 min 05 s" in result.output or "2 min 04 s" in result.output
    assert "gateway outbox requeue" in result.output


def test_outbox_status_reports_all_delivered(tmp_path):
    """Test that an outbox with nothing pending or dead reports that every event is delivered."""
    with closing(journal.connect(tmp_path / "journal.db")) as conn:
        journal.migrate(conn)
        insert_row(conn, "evt-1", "central", "delivered", age_s=1.0)

    result = invoke("--data-dir", str(tmp_path))

    assert result.exit_code == 0, result.output
    assert "Every event is delivered" in result.output


def test_outbox_missing_journal_fails(tmp_path):
    """Test that a data dir without a journal is an error naming the path, and creates nothing."""
    result = invoke("--data-dir", str(tmp_path / "nowhere"))

    assert result.exit_code == 2
    assert "No journal at" in result.output
    assert not (tmp_path / "nowhere").exists()


def test_outbox_dead_lists_rejections(data_dir):
    """Test that `dead` lists the dead rows with status and reason, filtered by destination."""
    result = invoke("dead", "--data-dir", str(data_dir), "--json")

    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["dead_letters"]
    assert [(row["event_id"], row["destination"]) for row in rows] == [("evt-dead", "central"), ("evt-dead", "hanoi")]
    assert rows[0]["status"] == 400
    assert rows[0]["reason"] == "HTTP 400: bad zone"
    assert rows[0]["dead_at"] == pytest.approx(time.time() - 50.0, abs=5.0)
    assert rows[1]["status"] is None

    filtered = invoke("dead", "--destination", "hanoi", "--data-dir", str(data_dir), "--json")
    assert [row["destination"] for row in json.loads(filtered.output)["dead_letters"]] == ["hanoi"]

    table = invoke("dead", "--data-dir", str(data_dir))
    assert "evt-dead" in table.output
    assert "bad zone" in table.output


def test_outbox_requeue_one_destination(data_dir):
    """Test that requeue with --destination sets only that row pending and marks it for the forwarder."""
    result = invoke("requeue", "evt-dead", "--destination", "central", "--data-dir", str(data_dir))

    assert result.exit_code == 0, result.output
    assert "requeued for central" in result.output
    assert read(data_dir, "SELECT destination, state FROM outbox WHERE event_id = 'evt-dead' ORDER BY destination") == [
        ("central", "pending"),
        ("hanoi", "dead"),
    ]
    assert read(data_dir, "SELECT COUNT(*) FROM outbox_requeue") == [(1,)]
    assert read(data_dir, "SELECT requeued_at IS NOT NULL FROM dead_letters") == [(1,)]


def test_outbox_requeue_every_destination(data_dir):
    """Test that requeue without --destination requeues the event for every destination that rejected it."""
    result = invoke("requeue", "evt-dead", "--data-dir", str(data_dir))

    assert result.exit_code == 0, result.output
    assert "requeued for central" in result.output
    assert "requeued for hanoi" in result.output
    assert read(data_dir, "SELECT COUNT(*) FROM outbox_requeue") == [(2,)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evt-missing"], "Event evt-missing is not in the outbox."),
        (["evt-dead", "--destination", "team-9"], "Event evt-dead has no outbox row for destination team-9."),
        (["evt-done"], "Event evt-done is not dead-lettered (hanoi: delivered, team-2: delivered); nothing to requeue."),
    ],
)
def test_outbox_requeue_rejects_what_is_not_dead(data_dir, args, message):
    """Test that requeue of an unknown or not dead-lettered event fails with exit code 1 and changes nothing."""
    result = invoke("requeue", *args, "--data-dir", str(data_dir))

    assert result.exit_code == 1
    assert message in result.output
    assert read(data_dir, "SELECT COUNT(*) FROM outbox_requeue") == [(0,)]


@pytest.mark.parametrize(("seconds", "text"), [(0, "0 s"), (59.9, "59 s"), (61, "1 min 01 s"), (3600, "1 h 00 min"), (90061, "25 h 01 min")])
def test_outbox_format_age(seconds, text):
    """Test that ages read as seconds, minutes or hours."""
    assert outbox.format_age(seconds) == text
