"""Search semantics on a small hand-made fixture, with expected results worked out by hand.

Every fixture resource carries a tag unique to this module's run, and every query filters on
it, so other tests writing to the same database cannot change the answers.
"""

from __future__ import annotations

import uuid
from functools import partial
from typing import Any

import httpx
import pytest
from conftest import ADMIN_AUTH

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CCCD = "https://ehealth-hub.vn/sid/cccd"


def _tagged(resource: dict[str, Any], tag: str) -> dict[str, Any]:
    return {**resource, "meta": {"tag": [{"system": "urn:hub-test", "code": tag}]}}


@pytest.fixture(scope="module")
def world(live_server: Any) -> dict[str, Any]:
    """Three patients, an organization, a practitioner, encounters, observations, a condition."""
    tag = uuid.uuid4().hex[:10]
    ids = {
        name: f"{name}-{tag}"
        for name in (
            "hoa",
            "duc",
            "lan",
            "org",
            "doc",
            "enc1",
            "enc2",
            "o1",
            "o2",
            "o3",
            "o4",
            "c1",
            "prov",
            "bp",
        )
    }
    people = {
        "hoa": ("Nguyễn", ["Thị", "Hoa"], "female", "1988-03-14", "Pleiku", "064188001234"),
        "duc": ("Trần", ["Văn", "Đức"], "male", "1950-11-02", "Huế", "046050009876"),
        "lan": ("Nguyễn", ["Lan"], "female", "2001-07", "Đông Hà", "045301004567"),
    }
    resources: list[dict[str, Any]] = [
        {"resourceType": "Organization", "id": ids["org"], "name": "Bệnh viện Đa khoa Gia Lai"},
        {"resourceType": "Practitioner", "id": ids["doc"], "name": [{"family": "Phạm", "given": ["Minh"]}]},
    ]
    for key, (family, given, gender, birth, city, cccd) in people.items():
        resources.append(
            {
                "resourceType": "Patient",
                "id": ids[key],
                "identifier": [{"use": "official", "system": CCCD, "value": f"{cccd}{tag[:2]}"}],
                "name": [{"family": family, "given": given}],
                "gender": gender,
                "birthDate": birth,
                "address": [{"city": city}],
                "managingOrganization": {"reference": f"Organization/{ids['org']}"} if key != "lan" else None,
                "active": key != "lan",
            }
        )
    resources[-1].pop("managingOrganization")
    for r in resources:
        if r.get("managingOrganization") is None:
            r.pop("managingOrganization", None)
    resources += [
        {
            "resourceType": "Encounter",
            "id": ids["enc1"],
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": f"Patient/{ids['hoa']}"},
            "participant": [{"individual": {"reference": f"Practitioner/{ids['doc']}"}}],
            "period": {"start": "2026-01-10T08:00:00Z", "end": "2026-01-10T09:00:00Z"},
        },
        {
            "resourceType": "Encounter",
            "id": ids["enc2"],
            "status": "in-progress",
            "class": {"code": "IMP"},
            "subject": {"reference": f"Patient/{ids['duc']}"},
            "period": {"start": "2026-02-01"},
        },
        _obs(ids["o1"], ids["hoa"], ids["enc1"], "8867-4", 72, "/min", "2026-01-10T08:10:00Z"),
        _obs(ids["o2"], ids["hoa"], ids["enc1"], "29463-7", 55.5, "kg", "2026-01-10T08:12:00Z"),
        _obs(ids["o3"], ids["duc"], ids["enc2"], "29463-7", 80, "kg", "2026-02-01T10:00:00Z"),
        _obs(ids["o4"], ids["duc"], ids["enc2"], "8867-4", 100, "/min", "2026-02-02"),
        {
            "resourceType": "Condition",
            "id": ids["c1"],
            "subject": {"reference": f"Patient/{ids['duc']}"},
            "clinicalStatus": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
                ]
            },
            "code": {
                "coding": [
                    {"system": "http://hl7.org/fhir/sid/icd-10", "code": "I10", "display": "Tăng huyết áp"}
                ],
                "text": "Tăng huyết áp vô căn",
            },
            "onsetDateTime": "2020-05-01",
        },
        {
            "resourceType": "Observation",
            "id": ids["bp"],
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
            "subject": {"reference": f"Patient/{ids['duc']}"},
            "effectiveDateTime": "2026-02-01T10:05:00Z",
            "component": [
                {
                    "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                    "valueQuantity": {"value": 150, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
                },
                {
                    "code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                    "valueQuantity": {"value": 95, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
                },
            ],
        },
        {
            "resourceType": "Provenance",
            "id": ids["prov"],
            "target": [{"reference": f"Observation/{ids['o1']}"}],
            "recorded": "2026-01-10T08:15:00Z",
            "agent": [{"who": {"reference": f"Practitioner/{ids['doc']}"}}],
        },
    ]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": _tagged(r, tag),
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }
    response = httpx.post(live_server.base, json=bundle, timeout=60, headers=ADMIN_AUTH)
    assert response.status_code == 200, response.text
    return {"tag": tag, "ids": ids, "base": live_server.base}


