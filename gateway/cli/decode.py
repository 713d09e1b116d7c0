"""`gateway decode`: turn one raw frame into canonical signals, for diagnosis in the field."""

from __future__ import annotations

import sys
from typing import Annotated

import msgspec
import typer

from drivers.base import Rejection
from drivers.contact_id import ContactIdError, parse_contact_id
from drivers.mqtt import protocol
from gateway import codes
from gateway.cli.console import fail
from gateway.cli.reasons import reason_line
from gateway.i18n import _
from gateway.signal import Signal, Source, new_signal_id, utc_now

app = typer.Typer(help=_("Decode a raw frame and print each canonical signal as one JSON line."), no_args_is_help=True)

_json = msgspec.json.Encoder()


def _print(item: msgspec.Struct) -> None:
    sys.stdout.write(_json.encode(item).decode() + "\n")


@app.command("mqtt", help=_("Decode an MQTT protocol v1 message."))
def decode_mqtt(
    topic: Annotated[str, typer.Option("--topic", help=_("MQTT topic, e.g. pccc/v1/DEV-001/event."))],
    payload: Annotated[str, typer.Option("--payload", help=_("Message payload (JSON text)."))],
) -> None:
    """Decode an MQTT protocol v1 message."""
    raw = payload.encode()
    now = utc_now()
    try:
        parsed = protocol.parse_topic(topic)
        if parsed.kind == "event":
            _print(protocol.decode_event(parsed, raw, now))
        elif parsed.kind == "heartbeat":
            _print(protocol.decode_heartbeat(parsed, raw, now))
        elif parsed.kind == "status":
            state = "online" if protocol.decode_status(raw) else "offline"
            sys.stdout.write(_json.encode({"device_id": parsed.device_id, "status": state}).decode() + "\n")
        else:
            fail(_("topic kind {kind} carries no signal").format(kind=parsed.kind))
    except Rejection as rejection:
        fail(reason_line(rejection.reason, rejection.message))


@app.command("contact-id", help=_("Decode a Contact ID (SIA DC-05) message."))
def decode_contact_id(
    digits: Annotated[str, typer.Argument(help=_("Contact ID message: ACCT MT Q XYZ GG CCC S (16 digits, spaces allowed)."))],
) -> None:
    """Decode a Contact ID (SIA DC-05) message."""
    try:
        message = parse_contact_id(digits)
        entry = codes.lookup(message.code)
    except ContactIdError as error:
        fail(reason_line(error.reason, str(error)))
    except codes.UnknownEventCode as error:
        fail(reason_line("unknown_code", str(error)))
    signal = Signal(
        id=new_signal_id(),
        source=Source.SERIAL,
        device_id=message.account,
        event_class=entry.event_class,
        code=entry.code,
        qualifier=message.qualifier,
        sia_code=codes.to_sia(entry.code, message.qualifier),
        group=message.group,
        zone=message.zone,
        text=entry.label_en,
        received_at=utc_now(),
        raw=digits.encode(),
    )
    _print(signal)
