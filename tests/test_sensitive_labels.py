"""Sensitive categories (issue 8, defect 4): which resources ``consent.labels.labels_of`` marks
HIV, PSY, SEX, ETH, STD or GDIS, and that the marks keep sensitive data from a clinician
with only an ordinary-data grant, over HTTP.

Each family the old lists missed has its own cases (every one labelled NORMAL before the
fix): HIV viral-load and other HIV LOINC codes; ICD-10 under ICD-10-CM, the WHO URI, OIDs
and the hub's Vietnamese ICD-10 URI; lower-case, dotted and undotted codes; ATC
antiretrovirals, psychiatric and opioid-substitution drugs; diagnoses, notes and drug names
given only as text (Vietnamese with or without diacritics, English). Negative cases pin the
precision: whole words only, ambiguous folded words, hepatitis-B-only drugs, exempt types.
The HTTP test runs on the backend under test (SQLite, or PostgreSQL with
HUB_TEST_DATABASE_URL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from conftest import LiveServer, make_token

from consent import labels
from consent.context import system_access
from hub.auth.principal import Role
from hub.db.schema import compartment, resource
from hub.store.reindex import reindex

ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10_CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10_OID = "urn:oid:2.16.840.1.113883.6.3"
ICD10_CM_OID = "urn:oid:2.16.840.1.113883.6.90"
ICD10_VN = "https://ehealth-hub.vn/sid/icd-10"
LOINC = "http://loinc.org"
LOINC_OID = "urn:oid:2.16.840.1.113883.6.1"
SNOMED = "http://snomed.info/sct"
SNOMED_OID = "urn:oid:2.16.840.1.113883.6.96"
ATC = "http://www.whocc.no/atc"
ATC_OID = "urn:oid:2.16.840.1.113883.6.73"


def condition(system: str | None, code: str | None, text: str | None = None) -> dict[str, Any]:
    concept: dict[str, Any] = {}
    if code is not None:
        concept["coding"] = [{"system": system, "code": code}] if system else [{"code": code}]
    if text is not None:
        concept["text"] = text
    return {"resourceType": "Condition", "subject": {"reference": "Patient/p"}, "code": concept}


def observation(system: str, code: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": "Patient/p"},
        **extra,
    }


def medication(system: str | None, code: str | None, text: str | None = None) -> dict[str, Any]:
    concept: dict[str, Any] = {}
    if code is not None:
        concept["coding"] = [{"system": system, "code": code}]
    if text is not None:
        concept["text"] = text
    return {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p"},
        "medicationCodeableConcept": concept,
    }


def names(resource: dict[str, Any]) -> set[str]:
    return set(labels.names(labels.labels_of(resource)))


HIV_LOINC = [
    "25836-8", "20447-9", "49580-4", "10351-5", "29539-4", "29541-0", "48511-0", "51780-5",
    "41497-2", "48345-3", "31201-7", "43009-3", "57975-5", "25835-0", "29893-5", "30361-0",
]  # fmt: skip


@pytest.mark.parametrize("code", HIV_LOINC)
def test_hiv_loinc_viral_loads_and_tests_are_hiv(code: str) -> None:
    assert names(observation(LOINC, code, valueQuantity={"value": 40})) == {"HIV"}
    assert names(observation(LOINC_OID, code)) == {"HIV"}  # LOINC by its OID


@pytest.mark.parametrize(
    ("system", "code", "label"),
    [
        (ICD10_CM, "B20", "HIV"),
        (ICD10_CM, "Z21", "HIV"),
        (ICD10_OID, "B24", "HIV"),
        (ICD10_CM_OID, "B20", "HIV"),
        (ICD10_VN, "B20.0", "HIV"),
        ("http://hl7.org/fhir/sid/icd-10-vn", "B23.8", "HIV"),
        ("https://ehealth-hub.vn/fhir/CodeSystem/ICD10", "B22", "HIV"),  # any URI naming ICD-10
        (ICD10 + "/", "B20", "HIV"),
        ("HTTP://HL7.ORG/FHIR/SID/ICD-10-CM", "B20", "HIV"),
        (ICD10_CM, "F32.9", "PSY"),
        (ICD10_CM, "O09.90", "SEX"),
        (ICD10_CM, "A54.00", "STD"),
        (ICD10_CM_OID, "Q90.9", "GDIS"),
        (ICD10, "R75", "HIV"),
        (ICD10, "Z20.6", "HIV"),
        (ICD10, "O98.7", "HIV"),
        (ICD10, "X70", "PSY"),
        (ICD10, "Z71.5", "ETH"),
        (ICD10, "Z11.3", "STD"),
        (ICD10, "N97.9", "SEX"),
        (ICD10, "Z15.0", "GDIS"),
    ],
)
def test_icd10_under_every_system_uri(system: str, code: str, label: str) -> None:
    assert label in names(condition(system, code))


@pytest.mark.parametrize(
    ("code", "label"),
    [("f32.9", "PSY"), ("F329", "PSY"), ("b20.0", "HIV"), ("B200", "HIV"), ("B20.0", "HIV"),
     (" B20 ", "HIV"), ("a51.0", "STD"), ("o80", "SEX"), ("q90.9", "GDIS"), ("f10.20", "ETH")],
)  # fmt: skip
def test_icd10_codes_are_compared_case_blind_with_or_without_the_dot(code: str, label: str) -> None:
    assert label in names(condition(ICD10, code))


def test_substance_use_codes_are_also_mental_health() -> None:
    assert names(condition(ICD10, "f10.2")) == {"PSY", "ETH"}


@pytest.mark.parametrize(
    ("system", "code", "label"),
    [
        (ATC, "J05AR03", "HIV"),  # tenofovir disoproxil and emtricitabine (also PrEP)
        (ATC, "J05AR27", "HIV"),  # a newer combination: the whole J05AR group
        (ATC, "j05ar13", "HIV"),
        (ATC_OID, "J05AG03", "HIV"),  # efavirenz
        (ATC, "J05AJ03", "HIV"),  # dolutegravir
        (ATC, "J05AE08", "HIV"),  # atazanavir
        (ATC, "J05AF05", "HIV"),  # lamivudine
        (ATC, "J05AX09", "HIV"),  # maraviroc
        (ATC, "J05AX07", "HIV"),  # enfuvirtide
        (ATC, "N05AH04", "PSY"),  # quetiapine
        (ATC, "N05AN01", "PSY"),  # lithium
        (ATC, "N06AB06", "PSY"),  # sertraline
        (ATC, "N07BC02", "ETH"),  # methadone
        (ATC, "N07BC01", "ETH"),  # buprenorphine
        (ATC, "G03AC08", "SEX"),  # etonogestrel implant
    ],
)
def test_atc_medications(system: str, code: str, label: str) -> None:
    assert names(medication(system, code)) == {label}


@pytest.mark.parametrize(
    "code",
    ["J05AF10", "J05AF08", "J05AF11", "J05AE30", "J05AB01", "N05BA01", "N02AA01", "C09AA05"],
)
def test_atc_drugs_that_are_not_sensitive(code: str) -> None:
    # entecavir, adefovir, telbivudine (hepatitis B only), nirmatrelvir/ritonavir (COVID-19),
    # aciclovir, diazepam (anxiolytics are not listed), morphine, ramipril
    assert names(medication(ATC, code)) == {"NORMAL"}


def test_the_contained_medication_of_a_request_counts() -> None:
    request = medication(None, None)
    del request["medicationCodeableConcept"]
    request["contained"] = [
        {"resourceType": "Medication", "id": "m", "code": {"coding": [{"system": ATC, "code": "J05AR20"}]}}
    ]
    request["medicationReference"] = {"reference": "#m"}
    assert names(request) == {"HIV"}


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("HIV giai đoạn 3", "HIV"),
        ("Nhiễm HIV", "HIV"),
        ("nhiem hiv", "HIV"),
        ("AIDS", "HIV"),
        ("HIV/AIDS", "HIV"),
        ("Suy giảm miễn dịch mắc phải", "HIV"),
        ("Human immunodeficiency virus infection", "HIV"),
        ("Trầm cảm", "PSY"),
        ("TRẦM CẢM NẶNG", "PSY"),
        ("Tâm thần phân liệt", "PSY"),
        ("tam than phan liet", "PSY"),
        ("Rối loạn lưỡng cực", "PSY"),
        ("Ý định tự tử", "PSY"),
        ("schizophrenia", "PSY"),
        ("Depression", "PSY"),
        ("Giang mai", "STD"),
        ("Bệnh lậu", "STD"),
        ("Syphilis, secondary", "STD"),
        ("Nghiện ma túy", "ETH"),
        ("Nghiện rượu", "ETH"),
        ("Điều trị Methadone", "ETH"),
        ("Opioid dependence", "ETH"),
        ("Mang thai 12 tuần", "SEX"),
        ("Phá thai", "SEX"),
        ("Đặt vòng tránh thai", "SEX"),
        ("Xét nghiệm gen BRCA1", "GDIS"),
    ],
)
def test_diagnoses_given_only_as_text(text: str, label: str) -> None:
    assert names(condition(None, None, text)) == {label}, text


def test_notes_displays_and_narratives_are_read() -> None:
    note = observation(LOINC, "718-7", note=[{"text": "Bệnh nhân HIV dương tính, đang điều trị ARV"}])
    assert names(note) == {"HIV"}
    display = condition(None, None)
    display["code"] = {"coding": [{"system": "https://ehealth-hub.vn/sid/benh-vien-x", "code": "X1",
                                    "display": "Rối loạn trầm cảm"}]}  # fmt: skip
    assert names(display) == {"PSY"}
    narrative = observation(LOINC, "718-7", text={"status": "generated", "div": "<div>Syphilis screen</div>"})
    assert names(narrative) == {"STD"}
    report = {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "Xét nghiệm"},
              "conclusion": "Tải lượng virus HIV dưới ngưỡng phát hiện"}  # fmt: skip
    assert names(report) == {"HIV"}
    answer = {"resourceType": "QuestionnaireResponse", "status": "completed",
              "item": [{"linkId": "1", "answer": [{"valueString": "đang dùng PrEP"}]}]}  # fmt: skip
    assert names(answer) == {"HIV"}


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Tenofovir/Lamivudine/Dolutegravir 300/300/50 mg", "HIV"),
        ("Biktarvy", "HIV"),
        ("Sertraline 50 mg", "PSY"),
        ("Quetiapine 25 MG Oral Tablet", "PSY"),
        ("Methadone 10mg/ml dung dịch uống", "ETH"),
        ("Buprenorphine 8 MG Sublingual Tablet", "ETH"),
        ("Levonorgestrel 1.5 mg", "SEX"),
    ],
)
def test_medications_named_only_in_text(text: str, label: str) -> None:
    assert names(medication(None, None, text)) == {label}


@pytest.mark.parametrize(
    "text",
    [
        "archive", "Archived record", "hearing aids", "walking aids", "Bệnh lâu năm", "khám lại sau 1 tuần",
        "ST depression in V4-V6", "respiratory depression", "Tăng huyết áp", "Viêm phổi", "Prep for surgery",
        "Chivas", "sida-like",
    ],
)  # fmt: skip
def test_ordinary_text_stays_ordinary(text: str) -> None:
    assert names(condition(None, None, text)) == {"NORMAL"}, text


def test_identity_resources_and_security_label_displays_are_not_scanned() -> None:
    patient = {"resourceType": "Patient", "name": [{"text": "Nguyễn Văn HIV"}],
               "address": [{"text": "Trung tâm cai nghiện ma túy"}]}  # fmt: skip
    assert names(patient) == {"NORMAL"}
    org = {"resourceType": "Organization", "name": "Phòng khám HIV", "alias": ["PrEP clinic"]}
    assert names(org) == {"NORMAL"}
    tagged = observation(LOINC, "718-7")
    tagged["category"] = [{"coding": [{"system": labels.ACT_CODE, "code": "IMP", "display": "HIV ward"}]}]
    assert names(tagged) == {"NORMAL"}
    consent = {"resourceType": "Consent", "status": "active", "scope": {"text": "Chia sẻ dữ liệu HIV"}}
    assert names(consent) == {"NORMAL"}


def _consent(provision: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Consent", "status": "active", "patient": {"reference": "Patient/p"},
            "provision": provision}  # fmt: skip


def _label(*codes: str, system: str = labels.ACT_CODE) -> list[dict[str, str]]:
    return [{"system": system, "code": code} for code in codes]


def test_a_consent_carries_the_sensitive_classes_its_provisions_name() -> None:
    """That a patient shares (or refuses) mental-health data is itself mental-health data."""
    dr = [{"reference": {"reference": "Practitioner/dr"}}]
    assert names(_consent({"type": "permit", "actor": dr, "securityLabel": _label("PSY")})) == {"PSY"}
    assert names(_consent({"type": "deny", "actor": dr, "securityLabel": _label("HIV", "SEX")})) == {
        "HIV",
        "SEX",
    }
    nested = {"type": "permit", "actor": dr,
              "provision": [{"type": "deny", "provision": [{"securityLabel": _label("GDIS", "ETH")}]}]}  # fmt: skip
    assert names(_consent(nested)) == {"GDIS", "ETH"}
    restricted = {"type": "permit", "securityLabel": _label("V", system=labels.CONFIDENTIALITY)}
    assert names(_consent(restricted)) == {"V"}
    # Ordinary data, no labels, or codes that name no class: the Consent stays ordinary.
    for plain in (
        {"type": "permit", "actor": dr},
        {"type": "permit", "securityLabel": _label("N", system=labels.CONFIDENTIALITY)},
        {"type": "deny", "securityLabel": _label("AUDIT", "NORMAL", "XYZ")},
        {"type": "permit", "securityLabel": "PSY", "provision": "HIV"},  # malformed: read nothing
    ):
        assert names(_consent(plain)) == {"NORMAL"}, plain
    # The same bits as the grants the Consent derives (consent.derive reads the same codes).
    from consent.derive import grant_rows

    body = _consent({"type": "permit", "actor": dr, "securityLabel": _label("PSY", "STD")})
    (grant,) = grant_rows("Consent", "c", body)
    assert labels.labels_of(body) == grant[4]
    # Only Consents: a securityLabel element elsewhere is no provision.
    assert names({**observation(LOINC, "718-7"), "securityLabel": _label("PSY")}) == {"NORMAL"}


def test_codes_of_other_systems_and_plain_resources_stay_ordinary() -> None:
    assert names(condition(ICD10, "I10")) == {"NORMAL"}
    assert names(condition("http://hl7.org/fhir/sid/icd-10-pcs", "B20ZZZZ")) == {"NORMAL"}  # a procedure
    assert names(condition("https://ehealth-hub.vn/sid/other", "B20")) == {"NORMAL"}
    assert names(observation(LOINC, "718-7")) == {"NORMAL"}
    assert names({"resourceType": "Condition", "subject": {"reference": "Patient/p"}}) == {"NORMAL"}


def test_the_data_files_are_consistent() -> None:
    bundle = orjson.loads(labels.CATEGORIES_FILE.read_bytes())
    terms = orjson.loads(labels.TERMS_FILE.read_bytes())
    systems = set(terms["systems"])
    for entry in bundle["entry"]:
        value_set = entry["resource"]
        assert value_set["resourceType"] == "ValueSet"
        (label,) = [
            e["valueCoding"]["code"] for e in value_set["extension"] if e["url"] == labels.LABEL_EXTENSION
        ]
        assert label in labels.BITS
        for part in value_set["compose"]["include"] + value_set["compose"].get("exclude", []):
            assert part["system"] in systems, part["system"]  # so its aliases apply
            assert all(f["op"] in ("is-a", "regex") for f in part.get("filter", ()))
    assert set(terms["keywords"]) <= set(labels.BITS)
    assert labels.rules().keywords.folded  # compiled


@pytest.fixture()
def admin(live_server: LiveServer) -> Any:
    with live_server.admin_client() as client:
        yield client


def test_clinician_with_an_ordinary_grant_cannot_read_the_newly_listed_data(
    live_server: LiveServer, admin: httpx.Client, client_for: Callable[[str | None], httpx.Client], uid: str
) -> None:
    org, pid = f"org-lbl-{uid}", f"p-lbl-{uid}"
    subject = {"reference": f"Patient/{pid}"}
    ordinary = {"resourceType": "Observation", "id": f"hb-{uid}", "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "718-7"}]}, "subject": subject}  # fmt: skip
    sensitive = [
        {"resourceType": "Observation", "id": f"vl-{uid}", "status": "final",
         "code": {"coding": [{"system": LOINC, "code": "25836-8"}]}, "subject": subject,
         "valueQuantity": {"value": 40, "unit": "copies/mL"}},
        {"resourceType": "Condition", "id": f"txt-{uid}", "subject": subject, "code": {"text": "HIV giai đoạn 3"}},
        {"resourceType": "MedicationRequest", "id": f"arv-{uid}", "status": "active", "intent": "order",
         "subject": subject, "medicationCodeableConcept": {"coding": [{"system": ATC, "code": "J05AR03"}]}},
        {"resourceType": "Condition", "id": f"cm-{uid}", "subject": subject,
         "code": {"coding": [{"system": ICD10_CM_OID, "code": "f32.9"}]}},
        {"resourceType": "MedicationRequest", "id": f"mtd-{uid}", "status": "active", "intent": "order",
         "subject": subject, "medicationCodeableConcept": {"text": "Methadone 10 mg/ml"}},
    ]  # fmt: skip
    bodies: list[dict[str, Any]] = [
        {"resourceType": "Organization", "id": org, "name": org},
        {"resourceType": "Patient", "id": pid, "managingOrganization": {"reference": f"Organization/{org}"}},
        ordinary,
        *sensitive,
    ]
    for body in bodies:
        put = admin.put(f"{body['resourceType']}/{body['id']}", json=body)
        assert put.status_code in (200, 201), put.text

    clinician = client_for(
        make_token(
            live_server, role=Role.CLINICIAN, fhir_user=f"Practitioner/dr-lbl-{uid}", organizations=[org]
        )
    )
    patient = client_for(make_token(live_server, role=Role.PATIENT, fhir_user=f"Patient/{pid}"))

    assert clinician.get(f"Observation/{ordinary['id']}").status_code == 200  # the policy grant works
    for body in sensitive:
        path = f"{body['resourceType']}/{body['id']}"
        assert clinician.get(path).status_code in (403, 404), path
        mine = patient.get(path)
        assert mine.status_code == 200 and mine.json()["id"] == body["id"], path
    for res_type in ("Observation", "Condition", "MedicationRequest"):
        seen = clinician.get(res_type, params={"patient": pid})
        assert seen.status_code == 200, seen.text
        ids = {e["resource"]["id"] for e in seen.json().get("entry", [])}
        assert ids == ({ordinary["id"]} if res_type == "Observation" else set()), (res_type, ids)
        all_mine = patient.get(res_type, params={"patient": pid})
        assert {e["resource"]["id"] for e in all_mine.json().get("entry", [])} == {
            b["id"] for b in [ordinary, *sensitive] if b["resourceType"] == res_type
        }


def test_reindex_labels_consents_stored_before_their_provisions_counted(
    live_server: LiveServer, admin: httpx.Client, client_for: Callable[[str | None], httpx.Client], uid: str
) -> None:
    """A PSY-sharing Consent stored with the NORMAL label (as before the provisions counted) is
    seen by the patient's care team until ``hub reindex`` labels it PSY."""
    org, pid, cid = f"org-rx-{uid}", f"p-rx-{uid}", f"c-rx-{uid}"
    role = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]
    }
    grant = {"type": "permit", "securityLabel": _label("PSY"),
             "actor": [{"role": role, "reference": {"reference": f"Practitioner/x-{uid}"}}]}  # fmt: skip
    consent = {
        **_consent(grant),
        "id": cid,
        "patient": {"reference": f"Patient/{pid}"},
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
    }
    bodies: list[dict[str, Any]] = [
        {"resourceType": "Organization", "id": org, "name": org},
        {"resourceType": "Patient", "id": pid, "managingOrganization": {"reference": f"Organization/{org}"}},
        consent,
    ]
    for body in bodies:
        put = admin.put(f"{body['resourceType']}/{body['id']}", json=body)
        assert put.status_code in (200, 201), put.text
    clinician = client_for(
        make_token(
            live_server, role=Role.CLINICIAN, fhir_user=f"Practitioner/dr-rx-{uid}", organizations=[org]
        )
    )

    def stored(conn: sa.Connection) -> list[int]:
        rows = sa.select(compartment.c.labels).join(resource, resource.c.pid == compartment.c.pid)
        return [
            r[0] for r in conn.execute(rows.where(resource.c.res_type == "Consent", resource.c.res_id == cid))
        ]

    with live_server.engine.begin() as conn:
        assert stored(conn) == [labels.PSY]
        mine = sa.select(resource.c.pid).where(resource.c.res_type == "Consent", resource.c.res_id == cid)
        conn.execute(compartment.update().where(compartment.c.pid.in_(mine)).values(labels=labels.NORMAL))
    assert clinician.get(f"Consent/{cid}").status_code == 200  # the old label: the care team learns of it
    with system_access("test-consent-reindex"):
        reindex(live_server.app.state.router.ctx.store, "Consent")
    with live_server.engine.begin() as conn:
        assert stored(conn) == [labels.PSY]
    assert clinician.get(f"Consent/{cid}").status_code == 404
