"""Contact ID (SIA DC-05) messages: parse, check and encode the 16-digit form.

A message reads `ACCT MT Q XYZ GG CCC S`:

- ACCT: account, 4 digits from 0-9 and B-F
- MT: message type, 18 (or 98 from some older senders)
- Q: qualifier, 1 new event, 3 restore, 6 still present (status report)
- XYZ, GG, CCC: event code, group (partition) and zone (or user number), all decimal
- S: checksum digit

For the checksum, digit 0 weighs 10, digits 1-9 weigh their value and B-F weigh 11-15. The
16 weights must add up to a multiple of 15. The digit A is not used.

Whether the event code is in the fire-use table is not checked here: callers use
`gateway.codes.lookup`, so that one message can be parsed and then rejected with its reason.
"""

from __future__ import annotations

import msgspec

from gateway.signal import QUALIFIER_BY_DIGIT, Qualifier

MESSAGE_LENGTH = 16
MESSAGE_TYPES = ("18", "98")

_WEIGHT_BY_DIGIT: dict[str, int] = {
    "0": 10,
    **{str(value): value for value in range(1, 10)},
    "B": 11,
    "C": 12,
    "D": 13,
    "E": 14,
    "F": 15,
}
_DIGIT_BY_WEIGHT: dict[int, str] = {weight: digit for digit, weight in _WEIGHT_BY_DIGIT.items()}
_DIGIT_BY_QUALIFIER: dict[Qualifier, str] = {qualifier: digit for digit, qualifier in QUALIFIER_BY_DIGIT.items()}


class ContactIdError(ValueError):
    """A Contact ID message that cannot be parsed or encoded.

    `reason` is a short stable token for metrics and the quarantine table, such as
    "bad_length", "bad_digit", "bad_checksum", "bad_message_type" or "bad_qualifier".
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ContactIdMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One parsed Contact ID message, with `account` and `checksum` in uppercase."""

    account: str
    message_type: str
    qualifier: Qualifier
    code: str
    group: int
    zone: int
    checksum: str


def parse_contact_id(text: str) -> ContactIdMessage:
    """Parse a 16-digit Contact ID message. Spaces and lowercase b-f are accepted.

    Raises ContactIdError. A bad checksum is reported before a bad field, because it
    means the digits themselves were damaged in transit.
    """
    digits = _normalize(text)
    if len(digits) != MESSAGE_LENGTH:
        raise ContactIdError(
            "bad_length",
            f"Contact ID message {text!r} has {len(digits)} digits, expected {MESSAGE_LENGTH} "
            "in the form ACCT MT Q XYZ GG CCC S",
        )
    _check_digits(digits, text)
    _check_checksum(digits, text)

    account, message_type, qualifier_digit = digits[0:4], digits[4:6], digits[6]
    code, group, zone, checksum = digits[7:10], digits[10:12], digits[12:15], digits[15]

    if message_type not in MESSAGE_TYPES:
        raise ContactIdError(
            "bad_message_type",
            f"Contact ID message {text!r} has message type {message_type!r}, expected 18 or 98",
        )
    qualifier = QUALIFIER_BY_DIGIT.get(qualifier_digit)
    if qualifier is None:
        raise ContactIdError(
            "bad_qualifier",
            f"Contact ID message {text!r} has qualifier {qualifier_digit!r}, "
            "expected 1 (new event), 3 (restore) or 6 (status)",
        )
    for name, field in (("event code", code), ("group", group), ("zone", zone)):
        if not _is_ascii_decimal(field):
            raise ContactIdError(
                "bad_digit",
                f"Contact ID message {text!r} has {name} {field!r}, which must contain only digits 0-9",
            )

    return ContactIdMessage(
        account=account,
        message_type=message_type,
        qualifier=qualifier,
        code=code,
        group=int(group),
        zone=int(zone),
        checksum=checksum,
    )


def checksum_digit(first15: str) -> str:
    """Return the checksum digit that makes the 15 given digits a valid message.

    The result is "1"-"9", "0" for the weight 10, or "B"-"F" for 11-15. Spaces are
    ignored. Raises ContactIdError for another length or an invalid digit.
    """
    digits = _normalize(first15)
    if len(digits) != MESSAGE_LENGTH - 1:
        raise ContactIdError(
            "bad_length",
            f"checksum input {first15!r} has {len(digits)} digits, expected {MESSAGE_LENGTH - 1}",
        )
    _check_digits(digits, first15)
    # The weight lies in 1..15, so a sum that is already a multiple of 15 gets F (15).
    return _DIGIT_BY_WEIGHT[15 - _weight_sum(digits) % 15]


def encode_contact_id(
    account: str,
    qualifier: Qualifier,
    code: str,
    group: int,
    zone: int,
    message_type: str = "18",
) -> str:
    """Encode a Contact ID message as 16 digits without spaces, checksum included.

    Raises ContactIdError naming the field that cannot be encoded.
    """
    account = account.upper()
    if len(account) != 4 or any(char not in _WEIGHT_BY_DIGIT for char in account):
        raise ContactIdError("bad_account", f"account {account!r} must be 4 digits from 0-9 and B-F")
    if message_type not in MESSAGE_TYPES:
        raise ContactIdError("bad_message_type", f"message type {message_type!r} must be 18 or 98")
    qualifier_digit = _DIGIT_BY_QUALIFIER.get(qualifier)
    if qualifier_digit is None:
        raise ContactIdError("bad_qualifier", f"qualifier {qualifier!r} must be a gateway.signal.Qualifier")
    if len(code) != 3 or not _is_ascii_decimal(code):
        raise ContactIdError("bad_code", f"event code {code!r} must be 3 digits 0-9")
    if not 0 <= group <= 99:
        raise ContactIdError("bad_group", f"group {group} is out of range 0-99")
    if not 0 <= zone <= 999:
        raise ContactIdError("bad_zone", f"zone {zone} is out of range 0-999")

    first15 = f"{account}{message_type}{qualifier_digit}{code}{group:02d}{zone:03d}"
    return first15 + checksum_digit(first15)


def _normalize(text: str) -> str:
    return "".join(text.split()).upper()


def _is_ascii_decimal(field: str) -> bool:
    return field.isascii() and field.isdigit()


def _check_digits(digits: str, text: str) -> None:
    for position, char in enumerate(digits, start=1):
        if char not in _WEIGHT_BY_DIGIT:
            raise ContactIdError(
                "bad_digit",
                f"Contact ID message {text!r} has {char!r} at digit {position}, "
                "but only 0-9 and B-F are valid",
            )


def _check_checksum(digits: str, text: str) -> None:
    total = _weight_sum(digits)
    if total % 15 == 0:
        return
    expected = checksum_digit(digits[:-1])
    raise ContactIdError(
        "bad_checksum",
        f"Contact ID message {text!r} fails its checksum: the digit weights add up to {total}, "
        f"not a multiple of 15, so the checksum digit should be {expected!r}, not {digits[-1]!r}. "
        "The message was damaged in transit, or the sender computes the checksum wrongly",
    )


def _weight_sum(digits: str) -> int:
    return sum(_WEIGHT_BY_DIGIT[char] for char in digits)
