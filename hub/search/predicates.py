"""One predicate builder per search-parameter type.

Owns: turning one parsed parameter value (with prefix or modifier) into the set of matching
pids, as a ``PidSet``: a SELECT of pids from one ``idx_*`` table (one index range scan
thanks to the leading hash column) and whether the match is negated (``:not``, ``:missing``).
The engine applies it to whichever alias of ``resource`` it is filtering, which is what
makes chaining and ``_has`` possible.
Calls: SQLAlchemy, hashing, normalize, words (multi-word name search), dates,
``hub.crypto.blind``.
Called by: ``hub.search.engine``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import sqlalchemy as sa

from hub.crypto.blind import search_forms
from hub.db.schema import (
    idx_composite,
    idx_date,
    idx_number,
    idx_quantity,
    idx_string,
    idx_token,
    idx_uri,
    index_table,
)
from hub.errors import bad_request
from hub.search.dates import DateFormatError, date_range, from_micros
from hub.search.hashing import hash64
from hub.search.normalize import fold
from hub.search.registry import SearchParam
from hub.search.words import searched_by_word, word_identity, words

Condition = sa.ColumnElement[bool]


@dataclass(frozen=True)
class PidSet:
    pids: sa.Select[Any]
    negated: bool = False


_PREFIX_RE = re.compile(r"^(eq|ne|gt|lt|ge|le|sa|eb|ap)(?=[-+0-9.])")


def split_prefix(value: str) -> tuple[str, str]:
    match = _PREFIX_RE.match(value)
    return (match.group(1), value[2:]) if match else ("eq", value)


def _pids_in(table: sa.Table, *conditions: Condition) -> PidSet:
    # correlate(None): chained searches nest selects of the same idx table; SQLAlchemy must not
    # correlate the inner one to the outer one.
    return PidSet(sa.select(table.c.pid).where(*conditions).correlate(None))


def _range_condition(
    prefix: str, low: sa.ColumnElement[Any], high: sa.ColumnElement[Any], q_low: float, q_high: float
) -> Condition:
    """Spec R4 3.1.1.4.x: compare the target range [low, high] with the search range."""
    if prefix == "eq":
        return sa.and_(low >= q_low, high <= q_high)
    if prefix == "ne":
        return sa.or_(low < q_low, high > q_high)
    if prefix == "gt":
        return high > q_high
    if prefix == "lt":
        return low < q_low
    contained = sa.and_(low >= q_low, high <= q_high)
    if prefix == "ge":  # the range above the search value overlaps the target, or contains it
        return sa.or_(high > q_high, contained)
    if prefix == "le":
        return sa.or_(low < q_low, contained)
    if prefix == "sa":
        return low > q_high
    if prefix == "eb":
        return high < q_low
    # ap: overlap with the search range widened by 10 % either side.
    margin = max((q_high - q_low) * 0.1, abs(q_low) * 0.1 if isinstance(q_low, float) else 0)
    return sa.and_(low <= q_high + margin, high >= q_low - margin)


def _any_of(column: sa.ColumnElement[Any], hashes: list[int]) -> Condition:
    # OR of equalities rather than IN: IN's expanding parameter is re-rendered per statement.
    return column == hashes[0] if len(hashes) == 1 else sa.or_(*(column == h for h in hashes))


def token(param: SearchParam, value: str, modifier: str | None) -> PidSet:
    rtype, code = param.resource_type, param.code
    if modifier == "text":
        # R4: ":text" is a string search (folded starts-with) on Coding.display and the text.
        return _pids_in(
            idx_token,
            idx_token.c.hash_identity == param.hash_identity,
            idx_token.c.display.startswith(fold(value), autoescape=True),
        )
    # Each value is looked for as given and, for CCCD/BHYT/BHXH identifiers and phone
    # numbers, as the keyed hash the index stores them under (hub.crypto.blind).
    if "|" in value:
        system, code_value = value.split("|", 1)
        if system and code_value:
            forms = [code_value, *search_forms(param.expression, system, code_value)]
            condition = _any_of(idx_token.c.hash_sys_value, [hash64(rtype, code, system, f) for f in forms])
        elif system:
            condition = sa.and_(
                idx_token.c.hash_identity == param.hash_identity, idx_token.c.system == system
            )
        else:
            forms = [code_value, *search_forms(param.expression, None, code_value)]
            condition = sa.and_(
                _any_of(idx_token.c.hash_value, [hash64(rtype, code, f) for f in forms]),
                idx_token.c.system.is_(None),
            )
    else:
        forms = [value, *search_forms(param.expression, None, value)]
        condition = _any_of(idx_token.c.hash_value, [hash64(rtype, code, f) for f in forms])
    matched = _pids_in(idx_token, condition)
    return PidSet(matched.pids, negated=True) if modifier == "not" else matched


def reference(param: SearchParam, value: str, modifier: str | None, base_url: str) -> PidSet:
    if value.startswith(base_url.rstrip("/") + "/"):
        value = value[len(base_url.rstrip("/")) + 1 :]
    target_type: str | None = modifier if modifier and modifier[0].isupper() else None
    table = index_table("reference", param.resource_type)  # AuditEvent's: idx_reference_audit
    if "://" in value or value.startswith("urn:"):
        return _pids_in(table, table.c.hash_target == hash64(param.resource_type, param.code, value))
    parts = value.split("/")
    if len(parts) >= 2:
        target_type, target_id = parts[-2], parts[-1]
        if len(parts) >= 4 and parts[-2] == "_history":
            target_type, target_id = parts[-4], parts[-3]
    else:
        target_id = value
    conditions: list[Condition] = [table.c.hash_target == hash64(param.resource_type, param.code, target_id)]
    if target_type:
        conditions.append(table.c.target_type == target_type)
    return _pids_in(table, *conditions)


def string(param: SearchParam, value: str, modifier: str | None) -> PidSet:
    if modifier == "exact":
        return _pids_in(
            idx_string,
            idx_string.c.hash_exact == hash64(param.resource_type, param.code, value),
            idx_string.c.value_exact == value,
        )
    folded = fold(value)
    if not modifier and searched_by_word(param.resource_type, param.code):
        query_words = words(folded)
        if len(query_words) > 1:  # one word keeps the plain starts-with of a whole part
            return _every_word(param, query_words)
    pattern = f"%{_like_escaped(folded)}%" if modifier == "contains" else f"{_like_escaped(folded)}%"
    return _pids_in(
        idx_string,
        idx_string.c.hash_identity == param.hash_identity,
        idx_string.c.value_norm.like(pattern, escape="\\"),
    )


def _like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _every_word(param: SearchParam, query_words: list[str]) -> PidSet:
    """Name search by words ("nguyen thi hoa", "Hoa Nguyễn", "ng th ho"): every word of the
    query starts some word of the parameter's values, in any order. Per query word, two
    range scans of the (hash_identity, value_norm, pid) index: a part's first word is the
    start of the part's own row, any other word has a word row (hub.search.words). The pids
    found are grouped and kept when every word found them. This costs the sum of the words'
    matches, whatever the planner thinks of them; ``IN`` semi-joins instead let PostgreSQL
    pick, under the page's ``ORDER BY pid LIMIT``, a nested loop over the pids of common
    words ("nguyen", "thi"), quadratic: 0.1 to 0.5 s at 5,000 patients on a busy machine."""
    identities = (param.hash_identity, word_identity(param.resource_type, param.code))
    found = sa.union_all(
        *(
            # The word's number inline: it is ours, never the client's.
            sa.select(idx_string.c.pid, sa.literal_column(str(number)).label("word"))
            .where(
                idx_string.c.hash_identity == identity,
                idx_string.c.value_norm.like(f"{_like_escaped(word)}%", escape="\\"),
            )
            .correlate(None)
            for number, word in enumerate(query_words)
            for identity in identities
        )
    ).subquery()
    # DISTINCT, then count(*): count(DISTINCT) would force PostgreSQL to sort, not hash.
    pairs = sa.select(found.c.pid, found.c.word).distinct().subquery()
    every = sa.func.count() == len(query_words)
    return PidSet(sa.select(pairs.c.pid).group_by(pairs.c.pid).having(every).correlate(None))


def date(param: SearchParam, value: str, modifier: str | None) -> PidSet:
    prefix, text = split_prefix(value)
    q_low, q_high = _date_or_400(param.code, text)
    return _pids_in(
        idx_date,
        idx_date.c.hash_identity == param.hash_identity,
        _range_condition(prefix, idx_date.c.low, idx_date.c.high, q_low, q_high),
    )


def last_updated(column: sa.ColumnElement[Any], value: str) -> Condition:
    prefix, text = split_prefix(value)
    q_low, q_high = _date_or_400("_lastUpdated", text)
    low, high = from_micros(q_low), from_micros(q_high)
    return _range_condition(prefix, column, column, low, high)  # type: ignore[arg-type]


def _date_or_400(code: str, text: str) -> tuple[int, int]:
    try:
        return date_range(text)
    except DateFormatError as exc:
        raise bad_request(f"Parameter '{code}': {exc}") from None


def _number_range(code: str, text: str) -> tuple[float, float]:
    """The implicit range of a number by its precision: 100 means [99.5, 100.5]."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise bad_request(f"Parameter '{code}': not a number: {text!r}") from None
    exponent = number.as_tuple().exponent
    half = Decimal(5).scaleb(exponent - 1) if isinstance(exponent, int) else Decimal(0)
    return float(number - half), float(number + half)


