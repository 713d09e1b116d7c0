"""Tests for the fire-use Contact ID event-code table and its SIA DC-03 mapping."""

from __future__ import annotations

import pytest

from gateway import codes
from gateway.codes import CODES, UnknownEventCode, from_sia, label, lookup, to_sia
from gateway.signal import EventClass, Qualifier

SIA_CODES_IN_TABLE = sorted(
    {entry.sia_new for entry in CODES.values() if entry.sia_new}
    | {entry.sia_restore for entry in CODES.values() if entry.sia_restore}
)


def test_table_codes_are_three_digit_keys():
    """Test that every key is a three-digit code equal to its entry's code."""
    for key, entry in CODES.items():
        assert key == entry.code
        assert len(key) == 3
        assert key.isdigit()


def test_table_has_no_duplicate_rows():
    """Test that the literal table lists each code once."""
    rows = [row[0] for row in codes._TABLE]
    assert len(rows) == len(set(rows))
    assert len(rows) == len(CODES)


def test_fire_family_complete():
    """Test that 110-118 are all present and all of class fire."""
    for number in range(110, 119):
        entry = lookup(str(number))
        assert entry.event_class is EventClass.FIRE, entry.code


def test_only_fire_family_is_fire_class():
    """Test that no code outside 110-118 can open a fire incident."""
    fire_codes = {code for code, entry in CODES.items() if entry.event_class is EventClass.FIRE}
    assert fire_codes == {str(number) for number in range(110, 119)}


@pytest.mark.parametrize(
    ("first", "last", "event_class"),
    [
        (200, 206, EventClass.SUPERVISORY),
        (300, 313, EventClass.TROUBLE),
        (320, 327, EventClass.TROUBLE),
        (330, 339, EventClass.TROUBLE),
        (341, 344, EventClass.TROUBLE),
        (350, 357, EventClass.TROUBLE),
        (370, 378, EventClass.TROUBLE),
        (380, 389, EventClass.TROUBLE),
        (391, 393, EventClass.TROUBLE),
        (570, 577, EventClass.TROUBLE),
        (601, 609, EventClass.TEST),
        (611, 614, EventClass.TEST),
        (621, 628, EventClass.TROUBLE),
    ],
)
def test_table_family_complete(first, last, event_class):
    """Test that each required family is present without gaps and has its class."""
    for number in range(first, last + 1):
        entry = lookup(str(number))
        assert entry.event_class is event_class, entry.code


def test_table_every_code_in_a_family():
    """Test that the families named in error messages cover every code in the table."""
    for code in CODES:
        assert any(first <= code <= last for first, last, _ in codes.FAMILIES), code


def test_table_family_bounds_exist():
    """Test that each family's first and last code are in the table."""
    for first, last, _ in codes.FAMILIES:
        assert first in CODES
        assert last in CODES


def test_table_labels_non_empty():
    """Test that every code has a Vietnamese and an English label, and that they differ."""
    for entry in CODES.values():
        assert entry.label_en.strip(), entry.code
        assert entry.label_vi.strip(), entry.code
        assert entry.label_vi != entry.label_en, entry.code


def test_table_sia_codes_are_two_uppercase_letters():
    """Test that every SIA code in the table is empty or two uppercase ASCII letters."""
    for entry in CODES.values():
        for sia in (entry.sia_new, entry.sia_restore):
            if sia:
                assert len(sia) == 2, entry.code
                assert sia.isascii(), entry.code
                assert sia.isalpha(), entry.code
                assert sia.isupper(), entry.code


def test_table_sia_code_has_one_qualifier():
    """Test that no SIA code is a new-event code in one entry and a restore code in another."""
    new_codes = {entry.sia_new for entry in CODES.values() if entry.sia_new}
    restore_codes = {entry.sia_restore for entry in CODES.values() if entry.sia_restore}
    assert new_codes & restore_codes == set()


def test_table_entries_are_immutable():
    """Test that an entry cannot be changed in place."""
    entry = lookup("110")
    with pytest.raises(AttributeError):
        entry.event_class = EventClass.TEST  # type: ignore[misc]
    with pytest.raises(TypeError):
        CODES["999"] = entry  # type: ignore[index]


@pytest.mark.parametrize(
    ("code", "new", "restore"),
    [
        ("110", "FA", "FR"),
        ("111", "FA", "FR"),
        ("113", "SA", "SR"),
        ("114", "KA", "KR"),
        ("115", "FA", "FR"),
        ("200", "FS", "FV"),
        ("301", "AT", "AR"),
        ("302", "YT", "YR"),
        ("350", "YS", "YK"),
        ("354", "YC", "YK"),
        ("373", "FT", "FJ"),
        ("570", "UB", "UU"),
        ("571", "FB", "FU"),
        ("602", "RP", ""),
        ("604", "FI", "FK"),
        ("607", "TS", "TE"),
        ("627", "LB", ""),
        ("628", "LX", ""),
    ],
)
def test_to_sia_known_examples(code, new, restore):
    """Test that well-known Contact ID codes map to the expected SIA pair."""
    assert to_sia(code, Qualifier.NEW) == new
    assert to_sia(code, Qualifier.RESTORE) == restore


def test_to_sia_status_uses_new_code():
    """Test that a status report (qualifier 6/P) gets the new-event SIA code."""
    for code, entry in CODES.items():
        assert to_sia(code, Qualifier.STATUS) == entry.sia_new, code


def test_to_sia_without_sia_code_is_empty():
    """Test that a code without an SIA equivalent maps to the empty string."""
    assert to_sia("313", Qualifier.NEW) == ""
    assert to_sia("609", Qualifier.NEW) == ""
    assert to_sia("602", Qualifier.RESTORE) == ""


