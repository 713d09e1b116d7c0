"""Translations of user-facing text: Vietnamese first, English as the alternative.

Message ids are the English text. The Vietnamese catalog is a gettext .po file read with
Babel at start-up, so no compile step is needed after editing it. The language comes from
the configuration, or from `GATEWAY_LANG`, then `LANG` (English when it starts with `en`).
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources

from babel.messages.pofile import read_po

DOMAIN = "gateway"
SUPPORTED = ("vi", "en")
_language: str | None = None


def detect_language() -> str:
    for variable in ("GATEWAY_LANG", "LANG"):
        value = os.environ.get(variable, "")
        if value.startswith("en"):
            return "en"
        if value.startswith("vi"):
            return "vi"
    return "vi"


def set_language(language: str) -> None:
    global _language
    if language not in SUPPORTED:
        raise ValueError(f"language {language!r} is not supported; use one of {', '.join(SUPPORTED)}")
    _language = language


def language() -> str:
    return _language or detect_language()


@lru_cache(maxsize=4)
def _catalog(language: str) -> dict[str, str]:
    if language == "en":
        return {}
    path = resources.files("gateway.locale").joinpath(f"{language}/LC_MESSAGES/{DOMAIN}.po")
    with path.open("rb") as handle:
        catalog = read_po(handle, locale=language)
    return {str(message.id): str(message.string) for message in catalog if message.id and message.string and not message.fuzzy}


def _(message: str) -> str:
    """Translate `message` into the current language; untranslated text stays English."""
    return _catalog(language()).get(message, message)
