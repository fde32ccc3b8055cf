"""A real FHIR client (fhirpy, async) against the running server."""

from __future__ import annotations

import uuid

import pytest
from conftest import LiveServer
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound

CCCD = "https://vnhub.example/cccd"


async def test_fhirpy_crud_search_and_transaction(live_server: LiveServer) -> None:
    client = AsyncFHIRClient(
        live_server.base,
        authorization=f"Bearer {live_server.admin_token}",
        extra_headers={"Accept": "application/fhir+json"},
    )
    value = uuid.uuid4().hex[:12]

    patient = client.resource(
        "Patient",
        identifier=[{"system": CCCD, "value": value}],
        name=[{"family": "Lê", "given": ["Hoa"]}],
        gender="female",
    )
    await patient.save()
    assert patient.id and patient["meta"]["versionId"] == "1"

    fetched = await client.reference("Patient", patient.id).to_resource()
    assert fetched["name"][0]["family"] == "Lê"

    fetched["birthDate"] = "1990-05-17"
    await fetched.save()
    assert (await client.reference("Patient", patient.id).to_resource())["meta"]["versionId"] == "2"

    found = await client.resources("Patient").search(identifier=f"{CCCD}|{value}").fetch_all()
    assert [p.id for p in found] == [patient.id]

    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                    "subject": {"reference": f"Patient/{patient.id}"},
                    "valueQuantity": {
                        "value": 52.5,
                        "unit": "kg",
                        "system": "http://unitsofmeasure.org",
                        "code": "kg",
                    },
                },
                "request": {"method": "POST", "url": "Observation"},
            }
        ],
    }
    response = await client.execute("", method="post", data=bundle)
    assert response["type"] == "transaction-response"
    assert response["entry"][0]["response"]["status"] == "201"
    observations = await client.resources("Observation").search(subject=f"Patient/{patient.id}").fetch_all()
    assert len(observations) == 1

    # Chaining, sorting and _include through the client's own query builder.
    chained = (
        await client.resources("Observation")
        .search(**{"subject:Patient.identifier": f"{CCCD}|{value}"})
        .fetch_all()
    )
    assert [o["subject"]["reference"] for o in chained] == [f"Patient/{patient.id}"]
    raw = (
        await client.resources("Observation")
        .search(patient=patient.id)
        .include("Observation", "patient")
        .sort("-date")
        .fetch_raw()
    )
    modes = sorted((e["resource"]["resourceType"], e["search"]["mode"]) for e in raw["entry"])
    assert modes == [("Observation", "match"), ("Patient", "include")]
    has = (
        await client.resources("Patient")
        .search(**{"_has:Observation:patient:code": "29463-7", "identifier": f"{CCCD}|{value}"})
        .fetch_all()
    )
    assert [p.id for p in has] == [patient.id]

    await fetched.delete()
    with pytest.raises(ResourceNotFound):
        await client.reference("Patient", patient.id).to_resource()
