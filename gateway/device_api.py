"""Device status on the local API: `GET /v1/devices/status[?id=...]`, from supervision."""

from __future__ import annotations

import msgspec
from aiohttp import web

from gateway.registry import RegistryCache
from gateway.supervision import Supervisor

_encoder = msgspec.json.Encoder()


def add_routes(app: web.Application, supervisor: Supervisor, registry: RegistryCache) -> None:
    async def status(request: web.Request) -> web.Response:
        requested = request.query.getall("id", [])
        device_ids = requested or sorted(device.id for device in registry.devices())
        states = []
        for device_id in device_ids:
            state = supervisor.state(device_id)
            if state is None and requested:
                return web.Response(
                    text=f'{{"error": "device {device_id} is not registered or not supervised"}}',
                    status=404,
                    content_type="application/json",
                )
            if state is not None:
                states.append(state)
        return web.Response(body=_encoder.encode(states), content_type="application/json")

    app.router.add_get("/v1/devices/status", status)
