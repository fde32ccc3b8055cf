"""Every text of the pages has its Vietnamese translation (Vietnamese is the default).

Extracts the message ids the way ``pybabel extract`` would (``_``/``gettext``/``ngettext``/
``N_`` in hub/web's Python, ``_()`` in its Jinja2 templates) and checks each against the
merged catalogue of ``hub/web/locale/vi/*.po``; also that the catalogues parse, no id is
translated twice differently, and the locale formats are the ones the issue asks for.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date
from pathlib import Path
from typing import Any

from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from hub.web import i18n

WEB = Path(i18n.__file__).parent
KEYWORDS = {"_": None, "gettext": None, "ngettext": (1, 2), "N_": None}


def extracted() -> dict[str | tuple[str, str], list[str]]:
    """Message ids and where they are; a plural is its (singular, plural) pair."""
    found: dict[str | tuple[str, str], list[str]] = defaultdict(list)
    method_map = [("**.py", "python"), ("templates/**.html", "jinja2.ext:babel_extract")]
    options = {"templates/**.html": {"extensions": "jinja2.ext.i18n", "trimmed": "true"}}
    for filename, lineno, message, _comments, _context in extract_from_dir(
        str(WEB), method_map, options, keywords=KEYWORDS
    ):
        if isinstance(message, tuple):
            if len(message) >= 2 and message[0] and message[1]:
                found[(message[0], message[1])].append(f"{filename}:{lineno}")
        elif message:
            found[message].append(f"{filename}:{lineno}")
    return found


def _translated(catalogue: Any, msgid: str | tuple[str, str]) -> bool:
    if isinstance(msgid, tuple):
        singular, plural = msgid
        # Vietnamese has one form; either form translated counts.
        return (
            catalogue.ngettext(singular, plural, 1) != singular
            or catalogue.ngettext(singular, plural, 2) != plural
        )
    return bool(catalogue.gettext(msgid) != msgid)


def test_every_page_text_has_a_vietnamese_translation() -> None:
    messages = extracted()
    assert len(messages) > 20  # the extraction itself works
    catalogue = i18n.translations("vi")
    missing = [
        f"{msgid!r} ({places[0]})" for msgid, places in messages.items() if not _translated(catalogue, msgid)
    ]
    assert not missing, f"{len(missing)} texts without Vietnamese:\n" + "\n".join(sorted(missing))


def test_catalogues_agree_with_each_other() -> None:
    seen: dict[str, tuple[str, str]] = {}
    conflicts = []
    for path in i18n.catalogue_files("vi"):
        with path.open("rb") as handle:
            for message in read_po(handle, locale="vi"):
                if not message.id or not message.string:
                    continue
                key = message.id if isinstance(message.id, str) else message.id[0]
                text = message.string if isinstance(message.string, str) else message.string[0]
                if key in seen and seen[key][1] != text:
                    conflicts.append(
                        f"{key!r}: {seen[key][0]} says {seen[key][1]!r}, {path.name} says {text!r}"
                    )
                seen.setdefault(key, (path.name, text))
    assert not conflicts, "\n".join(conflicts)


def test_dates_and_numbers_are_written_the_vietnamese_way_by_default() -> None:
    assert i18n.DEFAULT_LOCALE == "vi"
    assert i18n.display_date(date(2026, 3, 10), "vi") == "10/03/2026"
    assert i18n.display_number(1234567.8, "vi") == "1.234.567,8"
    assert i18n.display_number(1234567.8, "en") == "1,234,567.8"
    assert i18n.translations("en").gettext("Log in") == "Log in"
    assert i18n.translations("vi").gettext("Log in") == "Đăng nhập"
