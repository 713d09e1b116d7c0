"""Terminal output shared by the CLI commands."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console

# soft_wrap keeps long lines (JSON payloads, URLs) whole, so they can be copied and grepped.
console = Console(soft_wrap=True)
error_console = Console(stderr=True, soft_wrap=True)


def fail(message: str, *, code: int = 2) -> NoReturn:
    """Print `message` on stderr without markup and exit with `code`."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    raise typer.Exit(code)
