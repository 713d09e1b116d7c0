"""The Vietnamese catalog covers every user-facing message in the code."""

from __future__ import annotations

from pathlib import Path

from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from gateway import i18n

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "gateway" / "locale" / "vi" / "LC_MESSAGES" / "gateway.po"


def extracted_messages() -> set[str]:
    found: set[str] = set()
    for folder in ("gateway", "drivers", "simulators"):
        for _filename, _line, message, _comments, _context in extract_from_dir(ROOT / folder, keywords={"_": None}):
            found.add(message)
    return found


def test_catalog_translates_every_message():
    """Test that every string passed to _() has a non-empty Vietnamese translation."""
    with CATALOG.open("rb") as handle:
        catalog = read_po(handle, locale="vi")
    translated = {message.id for message in catalog if message.id and message.string and not message.fuzzy}

    missing = sorted(extracted_messages() - translated)

    assert missing == []


def test_translation_follows_language():
    """Test that _() gives Vietnamese by default and English when asked."""
    try:
        i18n.set_language("vi")
        assert i18n._("Device") == "Thiết bị"
        i18n.set_language("en")
        assert i18n._("Device") == "Device"
    finally:
        i18n._language = None
