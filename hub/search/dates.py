"""FHIR date, dateTime and instant values as inclusive microsecond ranges.

Owns: the implicit range of a date by its precision ("2020" covers the whole year).
Values without a time zone are read as UTC, both when indexing and when searching,
so the two sides always agree.
Calls: datetime.  Called by: index extraction, date predicates, ``_lastUpdated``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_ONE_MICRO = timedelta(microseconds=1)


class DateFormatError(ValueError):
    pass


def to_micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _ONE_MICRO


def from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def date_range(text: str) -> tuple[int, int]:
    """Inclusive (low, high) bounds, in microseconds since the epoch, of a FHIR date."""
    match = _DATE_RE.match(text.strip())
    if not match:
        raise DateFormatError(f"not a FHIR date or dateTime: {text!r}")
    parts = match.groupdict()
    year = int(parts["y"])
    try:
        if parts["m"] is None:
            low = datetime(year, 1, 1, tzinfo=UTC)
            high = datetime(year + 1, 1, 1, tzinfo=UTC) if year < 9999 else datetime.max.replace(tzinfo=UTC)
            return to_micros(low), to_micros(high) - 1
        month = int(parts["m"])
        if parts["d"] is None:
            low = datetime(year, month, 1, tzinfo=UTC)
            high = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
            return to_micros(low), to_micros(high) - 1
        day = int(parts["d"])
        if parts["H"] is None:
            low = datetime(year, month, day, tzinfo=UTC)
            return to_micros(low), to_micros(low + timedelta(days=1)) - 1
        tz = parts["tz"]
        offset = timedelta(0)
        if tz and tz != "Z":
            sign = 1 if tz[0] == "+" else -1
            offset = sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
        low = datetime(year, month, day, int(parts["H"]), int(parts["M"]), int(parts["S"] or 0), tzinfo=UTC)
        low -= offset
        if parts["S"] is None:
            span = timedelta(minutes=1)
        elif parts["f"]:
            digits = parts["f"][:6]
            low += timedelta(microseconds=int(digits.ljust(6, "0")))
            span = timedelta(microseconds=10 ** (6 - len(digits)))
        else:
            span = timedelta(seconds=1)
        return to_micros(low), to_micros(low + span) - 1
    except (ValueError, OverflowError) as exc:  # OverflowError: past 9999-12-31 once shifted
        raise DateFormatError(f"not a valid calendar date: {text!r}") from exc
