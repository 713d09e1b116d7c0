"""`gateway db`: manage the heartbeat and signal store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.console import fail
from gateway.i18n import _
from gateway.store import EMBEDDED_FILE, open_store, redact_url
from gateway.store.base import StoreError, StoreUnavailable

app = typer.Typer(help=_("Manage the heartbeat and signal store."), no_args_is_help=True)


@app.callback()
def db() -> None:
    """Manage the heartbeat and signal store."""


async def _migrate(url: str | None, data_dir: Path) -> list[str]:
    store = open_store(url, data_dir)
    await store.start()
    try:
        return await store.migrate()
    finally:
        await store.close()


@app.command("migrate", help=_("Apply the store's schema migrations that are not applied yet."))
def migrate(
    store_url: Annotated[
        str | None,
        typer.Option(
            "--store",
            metavar="URL",
            envvar="GATEWAY_STORE_URL",
            help=_("PostgreSQL URL of the TimescaleDB store. Without it, the embedded store in the data folder is used."),
        ),
    ] = None,
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir", metavar="DIR", envvar="GATEWAY_DATA_DIR", help=_("Folder of the journal and the embedded store.")
        ),
    ] = Path("var"),
) -> None:
    """Apply the store's schema migrations that are not applied yet."""
    target = redact_url(store_url) if store_url else str(data_dir / EMBEDDED_FILE)
    try:
        applied = asyncio.run(_migrate(store_url, data_dir))
    except ValueError as error:
        fail(str(error), code=2)
    except StoreUnavailable as error:
        fail(_("Cannot reach the store {target}: {error}").format(target=target, error=error), code=1)
    except StoreError as error:
        fail(_("Migrating the store {target} failed: {error}").format(target=target, error=error), code=1)
    if not applied:
        typer.echo(_("Store {target} is up to date: no migration applied.").format(target=target))
        return
    for name in applied:
        typer.echo(_("applied {name}").format(name=name))
    typer.echo(_("Store {target}: migrations applied: {count}.").format(target=target, count=len(applied)))
