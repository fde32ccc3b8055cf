"""Patient resolution: one citizen, one record, whatever facility a message comes from.

Owns: which stored Patient a message's patient is (``resolve``), what the message adds to
it, the review flags of what a person must look at (a patient created without a match, an
inconsistent CCCD, two records that seem to be one person) and merges (ADT^A40).
Calls: the search engine (``hub.search.engine``) through the caller's connection and
Access (identifier values of CCCD, BHYT and BHXH are indexed as keyed hashes: only the
engine knows how to look them up), ``connectors.identifiers`` (the systems and checks).
Called by: ``connectors.pipeline``, once per mapped message unit, before its transaction;
for a combined unit of several messages first ``prefetch`` (one search for all their
patients' identifiers) and ``begin_message`` between messages.

Order of the identifiers (the issue's rule): a structurally valid CCCD, then the social
insurance number (BHXH: the last 10 digits of the BHYT card code, the same on every renewed
card, so the Patient gets a BHXH identifier besides the card), then a facility MRN. The
first level that matches exactly one Patient wins. Records are never merged on a guess:
when identifiers point to different Patients (or one identifier to several), the winner
is used, the identifiers that point elsewhere are not added to it, and it gets a Flag
("Possible duplicate patient records", the other record in an extension) and a tag.

What ``resolve`` returns are transaction entries, each ``fullUrl`` being the placeholder
the mapped entries reference (the transaction rewrites those references):
- a match: ``PUT Patient/<id>`` of the stored content updated by the message (identifiers
  united, demographics from the message where it gives them, a year-only birth date never
  replacing a full one): a re-sent message is a no-op update (the store keeps no version
  for identical content);
- no match: ``POST Patient`` with ``ifNoneExist`` on its strongest identifier, tagged
  ``record-review|unmatched``, with a Flag (category admin) so review work finds it. Two
  messages of one new patient processed at once still make one Patient: a transaction
  locks its conditions first (PostgreSQL advisory locks), so the second one's condition
  finds the first one's Patient after it commits;
- every Flag is a ``PUT Flag/<id>`` whose id is derived from what it is about and whose
  patient, so processing a message again adds no second Flag (``_flags``). The Patient is
  tagged with each reason too: ``Patient?_tag=<record-review>|unmatched`` is the review
  queue of records, ``Flag?identifier=<record-review>|unmatched`` (or ``Flag?patient=``)
  that of the flags; ``$everything`` and the Patient compartment include them.

Merges (``Mapped.merges``): the retired Patient gets ``active: false`` and a ``replaced-by``
link to the survivor, the survivor a ``replaces`` link. References to the retired record
are not moved: resources are versioned and audited as their facility sent them, moving
them would rewrite every one (and their history would still point to the old record),
and a FHIR client follows ``Patient.link`` (as ``resolve`` itself does: a later message
with the retired record's MRN resolves to the survivor).
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson
import sqlalchemy as sa

from connectors.identifiers import BHXH, BHYT, CCCD, bhxh_of, check_cccd, facility_system
from connectors.model import Mapped, Rejected, Source
from hub.crypto import blind
from hub.crypto.policy import SENSITIVE_SYSTEMS
from hub.search import engine as search_engine

if TYPE_CHECKING:
    from hub.rest.router import FhirRouter

__all__ = ["FLAG_KEY", "MRN_PREFIX", "OTHER_RECORD", "REVIEW", "begin_message", "prefetch", "resolve"]

# meta.tag and Flag.code of what review work must look at.
REVIEW = "https://ehealth-hub.vn/CodeSystem/record-review"
# Flag.identifier: what a flag is about ("unmatched", "possible-duplicate:<other id>"...).
FLAG_KEY = "https://ehealth-hub.vn/sid/record-review"
# Flag.extension naming the other Patient of a possible duplicate.
OTHER_RECORD = "https://ehealth-hub.vn/fhir/StructureDefinition/other-record"
MRN_PREFIX = "https://ehealth-hub.vn/sid/mrn/"  # identifiers.facility_system("mrn", code)
_FLAG_CATEGORY = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/flag-category",
            "code": "admin",
            "display": "Administrative",
        }
    ]
}
_REASONS = {
    "unmatched": "Patient record created from a facility feed without a match",
    "possible-duplicate": "Possible duplicate patient records",
    "invalid-cccd": "CCCD inconsistent with the record",
    "cccd-differs": "CCCD differs from the one on the record",
}
_LEVELS = ("CCCD", "BHXH", "MRN")
_FLAG_IDS = uuid.UUID("6f1c2a52-3d4e-5b7a-9c0d-1e2f3a4b5c6d")  # namespace of the flags' uuid5 ids
_MAX_CANDIDATES = 50  # Patients one message's identifiers may match (more: a broken feed)
_MAX_HOPS = 3  # replaced-by links followed from a retired record to its survivor

# Fields the update logic handles itself; every other field the message gives replaces
# the stored one, and fields it lacks are kept.
_OWN_FIELDS = frozenset({"resourceType", "id", "meta", "identifier", "link", "birthDate", "extension"})

# Fields the first writer sets and later messages do not change: every facility a citizen
# visits names itself as the managing organization, and a record flipping between them
# would gain a version per message.
_KEPT_FIELDS = frozenset({"managingOrganization"})

IdentKey = tuple[str, str]  # (system, value as the index compares it)


def resolve(conn: sa.Connection, router: FhirRouter, mapped: Mapped, source: Source) -> list[dict[str, Any]]:
    """The transaction entries that stand for ``mapped.patients`` and ``mapped.merges``.

    Reads with the caller's Access (the pipeline's system access) on ``conn``; writes
    nothing: the entries are written by the message's transaction. Raises ``Rejected`` for
    a patient without any identifier (it could never be found again) and for a merge that
    names no patient of the message.

    A message may hold several units (the HOSO of one QĐ 130 file) about one citizen, all
    resolved before its one transaction writes any: a patient already resolved for an
    earlier unit of the message (same record, or a shared identifier) is not written
    twice (a transaction may not hold two ``PUT Patient/<id>``, and two conditional creates
    on one identifier would both create). What the later unit says is merged into the
    earlier entry, and the unit's references to its placeholder are pointed at the
    earlier one. "The message" is the caller's innermost open transaction (the pipeline's
    SAVEPOINT per message)."""
    lookup = _Lookup(conn, router)
    memo = _memo(conn)
    resolved: dict[str, _Resolved] = {}
    for facts in mapped.patients:
        wanted = _Wanted.of(facts.resource, source)
        found = _decide(lookup, wanted)
        found.placeholder, found.incoming, found.wanted = facts.placeholder, facts.resource, wanted
        earlier = memo.same_patient(found) or next(
            (r for r in resolved.values() if _same_patient(r, found)), None
        )
        if earlier is not None:
            _absorb(earlier, found)
            _alias(mapped, facts.placeholder, earlier.placeholder)
            continue
        resolved[facts.placeholder] = found
    entries: list[dict[str, Any]] = []
    for survivor, retired_identifiers in mapped.merges:
        _merge(lookup, resolved, memo, survivor, retired_identifiers, source, mapped, entries)
    patient_entries = []
    for found in resolved.values():
        found.entry = _patient_entry(found)
        memo.remember(found)
        patient_entries.append(found.entry)
    for found in memo.found:  # earlier units' entries: what this unit added to them
        if found.entry is not None and found.placeholder not in resolved:
            found.entry["resource"] = _patient_entry(found)["resource"]
    flags = memo.unwritten([flag for found in [*resolved.values(), *memo.found] for flag in _flags(found)])
    return [*patient_entries, *entries, *flags]


class _Memo:
    """The patients resolved for earlier units of the message being processed."""

    def __init__(self) -> None:
        self.found: list[_Resolved] = []
        self.flag_ids: set[str] = set()

    def same_patient(self, found: _Resolved) -> _Resolved | None:
        return next((r for r in self.found if _same_patient(r, found)), None)

    def remember(self, found: _Resolved) -> None:
        if found not in self.found:
            self.found.append(found)

    def unwritten(self, flags: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The flags no earlier unit of the message wrote (one id, one entry)."""
        out = []
        for flag in flags:
            flag_id = flag["resource"]["id"]
            if flag_id not in self.flag_ids:
                self.flag_ids.add(flag_id)
                out.append(flag)
        return out


