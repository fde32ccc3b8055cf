"""The CapabilityStatement: the template in ``fhir/`` plus what the registry really indexes.

Owns: stating only what works. Per type: the interactions the router implements and the
search parameters that have an index (plus ``_id`` and ``_lastUpdated``).
Calls: the registry, ``hub.auth.tokens`` (the token URL), the router's registered operations.
Called by: the router (``GET /metadata``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from hub import __version__
from hub.auth.tokens import auth_url
from hub.rest.operations import Operation
from hub.search.registry import FHIR_DATA_DIR, Registry

TEMPLATE = FHIR_DATA_DIR / "capability-statement.json"
TYPE_INTERACTIONS = (
    "read",
    "vread",
    "update",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)


def _unique(operations: list[dict[str, str]]) -> list[dict[str, str]]:
    return list({op["name"]: op for op in operations}.values())


def _security(base_url: str) -> dict[str, Any]:
    """SMART on FHIR: where to get a token (the full discovery is .well-known/smart-configuration)."""
    return {
        "extension": [
            {
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": auth_url(base_url, "token")}],
            }
        ],
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }
                ],
                "text": "OAuth2 bearer tokens with SMART App Launch v2 scopes",
            }
        ],
        "description": "Send Authorization: Bearer <JWT>, from the token endpoint above or a trusted "
        "identity provider; this CapabilityStatement and the SMART configuration are public.",
    }


def capability_statement(
    registry: Registry, base_url: str, registered_operations: Iterable[Operation] = ()
) -> dict[str, Any]:
    """The CapabilityStatement served at ``base_url``: the registry's types and parameters,
    and the router's registered operations."""
    registered = list(registered_operations)
    statement: dict[str, Any] = orjson.loads(TEMPLATE.read_bytes())
    statement["software"]["version"] = __version__
    statement["implementation"]["url"] = base_url
    rest = statement["rest"][0]
    resources = []
    for res_type in registry.resource_types:
        params = [
            {"name": "_id", "type": "token"},
            {"name": "_lastUpdated", "type": "date"},
        ] + [
            {"name": p.code, "type": p.type, "definition": p.url}
            for p in sorted(registry.indexed_params(res_type), key=lambda p: p.code)
        ]
        references = sorted(p.code for p in registry.indexed_params(res_type) if p.type == "reference")
        operations = [
            {"name": op.name, "definition": op.definition}
            for op in registered
            if op.level in ("type", "instance") and op.resource_type in (res_type, None) and op.definition
        ]
        resources.append(
            {
                "type": res_type,
                "interaction": [{"code": code} for code in TYPE_INTERACTIONS],
                "versioning": "versioned-update",
                "readHistory": True,
                "updateCreate": True,
                "conditionalCreate": True,
                "conditionalUpdate": True,
                "conditionalDelete": "single",
                "searchInclude": [f"{res_type}:{code}" for code in references],
                "searchRevInclude": sorted(
                    f"{other}:{p.code}"
                    for other in registry.resource_types
                    for p in registry.indexed_params(other)
                    if p.type == "reference" and (res_type in p.targets or not p.targets)
                ),
                "searchParam": params,
                **({"operation": _unique(operations)} if operations else {}),
            }
        )
    rest["resource"] = resources
    rest["security"] = _security(base_url)
    system_operations = [
        {"name": op.name, "definition": op.definition}
        for op in registered
        if op.level == "system" and op.definition
    ]
    if system_operations:
        rest["operation"] = _unique(system_operations)
    return statement
