"""Sensitivity labels: which classes of sensitive data a resource holds, as a bit mask.

Owns: the label bits; reading the code lists in ``fhir/sensitive-categories.json`` (one
ValueSet per class, naming its v3 ActCode security label: codes, is-a filters, regex filters,
excludes) and the text rules in ``fhir/sensitive-terms.json`` (system URI aliases, code
normalisation, keywords per class); and ``labels_of``, which a write calls once per resource.
A resource is labelled by its own ``meta.security``, by any Coding in it whose code falls in
a list (systems resolved through the alias table, codes compared upper-case and, for ICD-10
and ATC, without dots), and - unless its type is exempt (Patient, Practitioner...) - by
keywords found in its free text (Coding.display, CodeableConcept.text, notes, narrative,
valueString, conclusion...: see docs/access.md, "Sensitive categories"); a Consent also by
the classes its provisions name (``provision.securityLabel`` at any level). A resource with no
sensitive class is ``NORMAL``. Grants carry masks of the same bits, so "may this grant see
that resource" is ``resource_labels & grant_labels == resource_labels`` in SQL.
Calls: nothing of the hub.  Called by: ``consent.derive`` (write time), ``hub.crypto``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

FHIR_DIR = Path(__file__).resolve().parent.parent / "fhir"
CATEGORIES_FILE = FHIR_DIR / "sensitive-categories.json"
TERMS_FILE = FHIR_DIR / "sensitive-terms.json"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
LABEL_EXTENSION = "https://ehealth-hub.vn/fhir/StructureDefinition/security-label"

NORMAL = 1 << 0  # nothing sensitive
HIV = 1 << 1
PSY = 1 << 2  # mental health
SEX = 1 << 3  # sexual and reproductive health
ETH = 1 << 4  # substance use
STD = 1 << 5
GDIS = 1 << 6  # genetic
RESTRICTED = 1 << 7  # meta.security confidentiality V (very restricted)
AUDIT = 1 << 8  # the audit trail: the patient and auditors only, never a treatment grant

BITS: dict[str, int] = {
    "HIV": HIV, "PSY": PSY, "SEX": SEX, "ETH": ETH, "STD": STD, "GDIS": GDIS,
    "V": RESTRICTED, "AUDIT": AUDIT,
}  # fmt: skip
SENSITIVE = HIV | PSY | SEX | ETH | STD | GDIS | RESTRICTED


def names(mask: int) -> list[str]:
    """Label codes of a mask, e.g. ["NORMAL"] or ["HIV", "PSY"]."""
    found = ["NORMAL"] if mask & NORMAL else []
    return found + [code for code, bit in BITS.items() if mask & bit]


def mask_of(codes: Iterable[str]) -> int:
    """The bits of label codes (v3 ActCode HIV, PSY... or NORMAL); unknown codes are ignored."""
    mask = 0
    for code in codes:
        mask |= NORMAL if code == "NORMAL" else BITS.get(code, 0)
    return mask


@dataclass(frozen=True)
class _SystemRules:
    """The code lists of one canonical code system, over normalised codes."""

    dotless: bool  # ICD-10, ATC: compare without dots and spaces
    exact: dict[str, int]  # code -> label bits
    prefixes: dict[str, int]  # is-a filter: code prefix -> label bits
    prefix_lengths: tuple[int, ...]
    patterns: tuple[tuple[re.Pattern[str], int], ...]  # regex filter over the normalised code
    excluded: dict[str, int]  # compose.exclude: code -> label bits it does not carry

    def normalise(self, code: str) -> str:
        code = code.strip().upper()
        return code.replace(".", "").replace(" ", "") if self.dotless else code

    def bits(self, code: str) -> int:
        code = self.normalise(code)
        mask = self.exact.get(code, 0)
        for length in self.prefix_lengths:
            if len(code) < length:
                break
            mask |= self.prefixes.get(code[:length], 0)
        for pattern, bit in self.patterns:
            if not mask & bit and pattern.match(code):
                mask |= bit
        return mask & ~self.excluded.get(code, 0) if self.excluded else mask


@dataclass(frozen=True)
class _Phrase:
    rest: tuple[str, ...]  # the words after the first
    bit: int
    prefix: bool  # the last word is a prefix ("contracepti*")
    not_after: frozenset[str]


@dataclass(frozen=True)
class _Keywords:
    """Free-text phrases per label, indexed by their first word."""

    folded: dict[str, tuple[_Phrase, ...]]
    prefix_pattern: re.Pattern[str] | None  # one-word phrases ending in "*", as one regex
    prefix_bits: dict[str, int]
    accented: dict[str, tuple[_Phrase, ...]]
    cased: dict[str, int]  # one word, matched as written

    @staticmethod
    def _match(words: list[str], index: dict[str, tuple[_Phrase, ...]], found: int) -> int:
        for i, word in enumerate(words):
            for phrase in index.get(word, ()):
                if found & phrase.bit or (phrase.not_after and i and words[i - 1] in phrase.not_after):
                    continue
                end = i + 1 + len(phrase.rest)
                if end > len(words):
                    continue
                if phrase.prefix and phrase.rest:
                    if words[i + 1 : end - 1] == list(phrase.rest[:-1]) and words[end - 1].startswith(
                        phrase.rest[-1]
                    ):
                        found |= phrase.bit
                elif words[i + 1 : end] == list(phrase.rest):
                    found |= phrase.bit
        return found

    def bits(self, text: str) -> int:
        found = 0
        folded = _fold(text)
        words = _FOLDED_WORD.findall(folded)
        found = self._match(words, self.folded, found)
        if self.prefix_pattern is not None:
            for match in self.prefix_pattern.finditer(folded):
                found |= self.prefix_bits[match.group(1)]
        if self.accented and not text.isascii():
            found = self._match(
                _WORD.findall(unicodedata.normalize("NFC", text).lower()), self.accented, found
            )
        if self.cased and any(word in text for word in self.cased):
            for word in _WORD.findall(text):
                found |= self.cased.get(word, 0)
        return found


@dataclass(frozen=True)
class _Rules:
    systems: dict[str, _SystemRules]  # canonical system -> its lists
    aliases: dict[str, str]  # any accepted system URI (folded) -> canonical
    system_patterns: tuple[tuple[re.Pattern[str], str], ...]
    keywords: _Keywords
    text_elements: frozenset[str]
    text_exempt_types: frozenset[str]
    text_ignored_systems: frozenset[str]
    canonical_cache: dict[str, str | None]

    def canonical(self, system: str) -> str | None:
        """The canonical system a Coding.system means, or None when no list uses it."""
        try:
            return self.canonical_cache[system]
        except KeyError:
            pass
        key = system.strip().lower().rstrip("/")
        found = self.aliases.get(key)
        if found is None:
            found = next((canon for p, canon in self.system_patterns if p.search(key)), None)
        if len(self.canonical_cache) < 10_000:
            self.canonical_cache[system] = found
        return found


_FOLDED_WORD = re.compile(r"[a-z0-9]+")
_WORD = re.compile(r"\w+")
# đ/Đ is a letter of its own, not d plus a combining mark, so NFD does not split it.
_SPECIAL_LETTERS = str.maketrans({"đ": "d", "Đ": "d", "ø": "o", "Ø": "o", "ł": "l", "Ł": "l"})


def _fold(text: str) -> str:
    """Lower-case without diacritics, as hub.search.normalize.fold but not truncated."""
    if text.isascii():
        return text.lower()
    decomposed = unicodedata.normalize("NFD", text.translate(_SPECIAL_LETTERS))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def _phrases(entries: Iterable[Any], bit: int, folded: bool) -> Iterator[tuple[str, _Phrase]]:
    for entry in entries:
        text, not_after = (
            (entry["phrase"], entry.get("notAfter", ())) if isinstance(entry, dict) else (entry, ())
        )
        prefix = text.endswith("*")
        words = _FOLDED_WORD.findall(_fold(text)) if folded else _WORD.findall(text.lower())
        if words:
            yield words[0], _Phrase(tuple(words[1:]), bit, prefix, frozenset(not_after))


def _keywords(data: dict[str, Any]) -> _Keywords:
    folded: dict[str, list[_Phrase]] = {}
    prefixes: dict[str, int] = {}
    accented: dict[str, list[_Phrase]] = {}
    cased: dict[str, int] = {}
    for label, kinds in data.items():
        bit = BITS[label]
        for first, phrase in _phrases(kinds.get("folded", ()), bit, folded=True):
            if phrase.prefix and not phrase.rest:
                prefixes[first] = prefixes.get(first, 0) | bit
            else:
                folded.setdefault(first, []).append(phrase)
        for first, phrase in _phrases(kinds.get("accented", ()), bit, folded=False):
            accented.setdefault(first, []).append(phrase)
        for word in kinds.get("cased", ()):
            cased[word] = cased.get(word, 0) | bit
    return _Keywords(
        {w: tuple(p) for w, p in folded.items()},
        re.compile(f"(?<![a-z0-9])({'|'.join(sorted(prefixes, key=len, reverse=True))})")
        if prefixes
        else None,
        prefixes,
        {w: tuple(p) for w, p in accented.items()},
        cased,
    )


@lru_cache(maxsize=1)
def rules() -> _Rules:
    """The code lists (``CATEGORIES_FILE``) and text rules (``TERMS_FILE``), compiled once."""
    terms = orjson.loads(TERMS_FILE.read_bytes())
    bundle = orjson.loads(CATEGORIES_FILE.read_bytes())
    dotless = {canon: bool(spec.get("dotless")) for canon, spec in terms["systems"].items()}
    exact: dict[str, dict[str, int]] = {}
    prefixes: dict[str, dict[str, int]] = {}
    patterns: dict[str, list[tuple[re.Pattern[str], int]]] = {}
    excluded: dict[str, dict[str, int]] = {}

    def norm(system: str, code: str) -> str:
        code = code.strip().upper()
        return code.replace(".", "").replace(" ", "") if dotless.get(system) else code

    for entry in bundle["entry"]:
        value_set = entry["resource"]
        label = next(e["valueCoding"]["code"] for e in value_set["extension"] if e["url"] == LABEL_EXTENSION)
        bit = BITS[label]
        for include in value_set["compose"]["include"]:
            system = include["system"]
            for concept in include.get("concept", ()):
                codes = exact.setdefault(system, {})
                code = norm(system, concept["code"])
                codes[code] = codes.get(code, 0) | bit
            for f in include.get("filter", ()):
                if f["op"] == "is-a":
                    starts = prefixes.setdefault(system, {})
                    code = norm(system, f["value"])
                    starts[code] = starts.get(code, 0) | bit
                elif f["op"] == "regex":
                    patterns.setdefault(system, []).append((re.compile(f["value"], re.IGNORECASE), bit))
        for exclude in value_set["compose"].get("exclude", ()):
            system = exclude["system"]
            for concept in exclude.get("concept", ()):
                drop = excluded.setdefault(system, {})
                code = norm(system, concept["code"])
                drop[code] = drop.get(code, 0) | bit
    systems = {}
    for system in exact.keys() | prefixes.keys() | patterns.keys():
        starts = prefixes.get(system, {})
        systems[system] = _SystemRules(
            dotless.get(system, False),
            exact.get(system, {}),
            starts,
            tuple(sorted({len(p) for p in starts})),
            tuple(patterns.get(system, ())),
            excluded.get(system, {}),
        )
    aliases = {canon.lower().rstrip("/"): canon for canon in systems}
    system_patterns = []
    for canon, spec in terms["systems"].items():
        for alias in spec.get("aliases", ()):
            aliases[alias.lower().rstrip("/")] = canon
        system_patterns += [(re.compile(p, re.IGNORECASE), canon) for p in spec.get("patterns", ())]
    return _Rules(
        systems,
        aliases,
        tuple(system_patterns),
        _keywords(terms["keywords"]),
        frozenset(terms["textElements"]),
        frozenset(terms["textExemptTypes"]),
        frozenset(terms["textIgnoredSystems"]),
        {},
    )


def _content_bits(resource: dict[str, Any], rules: _Rules) -> int:
    """The labels of every coded value and (unless the type is exempt) every text of a resource."""
    mask = 0
    collect = resource.get("resourceType") not in rules.text_exempt_types
    texts: list[str] = []
    text_keys, ignored_systems = rules.text_elements, rules.text_ignored_systems
    canonical, systems = rules.canonical, rules.systems
    stack: list[Any] = [resource]
    pop, push = stack.pop, stack.append
    while stack:
        value = pop()
        if type(value) is list:
            for item in value:
                kind = type(item)
                if kind is dict or kind is list:
                    push(item)
            continue
        take = collect
        system = value.get("system")
        if type(system) is str:
            code = value.get("code")
            if type(code) is str:
                canon = canonical(system)
                if canon is not None:
                    mask |= systems[canon].bits(code)
            if system in ignored_systems:
                take = False
        for key, item in value.items():
            kind = type(item)
            if kind is str:
                if take and key in text_keys:
                    texts.append(item)
            elif (kind is dict or kind is list) and key != "meta":
                push(item)
    if texts:
        mask |= rules.keywords.bits("\n".join(texts))
    return mask


def _security_bits(resource: dict[str, Any]) -> int:
    mask = 0
    meta = resource.get("meta")
    for label in meta.get("security", ()) if isinstance(meta, dict) else ():
        if not isinstance(label, dict):
            continue
        if label.get("system") == ACT_CODE:
            mask |= BITS.get(label.get("code", ""), 0) & SENSITIVE
        elif label.get("system") == CONFIDENTIALITY and label.get("code") == "V":
            mask |= RESTRICTED
    return mask


def _provision_bits(provision: Any) -> int:
    """The sensitive classes a Consent's provisions name (``securityLabel``, nested provisions
    too, permit or deny alike): that a patient shares - or refuses - their HIV or mental-health
    data is itself that class of data. Codes are read whatever their system, as
    ``consent.derive`` reads them for the grants, so the Consent is labelled with every class a
    grant of it may carry (fail closed)."""
    mask = 0
    stack: list[Any] = [provision]
    while stack:
        value = stack.pop()
        if not isinstance(value, dict):
            continue
        security = value.get("securityLabel")
        for label in security if isinstance(security, list) else ():
            code = label.get("code") if isinstance(label, dict) else None
            if isinstance(code, str):
                mask |= BITS.get(code, 0) & SENSITIVE
        children = value.get("provision")
        if isinstance(children, list):
            stack.extend(children)
    return mask


def labels_of(resource: dict[str, Any]) -> int:
    """The label mask of a resource: its sensitive classes, or NORMAL when it has none. A
    Consent also carries the classes its provisions name (``_provision_bits``)."""
    kind = resource.get("resourceType")
    if kind == "AuditEvent":
        return AUDIT
    mask = _security_bits(resource) | _content_bits(resource, rules())
    if kind == "Consent":
        mask |= _provision_bits(resource.get("provision"))
    return mask or NORMAL
