"""Languages of the pages: Vietnamese (the default) and English, with Babel.

Owns: which locales exist, the merged gettext catalogue of each, and how dates, times and
numbers are written per locale (vi: ``10/03/2026``, ``1.234.567,8``).
Message ids are English; Vietnamese lives in ``hub/web/locale/vi/*.po``, one file per area
(common, clinician, portal, console), merged here at first use so areas never edit one file.
Calls: Babel.  Called by: ``hub.web.render`` (templates' ``_`` and filters), views, tests.
"""

from __future__ import annotations

import gettext as stdlib_gettext
import io
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo

from babel import Locale
from babel.dates import format_date, format_datetime
from babel.messages.catalog import Catalog
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import format_decimal
from babel.support import Translations

LOCALES = ("vi", "en")
DEFAULT_LOCALE = "vi"
LOCALE_DIR = Path(__file__).parent / "locale"
# Times are shown in Vietnam's time zone, whatever the server's.
DISPLAY_ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
_DATE_PATTERN = {"vi": "dd/MM/yyyy", "en": "d MMM yyyy"}
_DATETIME_PATTERN = {"vi": "HH:mm dd/MM/yyyy", "en": "d MMM yyyy, HH:mm"}


def N_(message: str) -> str:
    """Marks a message id for extraction where it is translated later (``page.gettext``)."""
    return message


def catalogue_files(locale: str) -> list[Path]:
    return sorted((LOCALE_DIR / locale).glob("*.po"))


@lru_cache(maxsize=len(LOCALES))
def translations(locale: str) -> stdlib_gettext.NullTranslations:
    """The merged catalogue of a locale; English (the message ids) needs none."""
    if locale not in LOCALES or locale == "en":
        return stdlib_gettext.NullTranslations()
    merged = Catalog(locale=locale)
    for path in catalogue_files(locale):
        with path.open("rb") as handle:
            for message in read_po(handle, locale=locale):
                if message.id and message.string and not message.fuzzy:
                    merged[message.id] = message
    buffer = io.BytesIO()
    write_mo(buffer, merged)
    buffer.seek(0)
    return Translations(buffer)


def pick_locale(requested: str | None) -> str:
    return requested if requested in LOCALES else DEFAULT_LOCALE


# Parsed once: Babel's Locale.parse per value was most of a record page's render time.
_PARSED = {code: Locale.parse(code) for code in LOCALES}


def _babel_locale(locale: str) -> Locale:
    return _PARSED.get(locale) or _PARSED[DEFAULT_LOCALE]


# A record page writes the same dates and values many times (a chart's table, the timeline):
# formatting is memoised per (value, locale).
@lru_cache(maxsize=8192)
def display_date(value: date, locale: str) -> str:
    return format_date(value, _DATE_PATTERN.get(locale, _DATE_PATTERN["vi"]), locale=_babel_locale(locale))


@lru_cache(maxsize=8192)
def display_datetime(value: datetime, locale: str) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(DISPLAY_ZONE)
    pattern = _DATETIME_PATTERN.get(locale, _DATETIME_PATTERN["vi"])
    return format_datetime(value, pattern, locale=_babel_locale(locale))


@lru_cache(maxsize=8192)
def display_number(value: float | int | Decimal, locale: str, digits: int | None = None) -> str:
    """``1.234.567,8`` in Vietnamese, ``1,234,567.8`` in English; ``digits`` fixes the decimals."""
    if digits is not None:
        pattern = "#,##0" + ("." + "0" * digits if digits else "")
        return format_decimal(value, format=pattern, locale=_babel_locale(locale))
    return format_decimal(value, locale=_babel_locale(locale))
