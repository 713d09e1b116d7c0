"""Simulated fire-alarm transmitters that speak MQTT protocol v1 to a real broker.

Each device has its own MQTT connection, with the device id as client id and username. On
connect it publishes a retained `online` on its status topic, with a retained `offline` as
its last will. It then sends heartbeats every `interval_s` seconds and the events it is asked
to send, either at run time through `TransmitterFleet.publish_event` or from a schedule of
`ScheduledEvent`s. Events and heartbeats of a device share one `seq` counter per `boot`.

A device whose connection fails reconnects with capped, jittered backoff and keeps its boot
and seq, as a transmitter does after a network outage. An event published while the device
is offline waits for the next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence

import aiomqtt

from drivers.mqtt.protocol import (
    encode_event,
    encode_heartbeat,
    event_topic,
    heartbeat_topic,
    status_topic,
)
from gateway.backoff import Backoff

log = logging.getLogger(__name__)

SEQ_MODULUS = 2**32
MAX_BOOT = 2**31 - 1

# Seconds that aiomqtt waits for a CONNACK, a PUBACK or a DISCONNECT before it raises MqttError.
MQTT_TIMEOUT_S = 10.0
# Seconds that a stopping fleet waits for its devices to publish `offline` and disconnect.
STOP_TIMEOUT_S = MQTT_TIMEOUT_S + 5.0
# Minimum seconds between two warnings about failed connections, so that a broker outage
# seen by thousands of devices logs a few lines with counts instead of one line per device.
FAILURE_WARNING_INTERVAL_S = 5.0

_TOPIC_UNSAFE = re.compile(r"[/+#\x00]")
_SCHEDULE_FORM = "AT_S:DEVICE_INDEX:CODE:QUALIFIER:ZONE[:LABEL], e.g. 10:0:110:E:3:Tầng 3 - Kho"


@dataclasses.dataclass(frozen=True)
class ScheduledEvent:
    """An event that device `device_index` publishes `at_s` seconds after the fleet starts running."""

    at_s: float
    device_index: int
    code: str = "110"
    qualifier: str = "E"
    zone: int = 1
    label: str = ""


def parse_schedule(items: Iterable[str]) -> list[ScheduledEvent]:
    """Parse items of the form AT_S:DEVICE_INDEX:CODE:QUALIFIER:ZONE[:LABEL].

    The label is the rest of the item, so it may contain colons. Raises ValueError naming
    the invalid item and the expected form.
    """
    return [_parse_schedule_item(item) for item in items]


def _parse_schedule_item(item: str) -> ScheduledEvent:
    parts = item.split(":", 5)
    if len(parts) < 5:
        raise _schedule_error(item, f"it has {len(parts)} fields instead of 5 or 6")
    at_text, index_text, code, qualifier, zone_text = (part.strip() for part in parts[:5])
    label = parts[5] if len(parts) == 6 else ""

    try:
        at_s = float(at_text)
    except ValueError:
        raise _schedule_error(item, f"time {at_text!r} is not a number of seconds") from None
    if not 0 <= at_s < float("inf"):
        raise _schedule_error(item, f"time {at_text!r} is not a finite number of 0 seconds or more")
    if not index_text.isdigit():
        raise _schedule_error(item, f"device index {index_text!r} is not a whole number 0 or more")
    if not (len(code) == 3 and code.isdigit()):
        raise _schedule_error(item, f"event code {code!r} is not three digits")
    if qualifier not in ("E", "R", "P"):
        raise _schedule_error(item, f"qualifier {qualifier!r} is not E, R or P")
    if not (zone_text.isdigit() and int(zone_text) <= 9999):
        raise _schedule_error(item, f"zone {zone_text!r} is not a whole number from 0 to 9999")
    return ScheduledEvent(at_s, int(index_text), code, qualifier, int(zone_text), label)


def _schedule_error(item: str, reason: str) -> ValueError:
    return ValueError(f"schedule item {item!r} is invalid because {reason}; expected {_SCHEDULE_FORM}")


def _parse_broker_url(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("mqtt", "tcp"):
        raise ValueError(f"broker URL {url!r} is invalid; use mqtt://HOST:PORT (TLS is not supported)")
    if parsed.username is not None or parsed.password is not None:
        raise ValueError(f"broker URL {url!r} contains credentials; pass device passwords separately")
    if not parsed.hostname:
        raise ValueError(f"broker URL {url!r} has no host; use mqtt://HOST:PORT")
    try:
        port = parsed.port or 1883
    except ValueError:
        raise ValueError(f"broker URL {url!r} has an invalid port") from None
    return parsed.hostname, port


class Device:
    """State of one simulated transmitter: identity, boot counter and sequence counter."""

    def __init__(self, device_id: str, password: str | None, boot: int) -> None:
        self.device_id = device_id
        self.password = password
        self.boot = boot
        self.last_seq: int | None = None
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()

    def next_seq(self) -> int:
        """Take the next seq of this boot; it starts at 0 and wraps at 2**32."""
        self.last_seq = 0 if self.last_seq is None else (self.last_seq + 1) % SEQ_MODULUS
        return self.last_seq


class FleetStopped(RuntimeError):
    """Raised by `publish_event` when the fleet stops before the event could be published."""


class TransmitterFleet:
    """A fleet of simulated transmitters, one MQTT connection per device."""

    def __init__(
        self,
        broker_url: str,
        device_ids: Sequence[str],
        *,
        interval_s: float = 60.0,
        heartbeat_qos: int = 0,
        passwords: dict[str, str] | None = None,
        password: str | None = None,
        schedule: Sequence[ScheduledEvent] = (),
        boot: int | None = 1,
        keepalive_s: int = 60,
        connect_concurrency: int = 50,
        on_publish: Callable[[str, str, bytes], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """Configure the fleet; nothing connects before `run`.

        `passwords` maps device ids to passwords and `password` is used for devices not in
        it; a device with neither connects with its username only. `boot` is the boot
        counter of every device, or None for a random one per device. `on_publish` is
        called with (device_id, topic, payload) after each publish that the broker accepted.
        `connect_concurrency` bounds how many devices are connecting at the same time.
        Raises ValueError for an invalid URL, device id, setting or schedule entry.
        """
        self._host, self._port = _parse_broker_url(broker_url)
        _check_device_ids(device_ids)
        if not interval_s > 0:
            raise ValueError(f"heartbeat interval {interval_s!r} s is invalid; give a positive number of seconds")
        if heartbeat_qos not in (0, 1):
            raise ValueError(f"heartbeat QoS {heartbeat_qos!r} is invalid; use 0 or 1")
        if boot is not None and not 0 <= boot <= MAX_BOOT:
            raise ValueError(f"boot counter {boot!r} is invalid; give a whole number from 0 to {MAX_BOOT}, or None")
        if connect_concurrency < 1:
            raise ValueError(f"connect concurrency {connect_concurrency!r} is invalid; give 1 or more")
        for entry in schedule:
            if not 0 <= entry.device_index < len(device_ids):
                raise ValueError(
                    f"scheduled event {entry} names device index {entry.device_index}, "
                    f"but the fleet has devices 0 to {len(device_ids) - 1}"
                )

        self.interval_s = interval_s
        self.heartbeat_qos = heartbeat_qos
        self.keepalive_s = keepalive_s
        self.connection_failures = 0
        self._rng = rng or random.Random()
        self._schedule = sorted(schedule, key=lambda entry: entry.at_s)
        self._on_publish = on_publish
        self._connect_slots = asyncio.Semaphore(connect_concurrency)
        passwords = passwords or {}
        self.devices = [
            Device(
                device_id,
                passwords.get(device_id, password),
                self._rng.randint(1, MAX_BOOT) if boot is None else boot,
            )
            for device_id in device_ids
        ]

        self._stopping = asyncio.Event()
        self._running = False
        self._started_at = 0.0
        self._event_tasks: set[asyncio.Task[None]] = set()
        self._failures_since_warning = 0
        self._last_warning_at = float("-inf")

    @property
    def connected_count(self) -> int:
        return sum(device.connected.is_set() for device in self.devices)

    async def wait_connected(self, timeout: float) -> None:
        """Wait until every device is connected; raise TimeoutError after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                for device in self.devices:
                    await device.connected.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{self.connected_count} of {len(self.devices)} devices connected to "
                f"{self._host}:{self._port} within {timeout} s"
            ) from None

    def stop(self) -> None:
        """Ask the fleet to stop: `run` disconnects the devices and returns, or returns at once if not started yet."""
        self._stopping.set()

    async def run(self, duration_s: float | None = None) -> None:
        """Connect all devices, send heartbeats and scheduled events, then disconnect.

        Runs for `duration_s` seconds, or until `stop` is called or the task is cancelled.
        Scheduled times count from the start of this call. Before disconnecting, each
        connected device publishes a retained `offline`, because a clean disconnect does
        not trigger the last will.
        """
        if self._running:
            raise RuntimeError("the transmitter fleet is already running")
        self._running = True
        self._started_at = time.monotonic()
        log.info(
            "transmitter fleet of %d devices starting against %s:%d, heartbeat every %s s",
            len(self.devices),
            self._host,
            self._port,
            self.interval_s,
        )

        workers = [
            asyncio.create_task(self._run_device(device), name=f"transmitter {device.device_id}")
            for device in self.devices
        ]
        workers.append(asyncio.create_task(self._run_schedule(), name="transmitter schedule"))
        stop_waiter = asyncio.create_task(self._wait_stopping(duration_s))
        try:
            # Workers only return once the fleet is stopping, so one that ends first has crashed.
            done, _ = await asyncio.wait([stop_waiter, *workers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._stopping.set()
            stop_waiter.cancel()
            await self._finish([task for task in (*workers, *self._event_tasks) if not task.done()])
            self._stopping = asyncio.Event()
            self._running = False

        for task in done:
            if task is not stop_waiter:
                task.result()
        log.info("transmitter fleet stopped")

    async def publish_event(
        self,
        device_index: int,
        code: str,
        qualifier: str = "E",
        zone: int = 0,
        label: str = "",
        *,
        group: int = 0,
        test: bool = False,
    ) -> int:
        """Publish one event at QoS 1 from device `device_index` and return the seq it used.

        Waits for the device to be connected, and publishes again on the next connection if
        the broker did not acknowledge it, so the broker may receive it twice (at least once).
        Raises IndexError for an unknown device index, RuntimeError when the fleet is not
        running, and FleetStopped when the fleet stops before the broker acknowledged the event.
        """
        if not 0 <= device_index < len(self.devices):
            raise IndexError(f"device index {device_index} is out of range 0 to {len(self.devices) - 1}")
        if not self._running:
            raise RuntimeError("the transmitter fleet is not running; start run() first")

        device = self.devices[device_index]
        seq = device.next_seq()
        payload = encode_event(
            boot=device.boot, seq=seq, code=code, qualifier=qualifier, group=group, zone=zone, label=label, test=test
        )
        await self._publish_until_acknowledged(device, event_topic(device.device_id), payload)
        return seq

    # Device connections

    async def _run_device(self, device: Device) -> None:
        backoff = Backoff(initial=0.5, cap=30.0, rng=self._rng)
        while not self._stopping.is_set():
            try:
                await self._connect_and_serve(device, backoff)
                return
            except aiomqtt.MqttError as error:
                self._report_connection_failure(device, error)
            if await self._sleep_unless_stopping(backoff.next_delay()):
                return

    async def _connect_and_serve(self, device: Device, backoff: Backoff) -> None:
        client = aiomqtt.Client(
            self._host,
            self._port,
            username=device.device_id,
            password=device.password,
            identifier=device.device_id,
            will=aiomqtt.Will(status_topic(device.device_id), b"offline", qos=1, retain=True),
            clean_session=True,
            keepalive=self.keepalive_s,
            timeout=MQTT_TIMEOUT_S,
        )
        async with contextlib.AsyncExitStack() as stack:
            async with self._connect_slots:
                if self._stopping.is_set():
                    return
                await stack.enter_async_context(client)
            await self._publish(device, client, status_topic(device.device_id), b"online", qos=1, retain=True)
            device.client = client
            device.connected.set()
            backoff.reset()
            log.debug("device %s connected with boot %d", device.device_id, device.boot)
            try:
                await self._serve_connection(device, client)
            finally:
                device.connected.clear()
                device.client = None
            await self._say_offline(device, client)

    async def _serve_connection(self, device: Device, client: aiomqtt.Client) -> None:
        """Send heartbeats until the fleet stops; raise MqttError when the connection fails."""
        # The heartbeat loop is ended by an event instead of cancellation: on Python 3.11,
        # asyncio.wait_for inside aiomqtt's publish swallows a cancellation that arrives just
        # as the publish completes, and the loop would then run on forever.
        closing = asyncio.Event()
        heartbeats = asyncio.create_task(self._send_heartbeats(device, client, closing))
        watchers = [
            asyncio.create_task(_wait_disconnected(client)),
            asyncio.create_task(self._stopping.wait()),
        ]
        try:
            await asyncio.wait([heartbeats, *watchers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.set()
            for watcher in watchers:
                watcher.cancel()
            # Bounded: a heartbeat publish in progress ends within MQTT_TIMEOUT_S.
            await asyncio.wait([heartbeats, *watchers])

        for task in (heartbeats, *watchers):
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()

    async def _send_heartbeats(self, device: Device, client: aiomqtt.Client, closing: asyncio.Event) -> None:
        # The first heartbeat falls at a random point of the interval, so that a large fleet
        # spreads its heartbeats over the interval instead of sending them all at once.
        due = time.monotonic() + self._rng.uniform(0, self.interval_s)
        while not await _wait_event(closing, due - time.monotonic()):
            payload = encode_heartbeat(boot=device.boot, seq=device.next_seq(), uptime_s=int(self._uptime_s()))
            await self._publish(device, client, heartbeat_topic(device.device_id), payload, qos=self.heartbeat_qos)
            # A late heartbeat moves the schedule instead of sending a burst to catch up.
            due = max(due + self.interval_s, time.monotonic())

    async def _say_offline(self, device: Device, client: aiomqtt.Client) -> None:
        try:
            await self._publish(device, client, status_topic(device.device_id), b"offline", qos=1, retain=True)
        except aiomqtt.MqttError as error:
            log.debug("device %s could not publish offline before disconnecting: %s", device.device_id, error)

    def _report_connection_failure(self, device: Device, error: aiomqtt.MqttError) -> None:
        self.connection_failures += 1
        self._failures_since_warning += 1
        log.debug("device %s lost or failed its broker connection: %s", device.device_id, error)
        now = time.monotonic()
        if now - self._last_warning_at < FAILURE_WARNING_INTERVAL_S:
            return
        log.warning(
            "device %s: connection to broker %s:%d failed (%s); %d connection failures in the fleet "
            "since the last warning, devices retry with backoff",
            device.device_id,
            self._host,
            self._port,
            error,
            self._failures_since_warning,
        )
        self._failures_since_warning = 0
        self._last_warning_at = now

    # Publishing

    async def _publish(
        self, device: Device, client: aiomqtt.Client, topic: str, payload: bytes, *, qos: int, retain: bool = False
    ) -> None:
        await client.publish(topic, payload, qos=qos, retain=retain)
        if self._on_publish is None:
            return
        try:
            self._on_publish(device.device_id, topic, payload)
        except Exception:
            log.exception("on_publish callback failed for device %s on %s", device.device_id, topic)

    async def _publish_until_acknowledged(self, device: Device, topic: str, payload: bytes) -> None:
        retry_delay = Backoff(initial=0.2, cap=5.0, rng=self._rng)
        while True:
            if not device.connected.is_set():
                await self._wait_connected_or_stopping(device)
            client = device.client
            if self._stopping.is_set() or client is None:
                raise FleetStopped(f"the fleet stopped before device {device.device_id} published on {topic}")
            try:
                await self._publish(device, client, topic, payload, qos=1)
                return
            except aiomqtt.MqttError as error:
                log.info("device %s publishes on %s again after a failed attempt: %s", device.device_id, topic, error)
            # The device loop may not have noticed the lost connection yet, so wait a little
            # instead of retrying at once on the same broken client.
            if await self._sleep_unless_stopping(retry_delay.next_delay()):
                raise FleetStopped(f"the fleet stopped before device {device.device_id} published on {topic}")

    async def _wait_connected_or_stopping(self, device: Device) -> None:
        waiters = [asyncio.create_task(device.connected.wait()), asyncio.create_task(self._stopping.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    # Schedule and shutdown

    async def _run_schedule(self) -> None:
        for entry in self._schedule:
            delay = self._started_at + entry.at_s - time.monotonic()
            if delay > 0 and await self._sleep_unless_stopping(delay):
                return
            # Each event gets its own task, so that a device waiting for its connection
            # does not hold back the events of other devices.
            task = asyncio.create_task(self._publish_scheduled(entry))
            self._event_tasks.add(task)
            task.add_done_callback(self._event_tasks.discard)
        await self._stopping.wait()

    async def _publish_scheduled(self, entry: ScheduledEvent) -> None:
        device_id = self.devices[entry.device_index].device_id
        try:
            seq = await self.publish_event(entry.device_index, entry.code, entry.qualifier, entry.zone, entry.label)
        except FleetStopped:
            log.warning("scheduled event %s of device %s was not published because the fleet stopped", entry, device_id)
            return
        log.info(
            "device %s published scheduled event %s%s zone %d with seq %d",
            device_id,
            entry.qualifier,
            entry.code,
            entry.zone,
            seq,
        )

    async def _wait_stopping(self, duration_s: float | None) -> None:
        if duration_s is None:
            await self._stopping.wait()
        else:
            await self._sleep_unless_stopping(duration_s)

    async def _sleep_unless_stopping(self, seconds: float) -> bool:
        """Sleep for `seconds`; return True early when the fleet starts stopping."""
        return await _wait_event(self._stopping, seconds)

    async def _finish(self, tasks: list[asyncio.Task[None]]) -> None:
        """Wait for the tasks still running to stop, cancel those that take longer than STOP_TIMEOUT_S."""
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s failed while the fleet was stopping", task.get_name(), exc_info=task.exception())
        if pending:
            log.warning(
                "%d transmitter tasks did not stop within %.0f s and are cancelled; "
                "their devices may not have published offline",
                len(pending),
                STOP_TIMEOUT_S,
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _uptime_s(self) -> float:
        return time.monotonic() - self._started_at


async def _wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `event`; return whether it is set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(max(0.0, seconds)):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def _wait_disconnected(client: aiomqtt.Client) -> None:
    """Raise MqttError when the connection drops."""
    # Devices subscribe to nothing, so the message iterator only ends when the connection does.
    async for _message in client.messages:
        pass
    raise aiomqtt.MqttError("the message iterator ended, so the connection is closed")


def _check_device_ids(device_ids: Sequence[str]) -> None:
    if not device_ids:
        raise ValueError("the fleet needs at least one device id")
    seen: set[str] = set()
    for device_id in device_ids:
        if not device_id or _TOPIC_UNSAFE.search(device_id):
            raise ValueError(f"device id {device_id!r} is invalid; it must be non-empty and contain no / + # or NUL")
        if device_id in seen:
            raise ValueError(f"device id {device_id!r} appears twice; each device needs its own MQTT client id")
        seen.add(device_id)
