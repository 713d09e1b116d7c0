"""`gateway sim`: simulated transmitters and a simulated command centre, for test engineers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.console import console, fail
from gateway.cli.lifecycle import run_until_stopped
from gateway.i18n import _

app = typer.Typer(help=_("Simulated transmitters and command centre."), no_args_is_help=True)


@app.command("transmitter", help=_("Run N simulated transmitters over a real MQTT connection."))
def transmitter(
    broker: Annotated[str, typer.Option("--broker", help=_("Broker URL, e.g. mqtt://127.0.0.1:1883."))] = "mqtt://127.0.0.1:1883",
    devices: Annotated[int, typer.Option("--devices", "-n", min=1, max=100_000, help=_("Number of simulated devices."))] = 1,
    prefix: Annotated[str, typer.Option("--prefix", help=_("Device id prefix; ids are PREFIX-0001, PREFIX-0002, ..."))] = "SIM",
    interval: Annotated[float, typer.Option("--interval", min=0.1, help=_("Heartbeat interval in seconds."))] = 60.0,
    password: Annotated[str | None, typer.Option("--password", help=_("Broker password shared by all simulated devices."))] = None,
    alarm: Annotated[list[str] | None, typer.Option("--alarm", help=_("Scheduled event AT_S:DEVICE_INDEX:CODE:Q:ZONE[:LABEL], e.g. 10:0:110:E:3:Kho."))] = None,
    duration: Annotated[float | None, typer.Option("--duration", help=_("Stop after this many seconds."))] = None,
) -> None:
    """Run N simulated transmitters over a real MQTT connection."""
    from simulators.transmitter import TransmitterFleet, parse_schedule

    try:
        schedule = parse_schedule(alarm or [])
    except ValueError as error:
        fail(str(error))
    device_ids = [f"{prefix}-{index:04d}" for index in range(1, devices + 1)]
    passwords = {device_id: password for device_id in device_ids} if password else None

    def show(device_id: str, topic: str, payload: bytes) -> None:
        if topic.endswith("/event"):
            console.print(f"[bold red]{_('Event sent')}[/] {device_id}: {payload.decode()}")

    fleet = TransmitterFleet(broker, device_ids, interval_s=interval, passwords=passwords, schedule=schedule, on_publish=show)
    console.print(_("{count} simulated devices connecting to {broker}").format(count=devices, broker=broker))
    run_until_stopped(fleet.run(duration))


@app.command("command-center", help=_("Run a simulated command centre that verifies and records events."))
def command_center(
    port: Annotated[int, typer.Option("--port", help=_("TCP port to listen on (127.0.0.1)."))] = 8790,
    record: Annotated[Path | None, typer.Option("--record", help=_("Append each received event to this file as a JSON line."))] = None,
    secret: Annotated[str, typer.Option("--secret", envvar="GATEWAY_FORWARD_SECRET", help=_("HMAC secret to verify signatures; empty accepts unsigned events."))] = "",
    host: Annotated[str, typer.Option("--host", help=_("Address to listen on."))] = "127.0.0.1",
) -> None:
    """Run a simulated command centre that verifies and records events."""
    from simulators.command_center import serve_forever

    def show(entry: dict) -> None:
        event = entry["event"]
        signal = event.get("signal") or {}
        console.print(
            f"[bold green]{_('Event received')}[/] {event['facility']['id']} {event['device']['id']} "
            f"{signal.get('code', '')} {signal.get('qualifier', '')} {_('zone')} {signal.get('zone', '')} {signal.get('zone_label', '')}"
        )

    console.print(_("Simulated command centre on http://{host}:{port}").format(host=host, port=port))
    run_until_stopped(serve_forever(host, port, secret, record, show))