_MEMO = "connectors.patients.memo"


def begin_message(conn: sa.Connection) -> None:
    """The next ``resolve`` calls on ``conn`` are another message's: its patients are not
    those of the units resolved so far. For a caller that resolves several messages in one
    transaction (the pipeline's combined units) before writing any; without it the memo
    lasts as long as the caller's innermost open transaction."""
    conn.info.pop(_MEMO, None)


def _memo(conn: sa.Connection) -> _Memo:
    """The memo of the caller's innermost open transaction (kept in ``conn.info`` with that
    transaction object: a later transaction is another object, and starts afresh)."""
    marker = conn.get_nested_transaction() or conn.get_transaction()
    held = conn.info.get(_MEMO)
    if held is None or held[0] is not marker:
        held = (marker, _Memo())
        conn.info[_MEMO] = held
    memo: _Memo = held[1]
    return memo


def _same_patient(earlier: _Resolved, later: _Resolved) -> bool:
    if later.id is not None:
        return earlier.id == later.id
    assert earlier.wanted is not None and later.wanted is not None
    return any(a & b for a, b in zip(earlier.wanted.levels, later.wanted.levels, strict=True))


def _absorb(earlier: _Resolved, later: _Resolved) -> None:
    """What a later unit says about a patient resolved earlier in the message."""
    assert earlier.wanted is not None and later.wanted is not None
    skip = later.excluded
    if earlier.stored is not None and _cccd_conflict(
        _Resolved(earlier.id, [], set(), earlier.stored, incoming=later.incoming)
    ):
        skip = skip | {k for k in _keys(later.incoming) if k[0] == CCCD}
    earlier.incoming = _combine(copy.deepcopy(earlier.incoming), later.incoming, skip, [])
    earlier.others = sorted(set(earlier.others) | {o for o in later.others if o != earlier.id})
    earlier.excluded |= later.excluded
    wanted = earlier.wanted
    wanted.levels = (
        wanted.levels[0] | later.wanted.levels[0],
        wanted.levels[1] | later.wanted.levels[1],
        wanted.levels[2] | later.wanted.levels[2],
    )
    wanted.all_keys |= later.wanted.all_keys
    wanted.cccd_problems += [p for p in later.wanted.cccd_problems if p not in wanted.cccd_problems]


