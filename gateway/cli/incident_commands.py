"""`gateway incident`: list incidents and move them through their states."""

from __future__ import annotations

import datetime as dt
import json
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gateway.cli.console import console, fail
from gateway.cli.registry_commands import DataDir, open_registry
from gateway.i18n import _
from gateway.incidents import IncidentState

app = typer.Typer(help=_("List incidents and change their state."), no_args_is_help=True)


@app.command("list", help=_("List incidents that are not closed."))
def incident_list(data_dir: DataDir = Path("var")) -> None:
    with closing(open_registry(data_dir)) as conn:
        rows = conn.execute(
            """SELECT id, facility_id, device_id, event_class, state, outcome, opened_at, zones
               FROM incidents WHERE state != 'closed' ORDER BY opened_at"""
        ).fetchall()
    table = Table(_("Incident"), _("Facility"), _("Class"), _("State"), _("Opened"), _("Zones"))
    for incident_id, facility_id, device_id, event_class, state, outcome, opened_at, zones in rows:
        opened = dt.datetime.fromtimestamp(opened_at).strftime("%Y-%m-%d %H:%M:%S")
        shown_state = f"{state} ({outcome})" if outcome else state
        table.add_row(incident_id, facility_id or device_id, event_class, shown_state, opened, ", ".join(map(str, json.loads(zones))))
    console.print(table)


@app.command("set", help=_("Change an incident's state through the running gateway."))
def incident_set(
    incident_id: Annotated[str, typer.Argument(help=_("Incident id."))],
    state: Annotated[IncidentState, typer.Argument(help=_("New state."))],
    actor: Annotated[str, typer.Option("--actor", help=_("Who makes the change, for the audit timeline."))],
    outcome: Annotated[str, typer.Option("--outcome", help=_("Outcome when resolving: real_fire, false_alarm, unwanted, test."))] = "",
    http: Annotated[str, typer.Option("--http", help=_("HOST:PORT of the running gateway's local API."))] = "127.0.0.1:8780",
) -> None:
    body = json.dumps({"state": state.value, "outcome": outcome, "actor": actor}).encode()
    request = urllib.request.Request(
        f"http://{http}/v1/incidents/{incident_id}/state", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = json.loads(error.read() or b"{}").get("error", error.reason)
        fail(_("The gateway rejected the change: {detail}").format(detail=detail))
    except OSError as error:
        fail(_("Cannot reach the gateway at {http}: {error}").format(http=http, error=error))
    console.print(_("Incident {id} is now {state}.").format(id=answer["incident_id"], state=answer["state"]))
