"""The local operator API for incident state changes, served beside /healthz on loopback.

`POST /v1/incidents/{id}/state` with JSON `{"state": ..., "outcome": ..., "actor": ...}`
moves an incident and queues the update for the command centres on the alarm path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.incidents import IncidentEngine, IncidentState, TransitionError
from gateway.journal import Journal
from gateway.signal import utc_now

log = logging.getLogger(__name__)


class StateChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: IncidentState
    outcome: str = ""
    actor: str = Field(min_length=1, max_length=100)


def _json(payload: dict, status: int) -> web.Response:
    return web.Response(text=json.dumps(payload, ensure_ascii=False), status=status, content_type="application/json")


def add_routes(app: web.Application, engine: IncidentEngine, journal: Journal, after_write: Callable) -> None:
    async def change_state(request: web.Request) -> web.Response:
        incident_id = request.match_info["incident_id"]
        try:
            change = StateChange.model_validate_json(await request.read())
        except ValidationError as error:
            return _json({"error": error.errors(include_url=False, include_context=False)}, 400)
        try:
            write = engine.change_state(incident_id, change.state, at=utc_now(), actor=change.actor, outcome=change.outcome)
        except LookupError as error:
            return _json({"error": str(error)}, 404)
        except TransitionError as error:
            return _json({"error": str(error)}, 409)

        future = journal.submit(write)
        future.add_done_callback(after_write)
        decision = await future
        log.info("incident %s moved to %s by %s", incident_id, change.state.value, change.actor)
        return _json({"incident_id": incident_id, "state": change.state.value, "forwarded_to": decision.outbox_count}, 200)

    app.router.add_post("/v1/incidents/{incident_id}/state", change_state)