def _alias(mapped: Mapped, placeholder: str, earlier: str) -> None:
    """Point the unit's references to ``placeholder`` at ``earlier``."""
    stack: list[Any] = [entry.get("resource") for entry in mapped.entries]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("reference") == placeholder:
                item["reference"] = earlier
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    mapped.merges = [(earlier if s == placeholder else s, ids) for s, ids in mapped.merges]


# --- identifiers ---------------------------------------------------------------------------


def _key(identifier: dict[str, Any]) -> IdentKey | None:
    system, value = identifier.get("system"), identifier.get("value")
    if not isinstance(system, str) or not isinstance(value, str) or not value.strip():
        return None
    # CCCD, BHYT and BHXH are indexed (and searched) without whitespace; other values as given.
    return system, blind.normalize_identifier(value) if system in SENSITIVE_SYSTEMS else value


def _keys(patient: dict[str, Any]) -> set[IdentKey]:
    """A Patient's identifiers, with the BHXH number of each BHYT card it carries."""
    keys: set[IdentKey] = set()
    for identifier in patient.get("identifier") or []:
        key = _key(identifier) if isinstance(identifier, dict) else None
        if key is None:
            continue
        keys.add(key)
        if key[0] == BHYT and (bhxh := bhxh_of(key[1])) is not None:
            keys.add((BHXH, bhxh))
    return keys


def _birth_year(patient: dict[str, Any]) -> int | None:
    birth = patient.get("birthDate")
    if isinstance(birth, str) and len(birth) >= 4 and birth[:4].isdigit():
        return int(birth[:4])
    return None


