"""The URL grammar below the FHIR base, and a request's parsed target.

Owns: the one table of URL forms the hub answers (``FORMS``: path template, the methods
each serves and the FHIR restful-interaction code of each), the parser that turns a method
and a path into a ``Target`` (level, resource type, id, version, history, ``_search``,
``$operation`` and its arguments, the interaction code), and the OpenAPI operationId of
every (form, method) pair. A request is parsed once (``FhirRequest.target`` caches it).
Calls: nothing.
Called by: ``hub.rest.messages`` (``FhirRequest.target``), the router (dispatch and the
permission check), the gate (break-glass patient, AuditEvent fields), Bundle processing
(per entry) and the web adapter (its route table is generated from ``FORMS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Level = Literal["system", "type", "instance"]

# Placeholders of a form's segments.
TYPE, ID, VERSION, OPERATION = "{resource_type}", "{resource_id}", "{version_id}", "${operation}"


@dataclass(frozen=True)
class Form:
    """One URL form below the FHIR base: ``segments`` (literals and placeholders), its
    level, and the interaction each method it serves performs (method -> (interaction
    code, OpenAPI operationId)). An operation form ends with ``${operation}`` and takes
    any further segments as the operation's arguments (``$export-status/{job id}``)."""

    segments: tuple[str, ...]
    level: Level
    methods: dict[str, tuple[str, str]]

    @property
    def template(self) -> str:
        """The path template below the base, e.g. ``/{resource_type}/{resource_id}``."""
        return "".join("/" + s for s in self.segments)

    @property
    def is_operation(self) -> bool:
        return OPERATION in self.segments


_OPERATION_METHODS = {"GET": ("operation", ""), "POST": ("operation", ""), "DELETE": ("operation", "")}

# The grammar, tried in this order (literals before the placeholders that would match them).
FORMS: tuple[Form, ...] = (
    Form((), "system", {"POST": ("transaction", "transaction_or_batch")}),
    Form(("metadata",), "system", {"GET": ("capabilities", "capabilities")}),
    Form(("_history",), "system", {"GET": ("history-system", "history_system")}),
    Form((OPERATION,), "system", _OPERATION_METHODS),
    Form(
        (TYPE,),
        "type",
        {
            "GET": ("search-type", "search_type"),
            "POST": ("create", "create"),
            "PUT": ("update", "conditional_update"),
            "DELETE": ("delete", "conditional_delete"),
        },
    ),
    Form((TYPE, "_search"), "type", {"POST": ("search-type", "search_type_post")}),
    Form((TYPE, "_history"), "type", {"GET": ("history-type", "history_type")}),
    Form((TYPE, OPERATION), "type", _OPERATION_METHODS),
    Form(
        (TYPE, ID),
        "instance",
        {"GET": ("read", "read"), "PUT": ("update", "update"), "DELETE": ("delete", "delete")},
    ),
    Form((TYPE, ID, "_history"), "instance", {"GET": ("history-instance", "history_instance")}),
    Form((TYPE, ID, "_history", VERSION), "instance", {"GET": ("vread", "vread")}),
    Form((TYPE, ID, OPERATION), "instance", _OPERATION_METHODS),
)


@dataclass(frozen=True)
class Target:
    """What a request asks for, parsed from its method and path below the FHIR base.

    ``interaction`` is the FHIR restful-interaction code (AuditEvent.subtype, the SMART
    permission): ``transaction`` or ``batch`` for ``POST [base]`` (the Bundle's type),
    ``operation`` for ``$operations``. ``form`` is None when the path matches no form of
    the grammar (the router answers 404); ``served`` is False when the form does not serve
    the method (405). ``resource_type`` is not checked against the known types here."""

    method: str  # as asked; HEAD is served as GET
    path: str  # the segments joined by "/", no leading or trailing slash
    level: Level
    interaction: str
    form: Form | None = None
    served: bool = False
    resource_type: str | None = None
    resource_id: str | None = None
    version: str | None = None
    history: bool = False
    search: bool = False  # [type] search by GET or POST _search
    operation: str | None = None  # without the "$"
    arguments: tuple[str, ...] = ()  # the segments after $operation

    @property
    def metadata(self) -> bool:
        return self.interaction == "capabilities"

    @property
    def bundle(self) -> bool:
        """``POST [base]``: a transaction or batch Bundle."""
        return self.form is not None and not self.form.segments and self.served

    @property
    def compartment(self) -> str | None:
        """The Patient compartment the path names (``Patient/{id}``, ``Patient/{id}/...``)."""
        if self.resource_type == "Patient" and self.resource_id is not None:
            return self.resource_id
        return None


