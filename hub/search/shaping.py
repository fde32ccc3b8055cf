"""``_summary`` and ``_elements``: returning part of a resource.

Owns: which elements survive each summary mode, using the summary flags of the
fhir.resources models. Shaped resources are marked SUBSETTED in ``meta.tag`` as the spec asks.
Calls: validation (model lookup), orjson.  Called by: the search engine.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson

from hub.validation import model_class

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
_ALWAYS = frozenset({"resourceType", "id", "meta"})


@lru_cache(maxsize=256)
def summary_elements(resource_type: str) -> frozenset[str]:
    model = model_class(resource_type)
    if model is None:
        return _ALWAYS
    names = set(_ALWAYS)
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("summary_element_property"):
            key = info.alias or name
            names.add(key)
            # Choice elements appear in JSON with their type suffix (valueQuantity...).
            if extra.get("one_of_many"):
                names.add(str(extra["one_of_many"]))
    return frozenset(names)


def _keeps(resource_type: str, key: str, allowed: frozenset[str]) -> bool:
    bare = key.lstrip("_")
    return bare in allowed or any(bare.startswith(a) and bare[len(a) : len(a) + 1].isupper() for a in allowed)


def shape(content: bytes, summary: str | None, elements: list[str] | None) -> bytes:
    resource: dict[str, Any] = orjson.loads(content)
    res_type = resource.get("resourceType", "")
    if summary == "data":
        resource.pop("text", None)
    elif summary == "text":
        resource = {k: v for k, v in resource.items() if k in ("resourceType", "id", "meta", "text")}
    elif summary == "true":
        allowed = summary_elements(res_type)
        resource = {k: v for k, v in resource.items() if _keeps(res_type, k, allowed)}
    if elements:
        allowed = frozenset(elements) | _ALWAYS
        resource = {k: v for k, v in resource.items() if _keeps(res_type, k, allowed)}
    meta = dict(resource.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    resource["meta"] = meta
    return orjson.dumps(resource)