def test_to_sia_unknown_code_raises():
    """Test that to_sia rejects a code outside the table."""
    with pytest.raises(UnknownEventCode):
        to_sia("130", Qualifier.NEW)


@pytest.mark.parametrize(
    ("sia", "code", "qualifier"),
    [
        ("FA", "110", Qualifier.NEW),
        ("FR", "110", Qualifier.RESTORE),
        ("SA", "113", Qualifier.NEW),
        ("KA", "114", Qualifier.NEW),
        ("FS", "200", Qualifier.NEW),
        ("FV", "200", Qualifier.RESTORE),
        ("YX", "300", Qualifier.NEW),
        ("AT", "301", Qualifier.NEW),
        ("AR", "301", Qualifier.RESTORE),
        ("YT", "302", Qualifier.NEW),
        ("YR", "302", Qualifier.RESTORE),
        ("YS", "350", Qualifier.NEW),
        ("YK", "350", Qualifier.RESTORE),
        ("LT", "351", Qualifier.NEW),
        ("YC", "354", Qualifier.NEW),
        ("UT", "370", Qualifier.NEW),
        ("FT", "373", Qualifier.NEW),
        ("FJ", "373", Qualifier.RESTORE),
        ("UB", "570", Qualifier.NEW),
        ("FB", "571", Qualifier.NEW),
        ("RX", "601", Qualifier.NEW),
        ("RP", "602", Qualifier.NEW),
        ("RY", "608", Qualifier.NEW),
        ("LB", "627", Qualifier.NEW),
        ("LX", "628", Qualifier.NEW),
    ],
)
def test_from_sia_canonical_examples(sia, code, qualifier):
    """Test that shared and one-to-one SIA codes map back to the documented Contact ID code."""
    entry, got_qualifier = from_sia(sia)
    assert entry.code == code
    assert got_qualifier is qualifier


@pytest.mark.parametrize("sia", SIA_CODES_IN_TABLE)
def test_from_sia_round_trip(sia):
    """Test that from_sia picks the lowest code using the SIA code, and to_sia gives it back."""
    entry, qualifier = from_sia(sia)
    assert to_sia(entry.code, qualifier) == sia

    users = [
        code
        for code, candidate in CODES.items()
        if (qualifier is Qualifier.NEW and candidate.sia_new == sia)
        or (qualifier is Qualifier.RESTORE and candidate.sia_restore == sia)
    ]
    assert entry.code == min(users)


def test_to_sia_round_trip_every_entry():
    """Test that each entry's SIA codes lead back to an entry of the same class, exactly where one-to-one."""
    for code, entry in CODES.items():
        for qualifier, sia in ((Qualifier.NEW, entry.sia_new), (Qualifier.RESTORE, entry.sia_restore)):
            if not sia:
                continue
            assert to_sia(code, qualifier) == sia
            back, back_qualifier = from_sia(sia)
            assert back_qualifier is qualifier, code
            assert back.event_class is entry.event_class, code
            shared = sum(1 for other in CODES.values() if sia in (other.sia_new, other.sia_restore))
            if shared == 1:
                assert back.code == code
            assert back.code <= code


@pytest.mark.parametrize(
    ("sia", "code"),
    [("FH", "110"), ("SH", "113"), ("KH", "114")],
)
def test_from_sia_alarm_restore_aliases(sia, code):
    """Test that the DC-03 alarm-restore codes are read as restores of the matching alarm."""
    entry, qualifier = from_sia(sia)
    assert entry.code == code
    assert qualifier is Qualifier.RESTORE


@pytest.mark.parametrize("sia", ["fa", "Fa", "F", "FAX", "", " FA", "ZZ", "BA", "12"])
def test_from_sia_rejects_unknown(sia):
    """Test that lowercase, malformed and non-fire SIA codes raise UnknownEventCode naming the value."""
    with pytest.raises(UnknownEventCode) as caught:
        from_sia(sia)
    assert caught.value.code == sia
    assert repr(sia) in str(caught.value)


@pytest.mark.parametrize("code", ["999", "130", "100", "11", "1100", " 110", "", "FA"])
def test_lookup_rejects_unknown(code):
    """Test that lookup raises UnknownEventCode for codes outside the table or of the wrong shape."""
    with pytest.raises(UnknownEventCode) as caught:
        lookup(code)
    assert caught.value.code == code


def test_unknown_event_code_message():
    """Test that the error is a LookupError whose message names the code and the valid families."""
    with pytest.raises(LookupError) as caught:
        lookup("999")
    message = str(caught.value)
    assert "'999'" in message
    assert "110-118 fire" in message
    assert "200-206 supervisory" in message
    assert "300-393 trouble" in message
    assert "621-628" in message


def test_label_languages():
    """Test that label returns Vietnamese by default and English on request."""
    assert label("110") == "Báo cháy"
    assert label("110", "en") == "Fire alarm"
    assert label("301") == "Mất nguồn điện lưới"
    assert label("302", "vi") == "Ắc quy yếu"
    assert label("602") == "Kiểm tra định kỳ"


def test_label_locale_forms():
    """Test that locale forms such as vi_VN and en-US select the same labels."""
    assert label("115", "vi_VN") == label("115", "vi")
    assert label("115", "en-US") == label("115", "en")
    assert label("115", "EN") == label("115", "en")


def test_label_rejects_other_language():
    """Test that label raises ValueError for a language without labels."""
    with pytest.raises(ValueError, match="'fr'"):
        label("110", "fr")


def test_label_unknown_code_raises():
    """Test that label raises UnknownEventCode for a code outside the table."""
    with pytest.raises(UnknownEventCode):
        label("131")
