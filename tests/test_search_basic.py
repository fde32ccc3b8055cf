"""The basic search of the backbone: _id, _lastUpdated, identifier, patient/subject, paging."""

from __future__ import annotations

import httpx

BHYT = "https://vnhub.example/bhyt"


def _make(http: httpx.Client, uid: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        body = {
            "resourceType": "Patient",
            "identifier": [{"system": BHYT, "value": f"DN4{uid}{i}"}],
            "name": [{"family": "Trần", "given": [f"Bình{uid}"]}],
        }
        ids.append(http.post("/Patient", json=body).json()["id"])
    return ids


def test_identifier_forms(http: httpx.Client, uid: str) -> None:
    ids = _make(http, uid, 2)
    assert [
        e["resource"]["id"]
        for e in http.get("/Patient", params={"identifier": f"{BHYT}|DN4{uid}0"}).json()["entry"]
    ] == ids[:1]
    assert (
        http.get("/Patient", params={"identifier": f"DN4{uid}1", "_total": "accurate"}).json()["total"] == 1
    )
    assert (
        http.get("/Patient", params={"identifier": f"http://other|DN4{uid}1", "_total": "accurate"}).json()[
            "total"
        ]
        == 0
    )
    both = http.get(
        "/Patient", params={"identifier": f"{BHYT}|DN4{uid}0,{BHYT}|DN4{uid}1", "_total": "accurate"}
    ).json()
    assert both["total"] == 2


def test_id_and_last_updated(http: httpx.Client, uid: str) -> None:
    ids = _make(http, uid, 3)
    result = http.get("/Patient", params={"_id": f"{ids[0]},{ids[2]}"}).json()
    assert {e["resource"]["id"] for e in result["entry"]} == {ids[0], ids[2]}
    stamp = http.get(f"/Patient/{ids[1]}").json()["meta"]["lastUpdated"]
    after = http.get("/Patient", params={"_id": ",".join(ids), "_lastUpdated": f"ge{stamp}"}).json()
    assert {e["resource"]["id"] for e in after["entry"]} == {ids[1], ids[2]}
    assert (
        http.get(
            "/Patient", params={"_id": ",".join(ids), "_lastUpdated": "lt2000-01-01", "_total": "accurate"}
        ).json()["total"]
        == 0
    )


def test_patient_and_subject(http: httpx.Client, uid: str) -> None:
    patient = _make(http, uid, 1)[0]
    for _ in range(2):
        http.post(
            "/Condition", json={"resourceType": "Condition", "subject": {"reference": f"Patient/{patient}"}}
        )
    assert http.get("/Condition", params={"patient": patient, "_total": "accurate"}).json()["total"] == 2
    assert (
        http.get("/Condition", params={"subject": f"Patient/{patient}", "_total": "accurate"}).json()["total"]
        == 2
    )
    assert (
        http.get("/Condition", params={"subject:Patient": patient, "_total": "accurate"}).json()["total"] == 2
    )
    assert (
        http.get("/Condition", params={"subject:Group": patient, "_total": "accurate"}).json()["total"] == 0
    )


def test_name_is_accent_insensitive_prefix(http: httpx.Client, uid: str) -> None:
    _make(http, uid, 1)
    assert http.get("/Patient", params={"given": f"binh{uid}", "_total": "accurate"}).json()["total"] == 1
    assert http.get("/Patient", params={"name": f"BÌNH{uid[:6]}", "_total": "accurate"}).json()["total"] >= 1


def test_paging_links(http: httpx.Client, uid: str) -> None:
    ids = _make(http, uid, 5)
    page = http.get("/Patient", params={"_id": ",".join(ids), "_count": 2, "_total": "accurate"}).json()
    seen = [e["resource"]["id"] for e in page["entry"]]
    assert page["total"] == 5
    while any(link["relation"] == "next" for link in page["link"]):
        next_url = next(link["url"] for link in page["link"] if link["relation"] == "next")
        page = http.get(next_url).json()
        seen += [e["resource"]["id"] for e in page["entry"]]
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    assert [e["search"]["mode"] for e in page["entry"]] == ["match"]


def test_post_search_and_summary_count(http: httpx.Client, uid: str) -> None:
    ids = _make(http, uid, 2)
    posted = http.post("/Patient/_search", data={"_id": ",".join(ids), "_total": "accurate"})
    assert posted.json()["total"] == 2
    counted = http.get("/Patient", params={"_id": ",".join(ids), "_summary": "count"}).json()
    assert counted["total"] == 2 and "entry" not in counted


def test_unknown_parameter_is_an_error_unless_lenient(http: httpx.Client) -> None:
    strict = http.get("/Patient", params={"shoe-size": "42"})
    assert strict.status_code == 400
    assert strict.json()["resourceType"] == "OperationOutcome"
    lenient = http.get(
        "/Patient", params={"shoe-size": "42", "_count": 1}, headers={"Prefer": "handling=lenient"}
    )
    assert lenient.status_code == 200
    assert lenient.json()["entry"][-1]["search"]["mode"] == "outcome"


def test_bad_values_are_400(http: httpx.Client) -> None:
    assert http.get("/Patient", params={"birthdate": "yesterday"}).status_code == 400
    assert http.get("/Patient", params={"_count": "-1"}).status_code == 400