def _matches(form: Form, parts: list[str]) -> bool:
    segments = form.segments
    if form.is_operation:
        if len(parts) < len(segments):
            return False
    elif len(parts) != len(segments):
        return False
    for segment, part in zip(segments, parts, strict=False):
        if segment == OPERATION:
            if not part.startswith("$") or len(part) == 1:
                return False
        elif segment == TYPE:
            if part.startswith(("$", "_")):
                return False
        elif segment == ID:
            if part.startswith("$"):
                return False
        elif segment != VERSION and segment != part:
            return False
    return True


def parse(method: str, path: str, bundle_type: str | None = None) -> Target:
    """The target of ``method path`` (``path`` below the FHIR base). ``bundle_type`` is the
    type of a ``POST [base]`` body (``batch`` makes the interaction ``batch``)."""
    parts = [p for p in path.split("/") if p]
    joined = "/".join(parts)
    asked = "GET" if method == "HEAD" else method
    form = next((f for f in FORMS if _matches(f, parts)), None)
    if form is None:
        # No form: the router answers 404; the audit still names what the path names.
        return Target(
            method,
            joined,
            "system" if not parts else ("type" if len(parts) == 1 else "instance"),
            "operation",
            resource_type=parts[0] if parts and not parts[0].startswith(("$", "_")) else None,
            resource_id=parts[1] if len(parts) > 1 and not parts[1].startswith(("$", "_")) else None,
            operation=next((p[1:] for p in parts if p.startswith("$")), None),
        )
    values: dict[str, str] = {}
    arguments: tuple[str, ...] = ()
    for index, segment in enumerate(form.segments):
        values[segment] = parts[index]
        if segment == OPERATION:
            arguments = tuple(parts[index + 1 :])
    served = asked in form.methods
    if served:
        interaction = form.methods[asked][0]
    elif asked == "PATCH" and form.level == "instance" and not form.is_operation and len(parts) == 2:
        interaction = "patch"  # not served (405), audited as what was asked
    elif len({code for code, _ in form.methods.values()}) == 1 and not form.is_operation:
        interaction = next(iter(form.methods.values()))[0]
    else:
        interaction = "operation"
    if not parts and asked != "POST":
        interaction = "search-system"
    elif not parts and bundle_type == "batch":
        interaction = "batch"
    operation = values.get(OPERATION)
    return Target(
        method,
        joined,
        form.level,
        interaction,
        form=form,
        served=served,
        resource_type=values.get(TYPE),
        resource_id=values.get(ID),
        version=values.get(VERSION),
        history="_history" in form.segments,
        search=interaction == "search-type",
        operation=operation[1:] if operation else None,
        arguments=arguments,
    )


@dataclass(frozen=True)
class Route:
    """One (path template, method) pair of the web adapter's route table."""

    template: str  # below the base
    method: str
    operation_id: str
    summary: str


def routes() -> list[Route]:
    """The route table of every non-operation form: one operationId per method and path.
    Operations are listed by the operation registry (``Operations.routes``)."""
    table = []
    for form in FORMS:
        if form.is_operation:
            continue
        for method, (code, operation_id) in form.methods.items():
            table.append(Route(form.template, method, operation_id, f"{code} ({form.level} level)"))
    return table
