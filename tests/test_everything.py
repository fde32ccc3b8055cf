"""Patient/$everything over HTTP: compartment, referenced resources, _type, _since, paging, errors."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from conftest import ADMIN_AUTH, LiveServer

CCCD = "https://ehealth-hub.vn/sid/cccd"
LOINC = "http://loinc.org"


@dataclass
class World:
    """Two patients with their records, sharing nothing but a Group."""

    a: str = ""
    b: str = ""
    expected_a: set[tuple[str, str]] = field(default_factory=set)
    expected_b: set[tuple[str, str]] = field(default_factory=set)
    ids: dict[str, str] = field(default_factory=dict)


def _post(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post(f"/{body['resourceType']}", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _observation(patient: str, code: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        **extra,
    }


def build_world(client: httpx.Client, tag: str) -> World:
    w = World()
    w.a = _post(client, {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": f"A{tag}"}]})
    w.b = _post(client, {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": f"B{tag}"}]})
    org = _post(client, {"resourceType": "Organization", "name": f"Trạm y tế {tag}"})
    pract_a = _post(client, {"resourceType": "Practitioner", "name": [{"family": f"Lê{tag}"}]})
    pract_b = _post(client, {"resourceType": "Practitioner", "name": [{"family": f"Phạm{tag}"}]})
    enc_a = _post(
        client,
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": f"Patient/{w.a}"},
            "participant": [{"individual": {"reference": f"Practitioner/{pract_a}"}}],
            "serviceProvider": {"reference": f"Organization/{org}"},
        },
    )
    enc_b = _post(
        client,
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": f"Patient/{w.b}"},
            "participant": [{"individual": {"reference": f"Practitioner/{pract_b}"}}],
        },
    )
    obs_b = _post(client, _observation(w.b, "8867-4", encounter={"reference": f"Encounter/{enc_b}"}))
    obs_a1 = _post(client, _observation(w.a, "8867-4", encounter={"reference": f"Encounter/{enc_a}"}))
    # A reference to another patient's data must not pull it in.
    obs_a2 = _post(client, _observation(w.a, "8310-5", hasMember=[{"reference": f"Observation/{obs_b}"}]))
    cond_a = _post(client, {"resourceType": "Condition", "subject": {"reference": f"Patient/{w.a}"}})
    gone_a = _post(client, _observation(w.a, "8310-5"))
    assert client.delete(f"/Observation/{gone_a}").status_code == 204
    # The Group lists both patients: it is in each compartment, the other member is not.
    group = _post(
        client,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [
                {"entity": {"reference": f"Patient/{w.a}"}},
                {"entity": {"reference": f"Patient/{w.b}"}},
            ],
        },
    )
    w.ids = {"org": org, "pract_a": pract_a, "obs_a1": obs_a1, "obs_a2": obs_a2, "gone_a": gone_a}
    w.expected_a = {
        ("Patient", w.a),
        ("Encounter", enc_a),
        ("Observation", obs_a1),
        ("Observation", obs_a2),
        ("Condition", cond_a),
        ("Practitioner", pract_a),
        ("Organization", org),
        ("Group", group),
    }
    w.expected_b = {
        ("Patient", w.b),
        ("Encounter", enc_b),
        ("Observation", obs_b),
        ("Practitioner", pract_b),
        ("Group", group),
    }
    return w


@pytest.fixture(scope="module")
def world(live_server: LiveServer) -> World:
    with httpx.Client(base_url=live_server.base, timeout=60, headers=ADMIN_AUTH) as client:
        return build_world(client, uuid.uuid4().hex[:12])


def _keys(bundle: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle.get("entry", [])]


def _link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((link["url"] for link in bundle["link"] if link["relation"] == relation), None)


def _all_pages(client: httpx.Client, url: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    response = client.get(url, params=params)
    for _ in range(1000):
        assert response.status_code == 200, response.text
        page = response.json()
        yield page
        following = _link(page, "next")
        if following is None:
            return
        response = client.get(following)
    raise AssertionError("paging does not end")


def test_everything_is_exactly_the_compartment_and_its_references(http: httpx.Client, world: World) -> None:
    response = http.get(f"/Patient/{world.a}/$everything", params={"_count": 100})
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    keys = _keys(bundle)
    assert len(keys) == len(set(keys)) == bundle["total"]
    assert set(keys) == world.expected_a
    assert keys[0] == ("Patient", world.a)  # the patient first, then the rest by type
    assert keys[1:] == sorted(keys[1:], key=lambda k: k[0])
    assert all(e["fullUrl"].endswith(f"/{t}/{i}") for e, (t, i) in zip(bundle["entry"], keys, strict=True))
    b_keys = set(_keys(http.get(f"/Patient/{world.b}/$everything", params={"_count": 100}).json()))
    assert b_keys == world.expected_b


def test_type_filter(http: httpx.Client, world: World) -> None:
    bundle = http.get(
        f"/Patient/{world.a}/$everything", params={"_type": "Observation,Practitioner", "_count": 100}
    ).json()
    assert set(_keys(bundle)) == {k for k in world.expected_a if k[0] in ("Observation", "Practitioner")}
    repeated = http.get(
        f"/Patient/{world.a}/$everything", params=[("_type", "Patient"), ("_type", "Organization")]
    ).json()
    assert set(_keys(repeated)) == {("Patient", world.a), ("Organization", world.ids["org"])}
    assert http.get(f"/Patient/{world.a}/$everything", params={"_type": "NotAType"}).status_code == 400


def test_since(http: httpx.Client, world: World) -> None:
    time.sleep(0.01)  # lastUpdated has millisecond precision
    obs = http.get(f"/Observation/{world.ids['obs_a1']}").json()
    obs["status"] = "amended"
    updated = http.put(f"/Observation/{obs['id']}", json=obs)
    assert updated.status_code == 200, updated.text
    stamp = updated.json()["meta"]["lastUpdated"]
    bundle = http.get(f"/Patient/{world.a}/$everything", params={"_since": stamp}).json()
    assert _keys(bundle) == [("Observation", obs["id"])]
    assert http.get(f"/Patient/{world.a}/$everything", params={"_since": "2000-01-01T00:00:00Z"}).json()[
        "total"
    ] == len(world.expected_a)
    assert http.get(f"/Patient/{world.a}/$everything", params={"_since": "yesterday"}).status_code == 400


def test_paging_covers_everything_once(http: httpx.Client, world: World) -> None:
    pages = list(_all_pages(http, f"/Patient/{world.a}/$everything", {"_count": 3}))
    assert len(pages) == 3
    seen = [k for page in pages for k in _keys(page)]
    assert len(seen) == len(set(seen)) and set(seen) == world.expected_a
    assert all(page["total"] == len(world.expected_a) for page in pages)
    assert _link(pages[0], "previous") is None and _link(pages[1], "previous") is not None
    # Links keep the filters.
    typed = list(_all_pages(http, f"/Patient/{world.a}/$everything", {"_count": 1, "_type": "Observation"}))
    assert len(typed) == 2
    assert {k for page in typed for k in _keys(page)} == {
        k for k in world.expected_a if k[0] == "Observation"
    }


def test_unknown_deleted_and_bad_requests(http: httpx.Client, world: World) -> None:
    unknown = http.get(f"/Patient/{uuid.uuid4()}/$everything")
    assert unknown.status_code == 404 and unknown.json()["resourceType"] == "OperationOutcome"
    patient = _post(http, {"resourceType": "Patient"})
    assert http.delete(f"/Patient/{patient}").status_code == 204
    deleted = http.get(f"/Patient/{patient}/$everything")
    assert deleted.status_code == 410 and deleted.json()["resourceType"] == "OperationOutcome"
    assert http.get(f"/Patient/{world.a}/$everything", params={"start": "2020"}).status_code == 400
    assert http.get(f"/Patient/{world.a}/$everything", params={"_count": "x"}).status_code == 400
    assert http.get(f"/Observation/{world.ids['obs_a1']}/$everything").status_code == 404
    lenient = http.get(
        f"/Patient/{world.a}/$everything", params={"start": "2020"}, headers={"Prefer": "handling=lenient"}
    )
    assert lenient.status_code == 200


def test_all_patients_on_a_fresh_database(fresh_database_url: Any) -> None:
    with (
        LiveServer(fresh_database_url("everything_all")) as server,
        httpx.Client(base_url=server.base, timeout=60, headers=ADMIN_AUTH) as client,
    ):
        w = build_world(client, "fresh")
        loner = _post(client, {"resourceType": "Practitioner"})  # referenced by nobody: not listed
        pages = list(_all_pages(client, "/Patient/$everything", {"_count": 4}))
        seen = [k for page in pages for k in _keys(page)]
        assert len(seen) == len(set(seen))
        assert set(seen) == w.expected_a | w.expected_b
        assert ("Practitioner", loner) not in seen
        assert pages[0]["total"] == len(w.expected_a | w.expected_b)
        assert {k[0] for k in seen[:2]} == {"Patient"}
        summary = client.get("/Patient/$everything", params={"_count": 0}).json()
        assert summary["total"] == len(seen) and "entry" not in summary or summary["entry"] == []
        assert _link(summary, "next") is None
        patients = client.get("/Patient/$everything", params={"_type": "Patient"}).json()
        assert set(_keys(patients)) == {("Patient", w.a), ("Patient", w.b)}
