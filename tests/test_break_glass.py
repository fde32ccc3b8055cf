"""Break-glass opens one named, existing patient per request, and its reviews are
append-only (issue 8, defects 9 and 19), over real HTTP against the live test server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from conftest import LiveServer, make_token

from hub.auth.principal import Role

LOINC = "http://loinc.org"
REASON = "Unconscious patient in the emergency room"


class Ward:
    """Patients of one hospital the clinic's doctor does not treat."""

    def __init__(
        self, server: LiveServer, uid: str, client_for: Callable[[str | None], httpx.Client]
    ) -> None:
        self.server, self.uid, self.client_for = server, uid, client_for
        self.root = server.base.removesuffix("/fhir")
        self.patients = [f"bg{i}-{uid}" for i in range(3)]
        admin = client_for(server.admin_token)
        for pid in self.patients:
            for body in (
                {"resourceType": "Patient", "id": pid},
                {"resourceType": "Observation", "id": f"obs-{pid}", "status": "final",
                 "code": {"coding": [{"system": LOINC, "code": "718-7"}]}, "subject": {"reference": f"Patient/{pid}"}},
            ):  # fmt: skip
                answer = admin.put(f"{body['resourceType']}/{body['id']}", json=body)
                assert answer.status_code in (200, 201), answer.text
        self.doctor = self.as_(Role.CLINICIAN, f"Practitioner/dr-er-{uid}", (f"org-er-{uid}",))
        self.facility_admin = self.as_(Role.FACILITY_ADMIN, None, (f"org-er-{uid}",))
        self.auditor = self.as_(Role.AUDITOR)

    def as_(self, role: Role, fhir_user: str | None = None, orgs: tuple[str, ...] = ()) -> httpx.Client:
        return self.client_for(make_token(self.server, role=role, fhir_user=fhir_user, organizations=orgs))

    def alerts(self, client: httpx.Client | None = None) -> list[dict[str, Any]]:
        answer = (client or self.auditor).get(f"{self.root}/access/break-glass")
        assert answer.status_code == 200, answer.text
        mine = f"Practitioner/dr-er-{self.uid}"
        return [a for a in answer.json() if a["clinician"] == mine]

    def review(self, client: httpx.Client, alert_id: int, verdict: str, note: str) -> httpx.Response:
        return client.post(
            f"{self.root}/access/break-glass/{alert_id}/review", json={"verdict": verdict, "note": note}
        )


@pytest.fixture()
def ward(live_server: LiveServer, uid: str, client_for: Callable[[str | None], httpx.Client]) -> Ward:
    return Ward(live_server, uid, client_for)


def test_one_request_opens_one_patient(ward: Ward) -> None:
    glass = {"X-Break-Glass-Reason": REASON}
    first, second, third = ward.patients
    many = ",".join(ward.patients)
    # Defect 9: one search naming several patients opened all of them.
    form = ward.doctor.post(
        "Observation/_search",
        data={"patient": many},
        headers={**glass, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 400, form.text
    assert "one patient" in form.json()["issue"][0]["diagnostics"]
    assert ward.doctor.get("Observation", params={"patient": many}, headers=glass).status_code == 400
    assert (
        ward.doctor.get(
            "Observation", params={"subject": f"Patient/{first}", "patient": second}, headers=glass
        ).status_code
        == 400
    )
    assert ward.doctor.get("Patient", params={"_id": f"{first},{third}"}, headers=glass).status_code == 400
    assert ward.alerts() == []
    for pid in ward.patients:
        assert ward.doctor.get(f"Observation/obs-{pid}").status_code == 404
    # One patient, named twice, is one patient.
    same = ward.doctor.get("Observation", params={"patient": f"{first},Patient/{first}"}, headers=glass)
    assert same.status_code == 200 and [e["resource"]["id"] for e in same.json()["entry"]] == [f"obs-{first}"]
    assert [a["patient"] for a in ward.alerts()] == [f"Patient/{first}"]
    assert ward.doctor.get(f"Observation/obs-{second}").status_code == 404


def test_an_unknown_patient_opens_nothing(ward: Ward, live_server: LiveServer) -> None:
    glass = {"X-Break-Glass-Reason": REASON}
    ghost = f"ghost-{ward.uid}"
    answer = ward.doctor.get(f"Patient/{ghost}", headers=glass)
    assert answer.status_code == 404, answer.text
    assert ward.doctor.get("Observation", params={"patient": ghost}, headers=glass).status_code == 404
    assert ward.alerts() == []
    # A deleted patient is unknown too.
    gone = ward.patients[2]
    assert ward.client_for(live_server.admin_token).delete(f"Patient/{gone}").status_code == 204
    assert ward.doctor.get(f"Patient/{gone}", headers=glass).status_code == 404
    assert ward.alerts() == []


def test_reviews_are_appended_and_a_reviewed_alert_is_never_reused(ward: Ward) -> None:
    glass = {"X-Break-Glass-Reason": REASON}
    pid = ward.patients[0]
    assert ward.doctor.get(f"Patient/{pid}", headers=glass).status_code == 200
    assert ward.doctor.get(f"Patient/{pid}", headers=glass).status_code == 200  # same emergency: reused
    (alert,) = ward.alerts()
    assert alert["status"] == "open" and alert["reviews"] == []
    # Defect 19: a later review replaced an earlier one. Now both are kept.
    assert ward.review(ward.auditor, alert["id"], "not-justified", "No emergency recorded").status_code == 200
    later = ward.review(ward.facility_admin, alert["id"], "justified", "Checked with the ER")
    assert later.status_code == 200, later.text
    reviewed = later.json()
    assert [(r["verdict"], r["note"]) for r in reviewed["reviews"]] == [
        ("not-justified", "No emergency recorded"),
        ("justified", "Checked with the ER"),
    ]
    assert reviewed["status"] == "disputed"
    assert ward.review(ward.facility_admin, alert["id"], "maybe", "?").status_code == 400
    assert ward.review(ward.doctor, alert["id"], "justified", "mine").status_code == 403
    (listed,) = ward.alerts(ward.as_(Role.PATIENT, f"Patient/{pid}"))
    assert len(listed["reviews"]) == 2 and listed["status"] == "disputed"
    # A new break-glass after the review is a new alert, not the reviewed one.
    assert ward.doctor.get(f"Patient/{pid}", headers=glass).status_code == 200
    newest, reviewed_alert = ward.alerts()
    assert reviewed_alert["id"] == alert["id"] and len(reviewed_alert["reviews"]) == 2
    assert newest["id"] != alert["id"] and newest["status"] == "open" and newest["reviews"] == []
    open_only = ward.facility_admin.get(f"{ward.root}/access/break-glass", params={"status": "open"}).json()
    assert [a["id"] for a in open_only] == [newest["id"]]
