"""The `gateway` command: run the daemon, decode frames, manage the registry, simulate."""

from __future__ import annotations

import asyncio
from importlib import metadata
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from gateway import config as gateway_config
from gateway.cli import db, decode, demo, incident_commands, outbox, registry_commands, sim
from gateway.cli.console import console, fail
from gateway.forwarder import ForwarderError
from gateway.i18n import _, set_language

app = typer.Typer(
    name="gateway",
    help=_("Alarm-receiving gateway for fire-alarm transmitters."),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
app.add_typer(decode.app, name="decode")
app.add_typer(registry_commands.facility_app, name="facility")
app.add_typer(registry_commands.device_app, name="device")
app.add_typer(sim.app, name="sim")
app.add_typer(incident_commands.app, name="incident")
app.add_typer(db.app, name="db")
app.add_typer(outbox.app, name="outbox")
app.command("demo", help=_("Run the gateway with embedded defaults and a simulated site."))(demo.demo)


def show_version(value: bool) -> None:
    if value:
        console.print(f"pccc-gateway {metadata.version('pccc-gateway')}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True, help=_("Print the version and exit."))] = False,
) -> None:
    """Alarm-receiving gateway for fire-alarm transmitters."""


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command("run", help=_("Run the gateway until SIGTERM or SIGINT."))
def run(
    config_file: Annotated[Path | None, typer.Option("--config", "-c", help=_("TOML configuration file; without it the embedded defaults apply."))] = None,
    mqtt: Annotated[str | None, typer.Option("--mqtt", help=_("Broker URL (mqtt://host:port) or `embedded`."))] = None,
    forward: Annotated[str | None, typer.Option("--forward", help=_("Base URL of the central command-centre API."))] = None,
    forward_secret: Annotated[str | None, typer.Option("--forward-secret", envvar="GATEWAY_FORWARD_SECRET", help=_("HMAC secret for signing forwarded events."))] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", envvar="GATEWAY_DATA_DIR", help=_("Folder of the journal and registry."))] = None,
    http: Annotated[str | None, typer.Option("--http", help=_("HOST:PORT of /healthz and /metrics."))] = None,
    store: Annotated[str | None, typer.Option("--store", envvar="GATEWAY_STORE_URL", help=_("postgresql:// URL of TimescaleDB; without it heartbeats stay in the embedded store."))] = None,
    log_level: Annotated[str, typer.Option("--log-level", help=_("debug, info, warning or error."))] = "info",
) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    from gateway.daemon import run_until_signalled

    configure_logging(log_level)
    try:
        settings = gateway_config.load(config_file)
        settings = gateway_config.with_overrides(
            settings, mqtt_url=mqtt, forward_url=forward, forward_secret=forward_secret, data_dir=data_dir, http_listen=http,
            store_url=store,
        )
    except gateway_config.ConfigError as error:
        fail(_("The configuration is invalid; the gateway did not start.") + "\n" + str(error), code=2)
    if config_file is not None and "GATEWAY_LANG" not in os.environ:
        set_language(settings.gateway.language)
    try:
        asyncio.run(run_until_signalled(settings))
    except (OSError, ForwarderError) as error:
        fail(_("Cannot start the gateway: {error}").format(error=error), code=1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