@dataclass
class _Wanted:
    """An incoming patient's identifiers, by level, and what is wrong with its CCCD."""

    levels: tuple[set[IdentKey], set[IdentKey], set[IdentKey]]
    strongest: IdentKey | None  # what a new Patient's ifNoneExist names
    cccd_problems: list[str]
    all_keys: set[IdentKey]

    @classmethod
    def of(cls, patient: dict[str, Any], source: Source | None) -> _Wanted:
        keys = _keys(patient)
        cccd: set[IdentKey] = set()
        invalid: list[IdentKey] = []
        problems: list[str] = []
        gender = patient.get("gender")
        for key in sorted(k for k in keys if k[0] == CCCD):
            found = check_cccd(key[1], gender if isinstance(gender, str) else None, _birth_year(patient))
            if found:
                invalid.append(key)
                problems.extend(found)
            else:
                cccd.add(key)
        bhxh = {k for k in keys if k[0] == BHXH}
        bhxh |= {k for k in keys if k[0] == BHYT}  # a stored Patient may carry only the card
        own = f"{MRN_PREFIX}{source.facility_code}" if source else None
        mrn = {k for k in keys if k[0].startswith(MRN_PREFIX)}
        # The strongest identifier: a valid CCCD, the BHXH number, the facility's own MRN,
        # another MRN, an inconsistent CCCD (better than a create that is not idempotent),
        # then anything else the message identifies the patient by.
        ranked = [
            *sorted(cccd),
            *sorted(k for k in bhxh if k[0] == BHXH),
            *sorted(k for k in mrn if k[0] == own),
            *sorted(mrn),
            *invalid,
            *sorted(k for k in keys if k[0] != BHYT),
            *sorted(keys),
        ]
        return cls((cccd, bhxh, mrn), ranked[0] if ranked else None, problems, keys)

    def search_values(self) -> list[str]:
        return [f"{_escape(s)}|{_escape(v)}" for level in self.levels for s, v in sorted(level)]

    def matched_levels(self, stored: dict[str, Any]) -> set[int]:
        keys = _keys(stored)
        return {i for i, level in enumerate(self.levels) if level & keys}


def _escape(text: str) -> str:
    """A value inside a search parameter that lists alternatives (``,``). A token's ``|``
    needs none: the engine splits system from value at the first one."""
    return text.replace("\\", "\\\\").replace(",", "\\,")


def _criteria(key: IdentKey) -> str:
    """``system|value`` as a query-string value of a condition (ifNoneExist)."""
    return quote(f"{_escape(key[0])}|{_escape(key[1])}", safe="/:|")


# --- lookup --------------------------------------------------------------------------------


_PREFETCH = "connectors.patients.prefetch"
_PREFETCH_VALUES = 100  # identifier values per prefetch search (one OR list)
_PREFETCH_COUNT = 1000  # the search's largest page: more matches and the prefetch is not used


@dataclass
class _Prefetched:
    """The Patients some messages' identifiers match, read with one search per chunk of
    values before any of them is resolved (``prefetch``)."""

    keys: set[IdentKey]  # the identifiers looked up
    by_key: dict[IdentKey, list[str]]  # identifier -> the stored Patients carrying it
    content: dict[str, bytes]  # id -> the stored Patient as read (parsed again on each use)


