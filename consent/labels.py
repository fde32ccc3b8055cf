"""Sensitivity labels: which classes of sensitive data a resource holds, as a bit mask.

Owns: the label bits, reading the code lists in ``fhir/sensitive-categories.json`` (one
ValueSet per class, naming its v3 ActCode security label), and ``labels_of``, which a write
calls once per resource. A resource is labelled by its own ``meta.security`` and by any
Coding in it that falls in one of the code lists; a resource with no sensitive class is
``NORMAL``. Grants carry masks of the same bits, so "may this grant see that resource" is
``resource_labels & grant_labels == resource_labels`` in SQL.
Calls: nothing of the hub.  Called by: ``consent.derive`` (write time), ``hub.crypto``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

CATEGORIES_FILE = Path(__file__).resolve().parent.parent / "fhir" / "sensitive-categories.json"
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
ALL = NORMAL | SENSITIVE | AUDIT  # what a patient may see of their own record


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
class _CodeList:
    bit: int
    codes: frozenset[tuple[str, str]]  # (system, code)
    patterns: tuple[tuple[str, re.Pattern[str]], ...]  # (system, regex over the code)


@lru_cache(maxsize=1)
def code_lists() -> tuple[_CodeList, ...]:
    bundle = orjson.loads(CATEGORIES_FILE.read_bytes())
    lists = []
    for entry in bundle["entry"]:
        value_set = entry["resource"]
        label = next(e["valueCoding"]["code"] for e in value_set["extension"] if e["url"] == LABEL_EXTENSION)
        codes: set[tuple[str, str]] = set()
        patterns: list[tuple[str, re.Pattern[str]]] = []
        for include in value_set["compose"]["include"]:
            system = include["system"]
            codes.update((system, c["code"]) for c in include.get("concept", ()))
            patterns.extend(
                (system, re.compile(f["value"])) for f in include.get("filter", ()) if f["op"] == "regex"
            )
        lists.append(_CodeList(BITS[label], frozenset(codes), tuple(patterns)))
    return tuple(lists)


def _codings(value: Any) -> Iterator[tuple[str, str]]:
    """Every (system, code) pair anywhere in a JSON value."""
    if isinstance(value, dict):
        system, code = value.get("system"), value.get("code")
        if isinstance(system, str) and isinstance(code, str):
            yield system, code
        for key, item in value.items():
            if key != "meta" and isinstance(item, (dict, list)):
                yield from _codings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _codings(item)


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


def labels_of(resource: dict[str, Any]) -> int:
    """The label mask of a resource: its sensitive classes, or NORMAL when it has none."""
    if resource.get("resourceType") == "AuditEvent":
        return AUDIT
    mask = _security_bits(resource)
    lists = code_lists()
    for system, code in _codings(resource):
        for code_list in lists:
            if mask & code_list.bit:
                continue
            if (system, code) in code_list.codes or any(
                s == system and p.match(code) for s, p in code_list.patterns
            ):
                mask |= code_list.bit
    return mask or NORMAL


def is_sensitive(resource: dict[str, Any]) -> bool:
    return bool(labels_of(resource) & SENSITIVE)