def _obs(
    oid: str, patient: str, encounter: str, code: str, value: float, unit: str, when: str
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        "encounter": {"reference": f"Encounter/{encounter}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


def search(world: dict[str, Any], path: str, **params: Any) -> dict[str, Any]:
    query = {"_tag": f"urn:hub-test|{world['tag']}", "_count": "100", **params}
    response = httpx.get(f"{world['base']}/{path}", params=query, timeout=30, headers=ADMIN_AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def ids_of(world: dict[str, Any], path: str, **params: Any) -> set[str]:
    bundle = search(world, path, **params)
    keys = {v: k for k, v in world["ids"].items()}
    return {keys[e["resource"]["id"]] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"}


def test_string_default_exact_contains(world: dict[str, Any]) -> None:
    assert ids_of(world, "Patient", family="nguyen") == {"hoa", "lan"}
    assert ids_of(world, "Patient", name="TRAN") == {"duc"}
    assert ids_of(world, "Patient", given="duc") == {"duc"}  # đ folds to d
    assert ids_of(world, "Patient", **{"family:exact": "Nguyễn"}) == {"hoa", "lan"}
    assert ids_of(world, "Patient", **{"family:exact": "nguyen"}) == set()
    assert ids_of(world, "Patient", **{"address-city:contains": "ng h"}) == {"lan"}  # "đông hà"
    assert ids_of(world, "Patient", **{"name:contains": "oa"}) == {"hoa"}


def test_token_forms_and_modifiers(world: dict[str, Any]) -> None:
    assert ids_of(world, "Observation", code=f"{LOINC}|8867-4") == {"o1", "o4"}
    assert ids_of(world, "Observation", code="29463-7") == {"o2", "o3"}
    assert ids_of(world, "Observation", code="|29463-7") == set()  # a system is present
    assert ids_of(world, "Observation", code=f"{LOINC}|") == {"o1", "o2", "o3", "o4", "bp"}
    assert ids_of(world, "Observation", **{"code:not": "8867-4"}) == {"o2", "o3", "bp"}
    assert ids_of(world, "Patient", gender="female") == {"hoa", "lan"}
    assert ids_of(world, "Patient", active="false") == {"lan"}
    assert ids_of(world, "Condition", **{"code:text": "tang huyet"}) == {"c1"}  # folded starts-with
    assert ids_of(world, "Condition", **{"code:text": "huyết áp"}) == set()  # not a substring search
    assert ids_of(world, "Patient", identifier=f"{CCCD}|064188001234{world['tag'][:2]}") == {"hoa"}


def test_missing(world: dict[str, Any]) -> None:
    assert ids_of(world, "Patient", **{"organization:missing": "true"}) == {"lan"}
    assert ids_of(world, "Patient", **{"organization:missing": "false"}) == {"hoa", "duc"}


def test_date_prefixes_and_precision(world: dict[str, Any]) -> None:
    assert ids_of(world, "Patient", birthdate="1988") == {"hoa"}
    assert ids_of(world, "Patient", birthdate="2001-07-15") == set()  # 2001-07 is wider than one day
    assert ids_of(world, "Patient", birthdate="2001-07") == {"lan"}
    assert ids_of(world, "Patient", birthdate="lt1960") == {"duc"}
    assert ids_of(world, "Patient", birthdate="ge2001-07-15") == {"lan"}  # overlaps
    assert ids_of(world, "Patient", birthdate="gt2001-07-31") == set()
    assert ids_of(world, "Patient", birthdate="ne1988-03-14") == {"duc", "lan"}
    assert ids_of(world, "Patient", birthdate="sa1960") == {"hoa", "lan"}
    assert ids_of(world, "Patient", birthdate="eb1960") == {"duc"}
    assert ids_of(world, "Observation", date="2026-01-10") == {"o1", "o2"}
    assert ids_of(world, "Observation", date="le2026-02-01T10:00:00Z") == {"o1", "o2", "o3"}
    # An open-ended period overlaps everything after its start.
    assert ids_of(world, "Encounter", date="ge2026-03-01") == {"enc2"}
    assert ids_of(world, "Encounter", date="lt2026-01-10T08:30:00Z") == {"enc1"}


def test_quantity_and_combinations(world: dict[str, Any]) -> None:
    assert ids_of(world, "Observation", **{"value-quantity": "gt70"}) == {"o1", "o3", "o4"}
    assert ids_of(world, "Observation", **{"value-quantity": f"55.5|{UCUM}|kg"}) == {"o2"}
    assert ids_of(world, "Observation", **{"value-quantity": "100"}) == {"o4"}  # 99.5 <= v < 100.5
    assert ids_of(world, "Observation", **{"value-quantity": "le80||kg"}) == {"o2", "o3"}
    # Comma is OR; a repeated parameter is AND.
    assert ids_of(world, "Observation", **{"value-quantity": "lt60,gt90"}) == {"o2", "o4"}
    both = search(world, "Observation", code="8867-4", patient=world["ids"]["duc"])
    assert {e["resource"]["id"] for e in both["entry"]} == {world["ids"]["o4"]}


def test_reference_forms(world: dict[str, Any]) -> None:
    hoa = world["ids"]["hoa"]
    assert ids_of(world, "Observation", subject=f"Patient/{hoa}") == {"o1", "o2"}
    assert ids_of(world, "Observation", patient=hoa) == {"o1", "o2"}
    assert ids_of(world, "Observation", **{"subject:Patient": hoa}) == {"o1", "o2"}
    assert ids_of(world, "Observation", subject=f"{world['base']}/Patient/{hoa}") == {"o1", "o2"}


def test_chaining_one_and_two_levels(world: dict[str, Any]) -> None:
    assert ids_of(world, "Observation", **{"subject:Patient.name": "tran"}) == {"o3", "o4", "bp"}
    assert ids_of(world, "Observation", **{"patient.birthdate": "lt1960"}) == {"o3", "o4", "bp"}
    assert ids_of(world, "Observation", **{"encounter.patient.gender": "female"}) == {"o1", "o2"}
    assert ids_of(world, "Encounter", **{"participant:Practitioner.family": "pham"}) == {"enc1"}


def test_reverse_chaining(world: dict[str, Any]) -> None:
    assert ids_of(world, "Patient", **{"_has:Observation:patient:code": "29463-7"}) == {"hoa", "duc"}
    assert ids_of(world, "Patient", **{"_has:Condition:subject:code": "I10"}) == {"duc"}
    assert ids_of(
        world, "Patient", **{"_has:Observation:patient:_has:Provenance:target:agent": world["ids"]["doc"]}
    ) == {"hoa"}


def test_sort_on_parameters(world: dict[str, Any]) -> None:
    newest = search(world, "Observation", _sort="-date")
    assert [e["resource"]["id"] for e in newest["entry"]] == [
        world["ids"][k] for k in ("o4", "bp", "o3", "o2", "o1")
    ]
    by_value = search(world, "Observation", _sort="value-quantity")
    assert [e["resource"]["id"] for e in by_value["entry"]] == [
        world["ids"][k] for k in ("o2", "o1", "o3", "o4", "bp")
    ]  # no value sorts last
    two_keys = search(world, "Patient", _sort="family,-birthdate")
    assert [e["resource"]["id"] for e in two_keys["entry"]] == [
        world["ids"][k] for k in ("lan", "hoa", "duc")
    ]


def test_include_revinclude_and_iterate(world: dict[str, Any]) -> None:
    bundle = search(world, "Observation", code="29463-7", _include="Observation:patient", _total="accurate")
    modes = {(e["resource"]["resourceType"], e["search"]["mode"]) for e in bundle["entry"]}
    assert modes == {("Observation", "match"), ("Patient", "include")}
    assert bundle["total"] == 2  # includes do not count
    assert len(bundle["entry"]) == 4
    rev = search(world, "Observation", _id=world["ids"]["o1"], _revinclude="Provenance:target")
    assert [e["resource"]["resourceType"] for e in rev["entry"]] == ["Observation", "Provenance"]
    chained = search(
        world,
        "Observation",
        _id=world["ids"]["o1"],
        _include="Observation:encounter",
        **{"_include:iterate": "Encounter:participant"},
    )
    assert {e["resource"]["resourceType"] for e in chained["entry"]} == {
        "Observation",
        "Encounter",
        "Practitioner",
    }
    targeted = search(world, "Observation", _id=world["ids"]["o1"], _include="Observation:subject:Group")
    assert len(targeted["entry"]) == 1


def test_summary_elements_total(world: dict[str, Any]) -> None:
    summary = search(world, "Patient", _id=world["ids"]["hoa"], _summary="true")["entry"][0]["resource"]
    assert "name" in summary and "address" in summary and "gender" in summary
    assert {"code": "SUBSETTED"}.items() <= summary["meta"]["tag"][-1].items()
    elements = search(world, "Patient", _id=world["ids"]["hoa"], _elements="gender")["entry"][0]["resource"]
    assert set(elements) == {"resourceType", "id", "meta", "gender"}
    data = search(world, "Observation", _id=world["ids"]["o1"], _summary="data")["entry"][0]["resource"]
    assert "valueQuantity" in data and "text" not in data
    assert "total" not in search(world, "Patient", _total="none")
    assert search(world, "Patient", _summary="count")["total"] == 3


def test_composite(world: dict[str, Any]) -> None:
    assert ids_of(world, "Observation", **{"code-value-quantity": f"{LOINC}|29463-7$gt60"}) == {"o3"}
    assert ids_of(world, "Observation", **{"code-value-quantity": f"8867-4$72|{UCUM}|/min"}) == {"o1"}
    assert ids_of(world, "Observation", **{"code-value-quantity": "8867-4$72|http://other|/min"}) == set()
    # The systolic component is over 140, the diastolic is not: components are not mixed up.
    assert ids_of(world, "Observation", **{"component-code-value-quantity": f"{LOINC}|8480-6$gt140"}) == {
        "bp"
    }
    assert ids_of(world, "Observation", **{"component-code-value-quantity": f"{LOINC}|8462-4$gt140"}) == set()
    assert ids_of(world, "Observation", **{"combo-code-value-quantity": "8462-4$95"}) == {"bp"}
    assert (
        httpx.get(
            f"{world['base']}/Observation", params={"code-value-quantity": "8867-4"}, headers=ADMIN_AUTH
        ).status_code
        == 400
    )


def test_unsupported_sort_and_bad_include_are_400(world: dict[str, Any]) -> None:
    base = world["base"]
    get = partial(httpx.get, headers=ADMIN_AUTH)
    assert get(f"{base}/Patient", params={"_sort": "shoe-size"}).status_code == 400
    assert get(f"{base}/Patient", params={"_include": "Patient:name"}).status_code == 400
    assert get(f"{base}/Observation", params={"subject.shoe": "x"}).status_code == 400
