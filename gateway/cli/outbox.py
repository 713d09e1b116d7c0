"""`gateway outbox`: the delivery of events to command centres, for operators.

The commands work on the journal in `--data-dir`, also while the gateway runs: SQLite in WAL
mode lets them read beside the daemon, and a requeue is a short write that the running
forwarder notices within a second or two.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.table import Table

from gateway import journal
from gateway.cli.console import console, fail
from gateway.i18n import _

app = typer.Typer(name="outbox", help=_("Show and repair the delivery of events to command centres."))

DataDir = Annotated[Path, typer.Option("--data-dir", envvar="GATEWAY_DATA_DIR", help=_("Folder of the journal and registry."))]
JsonOutput = Annotated[bool, typer.Option("--json", help=_("Print JSON instead of a table."))]

_json = msgspec.json.Encoder()


def open_journal(data_dir: Path) -> sqlite3.Connection:
    """Open the journal of `data_dir`, which must exist, and add missing delivery tables."""
    path = data_dir / "journal.db"
    if not path.is_file():
        fail(_("No journal at {path}; check --data-dir.").format(path=path))
    try:
        conn = journal.connect(path)
        journal.migrate(conn)
    except sqlite3.Error as error:
        fail(_("Cannot open the journal {path}: {error}").format(path=path, error=error))
    return conn


def format_age(seconds: float) -> str:
    """Format a duration for operators: 42 s, 5 min 03 s, 2 h 07 min."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def format_time(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def circuit_label(circuit: str) -> str:
    labels = {"closed": _("normal"), "open": _("paused, probing"), "half_open": _("probing")}
    return labels.get(circuit, _("unknown"))


def print_json(value: Any) -> None:
    sys.stdout.write(_json.encode(value).decode() + "\n")


# Status


def read_status(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """Backlog, oldest undelivered event, dead letters and circuit state per destination."""
    entries: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        if name not in entries:
            entries[name] = {"destination": name, "circuit": "", "pending": 0, "oldest_pending_s": None, "dead": 0, "last_error": ""}
        return entries[name]

    for name, circuit, last_error in conn.execute("SELECT destination, circuit, last_error FROM destination_status"):
        entry(name).update(circuit=circuit, last_error=last_error)
    pending = conn.execute(
        "SELECT destination, COUNT(*), MIN(created_at) FROM outbox WHERE state = 'pending' GROUP BY destination"
    )
    for name, count, oldest in pending:
        entry(name).update(pending=count, oldest_pending_s=round(max(0.0, now - oldest), 3))
    for name, count in conn.execute("SELECT destination, COUNT(*) FROM outbox WHERE state = 'dead' GROUP BY destination"):
        entry(name)["dead"] = count
    errors = conn.execute(
        """SELECT destination, last_error FROM outbox
           WHERE seq IN (SELECT MAX(seq) FROM outbox WHERE state = 'pending' AND last_error != '' GROUP BY destination)"""
    )
    for name, last_error in errors:
        if not entries[name]["last_error"]:
            entries[name]["last_error"] = last_error
    return [entries[name] for name in sorted(entries)]


@app.callback(invoke_without_command=True)
def status(ctx: typer.Context, data_dir: DataDir = Path("var"), as_json: JsonOutput = False) -> None:
    """Show the backlog, the oldest undelivered event and the dead letters per destination."""
    if ctx.invoked_subcommand is not None:
        return
    with closing(open_journal(data_dir)) as conn:
        rows = read_status(conn, time.time())
    if as_json:
        print_json({"destinations": rows})
        return
    if not any(row["pending"] or row["dead"] for row in rows):
        console.print(_("Every event is delivered; nothing is pending or dead-lettered."))
    if not rows:
        return
    table = Table(_("Destination"), _("Link"), _("Pending"), _("Oldest pending"), _("Dead letters"), _("Last error"), title=_("Outbox"))
    for row in rows:
        age = "-" if row["oldest_pending_s"] is None else format_age(row["oldest_pending_s"])
        table.add_row(
            row["destination"],
            circuit_label(row["circuit"]) if row["circuit"] else "-",
            str(row["pending"]),
            age,
            str(row["dead"]),
            row["last_error"] or "-",
        )
    console.print(table)
    if any(row["dead"] for row in rows):
        console.print(_("List them with `gateway outbox dead`; send one again with `gateway outbox requeue EVENT_ID`."))


# Dead letters


def read_dead(conn: sqlite3.Connection, destination: str | None, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        """SELECT o.seq, o.event_id, o.destination, o.event_class, o.created_at, o.attempts, o.last_error,
                  (SELECT MAX(d.dead_at) FROM dead_letters d WHERE d.seq = o.seq),
                  (SELECT d.status FROM dead_letters d WHERE d.seq = o.seq ORDER BY d.dead_at DESC LIMIT 1)
           FROM outbox o WHERE o.state = 'dead' AND (? IS NULL OR o.destination = ?)
           ORDER BY o.seq LIMIT ?""",
        (destination, destination, limit),
    ).fetchall()
    return [
        {
            "seq": seq,
            "event_id": event_id,
            "destination": name,
            "event_class": event_class,
            "received_at": created_at,
            "attempts": attempts,
            "dead_at": dead_at,
            "status": status_code,
            "reason": reason,
        }
        for seq, event_id, name, event_class, created_at, attempts, reason, dead_at, status_code in rows
    ]


@app.command("dead", help=_("List dead-lettered events: events a command centre rejected permanently."))
def dead(
    destination: Annotated[str | None, typer.Option("--destination", help=_("Only this destination."))] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100_000, help=_("Maximum number of events to list."))] = 200,
    data_dir: DataDir = Path("var"),
    as_json: JsonOutput = False,
) -> None:
    """List dead-lettered events: events a command centre rejected permanently."""
    with closing(open_journal(data_dir)) as conn:
        rows = read_dead(conn, destination, limit)
    if as_json:
        print_json({"dead_letters": rows})
        return
    if not rows:
        console.print(_("No dead letters."))
        return
    table = Table(_("Event id"), _("Destination"), _("Event class"), _("Received at"), _("Attempts"), _("Dead since"), _("Reason"))
    # The event id is what `gateway outbox requeue` needs, so it is never shortened.
    table.columns[0].no_wrap = True
    table.columns[0].min_width = 36
    table.columns[6].max_width = 60
    for row in rows:
        table.add_row(
            row["event_id"],
            row["destination"],
            row["event_class"],
            format_time(row["received_at"]),
            str(row["attempts"]),
            format_time(row["dead_at"]),
            row["reason"],
        )
    console.print(table)


