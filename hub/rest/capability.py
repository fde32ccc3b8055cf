"""The CapabilityStatement: the template in ``fhir/`` plus what the registry really indexes.

Owns: stating only what works. Per type: the interactions the router implements and the
search parameters that have an index (plus ``_id`` and ``_lastUpdated``).
Calls: the registry.  Called by: the router (``GET /metadata``).
"""

from __future__ import annotations

from typing import Any

import orjson

from hub import __version__
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


def capability_statement(registry: Registry, base_url: str) -> dict[str, Any]:
    statement = orjson.loads(TEMPLATE.read_bytes())
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
                "searchParam": params,
            }
        )
    rest["resource"] = resources
    return statement
