"""Which resource versions are stored encrypted.

Owns: the rule, decided once per write in ``records.finalize`` from the bytes and index
rows it already has (no extra parse, no extra walk for most resources). A version is
sealed when encryption at rest is on and any of these holds:

- it carries a sensitive national identifier anywhere: the CCCD, BHYT or BHXH system URI
  occurs in its JSON (identifiers, references by identifier, extensions alike; a false
  positive only costs one AES-GCM call);
- it is a person (Patient, RelatedPerson, Practitioner, Person) with a phone or sms
  ContactPoint (its own telecom or a contact's);
- its sensitivity labels (``consent.labels``) include a sensitive class (HIV, PSY, SEX,
  ETH, STD, GDIS, or confidentiality V). The compartment rows already carry the mask;
  resources outside every compartment are labelled here.

- it is an AuditEvent: every one is sealed. The trail records who searched for what (a
  search query can hold a CCCD the masking did not recognise), the user's token id and IP
  address, and which patients were touched; none of it belongs in a plain database dump.
  The audit chain digests the plaintext JSON (``hub.audit.trail.content_digest``), so
  sealing, key rotation and ``--reencrypt`` leave the chain valid, and ``hub audit verify``
  opens each event (with the database's keys) before hashing.
Calls: ``consent.labels``.  Called by: ``records.finalize``, key rotation (``--reencrypt``).
"""

from __future__ import annotations

from typing import Any

from consent import labels

CCCD = "https://ehealth-hub.vn/sid/cccd"
BHYT = "https://ehealth-hub.vn/sid/bhyt"
BHXH = "https://ehealth-hub.vn/sid/bhxh"
SENSITIVE_SYSTEMS = frozenset({CCCD, BHYT, BHXH})
PHONE_CHANNELS = frozenset({"phone", "sms"})
PERSON_TYPES = frozenset({"Patient", "RelatedPerson", "Practitioner", "Person"})
ALWAYS_SEALED = frozenset({"AuditEvent"})

_SYSTEM_MARKS = tuple(s.encode() for s in SENSITIVE_SYSTEMS)
# finalize serializes with orjson: compact, '/' unescaped, so these are the exact bytes.
_PHONE_MARKS = tuple(f'"system":"{c}"'.encode() for c in PHONE_CHANNELS)


def needs_sealing(
    res_type: str, content: bytes, resource: dict[str, Any], index_rows: dict[str, list[tuple[Any, ...]]]
) -> bool:
    if res_type in ALWAYS_SEALED:
        return True
    if b"/sid/" in content and any(mark in content for mark in _SYSTEM_MARKS):
        return True
    if res_type in PERSON_TYPES and any(mark in content for mark in _PHONE_MARKS):
        return True
    members = index_rows.get("compartment")
    # compartment rows are (patient_id, labels): the mask labels_of computed for this write
    mask = members[0][1] if members else labels.labels_of(resource)
    return bool(mask & labels.SENSITIVE)
