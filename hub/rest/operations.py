"""The registry of FHIR operations (``$everything``, ``$export``...).

Owns: which operation answers which ``$name`` at which level (``Operations``, filled by
explicit ``register`` calls where the object graph is built), the canonical definition of
each, and the web adapter's route of each (path template, method, operationId). An
operation handler gets the router and the request and manages its own database sessions
(kick-off of an asynchronous export writes; most operations only read).
Calls: ``hub.rest.target`` (route templates).
Called by: ``hub.app_factory`` (registration), the router (lookup), the CapabilityStatement,
the web adapter (routes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hub.rest.target import ID, TYPE, Route

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
    # Path segments after ``$name`` the operation takes, as OpenAPI path parameters
    # (``$export-status/{job_id}``).
    arguments: tuple[str, ...] = ()

    def routes(self) -> Iterator[Route]:
        """Its routes below the base: one per method, each with its own operationId."""
        prefix = {
            "system": "",
            "type": f"/{self.resource_type or TYPE}",
            "instance": f"/{self.resource_type or TYPE}/{ID}",
        }[self.level]
        template = prefix + f"/${self.name}" + "".join(f"/{{{a}}}" for a in self.arguments)
        scope = self.level if self.resource_type is None else f"{self.level}_{self.resource_type}"
        for method in sorted(self.methods):
            operation_id = f"{self.name.replace('-', '_')}_{scope}_{method.lower()}"
            yield Route(template, method, operation_id, f"${self.name} ({self.level} level)")


# Canonical OperationDefinitions of the operations the hub implements.
DEFINITIONS = {
    ("everything", None): "http://hl7.org/fhir/OperationDefinition/Patient-everything",
    ("export", None): "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
    ("export", "Patient"): "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
    ("export", "Group"): "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
}


class Operations:
    """The operations one router answers, registered explicitly (``hub.app_factory``)."""

    def __init__(self) -> None:
        self._operations: list[Operation] = []

    def register(
        self,
        name: str,
        level: str,
        handler: OperationHandler,
        resource_type: str | None = None,
        methods: tuple[str, ...] = ("GET", "POST"),
        permission: str | None = "s",
        arguments: tuple[str, ...] = (),
    ) -> Operations:
        """Add ``$name`` at ``level`` (for ``resource_type``, None: every type); chainable."""
        if level not in ("system", "type", "instance"):
            raise ValueError(f"unknown operation level {level!r}")
        if any((op.name, op.level, op.resource_type) == (name, level, resource_type) for op in self):
            raise ValueError(f"${name} is already registered at {level} level for {resource_type}")
        definition = DEFINITIONS.get((name, resource_type)) or DEFINITIONS.get((name, None), "")
        self._operations.append(
            Operation(
                name, level, resource_type, frozenset(methods), handler, definition, permission, arguments
            )
        )
        return self

    def find(self, name: str, level: str, resource_type: str | None) -> list[Operation]:
        return [
            op
            for op in self._operations
            if op.name == name and op.level == level and op.resource_type in (None, resource_type)
        ]

    def __iter__(self) -> Iterator[Operation]:
        return iter(list(self._operations))

    def __len__(self) -> int:
        return len(self._operations)
