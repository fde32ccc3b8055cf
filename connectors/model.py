"""The shapes every connector shares: a source (channel), what a format reads from a raw
message before it is stored (``Peek``), what its mapping produces (``Mapped``), and the two
ways a message can fail (``Rejected``: permanent; ``Transient``: retried).

Owns: these types and the ``Format`` protocol each feed implements (``connectors.hl7v2``,
``connectors.xml130``, ``connectors.fhirpull``).
Calls: nothing.
Called by: every module of ``connectors``.

Data flows one way: a listener or poller stores the raw bytes in the inbox (``Peek`` gives
the row its control id, message type and ordering key), a worker maps them (``Format.map``),
resolves the patient (``connectors.patients``) and writes one FHIR transaction through the
store (``connectors.pipeline``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# The kinds of source and the format of what each delivers.
SourceKind = Literal["hl7v2-mllp", "xml130", "fhir-pull"]
FORMAT_OF_KIND: dict[str, str] = {"hl7v2-mllp": "hl7v2", "xml130": "xml130", "fhir-pull": "fhir"}
# Facility levels of the Vietnamese system (commune health station, district or regional
# centre, provincial hospital); "other" for private clinics, labs and the like.
FacilityLevel = Literal["commune", "district", "provincial", "other"]
FACILITY_LEVELS: tuple[str, ...] = ("commune", "district", "provincial", "other")


@dataclass(frozen=True)
class Source:
    """A registered channel: one feed of one facility."""

    name: str  # unique, [a-z0-9-]{1,64}: "bvdk-gialai-lis"
    facility_code: str  # MA_CSKCB, 5 characters, leading zeros kept
    facility_name: str
    facility_level: str  # one of FACILITY_LEVELS
    kind: str  # one of FORMAT_OF_KIND
    settings: dict[str, Any] = field(default_factory=dict)  # per kind: port, folder, base_url...
    paused: bool = False

    @property
    def format(self) -> str:
        return FORMAT_OF_KIND[self.kind]


@dataclass(frozen=True)
class Peek:
    """What is read from a raw message cheaply, before it is stored and acknowledged."""

    message_type: str  # "ADT^A01", "ORU^R01", "XML130", "Bundle"...
    control_id: str  # MSH-10; the MA_LK list of an XML file; a resource's type/id/version
    # Messages with the same ordering key are processed in the order received; others may be
    # processed in any order. Give the strongest patient identifier as "system|value"; the
    # inbox stores only a keyed hash of it (its index is not sealed). None: no patient.
    ordering_key: str | None = None


@dataclass
class PatientFacts:
    """The patient a message is about, as the message says it.

    ``resource`` is a Patient as the facility describes it (identifiers with the hub's
    systems, name, gender, birthDate, address, telecom...). ``placeholder`` is the
    ``urn:uuid:`` every reference to this patient in ``Mapped.entries`` uses;
    ``connectors.patients.resolve`` turns it into the one Patient of the record."""

    placeholder: str
    resource: dict[str, Any]


@dataclass
class Mapped:
    """One unit of a message mapped to FHIR: written as (part of) one transaction.

    ``entries`` are transaction Bundle entries (``fullUrl``, ``resource``, ``request``) that
    are idempotent when written again: conditional create/update on stable identifiers
    (placer/filler numbers, MA_LK, MSH-10 plus a position), never a plain POST."""

    message_type: str
    control_id: str
    patients: list[PatientFacts]
    entries: list[dict[str, Any]]
    # ADT^A40 and the like: (surviving placeholder, retired patient's identifiers) pairs.
    merges: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # kept with the inbox row


class Rejected(Exception):
    """The message can never be processed as it is (unparseable, unsupported type, a field
    that breaks a rule). Kept in the inbox as ``rejected``; an HL7 sender gets AE/AR.

    ``where`` names the place: "PID-7", "XML1/NGAY_SINH", "entry[3]"."""

    def __init__(self, reason: str, where: str | None = None, *, unsupported: bool = False) -> None:
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason
        self.where = where
        self.unsupported = unsupported  # AR (unsupported message type) rather than AE


class Transient(Exception):
    """The message could not be processed now (database, peer down): retried with backoff."""


class Format(Protocol):
    """What a feed's format module provides (``connectors.<format>.FORMAT``)."""

    name: str  # "hl7v2", "xml130", "fhir"

    def peek(self, raw: bytes) -> Peek:
        """Control id, type and ordering key; raises ``Rejected`` when not even these can be
        read (the raw bytes are still stored, as rejected)."""
        ...

    def map(self, raw: bytes, source: Source) -> list[Mapped]:
        """The FHIR the message carries; raises ``Rejected`` with a per-field reason."""
        ...
