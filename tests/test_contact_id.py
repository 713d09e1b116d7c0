"""Tests for the Contact ID (SIA DC-05) parser, checksum and encoder.

The valid messages below were checked by hand. Digit 0 weighs 10, 1-9 their value and
B-F 11-15, and a valid message's weights add up to a multiple of 15.
"""

from __future__ import annotations

import itertools
import random

import pytest

from drivers.contact_id import (
    ContactIdError,
    ContactIdMessage,
    checksum_digit,
    encode_contact_id,
    parse_contact_id,
)
from gateway.signal import Qualifier

VALID_DIGITS = "0123456789BCDEF"


def test_parse_contact_id_fire_alarm():
    """Test that a fire alarm from zone 15 parses into its fields.

    1234 18 1 110 01 015: 1+2+3+4 + 1+8 + 1 + 1+1+10 + 10+1 + 10+1+5 = 59, and 60 - 59 = 1.
    """
    message = parse_contact_id("1234 18 1 110 01 015 1")
    assert message == ContactIdMessage(
        account="1234",
        message_type="18",
        qualifier=Qualifier.NEW,
        code="110",
        group=1,
        zone=15,
        checksum="1",
    )


def test_parse_contact_id_checksum_zero_means_ten():
    """Test that the checksum digit 0 weighs 10.

    1234 18 1 110 01 002: 10 + 9 + 1 + 12 + 11 + (10+10+2) = 65, and 75 - 65 = 10, written 0.
    """
    message = parse_contact_id("1234 18 1 110 01 002 0")
    assert message.zone == 2
    assert message.checksum == "0"


def test_parse_contact_id_checksum_f_means_fifteen():
    """Test that a sum already divisible by 15 needs the checksum F.

    1234 18 1 110 01 106: 10 + 9 + 1 + 12 + 11 + (1+10+6) = 60, so the digit must weigh 15.
    """
    message = parse_contact_id("1234 18 1 110 01 106 F")
    assert message.zone == 106
    assert message.checksum == "F"


def test_parse_contact_id_hex_account_restore():
    """Test that an account with B-F digits and a restore qualifier parse.

    C0DE 18 3 301 00 001: (12+10+13+14) + 9 + 3 + (3+10+1) + (10+10) + (10+10+1) = 116,
    and 120 - 116 = 4.
    """
    message = parse_contact_id("C0DE 18 3 301 00 001 4")
    assert message.account == "C0DE"
    assert message.qualifier is Qualifier.RESTORE
    assert message.code == "301"
    assert message.group == 0
    assert message.zone == 1


def test_parse_contact_id_accepts_compact_and_lowercase():
    """Test that spaces are optional and lowercase b-f read as uppercase."""
    spaced = parse_contact_id("C0DE 18 3 301 00 001 4")
    assert parse_contact_id("C0DE183301000014") == spaced
    assert parse_contact_id("c0de183301000014") == spaced
    assert parse_contact_id("  C0DE 183 301 00001 4\r\n") == spaced


def test_parse_contact_id_status_and_type_98():
    """Test that qualifier 6 reads as status and message type 98 is accepted.

    1234 98 6 373 02 004: 10 + (9+8) + 6 + (3+7+3) + (10+2) + (10+10+4) = 82, and 90 - 82 = 8.
    """
    message = parse_contact_id("1234 98 6 373 02 004 8")
    assert message.message_type == "98"
    assert message.qualifier is Qualifier.STATUS
    assert message.code == "373"
    assert message.group == 2
    assert message.zone == 4


def test_parse_contact_id_unknown_event_code_passes():
    """Test that an event code outside the fire-use table still parses, since callers look it up."""
    message = parse_contact_id(encode_contact_id("1234", Qualifier.NEW, "131", 1, 15))
    assert message.code == "131"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "bad_length"),
        ("1234 18 1 110 01 015", "bad_length"),
        ("1234 18 1 110 01 015 11", "bad_length"),
        ("1234 18 1 110 01 015 1 1234", "bad_length"),
        ("1A34 18 1 110 01 015 1", "bad_digit"),
        ("1234 18 1 110 01 015 A", "bad_digit"),
        ("1234 18 1 11* 01 015 1", "bad_digit"),
        ("1234 18 1 110 01 015 #", "bad_digit"),
        ("1234-18-1-110-01-015-1", "bad_length"),
        ("1234 18 1 110 01 015 2", "bad_checksum"),
        ("1234 18 1 131 01 015 4", "bad_checksum"),
        # 1234 28 1 110 01 015: 10 + (2+8) + 1 + 12 + 11 + 16 = 60, so F. The type is wrong.
        ("1234 28 1 110 01 015 F", "bad_message_type"),
        # 1234 18 2 110 01 015: 10 + 9 + 2 + 12 + 11 + 16 = 60, so F. The qualifier is wrong.
        ("1234 18 2 110 01 015 F", "bad_qualifier"),
        # 1234 18 1 110 01 01B: 10 + 9 + 1 + 12 + 11 + (10+1+11) = 65, so 0. B is not a zone digit.
        ("1234 18 1 110 01 01B 0", "bad_digit"),
        # 1234 18 1 110 0C 015: 10 + 9 + 1 + 12 + (10+12) + 16 = 70, so 5. C is not a group digit.
        ("1234 18 1 110 0C 015 5", "bad_digit"),
        # 1234 18 1 11B 01 015: 10 + 9 + 1 + (1+1+11) + 11 + 16 = 60, so F. B is not an event digit.
        ("1234 18 1 11B 01 015 F", "bad_digit"),
    ],
)
def test_parse_contact_id_rejects_bad_input(text, reason):
    """Test that each kind of malformed message raises ContactIdError with its reason."""
    with pytest.raises(ContactIdError) as caught:
        parse_contact_id(text)
    assert caught.value.reason == reason
    assert isinstance(caught.value, ValueError)
    assert repr(text) in str(caught.value)


