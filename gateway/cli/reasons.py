"""Short user-facing words for the rejection reasons that drivers and parsers report.

The detail after the reason stays in English (it names fields and values); this line in front
of it is what a technician reads first, in the configured language.
"""

from __future__ import annotations

from gateway.i18n import _

REASONS = {
    "invalid_json": "The payload is not valid JSON",
    "invalid_field": "A field is missing, has the wrong type or is out of range",
    "payload_too_large": "The payload is larger than 4 KiB",
    "unsupported_version": "The protocol version is not supported",
    "unknown_code": "The event code is not in the code table",
    "bad_contact_id": "The Contact ID message is invalid",
    "identity_mismatch": "The payload names another device than the topic",
    "bad_topic": "The topic does not follow pccc/v1/<device_id>/<kind>",
    "unregistered_device": "The device is not registered",
    "bad_checksum": "The Contact ID checksum is wrong",
    "bad_length": "The Contact ID message does not have 16 digits",
    "bad_message_type": "The Contact ID message type is not 18 or 98",
    "bad_qualifier": "The Contact ID qualifier is not 1, 3 or 6",
    "bad_digit": "The Contact ID message contains an invalid digit",
}


def reason_line(reason: str, detail: str) -> str:
    """Return one line: the reason in the user's language, its token, then the detail."""
    text = REASONS.get(reason)
    summary = _(text) if text else reason
    return f"{summary} [{reason}]: {detail}"
