"""The embedded MQTT broker (amqtt) for demos and single small sites.

It accepts anonymous clients, so it listens on loopback only. A real site uses Mosquitto
with per-device credentials and an ACL (config/mosquitto/), because amqtt is much slower.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from amqtt.broker import Broker

log = logging.getLogger(__name__)


# NOTE: amqtt keeps sessions in memory only, so an event that a device publishes while the
# gateway is not subscribed (for example during a gateway restart) is acked by the broker and
# lost. The gateway waits for its subscription before it reports ready; sites use Mosquitto.
class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: Broker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        # amqtt logs every client connection at INFO, and at ERROR a PUBACK time-out per QoS 1
        # status message that did not change delivery (see _quiet_amqtt_puback_timeouts).
        logging.getLogger("amqtt").setLevel(logging.ERROR)
        logging.getLogger("amqtt.broker").setLevel(logging.CRITICAL)
        logging.getLogger("transitions").setLevel(logging.WARNING)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_amqtt_puback_timeouts(loop.get_exception_handler()))
        self._broker = Broker(config)
        await self._broker.start()
        log.info("embedded MQTT broker listening on %s", self.url)

    async def stop(self) -> None:
        if self._broker is None:
            return
        await self._broker.shutdown()
        self._broker = None


ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


def _quiet_amqtt_puback_timeouts(previous: ExceptionHandler | None) -> ExceptionHandler:
    """Log amqtt's unretrieved PUBACK time-outs at debug level instead of as errors.

    amqtt 0.12 leaves a task per QoS 1 delivery that fails with TimeoutError when it does not
    match the client's PUBACK (seen for retained `status` messages); delivery itself is not
    affected, and the gateway acks every message it takes.
    """

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        future = context.get("future")
        coroutine = getattr(future, "get_coro", lambda: None)() if future is not None else None
        module = getattr(getattr(coroutine, "cr_code", None), "co_filename", "")
        if isinstance(error, TimeoutError) and "amqtt" in module:
            log.debug("amqtt: %s", error)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    return handle