def test_parse_contact_id_suggests_checksum():
    """Test that a bad checksum names the digit it should be.

    1234 18 1 131 01 015: 10 + 9 + 1 + (1+3+1) + 11 + 16 = 52, so the checksum is 8, not 4.
    """
    with pytest.raises(ContactIdError) as caught:
        parse_contact_id("1234 18 1 131 01 015 4")
    message = str(caught.value)
    assert "should be '8'" in message
    assert "not '4'" in message
    assert "56" in message


def test_parse_contact_id_suggests_zero_and_f():
    """Test that the suggested checksum is written 0 for weight 10 and F for weight 15."""
    with pytest.raises(ContactIdError, match="should be '0'"):
        parse_contact_id("1234 18 1 110 01 002 5")
    with pytest.raises(ContactIdError, match="should be 'F'"):
        parse_contact_id("1234 18 1 110 01 106 1")


def test_parse_contact_id_detects_any_single_digit_change():
    """Test that changing any one digit of a valid message to any other digit fails the checksum."""
    valid = "1234181110010151"
    for position, replacement in itertools.product(range(len(valid)), VALID_DIGITS):
        if valid[position] == replacement:
            continue
        damaged = valid[:position] + replacement + valid[position + 1 :]
        with pytest.raises(ContactIdError) as caught:
            parse_contact_id(damaged)
        assert caught.value.reason == "bad_checksum", damaged


@pytest.mark.parametrize(
    ("first15", "expected"),
    [
        ("1234 18 1 110 01 015", "1"),
        ("1234 18 1 110 01 002", "0"),
        ("1234 18 1 110 01 106", "F"),
        ("C0DE 18 3 301 00 001", "4"),
        ("1234 18 1 131 01 015", "8"),
        ("1234 98 6 373 02 004", "8"),
    ],
)
def test_checksum_digit_hand_examples(first15, expected):
    """Test that checksum_digit matches the hand-computed examples."""
    assert checksum_digit(first15) == expected


@pytest.mark.parametrize(
    ("first15", "reason"),
    [
        ("1234 18 1 110 01 01", "bad_length"),
        ("1234 18 1 110 01 0151", "bad_length"),
        ("1234 18 1 110 01 0A5", "bad_digit"),
    ],
)
def test_checksum_digit_rejects_bad_input(first15, reason):
    """Test that checksum_digit rejects input that is not 15 valid digits."""
    with pytest.raises(ContactIdError) as caught:
        checksum_digit(first15)
    assert caught.value.reason == reason


def test_encode_contact_id_hand_example():
    """Test that encoding the fire alarm example gives the hand-checked 16 digits."""
    assert encode_contact_id("1234", Qualifier.NEW, "110", 1, 15) == "1234181110010151"
    assert encode_contact_id("c0de", Qualifier.RESTORE, "301", 0, 1) == "C0DE183301000014"
    assert encode_contact_id("1234", Qualifier.STATUS, "373", 2, 4, message_type="98") == "1234986373020048"


def test_encode_contact_id_round_trip():
    """Test that random encoded messages parse back to the same fields."""
    generator = random.Random(20240601)
    account_digits = VALID_DIGITS
    for _ in range(500):
        account = "".join(generator.choice(account_digits) for _ in range(4))
        qualifier = generator.choice(list(Qualifier))
        code = f"{generator.randrange(1000):03d}"
        group = generator.randrange(100)
        zone = generator.randrange(1000)
        message_type = generator.choice(["18", "98"])

        text = encode_contact_id(account, qualifier, code, group, zone, message_type=message_type)
        message = parse_contact_id(text)

        assert len(text) == 16
        assert message.account == account
        assert message.message_type == message_type
        assert message.qualifier is qualifier
        assert message.code == code
        assert message.group == group
        assert message.zone == zone
        assert message.checksum == text[-1]


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        (("123", Qualifier.NEW, "110", 1, 15), "bad_account"),
        (("12345", Qualifier.NEW, "110", 1, 15), "bad_account"),
        (("12A4", Qualifier.NEW, "110", 1, 15), "bad_account"),
        (("1234", "E", "110", 1, 15), "bad_qualifier"),
        (("1234", Qualifier.NEW, "11", 1, 15), "bad_code"),
        (("1234", Qualifier.NEW, "11B", 1, 15), "bad_code"),
        (("1234", Qualifier.NEW, "110", 100, 15), "bad_group"),
        (("1234", Qualifier.NEW, "110", -1, 15), "bad_group"),
        (("1234", Qualifier.NEW, "110", 1, 1000), "bad_zone"),
        (("1234", Qualifier.NEW, "110", 1, -1), "bad_zone"),
    ],
)
def test_encode_contact_id_rejects_bad_fields(arguments, reason):
    """Test that the encoder names the field it cannot encode."""
    with pytest.raises(ContactIdError) as caught:
        encode_contact_id(*arguments)
    assert caught.value.reason == reason


def test_encode_contact_id_rejects_message_type():
    """Test that the encoder accepts only message types 18 and 98."""
    with pytest.raises(ContactIdError) as caught:
        encode_contact_id("1234", Qualifier.NEW, "110", 1, 15, message_type="28")
    assert caught.value.reason == "bad_message_type"
