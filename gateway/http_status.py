"""The local HTTP endpoint: `/healthz` for probes, `/metrics` for Prometheus, and any routes
the daemon adds (the operator API)."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.metrics import Metrics


class StatusServer:
    def __init__(
        self,
        metrics: Metrics,
        health: Callable[[], dict],
        host: str,
        port: int,
        extra_routes: Callable[[web.Application], None] | None = None,
    ) -> None:
        self._extra_routes = extra_routes
        self._metrics = metrics
        self._health = health
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics_page)
        if self._extra_routes is not None:
            self._extra_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # the bound port when 0 was asked
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        report = self._health()
        status = 200 if report.get("status") == "ok" else 503
        return web.Response(text=json.dumps(report, ensure_ascii=False), status=status, content_type="application/json")

    async def _metrics_page(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
