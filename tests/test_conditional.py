"""Conditional create, update and delete."""

from __future__ import annotations

import httpx

CCCD = "https://vnhub.example/cccd"


def _patient(value: str) -> dict[str, object]:
    return {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": value}]}


def test_if_none_exist_creates_once(http: httpx.Client, uid: str) -> None:
    header = {"If-None-Exist": f"identifier={CCCD}|{uid}"}
    first = http.post("/Patient", json=_patient(uid), headers=header)
    second = http.post("/Patient", json=_patient(uid), headers=header)
    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]


def test_if_none_exist_with_two_matches_is_412(http: httpx.Client, uid: str) -> None:
    http.post("/Patient", json=_patient(uid))
    http.post("/Patient", json=_patient(uid))
    response = http.post(
        "/Patient", json=_patient(uid), headers={"If-None-Exist": f"identifier={CCCD}|{uid}"}
    )
    assert response.status_code == 412


def test_conditional_update_creates_then_updates(http: httpx.Client, uid: str) -> None:
    query = {"identifier": f"{CCCD}|{uid}"}
    created = http.put("/Patient", params=query, json=_patient(uid))
    assert created.status_code == 201
    updated = http.put("/Patient", params=query, json={**_patient(uid), "gender": "female"})
    assert updated.status_code == 200
    assert updated.json()["id"] == created.json()["id"]
    assert updated.json()["meta"]["versionId"] == "2"


def test_conditional_update_with_many_matches_is_412(http: httpx.Client, uid: str) -> None:
    http.post("/Patient", json=_patient(uid))
    http.post("/Patient", json=_patient(uid))
    response = http.put("/Patient", params={"identifier": f"{CCCD}|{uid}"}, json=_patient(uid))
    assert response.status_code == 412


def test_conditional_update_no_match_but_id_taken_is_409(http: httpx.Client, uid: str) -> None:
    http.put(f"/Patient/taken-{uid}", json={"resourceType": "Patient", "id": f"taken-{uid}"})
    body = {**_patient(uid), "id": f"taken-{uid}"}
    response = http.put("/Patient", params={"identifier": f"{CCCD}|{uid}"}, json=body)
    assert response.status_code == 409


def test_conditional_delete(http: httpx.Client, uid: str) -> None:
    created = http.post("/Patient", json=_patient(uid)).json()
    assert http.delete("/Patient", params={"identifier": f"{CCCD}|{uid}"}).status_code == 204
    assert http.get(f"/Patient/{created['id']}").status_code == 410
    assert http.delete("/Patient", params={"identifier": f"{CCCD}|{uid}"}).status_code == 204  # no match


def test_conditional_delete_many_matches_is_412(http: httpx.Client, uid: str) -> None:
    http.post("/Patient", json=_patient(uid))
    http.post("/Patient", json=_patient(uid))
    assert http.delete("/Patient", params={"identifier": f"{CCCD}|{uid}"}).status_code == 412


def test_conditional_without_criteria_is_400(http: httpx.Client) -> None:
    assert http.delete("/Patient").status_code == 400
