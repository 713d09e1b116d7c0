"""`gateway demo`: the gateway on embedded defaults with a simulated site, in one process.

It registers a sample facility with five transmitters, starts the embedded broker, a
simulated command centre and the transmitters, raises a fire alarm after a few seconds and
restores it later, and prints what arrives where.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from contextlib import closing
from pathlib import Path
from typing import Annotated

import typer

from drivers.base import Heartbeat
from gateway import config as gateway_config
from gateway import registry
from gateway.cli.console import console
from gateway.cli.lifecycle import run_until_stopped
from gateway.cli.registry_commands import open_registry
from gateway.daemon import Gateway
from gateway.i18n import _

DEMO_FACILITY = registry.Facility(
    id="HN-DEMO-001",
    name="Trung tâm thương mại Demo",
    address="1 Phố Tràng Tiền",
    commune="Phường Hoàn Kiếm",
    province="Hà Nội",
    latitude=21.0245,
    longitude=105.8561,
    team="HN-DOI-01",
)
DEMO_ZONES = {1: "Tầng 1 - Sảnh", 2: "Tầng 2 - Cửa hàng", 3: "Tầng hầm - Kho hàng", 4: "Tầng thượng - Máy phát"}
DEMO_SECRET = "demo-secret"


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def register_site(data_dir: Path, device_ids: list[str], interval_s: float) -> None:
    with closing(open_registry(data_dir)) as conn:
        with conn:
            conn.execute("BEGIN")
            registry.add_facility(conn, DEMO_FACILITY, DEMO_ZONES)
            for device_id in device_ids:
                registry.add_device(
                    conn,
                    registry.make_device(id=device_id, facility_id=DEMO_FACILITY.id, heartbeat_s=int(interval_s), window_s=int(interval_s * 3)),
                )


async def run_demo(data_dir: Path, devices: int, interval_s: float, fire_at_s: float, duration_s: float | None) -> None:
    from simulators.command_center import CommandCenter
    from simulators.transmitter import ScheduledEvent, TransmitterFleet

    device_ids = [f"DEMO-{index:03d}" for index in range(1, devices + 1)]
    register_site(data_dir, device_ids, interval_s)

    centre = CommandCenter(secret=DEMO_SECRET, record_path=data_dir / "command-center.jsonl")
    await centre.start()
    console.print(_("Simulated command centre listening on {url}").format(url=centre.url))

    broker_port = free_port()
    settings = gateway_config.parse(
        {
            "gateway": {"data_dir": str(data_dir), "startup_grace_s": 0},
            "mqtt": {"url": "embedded"},
            "embedded_broker": {"host": "127.0.0.1", "port": broker_port},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "destinations": [{"name": "central", "url": centre.url, "scope": "central", "secret": DEMO_SECRET}],
        },
        "demo",
    )
    gateway = Gateway(settings)
    gateway.router.on_heartbeats(_print_heartbeats)
    await gateway.start()
    assert gateway.status is not None
    console.print(_("Gateway running: embedded broker mqtt://127.0.0.1:{port}, status http://127.0.0.1:{http}/healthz").format(port=broker_port, http=gateway.status.port))

    schedule = [
        ScheduledEvent(at_s=fire_at_s, device_index=0, code="110", qualifier="E", zone=3),
        ScheduledEvent(at_s=fire_at_s + 15, device_index=0, code="110", qualifier="R", zone=3),
    ]
    fleet = TransmitterFleet(f"mqtt://127.0.0.1:{broker_port}", device_ids, interval_s=interval_s, schedule=schedule, on_publish=_print_published)
    seen = 0

    async def watch_centre() -> None:
        nonlocal seen
        while True:
            await asyncio.sleep(0.2)
            for entry in centre.events[seen:]:
                _print_received(entry)
            seen = len(centre.events)

    watcher = asyncio.create_task(watch_centre())
    try:
        await fleet.run(duration_s)
    finally:
        await asyncio.sleep(1.0)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await gateway.stop()
        await centre.stop()


def _print_heartbeats(batch: list[Heartbeat]) -> None:
    for heartbeat in batch:
        console.print(
            f"[cyan]{_('Heartbeat')}[/] {heartbeat.device_id} seq={heartbeat.seq} "
            f"{_('mains')}={'✓' if heartbeat.mains else '✗'} {_('battery')}={heartbeat.battery_v} V rssi={heartbeat.rssi} dBm"
        )


def _print_published(device_id: str, topic: str, payload: bytes) -> None:
    if topic.endswith("/event"):
        console.print(f"[bold yellow]{_('Transmitter sent event')}[/] {device_id}: {payload.decode()}")


def _print_received(entry: dict) -> None:
    event = entry["event"]
    signal = event.get("signal") or {}
    incident = event.get("incident") or {}
    kind = _("FIRE ALARM") if signal.get("event_class") == "fire" and signal.get("qualifier") == "new" else _(signal.get("qualifier", event["kind"]))
    console.print(
        f"[bold red]{_('Command centre received')}[/] {kind}: {event['facility']['name']} - "
        f"{_('zone')} {signal.get('zone', '')} \"{signal.get('zone_label', '')}\" ({_('incident')} {incident.get('id', '-')}, {incident.get('state', '')})"
    )


def demo(
    data_dir: Annotated[Path, typer.Option("--data-dir", help=_("Folder for the demo's journal and recordings."))] = Path("var/demo"),
    devices: Annotated[int, typer.Option("--devices", min=1, max=1000, help=_("Number of simulated transmitters."))] = 5,
    interval: Annotated[float, typer.Option("--interval", min=0.5, help=_("Heartbeat interval in seconds."))] = 5.0,
    fire_at: Annotated[float, typer.Option("--fire-at", min=0, help=_("Seconds after start when the fire alarm is raised."))] = 10.0,
    duration: Annotated[float | None, typer.Option("--duration", help=_("Stop after this many seconds; runs until Ctrl-C when omitted."))] = None,
) -> None:
    """Run the gateway with embedded defaults and a simulated site."""
    from gateway.cli.app import configure_logging

    configure_logging("warning")
    if run_until_stopped(run_demo(data_dir, devices, interval, fire_at, duration)):
        console.print(_("Demo stopped."))