def number(param: SearchParam, value: str, modifier: str | None) -> PidSet:
    prefix, text = split_prefix(value)
    q_low, q_high = _number_range(param.code, text)
    if prefix in ("gt", "lt", "ge", "le", "sa", "eb"):
        q_low = q_high = float(Decimal(text))
    return _pids_in(
        idx_number,
        idx_number.c.hash_identity == param.hash_identity,
        _range_condition(prefix, idx_number.c.low, idx_number.c.high, q_low, q_high),
    )


def quantity(param: SearchParam, value: str, modifier: str | None) -> PidSet:
    prefix, text = split_prefix(value)
    number_text, _, rest = text.partition("|")
    system, _, unit = rest.partition("|")
    q_low, q_high = _number_range(param.code, number_text)
    if prefix in ("gt", "lt", "ge", "le", "sa", "eb"):
        q_low = q_high = float(Decimal(number_text))
    conditions: list[Condition] = [
        _range_condition(prefix, idx_quantity.c.low, idx_quantity.c.high, q_low, q_high)
    ]
    if system and unit:
        conditions.append(
            idx_quantity.c.hash_sys_code == hash64(param.resource_type, param.code, system, unit)
        )
    else:
        conditions.append(idx_quantity.c.hash_identity == param.hash_identity)
        if unit:
            conditions.append(idx_quantity.c.code == unit)
    return _pids_in(idx_quantity, *conditions)