def prefetch(conn: sa.Connection, router: FhirRouter, units: list[Mapped], source: Source) -> None:
    """Look up the Patients of several messages' units at once (the pipeline's combined
    unit: one search instead of one per message). ``resolve`` calls on ``conn`` in the same
    innermost transaction then take their candidates from it, as the per-patient search
    would have found them: the search matches an identifier by system and value (CCCD,
    BHYT, BHXH without whitespace), exactly as ``_key`` compares them. Valid until the
    caller writes: it must not resolve after writing in the same innermost transaction (the
    pipeline writes a unit in its SAVEPOINT, and resolves the next unit in another one).
    A lookup that returns a full page is not used (the per-patient searches run)."""
    conn.info.pop(_PREFETCH, None)
    keys: set[IdentKey] = set()
    for unit in units:
        for facts in unit.patients:
            wanted = _Wanted.of(facts.resource, source)
            keys.update(key for level in wanted.levels for key in level)
    if not keys:
        return
    ctx = router.ctx
    content: dict[str, bytes] = {}
    ordered = sorted(keys)
    for start in range(0, len(ordered), _PREFETCH_VALUES):
        values = [f"{_escape(s)}|{_escape(v)}" for s, v in ordered[start : start + _PREFETCH_VALUES]]
        params = [("identifier", ",".join(values)), ("_count", str(_PREFETCH_COUNT))]
        query = search_engine.parse(ctx.registry, "Patient", params, base_url=ctx.base_url)
        result = search_engine.execute(conn, ctx.registry, query)
        if result.has_more or len(result.matches) >= _PREFETCH_COUNT:
            return  # a broken feed's identifier on thousands of records: searched one by one
        content.update((match.res_id, match.content) for match in result.matches)
    by_key: dict[IdentKey, list[str]] = {}
    for res_id, stored in content.items():
        for identifier in orjson.loads(stored).get("identifier") or []:
            key = _key(identifier) if isinstance(identifier, dict) else None
            if key in keys:
                by_key.setdefault(key, []).append(res_id)
    marker = conn.get_nested_transaction() or conn.get_transaction()
    conn.info[_PREFETCH] = (marker, _Prefetched(keys, by_key, content))


class _Lookup:
    """Patient searches through the engine, with the caller's Access, on one connection."""

    def __init__(self, conn: sa.Connection, router: FhirRouter) -> None:
        self.conn, self.router = conn, router
        self.content: dict[str, dict[str, Any]] = {}  # id -> stored Patient, as read
        held = conn.info.get(_PREFETCH)
        marker = conn.get_nested_transaction() or conn.get_transaction()
        self.prefetched: _Prefetched | None = held[1] if held is not None and held[0] is marker else None

    def search(self, params: list[tuple[str, str]]) -> list[str]:
        ctx = self.router.ctx
        query = search_engine.parse(
            ctx.registry, "Patient", [*params, ("_count", str(_MAX_CANDIDATES))], base_url=ctx.base_url
        )
        matches = search_engine.execute(self.conn, ctx.registry, query).matches
        for match in matches:
            self.content[match.res_id] = orjson.loads(match.content)
        return [m.res_id for m in matches]

    def by_identifiers(self, wanted: _Wanted) -> list[str]:
        values = wanted.search_values()
        if not values:
            return []
        asked = {key for level in wanted.levels for key in level}
        known = self.prefetched
        if known is None or not asked <= known.keys:
            return self.search([("identifier", ",".join(values))])
        found = sorted({res_id for key in asked for res_id in known.by_key.get(key, ())})
        if len(found) > _MAX_CANDIDATES:  # as the search's page would: a broken feed
            return self.search([("identifier", ",".join(values))])
        for res_id in found:
            self.content[res_id] = orjson.loads(known.content[res_id])
        return found

    def survivor(self, patient_id: str) -> str:
        """The record a retired Patient (``active: false``, ``replaced-by``) was merged into."""
        current = patient_id
        for _ in range(_MAX_HOPS):
            nxt = _replaced_by(self.content.get(current) or {})
            if nxt is None or nxt == patient_id:
                return current
            if nxt not in self.content:
                self.search([("_id", nxt)])
                if nxt not in self.content:  # gone or not visible: stay with the retired one
                    return current
            current = nxt
        return current


def _replaced_by(patient: dict[str, Any]) -> str | None:
    if patient.get("active") is not False:
        return None
    for link in patient.get("link") or []:
        reference = ((link or {}).get("other") or {}).get("reference")
        if (
            link.get("type") == "replaced-by"
            and isinstance(reference, str)
            and reference.startswith("Patient/")
        ):
            return reference.removeprefix("Patient/")
    return None


@dataclass
class _Resolved:
    id: str | None  # the stored Patient, None: a new one
    others: list[str]  # other Patients the identifiers matched: possible duplicates
    excluded: set[IdentKey]  # identifiers of the message that point to another record
    stored: dict[str, Any] | None = None
    placeholder: str = ""
    incoming: dict[str, Any] = field(default_factory=dict)
    wanted: _Wanted | None = None
    links: list[dict[str, Any]] = field(default_factory=list)  # added by a merge
    entry: dict[str, Any] | None = None  # the Patient entry returned for it