# Requeue


def requeue_event(conn: sqlite3.Connection, event_id: str, destination: str | None, now: float) -> list[str]:
    """Set the dead rows of `event_id` back to pending and mark them for the running forwarder.

    Returns the destinations requeued, empty when the event has no dead row there.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = conn.execute(
            """UPDATE outbox SET state = 'pending', next_attempt_at = 0
               WHERE event_id = ? AND state = 'dead' AND (? IS NULL OR destination = ?)
               RETURNING seq, destination""",
            (event_id, destination, destination),
        ).fetchall()
        conn.executemany("INSERT OR REPLACE INTO outbox_requeue (seq, requested_at) VALUES (?, ?)", [(seq, now) for seq, _name in rows])
        conn.executemany(
            "UPDATE dead_letters SET requeued_at = ? WHERE seq = ? AND requeued_at IS NULL", [(now, seq) for seq, _name in rows]
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return sorted(name for _seq, name in rows)


@app.command("requeue", help=_("Send a dead-lettered event again; the running gateway picks it up within a few seconds."))
def requeue(
    event_id: Annotated[str, typer.Argument(help=_("Event id, the Idempotency-Key the command centre saw."))],
    destination: Annotated[str | None, typer.Option("--destination", help=_("Only this destination; without it, every destination that dead-lettered the event."))] = None,
    data_dir: DataDir = Path("var"),
) -> None:
    """Send a dead-lettered event again; the running gateway picks it up within a few seconds."""
    with closing(open_journal(data_dir)) as conn:
        try:
            requeued = requeue_event(conn, event_id, destination, time.time())
        except sqlite3.Error as error:
            fail(_("Requeue of event {event_id} failed: {error}").format(event_id=event_id, error=error), code=1)
        if not requeued:
            states = conn.execute(
                "SELECT destination, state FROM outbox WHERE event_id = ? AND (? IS NULL OR destination = ?) ORDER BY destination",
                (event_id, destination, destination),
            ).fetchall()
    if not requeued:
        if not states and destination is None:
            fail(_("Event {event_id} is not in the outbox.").format(event_id=event_id), code=1)
        if not states:
            fail(
                _("Event {event_id} has no outbox row for destination {destination}.").format(event_id=event_id, destination=destination),
                code=1,
            )
        listing = ", ".join(f"{name}: {state}" for name, state in states)
        fail(_("Event {event_id} is not dead-lettered ({states}); nothing to requeue.").format(event_id=event_id, states=listing), code=1)
    for name in requeued:
        console.print(
            _("Event {event_id} requeued for {destination}; the running gateway sends it within a few seconds.").format(
                event_id=event_id, destination=name
            )
        )


if __name__ == "__main__":
    app()