def uri(param: SearchParam, value: str, modifier: str | None) -> PidSet:
    if modifier == "below":
        return _pids_in(
            idx_uri, idx_uri.c.hash_identity == param.hash_identity, idx_uri.c.uri.startswith(value)
        )
    return _pids_in(idx_uri, idx_uri.c.hash_uri == hash64(param.resource_type, param.code, value))


def composite(param: SearchParam, value: str, modifier: str | None) -> PidSet:
    """``first$second``, e.g. ``http://loinc.org|8480-6$gt140|http://unitsofmeasure.org|mm[Hg]``."""
    first, separator, second = value.partition("$")
    if not separator or not first or not second:
        raise bad_request(f"Parameter '{param.code}' takes two values joined by '$', not {value!r}")
    rtype, code = param.resource_type, param.code
    kind = param.components[1][0]
    if kind == "token":
        return _pids_in(idx_composite, idx_composite.c.hash_key == hash64(rtype, code, first, "t", second))
    if kind == "reference":
        target = second.rsplit("/", 1)[-1] if "://" not in second else second
        return _pids_in(idx_composite, idx_composite.c.hash_key == hash64(rtype, code, first, "r", target))
    if kind == "string":
        return _pids_in(
            idx_composite,
            idx_composite.c.hash_key == hash64(rtype, code, first, "s", ""),
            idx_composite.c.text.startswith(fold(second), autoescape=True),
        )
    prefix, text = split_prefix(second)
    q_low: float
    q_high: float
    if kind == "date":
        q_low, q_high = _date_or_400(code, text)
        key = hash64(rtype, code, first, "d", "")
    else:
        number_text, _, rest = text.partition("|")
        system, _, unit = rest.partition("|")
        q_low, q_high = _number_range(code, number_text)
        if prefix in ("gt", "lt", "ge", "le", "sa", "eb"):
            q_low = q_high = float(Decimal(number_text))
        key = hash64(rtype, code, first, "q", f"{system}|{unit}" if unit else "")
    return _pids_in(
        idx_composite,
        idx_composite.c.hash_key == key,
        _range_condition(prefix, idx_composite.c.low, idx_composite.c.high, q_low, q_high),
    )


def missing(param: SearchParam, value: str) -> PidSet:
    table = index_table(param.type, param.resource_type)
    present = _pids_in(table, table.c.hash_identity == param.hash_identity)
    if value not in ("true", "false"):
        raise bad_request(f"Parameter '{param.code}:missing' takes true or false")
    return PidSet(present.pids, negated=value == "true")


Builder = Callable[[SearchParam, str, str | None], PidSet]
BUILDERS: dict[str, Builder] = {
    "token": token,
    "string": string,
    "date": date,
    "number": number,
    "quantity": quantity,
    "uri": uri,
    "composite": composite,
}
MODIFIERS: dict[str, frozenset[str]] = {
    "token": frozenset({"not", "text", "missing"}),
    "string": frozenset({"exact", "contains", "missing"}),
    "date": frozenset({"missing"}),
    "number": frozenset({"missing"}),
    "quantity": frozenset({"missing"}),
    "uri": frozenset({"below", "missing"}),
    "reference": frozenset({"missing"}),
    "composite": frozenset({"missing"}),
}
