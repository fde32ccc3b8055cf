"""Reading the fields of one QĐ 130 record: timestamps, partial birth dates, ";" lists,
decimals, codes with their leading zeros, and a per-field error for each that breaks a rule.

Owns: ``Row`` (one record of one table, its fields as the XML gives them) and ``Problems``
(every field error of a file, raised together as one ``Rejected`` whose ``where`` is the
first place, e.g. "XML1/NGAY_SINH", and whose reason lists them all).
Calls: ``connectors.model`` (``Rejected``).
Called by: ``connectors.xml130.mapping``, ``connectors.xml130`` (peek).

Times are local Vietnamese time (UTC+07:00, no daylight saving), the only zone the HIS
write, so every ``yyyyMMddHHmm`` becomes a FHIR dateTime with ``+07:00``.
"""

from __future__ import annotations

import re

from connectors.model import Rejected

TZ = "+07:00"
_DECIMAL = re.compile(r"-?\d+(\.\d+)?")


def masked(value: str, limit: int = 24) -> str:
    """``value`` as an error message may show it: its shape, not its content (digits as 9,
    letters as A, other characters kept), at most ``limit`` characters."""
    shape = "".join("9" if c.isdigit() else "A" if c.isalpha() else c for c in value[:limit])
    return shape + ("…" if len(value) > limit else "")


class Problems:
    """The field errors of one file, collected so a sender sees them all at once."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, reason: str) -> None:
        self.items.append((where, reason))

    def raise_if_any(self) -> None:
        if self.items:
            where = self.items[0][0]
            listed = "; ".join(f"{w}: {r}" for w, r in self.items[:20])
            more = f" (and {len(self.items) - 20} more)" if len(self.items) > 20 else ""
            raise Rejected(f"{len(self.items)} field error(s): {listed}{more}", where)


class Row:
    """One record of one table. ``pos`` is its STT (or position) in a list table, None for a
    single-record table (XML1), and names the record in errors: "XML2[3]/SO_LUONG"."""

    __slots__ = ("pos", "problems", "table", "values")

    def __init__(self, table: str, pos: str | None, values: dict[str, str], problems: Problems) -> None:
        self.table, self.pos, self.values, self.problems = table, pos, values, problems

    def where(self, name: str) -> str:
        return f"{self.table}/{name}" if self.pos is None else f"{self.table}[{self.pos}]/{name}"

    def bad(self, name: str, reason: str) -> None:
        """A field error. The field's value (or an item of its ";" list) quoted in ``reason``
        is replaced by its shape (``masked``): error texts are stored and shown unsealed, and
        a misplaced CCCD, a card code, a phone or a birth date must not be written there."""
        value = self.values.get(name) or ""
        for item in sorted(
            {value, value.strip(), *(v.strip() for v in value.split(";"))}, key=len, reverse=True
        ):
            if item and repr(item) in reason:
                reason = reason.replace(repr(item), repr(masked(item)))
        self.problems.add(self.where(name), reason)

    def text(self, name: str) -> str | None:
        """The field's text (whitespace around it dropped), None when empty or absent."""
        value = self.values.get(name)
        return value if value else None

    def required(self, name: str) -> str | None:
        value = self.text(name)
        if value is None:
            self.bad(name, "is required")
        return value

    def codes(self, name: str) -> list[str]:
        """A ";"-separated list (MA_BENH_KT, MA_THE_BHYT, MA_PTTT_QT...), empty items dropped."""
        value = self.text(name)
        return [c.strip() for c in value.split(";") if c.strip()] if value else []

    def when(self, name: str) -> str | None:
        """``yyyyMMddHHmm`` (also ``yyyyMMdd`` and ``yyyyMMddHHmmss``) as a FHIR dateTime."""
        value = self.text(name)
        return None if value is None else self._when(name, value)

    def _when(self, name: str, value: str) -> str | None:
        if not value.isdigit() or len(value) not in (8, 12, 14):
            self.bad(name, f"{value!r} is not a time yyyyMMddHHmm")
            return None
        day = self._day(name, value[:8])
        if day is None or len(value) == 8:
            return day
        hh, mm, ss = int(value[8:10]), int(value[10:12]), int(value[12:14] or 0)
        if hh > 23 or mm > 59 or ss > 59:
            self.bad(name, f"{value!r} has no such time of day")
            return None
        return f"{day}T{hh:02d}:{mm:02d}:{ss:02d}{TZ}"

    def day(self, name: str) -> str | None:
        """``yyyyMMdd`` (a longer timestamp keeps its date) as a FHIR date."""
        value = self.text(name)
        if value is None:
            return None
        if not value.isdigit() or len(value) not in (8, 12, 14):
            self.bad(name, f"{value!r} is not a date yyyyMMdd")
            return None
        return self._day(name, value[:8])

    def _day(self, name: str, value: str) -> str | None:
        year, month, day = int(value[:4]), int(value[4:6]), int(value[6:8])
        if not (1900 <= year <= 2199 and 1 <= month <= 12 and 1 <= day <= _days_in(year, month)):
            self.bad(name, f"{value!r} is no calendar date")
            return None
        return f"{year:04d}-{month:02d}-{day:02d}"

    def birth(self, name: str) -> str | None:
        """NGAY_SINH: 12 (or 8) digits whose unknown parts are zeros: ``1985000000000``
        is the year 1985, ``198503000000`` March 1985. The time of day is not kept."""
        value = self.text(name)
        if value is None:
            return None
        if not value.isdigit() or len(value) not in (8, 12):
            self.bad(name, f"{value!r} is not a birth date yyyyMMddHHmm (unknown parts 00)")
            return None
        year, month, day = int(value[:4]), int(value[4:6]), int(value[6:8])
        if not 1880 <= year <= 2199 or month > 12 or (month == 0 and day != 0):
            self.bad(name, f"{value!r} is not a birth date (year, month or day out of range)")
            return None
        if month == 0:
            return f"{year:04d}"
        if day == 0:
            return f"{year:04d}-{month:02d}"
        if day > _days_in(year, month):
            self.bad(name, f"{value!r} is no calendar date")
            return None
        return f"{year:04d}-{month:02d}-{day:02d}"

    def number(self, name: str) -> int | float | None:
        """A decimal written with "." (an integer stays an integer)."""
        value = self.text(name)
        if value is None:
            return None
        if not _DECIMAL.fullmatch(value):
            self.bad(name, f"{value!r} is not a decimal number (decimals use '.')")
            return None
        return float(value) if "." in value else int(value)

    def code(self, name: str, pattern: re.Pattern[str], what: str, *, required: bool = False) -> str | None:
        value = self.required(name) if required else self.text(name)
        if value is not None and not pattern.fullmatch(value):
            self.bad(name, f"{value!r} is not {what}")
            return None
        return value


def _days_in(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31