def _decide(lookup: _Lookup, wanted: _Wanted) -> _Resolved:
    """The winner among the stored Patients the identifiers match (see the module doc)."""
    found = lookup.by_identifiers(wanted)
    if not found:
        return _Resolved(None, [], set())
    # Each candidate counts as the record it was merged into, with its levels.
    levels: dict[str, set[int]] = {}
    for patient_id in found:
        levels.setdefault(lookup.survivor(patient_id), set()).update(
            wanted.matched_levels(lookup.content[patient_id])
        )
    winner: str | None = None
    for level in range(len(_LEVELS)):
        ids = [p for p, matched in levels.items() if level in matched]
        if len(ids) == 1:
            winner = ids[0]
            break
    if winner is None:  # every level matches none or several: the most identifiers, then the oldest id
        first = min(min(m) for m in levels.values() if m) if any(levels.values()) else 0
        tied = [p for p, m in levels.items() if first in m] or list(levels)
        winner = sorted(tied, key=lambda p: (-len(levels[p]), p))[0]
    others = sorted(p for p in levels if p != winner)
    excluded: set[IdentKey] = set()
    for other in others:
        excluded |= wanted.all_keys & _keys(lookup.content[other])
    excluded -= _keys(lookup.content[winner])
    return _Resolved(winner, others, excluded, stored=lookup.content[winner])


# --- entries -------------------------------------------------------------------------------


def _tagged(resource: dict[str, Any], code: str) -> None:
    meta = resource.setdefault("meta", {})
    tags = meta.setdefault("tag", [])
    if not any(t.get("system") == REVIEW and t.get("code") == code for t in tags):
        tags.append({"system": REVIEW, "code": code, "display": _REASONS[code]})


