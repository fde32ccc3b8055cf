"""Text folding for string search, Vietnamese first.

Owns: how a string is normalized for the default (starts-with, case- and accent-blind)
string match: "Nguyễn Thị Đào" -> "nguyen thi dao".
Calls: unicodedata.  Called by: index extraction and string predicates.
"""

from __future__ import annotations

import unicodedata

MAX_NORMALIZED_LENGTH = 200
# đ/Đ is a letter of its own, not d plus a combining mark, so NFD does not split it.
_SPECIAL_LETTERS = str.maketrans({"đ": "d", "Đ": "d", "ø": "o", "Ø": "o", "ł": "l", "Ł": "l"})


def fold(text: str) -> str:
    if text.isascii():
        return " ".join(text.lower().split())[:MAX_NORMALIZED_LENGTH]
    decomposed = unicodedata.normalize("NFD", text.translate(_SPECIAL_LETTERS))
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(stripped.casefold().split())[:MAX_NORMALIZED_LENGTH]
