from __future__ import annotations

import httpx


def test_create_then_read_returns_the_resource(http: httpx.Client, uid: str) -> None:
    created = http.post("/Patient", json={"resourceType": "Patient", "name": [{"family": f"Nguyễn{uid}"}]})
    assert created.status_code == 201, created.text
    assert created.headers["content-type"].startswith("application/fhir+json")
    location = created.headers["location"]
    body = created.json()
    assert location.endswith(f"/Patient/{body['id']}/_history/1")
    read = http.get(f"/Patient/{body['id']}")
    assert read.status_code == 200
    assert read.json()["name"][0]["family"] == f"Nguyễn{uid}"
    assert read.headers["etag"] == 'W/"1"'