def _with_bhxh(identifiers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The identifiers plus the BHXH number of each BHYT card (when not there already)."""
    out = list(identifiers)
    have = {k for i in identifiers if (k := _key(i)) is not None}
    for identifier in identifiers:
        key = _key(identifier)
        bhxh = bhxh_of(key[1]) if key is not None and key[0] == BHYT else None
        if bhxh is not None and (BHXH, bhxh) not in have:
            have.add((BHXH, bhxh))
            out.append({"system": BHXH, "value": bhxh})
    return out


def _cccd_conflict(found: _Resolved) -> bool:
    """The record has a CCCD and the message another one."""
    if found.stored is None:
        return False
    stored = {k for k in _keys(found.stored) if k[0] == CCCD}
    incoming = {k for k in _keys(found.incoming) if k[0] == CCCD}
    return bool(stored and incoming - stored)


def _unversioned(stored: dict[str, Any]) -> dict[str, Any]:
    """A copy of a stored resource to write again: its tags and labels kept, the version
    stamps left to the store."""
    out = copy.deepcopy(stored)
    meta = {k: v for k, v in (out.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    return out


def _updated(found: _Resolved) -> dict[str, Any]:
    """The stored Patient updated by what the message says."""
    assert found.stored is not None
    skip = set(found.excluded)
    if _cccd_conflict(found):  # never a second CCCD on one record: flagged instead
        skip |= {k for k in _keys(found.incoming) if k[0] == CCCD}
    return _combine(_unversioned(found.stored), found.incoming, skip, found.links)


def _combine(
    base: dict[str, Any], incoming: dict[str, Any], skip: set[IdentKey], links: list[dict[str, Any]]
) -> dict[str, Any]:
    """``base`` (changed in place and returned) updated by ``incoming``: identifiers united
    (but those in ``skip``), every other field the message gives replacing the base's
    (but ``_KEPT_FIELDS``),
    extensions by url, links united, a less precise birth date never replacing a full one."""
    out = base
    identifiers = list(out.get("identifier") or [])
    have = {k for i in identifiers if (k := _key(i)) is not None}
    for identifier in _with_bhxh(list(incoming.get("identifier") or [])):
        key = _key(identifier)
        if key is None or key in have or key in skip:
            continue
        identifiers.append(identifier)
        have.add(key)
    if identifiers:
        out["identifier"] = _with_bhxh(identifiers)
    for name, value in incoming.items():
        if name in _KEPT_FIELDS and out.get(name):
            continue
        if name not in _OWN_FIELDS and value not in (None, "", [], {}):
            out[name] = copy.deepcopy(value)
    birth = incoming.get("birthDate")
    base_birth = out.get("birthDate")
    # A year-only (or year-month) birth date never replaces a more precise one.
    if (
        isinstance(birth, str)
        and birth
        and not (isinstance(base_birth, str) and len(base_birth) > len(birth))
    ):
        out["birthDate"] = birth
    extensions = {e.get("url"): e for e in out.get("extension") or [] if isinstance(e, dict)}
    for extension in incoming.get("extension") or []:
        if isinstance(extension, dict):
            extensions[extension.get("url")] = copy.deepcopy(extension)
    if extensions:
        out["extension"] = list(extensions.values())
    merged_links = _links(out.get("link") or [], [*(incoming.get("link") or []), *links])
    if merged_links:
        out["link"] = merged_links
    return out


def _links(stored: list[dict[str, Any]], added: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = list(stored)
    seen = {((link.get("other") or {}).get("reference"), link.get("type")) for link in stored}
    for link in added:
        key = ((link.get("other") or {}).get("reference"), link.get("type"))
        if key not in seen:
            seen.add(key)
            out.append(link)
    return out


def _patient_entry(found: _Resolved) -> dict[str, Any]:
    assert found.wanted is not None
    if found.id is not None:
        resource = _updated(found)
        if found.others:
            _tagged(resource, "possible-duplicate")
        if found.wanted.cccd_problems:
            _tagged(resource, "invalid-cccd")
        if _cccd_conflict(found):
            _tagged(resource, "cccd-differs")
        return {
            "fullUrl": found.placeholder,
            "resource": resource,
            "request": {"method": "PUT", "url": f"Patient/{found.id}"},
        }
    strongest = found.wanted.strongest
    if strongest is None:
        raise Rejected(
            "the patient has no identifier: it could never be found again", where="Patient.identifier"
        )
    resource = copy.deepcopy(found.incoming)
    resource.pop("id", None)
    resource["resourceType"] = "Patient"
    resource["identifier"] = _with_bhxh(list(resource.get("identifier") or []))
    if found.links:
        resource["link"] = _links(list(resource.get("link") or []), found.links)
    _tagged(resource, "unmatched")
    if found.wanted.cccd_problems:
        _tagged(resource, "invalid-cccd")
    return {
        "fullUrl": found.placeholder,
        "resource": resource,
        "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={_criteria(strongest)}"},
    }


def _flags(found: _Resolved) -> list[dict[str, Any]]:
    """The Flags of what the resolution found, as ``PUT Flag/<id>`` of an id derived from
    what each flag is about: writing the message again (or a concurrent message about the
    same new patient) writes the same Flag, a no-op, instead of a second one. Flag is
    searchable now, but a conditional create would not serve better: a new Patient's id is
    not known when the entry is built, so its criteria would still have to name the keyed
    identifier hash this id is made of, and it would cost a search and a lock per flag."""
    assert found.wanted is not None
    if found.id is not None:
        subject = {"reference": f"Patient/{found.id}"}
        about = f"Patient/{found.id}"
        tags = _tags(found.stored or {})
    else:
        assert found.wanted.strongest is not None
        subject = {"reference": found.placeholder}
        # The new Patient's id is not known yet (a concurrent message may have created it):
        # its flags are named after the identifier it is created on, in its keyed-hash form
        # (the id must not let anyone recover a CCCD).
        system, value = found.wanted.strongest
        about = f"{system}|{blind.index_identifier(system, value)}"
        tags = set()
    flags = []
    if found.id is None:
        flags.append(_flag("unmatched", "unmatched", subject, about, _REASONS["unmatched"]))
    for other in found.others:
        flag = _flag("possible-duplicate", f"possible-duplicate:{other}", subject, about, None)
        flag["resource"]["extension"] = [
            {"url": OTHER_RECORD, "valueReference": {"reference": f"Patient/{other}"}}
        ]
        flags.append(flag)
    # A record flagged once (its tag says so) is not flagged again by a later message,
    # whose flag would be named after the record rather than the identifier.
    if found.wanted.cccd_problems and "invalid-cccd" not in tags:
        text = f"{_REASONS['invalid-cccd']}: {'; '.join(found.wanted.cccd_problems)}"
        flags.append(_flag("invalid-cccd", "invalid-cccd", subject, about, text))
    if _cccd_conflict(found):
        flags.append(_flag("cccd-differs", "cccd-differs", subject, about, None))
    return flags


def _tags(resource: dict[str, Any]) -> set[str]:
    return {t.get("code") for t in (resource.get("meta") or {}).get("tag") or [] if t.get("system") == REVIEW}


def _flag(code: str, key: str, subject: dict[str, str], about: str, text: str | None) -> dict[str, Any]:
    flag_id = str(uuid.uuid5(_FLAG_IDS, f"{about}|{key}"))
    resource = {
        "resourceType": "Flag",
        "id": flag_id,
        "meta": {"tag": [{"system": REVIEW, "code": code}]},
        "identifier": [{"system": FLAG_KEY, "value": key}],
        "status": "active",
        "category": [_FLAG_CATEGORY],
        "code": {"coding": [{"system": REVIEW, "code": code}], "text": text or _REASONS[code]},
        "subject": dict(subject),
    }
    return {
        "fullUrl": f"urn:uuid:{flag_id}",
        "resource": resource,
        "request": {"method": "PUT", "url": f"Flag/{flag_id}"},
    }


# --- merges --------------------------------------------------------------------------------


def _merge(
    lookup: _Lookup,
    resolved: dict[str, _Resolved],
    memo: _Memo,
    survivor_placeholder: str,
    retired_identifiers: list[dict[str, Any]],
    source: Source,
    mapped: Mapped,
    entries: list[dict[str, Any]],
) -> None:
    """Retire the record ``retired_identifiers`` name in favour of the surviving patient."""
    patients = [*resolved.values(), *memo.found]
    survivor = next((r for r in patients if r.placeholder == survivor_placeholder), None)
    if survivor is None:
        raise Rejected("the merge names a surviving patient the message does not describe", where="MRG")
    wanted = _Wanted.of({"identifier": retired_identifiers}, source)
    if wanted.strongest is None:
        raise Rejected("the merge names no identifier of the retired patient", where="MRG")
    # The retired record itself, not the one it may already have been merged into.
    candidates = sorted({p for p in lookup.by_identifiers(wanted)} - {survivor.id})
    if not candidates:
        mapped.warnings.append("merge: no stored Patient has the retired patient's identifiers")
        return
    if len(candidates) > 1:
        mapped.warnings.append(f"merge: the retired patient's identifiers match {len(candidates)} Patients")
        return
    retired_id = candidates[0]
    if any(r.id == retired_id for r in patients):
        mapped.warnings.append("merge: the retired record is also a patient of the message")
        return
    retired = _unversioned(lookup.content[retired_id])
    # Only a facility that holds the retired record (its own MRN is on it) may retire it: a
    # merge is the facility correcting its own duplicate, never a verdict on another
    # facility's patient found by a national identifier alone.
    own_mrn = facility_system("mrn", source.facility_code)
    if not any(isinstance(i, dict) and i.get("system") == own_mrn for i in retired.get("identifier") or []):
        mapped.warnings.append("merge: the retired record holds no MRN of this facility; not merged")
        return
    target = f"Patient/{survivor.id}" if survivor.id is not None else survivor_placeholder
    retired["active"] = False
    retired["link"] = _links(
        retired.get("link") or [], [{"other": {"reference": target}, "type": "replaced-by"}]
    )
    entries.append({"resource": retired, "request": {"method": "PUT", "url": f"Patient/{retired_id}"}})
    survivor.links.append({"other": {"reference": f"Patient/{retired_id}"}, "type": "replaces"})
