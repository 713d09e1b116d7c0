"""MQTT driver: subscribes to transmitter protocol v1 on a broker and feeds the intake.

The session is persistent (clean session off, fixed client id), so the broker keeps QoS 1
events while the gateway is away. PUBACK is sent by hand: for an event only after the intake
made it durable, for a rejected message only after it is quarantined. An event whose ack was
never sent is redelivered by the broker, and the intake recognises the redelivery.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho

from drivers.base import IntakePort, Rejection
from drivers.mqtt import protocol
from gateway.backoff import Backoff
from gateway.signal import Source, utc_now

log = logging.getLogger(__name__)

LINK = "mqtt"
SUBSCRIBED_KINDS = ("event", "heartbeat", "status", "reply")


class MqttEndpoint:
    def __init__(self, url: str, *, username: str = "", password: str = "") -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "mqtts"
        self.port = parts.port or (8883 if self.tls else 1883)
        self.username = username or unquote(parts.username or "") or None
        self.password = password or unquote(parts.password or "") or None

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class MqttDriver:
    def __init__(
        self,
        intake: IntakePort,
        endpoint: MqttEndpoint,
        *,
        client_id: str = "pccc-gateway",
        keepalive_s: int = 30,
        shared_group: str = "",
    ) -> None:
        self._intake = intake
        self._endpoint = endpoint
        self._client_id = client_id
        self._keepalive_s = keepalive_s
        prefix = f"$share/{shared_group}/" if shared_group else ""
        self.subscriptions = [f"{prefix}{protocol.TOPIC_ROOT}/+/{kind}" for kind in SUBSCRIBED_KINDS]
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()
        self._pending: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Connect, consume and reconnect with jittered, capped backoff, forever."""
        backoff = Backoff(initial=0.5, cap=30.0)
        while True:
            try:
                await self._session(backoff)
            except aiomqtt.MqttError as error:
                reason = str(error)
            else:
                reason = "the broker closed the connection"
            self.connected.clear()
            self.subscribed.clear()
            self._intake.link_state(LINK, False)
            delay = backoff.next_delay()
            log.warning("MQTT link to %s lost (%s); reconnecting in %.1f s", self._endpoint, reason, delay)
            await asyncio.sleep(delay)

    async def _session(self, backoff: Backoff) -> None:
        endpoint = self._endpoint
        client = aiomqtt.Client(
            endpoint.host,
            endpoint.port,
            identifier=self._client_id,
            username=endpoint.username,
            password=endpoint.password,
            keepalive=self._keepalive_s,
            clean_session=False,
            protocol=aiomqtt.ProtocolVersion.V311,
            tls_params=aiomqtt.TLSParameters() if endpoint.tls else None,
        )
        # NOTE: aiomqtt 2.5 has no public manual-ack API (aiomqtt issue #345, PR #346), so the
        # underlying paho client is switched to manual acks before connecting. Remove when
        # aiomqtt exposes `manual_ack` and `Message.ack()`.
        paho_client: paho.Client = client._client
        paho_client.manual_ack_set(True)

        log.info("connecting to MQTT broker %s as %s", endpoint, self._client_id)
        async with client:
            backoff.reset()
            self.connected.set()
            self._intake.link_state(LINK, True)
            log.info("MQTT link to %s is up", endpoint)
            for topic in self.subscriptions:
                await client.subscribe(topic, qos=1)
            self.subscribed.set()
            async for message in client.messages:
                self._dispatch(paho_client, message)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        # Admissions outlive a lost connection: their journal writes complete, and their acks
        # go nowhere, so the broker redelivers and the intake recognises the duplicate.
        task = asyncio.create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _dispatch(self, paho_client: paho.Client, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        received_at = utc_now()

        def ack() -> None:
            if message.qos > 0:
                paho_client.ack(message.mid, message.qos)

        try:
            parsed = protocol.parse_topic(topic)
            if parsed.kind == "event":
                signal = protocol.decode_event(parsed, payload, received_at)
                key = protocol.dedup_key(parsed.device_id, signal.boot, signal.seq, payload)
                self._spawn(self._admit(signal, key, ack))
                return
            if parsed.kind == "heartbeat":
                self._intake.submit_heartbeat(protocol.decode_heartbeat(parsed, payload, received_at))
            elif parsed.kind == "status":
                self._intake.device_status(parsed.device_id, protocol.decode_status(payload), Source.MQTT)
            else:
                log.debug("reply from %s: %r", parsed.device_id, payload[:200])
            ack()
        except Rejection as rejection:
            device_id = topic.split("/")[2] if topic.count("/") >= 2 else ""
            rejection.with_context(raw=payload, source=Source.MQTT, origin=topic, device_id=device_id)
            self._spawn(self._reject(rejection, ack))

    async def _admit(self, signal, key: str, ack) -> None:
        try:
            await self._intake.submit_signal(signal, key)
        except Rejection as rejection:
            rejection.with_context(raw=signal.raw, source=Source.MQTT, origin=protocol.event_topic(signal.device_id), device_id=signal.device_id)
            await self._reject(rejection, ack)
            return
        except Exception:
            # Not acked: the broker redelivers the event on the next session.
            log.exception("intake failed on event seq %s from device %s; left unacked for redelivery", signal.seq, signal.device_id)
            return
        ack()

    async def _reject(self, rejection: Rejection, ack) -> None:
        try:
            await self._intake.quarantine(rejection)
        except Exception:
            log.exception("quarantine of a rejected message from %s failed; left unacked for redelivery", rejection.origin)
            return
        ack()
