"""FHIR errors as exceptions that know their HTTP status and OperationOutcome.

Owns: the mapping from failure to status code and OperationOutcome issue codes.
Calls: orjson.  Called by: everything that can fail; the API renders ``FhirError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True)
class Issue:
    code: str  # http://hl7.org/fhir/issue-type
    diagnostics: str
    severity: str = "error"
    expression: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = list(self.expression)
        return issue


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


@dataclass
class FhirError(Exception):
    status: int
    issues: list[Issue] = field(default_factory=list)
    # Which item of a multi-resource write failed (so a transaction can name its entry).
    item_index: int | None = None

    def __str__(self) -> str:
        return "; ".join(i.diagnostics for i in self.issues) or f"HTTP {self.status}"

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)

    def outcome_bytes(self) -> bytes:
        return orjson.dumps(self.outcome())


def _error(status: int, code: str, message: str, expression: tuple[str, ...] = ()) -> FhirError:
    return FhirError(status, [Issue(code, message, expression=expression)])


def bad_request(message: str, expression: tuple[str, ...] = ()) -> FhirError:
    return _error(400, "invalid", message, expression)


def not_found(message: str) -> FhirError:
    return _error(404, "not-found", message)


def gone(message: str) -> FhirError:
    return _error(410, "deleted", message)


def not_allowed(message: str) -> FhirError:
    return _error(405, "not-supported", message)


def conflict(message: str) -> FhirError:
    return _error(409, "conflict", message)


def precondition_failed(message: str) -> FhirError:
    return _error(412, "conflict", message)


def unprocessable(issues: list[Issue]) -> FhirError:
    return FhirError(422, issues)
