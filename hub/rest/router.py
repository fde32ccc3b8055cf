"""Routing a FHIR request to its interaction, inside a database transaction.

Owns: which interaction answers a request's parsed target (``FhirRequest.target``, parsed
once by the URL grammar in ``hub.rest.target``), the SMART permission check of reads and
searches, and where a write's AuditEvent joins the write's transaction (``audit_write``).
Calls: interactions, the operations registered with it (``hub.rest.operations``),
transaction processing, the capability statement, the gate (admission, audit).
Called by: the web adapter (``hub.api``) and Bundle processing (per entry).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import orjson
import sqlalchemy as sa

from consent.context import current as current_access
from consent.context import serving
from consent.decision import PERMISSION, Access, unauthorized
from hub.errors import FhirError, not_allowed, not_found
from hub.rest import interactions as ix
from hub.rest.capability import capability_statement
from hub.rest.gate import audit_failure
from hub.rest.messages import FhirRequest, FhirResponse
from hub.rest.operations import Operations
from hub.validation import is_resource_type

if TYPE_CHECKING:
    from hub.rest.gate import Gate

log = logging.getLogger(__name__)
Handler = Callable[[sa.Connection], FhirResponse]
_READ_METHODS = frozenset({"GET", "HEAD"})
# Interactions whose AuditEvent is written in the same transaction as their data.
AUDITED_WITH_WRITE = frozenset({"create", "update", "patch", "delete", "transaction"})


class FhirRouter:
    def __init__(self, ctx: ix.Context, gate: Gate, operations: Operations | None = None) -> None:
        self.ctx = ctx
        self.gate = gate
        self.operations = operations if operations is not None else Operations()
        self._capability: dict[str, bytes] = {}  # by base URL (a few: BASE_URL or hosts served)

    def handle(self, request: FhirRequest) -> FhirResponse:
        """Answer one request in its own database transaction; errors become OperationOutcome.

        Around every interaction: the access decision (401/403 before any data is read, then
        the row filter the store applies), and exactly one AuditEvent. A write (create,
        update, patch, delete, their conditional forms, a transaction) writes its AuditEvent
        inside its own transaction, just before commit: if the audit cannot be written,
        nothing is stored and the answer is a 500. Reads and failed requests are audited
        afterwards in a transaction of their own, and their answer leaves only once that
        audit is written."""
        target = request.target
        if target.metadata:
            return FhirResponse(200, self.capability(request.base_url))
        if request.principal is None:
            return error_response(unauthorized())
        access: Access | None = None
        interaction = target.interaction
        audited = False
        try:
            with self._reads_of(request):
                access = self.gate.admit(request)
                with serving(access):
                    response = self._dispatch(request, access, interaction)
            # Committed: a write's audit record committed with it.
            audited = interaction in AUDITED_WITH_WRITE
        except FhirError as error:
            response = error_response(error)
        if access is not None and not access.unrestricted:
            response = _without_session_details(response)
        # Each batch entry is audited as a request of its own; a batch refused as a whole
        # (413 too many entries, 400 malformed, 403) is audited as one request.
        if not audited and (interaction != "batch" or response.status >= 400):
            try:
                self.gate.audit(request, access, interaction, response.status)
            except Exception as exc:  # noqa: BLE001  (no answer leaves without its audit record)
                log.exception("audit failed for %s %s", request.method, request.path)
                return error_response(audit_failure(exc))
        return response

    def _reads_of(self, request: FhirRequest) -> AbstractContextManager[object]:
        """One read transaction for the admission and the interaction of a plain read
        (read, vread, search, history): one connection and one transaction, not one each.
        Operations and Bundles manage their own transactions; the audit record is written
        after this transaction ends, so a failed read still gets its record."""
        target = request.target
        if request.method in _READ_METHODS and target.operation is None and not target.bundle:
            return self.ctx.store.shared_read()
        return nullcontext()

    def _dispatch(self, request: FhirRequest, access: Access, interaction: str) -> FhirResponse:
        operation = self._operation(request)
        if operation is not None:
            return operation()
        if request.target.bundle:
            from hub.rest.transaction import process_bundle

            return process_bundle(self, request)  # a transaction calls audit_write itself
        handler = self.route(request, access)
        if request.method in _READ_METHODS:
            with self.ctx.store.read() as conn:
                return handler(conn)
        with self.ctx.store.write() as conn:
            response = handler(conn)
            if interaction in AUDITED_WITH_WRITE:
                self.audit_write(conn, request, interaction, response.status)
            return response

    def audit_write(self, conn: sa.Connection, request: FhirRequest, interaction: str, status: int) -> None:
        """Write the AuditEvent of a write inside its transaction, as its last statement
        (the chain lock is then held only for the commit). Raises a 500 FhirError when the
        audit cannot be written, so the caller's transaction rolls back."""
        try:
            self.gate.audit_in(conn, request, current_access(), interaction, status)
        except Exception as exc:  # noqa: BLE001  (an unaudited write must not commit)
            log.exception("audit failed for %s %s; the write is rolled back", request.method, request.path)
            raise audit_failure(exc) from exc

    def handle_in(self, conn: sa.Connection, request: FhirRequest) -> FhirResponse:
        """Answer a request inside the caller's transaction (Bundle entries). Errors propagate."""
        access = current_access()
        if access is None:
            raise unauthorized()
        return self.route(request, access)(conn)

    def _operation(self, request: FhirRequest) -> Callable[[], FhirResponse] | None:
        """The handler for a ``$operation`` path, or None when the path names none."""
        target = request.target
        name = target.operation
        if name is None or target.form is None:
            return None
        level, res_type, res_id, extra = (
            target.level,
            target.resource_type,
            target.resource_id,
            target.arguments,
        )
        if res_type is not None and not is_resource_type(res_type):
            raise not_found(f"Unknown resource type '{res_type}'")
        candidates = self.operations.find(name, level, res_type)
        if not candidates:
            raise not_found(
                f"Operation ${name} is not supported at {level} level{' for ' + res_type if res_type else ''}"
            )
        chosen = next((op for op in candidates if request.method in op.methods), None)
        if chosen is None:
            raise not_allowed(f"${name} does not accept {request.method}")
        access = current_access()
        if access is not None and chosen.permission is not None:
            access.require(res_type, chosen.permission)
        return lambda: chosen.handler(self, request, res_type, res_id, list(extra))

    def capability(self, base_url: str | None = None) -> bytes:
        """The CapabilityStatement served at ``base_url`` (default: the configured base)."""
        base = (base_url or self.ctx.base_url).rstrip("/")
        found = self._capability.get(base)
        if found is None:
            if len(self._capability) >= 16:  # Host headers are the client's: bound the cache
                self._capability.clear()
            found = self._capability[base] = orjson.dumps(
                capability_statement(self.ctx.registry, base, self.operations)
            )
        return found

    def route(self, request: FhirRequest, access: Access) -> Handler:
        """The handler of a request, once the access layer allows the interaction."""
        handler = self._route(request)
        target = request.target
        permission = PERMISSION.get(target.interaction)
        if permission is not None and permission in "rs":  # writes are checked by the store
            access.require(target.resource_type, permission)
        return handler

    def _route(self, request: FhirRequest) -> Handler:
        ctx, target = self.ctx, request.target
        if not target.path:  # POST [base] is answered before routing
            raise not_allowed(f"{request.method} is not supported at the server base")
        if target.form is None:
            raise not_found(f"No FHIR interaction at '{request.path}'")
        if target.operation is not None or target.metadata:  # answered before routing
            raise not_allowed(f"{request.method} is not supported at '{request.path}'")
        if target.resource_type is not None and not is_resource_type(target.resource_type):
            raise not_found(f"Unknown resource type '{target.resource_type}'")
        if not target.served:
            raise not_allowed(f"{request.method} is not allowed on '{request.path}'")
        # The grammar's forms name a type at type level and a type and id at instance level.
        res_type, res_id, version = target.resource_type or "", target.resource_id or "", target.version or ""
        match target.interaction:
            case "search-type":
                return lambda conn: ix.search(ctx, conn, request, res_type)
            case "create":
                return lambda conn: ix.create(ctx, conn, request, res_type)
            case "update" if target.level == "type":
                return lambda conn: ix.conditional_update(ctx, conn, request, res_type)
            case "update":
                return lambda conn: ix.update(ctx, conn, request, res_type, res_id)
            case "delete" if target.level == "type":
                return lambda conn: ix.conditional_delete(ctx, conn, request, res_type)
            case "delete":
                return lambda conn: ix.delete(ctx, conn, request, res_type, res_id)
            case "read":
                return lambda conn: ix.read(ctx, conn, request, res_type, res_id)
            case "history-system" | "history-type" | "history-instance":
                return lambda conn: ix.history(ctx, conn, request, target.resource_type, target.resource_id)
            case "vread":
                return lambda conn: ix.vread(ctx, conn, request, res_type, res_id, version)
        raise not_found(f"No FHIR interaction at '{request.path}'")


