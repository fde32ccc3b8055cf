"""The registry of FHIR operations (``$everything``, ``$export``...).

Owns: which operation answers which ``$name`` at which level. An operation handler gets the
router and the request and manages its own database sessions (kick-off of an asynchronous
export writes; most operations only read).
Calls: nothing.  Called by: the router; operation modules register themselves here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hub.rest.messages import FhirRequest, FhirResponse
    from hub.rest.router import FhirRouter

# (router, request, resource type or None, resource id or None, extra path segments) -> response
OperationHandler = Callable[
    ["FhirRouter", "FhirRequest", "str | None", "str | None", "list[str]"], "FhirResponse"
]


@dataclass(frozen=True)
class Operation:
    name: str  # without the "$"
    level: str  # "system" | "type" | "instance"
    resource_type: str | None  # None: any type at that level
    methods: frozenset[str]
    handler: OperationHandler
    definition: str = ""  # canonical URL of the OperationDefinition, for the CapabilityStatement
    # The SMART permission the caller needs on the resource type (system level: on "*");
    # None when the operation checks for itself (e.g. only a job's owner polls its status).
    permission: str | None = "s"


_OPERATIONS: list[Operation] = []


# Canonical OperationDefinitions of the operations the hub implements.
DEFINITIONS = {
    "everything": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
    "export": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
}


def operation(
    name: str,
    level: str,
    resource_type: str | None = None,
    methods: tuple[str, ...] = ("GET", "POST"),
    permission: str | None = "s",
) -> Callable[[OperationHandler], OperationHandler]:
    def register(handler: OperationHandler) -> OperationHandler:
        definition = DEFINITIONS.get(name, "")
        if name == "export" and resource_type == "Patient":
            definition = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"
        elif name == "export" and resource_type == "Group":
            definition = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"
        _OPERATIONS.append(
            Operation(name, level, resource_type, frozenset(methods), handler, definition, permission)
        )
        return handler

    return register


def find(name: str, level: str, resource_type: str | None) -> list[Operation]:
    return [
        op
        for op in _OPERATIONS
        if op.name == name and op.level == level and op.resource_type in (None, resource_type)
    ]


def all_operations() -> list[Operation]:
    return list(_OPERATIONS)
