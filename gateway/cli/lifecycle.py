"""Running a CLI command's coroutine until it finishes or SIGTERM/SIGINT stops it cleanly."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any


def run_until_stopped(work: Coroutine[Any, Any, None]) -> bool:
    """Run `work`; on SIGTERM or SIGINT cancel it so its cleanup runs. Return True if stopped by a signal."""

    async def main() -> bool:
        task = asyncio.create_task(work)
        stopped = False

        def stop() -> None:
            nonlocal stopped
            stopped = True
            task.cancel()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop)
        try:
            await task
        except asyncio.CancelledError:
            if not stopped:
                raise
        return stopped

    return asyncio.run(main())