# AuditEvent.agent elements that identify a session rather than a person: the IP address
# (network type 2) and the OAuth token id (policy). The trail keeps them for auditors; a
# patient or proxy reading their access log learns who accessed, from which application,
# when and why, but not the addresses and token ids of the clinicians who did.
_SESSION_NETWORK_TYPES = frozenset({"1", "2"})  # machine name, IP address


def _without_session_details(response: FhirResponse) -> FhirResponse:
    """The response with AuditEvents' session details removed (for restricted roles)."""
    body = response.body
    if not body or response.status >= 300 or b'"AuditEvent"' not in body:
        return response
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return response
    if not isinstance(document, dict):
        return response
    resources = [document] + [
        e["resource"]
        for e in document.get("entry") or []
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]
    changed = False
    for item in resources:
        if item.get("resourceType") != "AuditEvent":
            continue
        for agent in item.get("agent") or []:
            if not isinstance(agent, dict):
                continue
            if agent.pop("policy", None) is not None:
                changed = True
            network = agent.get("network")
            if isinstance(network, dict) and network.get("type") in _SESSION_NETWORK_TYPES:
                del agent["network"]
                changed = True
    if not changed:
        return response
    return FhirResponse(response.status, orjson.dumps(document), response.headers)


def error_response(error: FhirError) -> FhirResponse:
    return FhirResponse(error.status, error.outcome_bytes())
