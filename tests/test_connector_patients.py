"""Patient resolution for the connectors (issue 11): one citizen, one record.

``connectors.patients.resolve`` is run as the pipeline runs it: inside a write transaction,
with a system access, its entries (plus a mapped Observation that references the patient's
placeholder) written by ``hub.rest.transaction.transaction_in``; what was stored is then
read back through the router. Each test makes its own identifiers, so they share the
session database. Both backends; the two-thread race runs on both (PostgreSQL: advisory
locks of the transaction's conditions; SQLite: one writer).
"""

from __future__ import annotations

import random
import threading
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import backend
from test_output_validity import validator  # noqa: F401  (the fixture)

from connectors.identifiers import (
    BHXH,
    BHYT,
    CCCD,
    FACILITY,
    FACILITY_SCOPED_KINDS,
    bhxh_of,
    check_cccd,
    facility_system,
    parse_bhyt,
)
from connectors.model import Mapped, PatientFacts, Rejected, Source
from connectors.patients import FLAG_KEY, OTHER_RECORD, REVIEW, resolve
from consent.context import system_access
from hub.auth.principal import system_principal
from hub.rest import FhirRouter
from hub.rest.messages import FhirRequest
from hub.rest.transaction import transaction_in

HIS = Source("test-his", "64001", "BVĐK Gia Lai", "provincial", "hl7v2-mllp")
LIS = Source("test-lis", "64123", "TTYT Chư Sê", "district", "xml130")
MRN = facility_system("mrn", HIS.facility_code)
MRN_LIS = facility_system("mrn", LIS.facility_code)
NAMING_SYSTEMS = Path(__file__).resolve().parent.parent / "fhir" / "naming-systems"


# --- identifiers -------------------------------------------------------------------------------


def _cccd(gender: str = "male", year: int = 1975, province: str = "064") -> str:
    digit = (year // 100 - 19) * 2 + (gender == "female")
    return f"{province}{digit}{year % 100:02d}{random.randrange(10**6):06d}"


def _bhxh() -> str:
    return f"{random.randrange(10**10):010d}"


def test_check_cccd() -> None:
    assert check_cccd("064075009876", "male", 1975) == []
    assert check_cccd("079305000123", "female", 2005) == []
    assert check_cccd("001199000001") == []  # no sex or year on the record: structure only
    (sex,) = check_cccd("064175009876", "male", 1975)
    assert "sex female" in sex and "says male" in sex
    (year,) = check_cccd("064206009876", "male", 1975)  # digit 2: born in the 2000s
    assert "2006" in year and "1975" in year
    assert any("future" in p for p in check_cccd("064299009876"))
    (province,) = check_cccd("003075009876", "male", 1975)  # 003 is no province code
    assert "003" in province
    assert check_cccd("064075009876", "unknown", 1975) == []
    assert check_cccd("06407500987")[0].startswith("a CCCD has 12 digits")
    assert check_cccd("06407500987X")[0].endswith("(not all digits)")
    assert "06407500987" not in check_cccd("06407500987X")[0]  # problems never quote the number


def test_bhyt_parts() -> None:
    card = parse_bhyt("DN4790123456789")
    assert card is not None
    assert (card.group, card.level, card.province, card.bhxh) == ("DN", 4, "79", "0123456789")
    assert parse_bhyt(" dn4 79 0123456789 ") == card
    assert parse_bhyt("DN6790123456789") is None  # benefit level 1-5
    assert parse_bhyt("DN479012345678") is None
    assert bhxh_of("HT3640123456789") == bhxh_of("0123456789") == "0123456789"
    assert bhxh_of("012345678") is None


def test_every_identifier_system_has_one_naming_system(
    validator: Any,  # noqa: F811  (the fixture imported above)
) -> None:
    files = sorted(NAMING_SYSTEMS.glob("*.json"))
    owners: dict[str, list[str]] = {}
    for path in files:
        for unique in orjson.loads(path.read_bytes())["uniqueId"]:
            owners.setdefault(unique["value"], []).append(path.name)
    from connectors.xml130.episode import CODE_LISTS, ID_DOCUMENT_SYSTEM, PRACTITIONER_SYSTEM

    wanted = [CCCD, BHYT, BHXH, FACILITY, FLAG_KEY, PRACTITIONER_SYSTEM, ID_DOCUMENT_SYSTEM]
    wanted += [facility_system(kind, "{MA_CSKCB}") for kind in sorted(FACILITY_SCOPED_KINDS)]
    wanted += sorted(CODE_LISTS["admin_unit"]["systems"].values())  # province, district, commune
    assert {s: owners.get(s, []) for s in wanted if len(owners.get(s, [])) != 1} == {}  # none missing
    assert {v: names for v, names in owners.items() if len(names) > 1} == {}  # none in two files
    code, output = validator(*files)
    assert code == 0 and output.strip().splitlines()[-1].startswith(f"{len(files)} valid, 0 invalid"), output


# --- helpers -----------------------------------------------------------------------------------


def _facts(*identifiers: tuple[str, str], **fields: Any) -> PatientFacts:
    resource = {
        "resourceType": "Patient",
        "identifier": [{"system": s, "value": v} for s, v in identifiers],
        **fields,
    }
    return PatientFacts(f"urn:uuid:{uuid.uuid4()}", resource)


def _mapped(*patients: PatientFacts, merges: list[tuple[str, list[dict[str, Any]]]] | None = None) -> Mapped:
    """A message unit: its patients and an Observation about the first one (references by
    placeholder, as a mapping writes them)."""
    entries = []
    if patients:
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "Cân nặng"},
                    "valueQuantity": {"value": 60, "unit": "kg"},
                    "subject": {"reference": patients[0].placeholder},
                },
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    return Mapped("ADT^A01", uuid.uuid4().hex, list(patients), entries, merges or [])


def _write(router: FhirRouter, mapped: Mapped, source: Source = HIS) -> list[dict[str, Any]]:
    """Resolve and write the message as the pipeline does; the transaction's response entries."""
    with system_access("test-patients"), router.ctx.store.write() as conn:
        entries = resolve(conn, router, mapped, source)
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [*entries, *mapped.entries]}
        request = FhirRequest("POST", "", parsed_body=bundle, principal=system_principal())
        response = transaction_in(router, conn, request)
    assert response.status == 200, response.body
    answered: list[dict[str, Any]] = orjson.loads(response.body or b"{}")["entry"]
    return answered


def _get(router: FhirRouter, path: str, **params: str) -> list[dict[str, Any]]:
    response = router.handle(
        FhirRequest("GET", path, [*params.items(), ("_count", "100")], principal=system_principal())
    )
    assert response.status == 200, response.body
    return [e["resource"] for e in orjson.loads(response.body or b"{}").get("entry", [])]


def _patients(router: FhirRouter, system: str, value: str) -> list[dict[str, Any]]:
    return _get(router, "Patient", identifier=f"{system}|{value}")


def _one(router: FhirRouter, system: str, value: str) -> dict[str, Any]:
    (patient,) = _patients(router, system, value)
    return patient


def _flags(router: FhirRouter, patient_id: str) -> list[dict[str, Any]]:
    """The patient's Flags (the registry has no Flag search: through its compartment)."""
    return _get(router, f"Patient/{patient_id}/$everything", _type="Flag")


def _seed(router: FhirRouter, *identifiers: tuple[str, str], **fields: Any) -> str:
    body = {
        "resourceType": "Patient",
        "identifier": [{"system": s, "value": v} for s, v in identifiers],
        **fields,
    }
    response = router.handle(FhirRequest("POST", "Patient", parsed_body=body, principal=system_principal()))
    assert response.status == 201, response.body
    patient_id: str = orjson.loads(response.body or b"{}")["id"]
    return patient_id


def _keys(patient: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((i["system"], i["value"]) for i in patient.get("identifier", []))


def _tags(resource: dict[str, Any]) -> set[str]:
    return {t["code"] for t in resource.get("meta", {}).get("tag", []) if t["system"] == REVIEW}


def _observation_subject(router: FhirRouter, answered: list[dict[str, Any]]) -> str:
    """The subject of the message's Observation, as stored (the last response entry)."""
    location = answered[-1]["response"]["location"]
    obs_id = location.split("/Observation/")[1].split("/")[0]
    (observation,) = _get(router, "Observation", _id=obs_id)
    subject: str = observation["subject"]["reference"]
    return subject


# --- resolution by level -----------------------------------------------------------------------


def test_unmatched_patient_is_created_once_and_flagged(router: FhirRouter, uid: str) -> None:
    cccd, mrn = _cccd("female", 1990), f"BN-{uid}"
    facts = _facts(
        (CCCD, cccd), (MRN, mrn), name=[{"family": "Nguyễn", "given": ["Thị", "Hoa"]}], gender="female"
    )
    with system_access("test-patients"), router.ctx.store.write() as conn:
        entries = resolve(conn, router, _mapped(facts), HIS)
    patient_entry = entries[0]
    assert patient_entry["fullUrl"] == facts.placeholder
    assert patient_entry["request"]["method"] == "POST"
    assert patient_entry["request"]["ifNoneExist"] == f"identifier={CCCD}|{cccd}"  # the strongest

    answered = _write(router, _mapped(facts))
    patient = _one(router, CCCD, cccd)
    assert _tags(patient) == {"unmatched"}
    assert _keys(patient) == sorted([(CCCD, cccd), (MRN, mrn)])
    assert _observation_subject(router, answered) == f"Patient/{patient['id']}"
    (flag,) = _flags(router, patient["id"])
    assert flag["status"] == "active"
    assert flag["category"][0]["coding"][0]["code"] == "admin"
    assert flag["code"]["coding"] == [{"system": REVIEW, "code": "unmatched"}]
    assert flag["identifier"] == [{"system": FLAG_KEY, "value": "unmatched"}]
    assert flag["subject"] == {"reference": f"Patient/{patient['id']}"}

    # The same message again (a re-sent feed): the same Patient, unchanged, no second flag.
    again = _mapped(_facts((CCCD, cccd), (MRN, mrn), name=facts.resource["name"], gender="female"))
    answered = _write(router, again)
    assert _one(router, CCCD, cccd)["meta"]["versionId"] == patient["meta"]["versionId"]
    assert _observation_subject(router, answered) == f"Patient/{patient['id']}"
    assert len(_flags(router, patient["id"])) == 1


def test_cccd_match_updates_the_record(router: FhirRouter, uid: str) -> None:
    cccd = _cccd("male", 1962)
    patient_id = _seed(
        router,
        (CCCD, cccd),
        name=[{"family": "Trần", "given": ["Văn", "Nam"]}],
        gender="male",
        birthDate="1962-03-04",
        telecom=[{"system": "phone", "value": "0905120001"}],
        managingOrganization={"display": "BVĐK tỉnh Gia Lai"},
    )
    mrn = f"BN-{uid}"
    facts = _facts(
        (CCCD, cccd),
        (MRN, mrn),
        name=[{"family": "Trần", "given": ["Văn", "Nam", "B"]}],
        birthDate="1962",
        managingOrganization={"display": "TTYT Chư Sê"},
    )
    answered = _write(router, _mapped(facts))
    patient = _one(router, CCCD, cccd)
    assert patient["id"] == patient_id
    assert _keys(patient) == sorted([(CCCD, cccd), (MRN, mrn)])
    assert patient["name"][0]["given"] == ["Văn", "Nam", "B"]  # what the message gives
    assert patient["birthDate"] == "1962-03-04"  # a year never replaces a full date
    assert patient["telecom"] == [{"system": "phone", "value": "0905120001"}]  # kept
    assert patient["gender"] == "male"
    assert patient["managingOrganization"] == {"display": "BVĐK tỉnh Gia Lai"}  # the first one stays
    assert _tags(patient) == set()
    assert _flags(router, patient_id) == []
    assert _observation_subject(router, answered) == f"Patient/{patient_id}"


def test_bhyt_renewal_matches_via_bhxh(router: FhirRouter, uid: str) -> None:
    bhxh = _bhxh()
    first = _facts((BHYT, f"DN464{bhxh}"), (MRN, f"BN-{uid}"), gender="female", birthDate="1988-07-01")
    _write(router, _mapped(first))
    patient = _one(router, BHXH, bhxh)  # the BHXH number is on the record besides the card
    # A renewed card (other group, level and province) at another facility: the same citizen.
    renewed = _facts((BHYT, f"HT379{bhxh}"), (MRN_LIS, f"LK-{uid}"), birthDate="1988-07-01")
    answered = _write(router, _mapped(renewed), LIS)
    assert answered[0]["response"]["status"] == "200"
    again = _one(router, BHXH, bhxh)
    assert again["id"] == patient["id"]
    assert _keys(again) == sorted(
        [
            (BHYT, f"DN464{bhxh}"),
            (BHYT, f"HT379{bhxh}"),
            (BHXH, bhxh),
            (MRN, f"BN-{uid}"),
            (MRN_LIS, f"LK-{uid}"),
        ]
    )
    assert len(_flags(router, patient["id"])) == 1  # the unmatched flag of its creation only


def test_bhyt_card_alone_on_a_stored_record_matches(router: FhirRouter, uid: str) -> None:
    """A record loaded some other way (FHIR import) may carry the card but no BHXH number."""
    bhxh = _bhxh()
    patient_id = _seed(router, (BHYT, f"GD479{bhxh}"))
    _write(router, _mapped(_facts((BHYT, f"GD479{bhxh}"), (MRN, f"BN-{uid}"))))
    patient = _one(router, BHXH, bhxh)
    assert patient["id"] == patient_id
    assert (MRN, f"BN-{uid}") in _keys(patient)


def test_mrn_match_when_nothing_stronger(router: FhirRouter, uid: str) -> None:
    mrn = f"BN-{uid}"
    patient_id = _seed(router, (MRN, mrn), name=[{"family": "Lê"}], birthDate="1950")
    cccd = _cccd("female", 1950)
    _write(router, _mapped(_facts((MRN, mrn), (CCCD, cccd), gender="female", birthDate="1950-02-03")))
    patient = _one(router, MRN, mrn)
    assert patient["id"] == patient_id
    assert (CCCD, cccd) in _keys(patient)
    assert patient["birthDate"] == "1950-02-03"  # a full date does replace a year
    assert patient["name"] == [{"family": "Lê"}]  # the message gave none


def test_identifier_values_with_search_syntax(router: FhirRouter, uid: str) -> None:
    """Commas, pipes, backslashes, ampersands in an MRN are values, not search syntax."""
    mrn = f"BN,{uid}|a\\b&c=d %2C"
    _write(router, _mapped(_facts((MRN, mrn))))
    (created,) = _patients(router, MRN, mrn.replace("\\", "\\\\").replace(",", "\\,"))
    answered = _write(router, _mapped(_facts((MRN, mrn))))
    assert _observation_subject(router, answered) == f"Patient/{created['id']}"
    assert [i["value"] for i in created["identifier"]] == [mrn]


def test_mrn_of_another_facility_is_another_identifier(router: FhirRouter, uid: str) -> None:
    """An MRN is unique only within its facility: the same number elsewhere is someone else."""
    number = f"BN-{uid}"
    patient_id = _seed(router, (MRN, number))
    _write(router, _mapped(_facts((MRN_LIS, number))), LIS)
    (created,) = _patients(router, MRN_LIS, number)
    assert created["id"] != patient_id
    assert _tags(created) == {"unmatched"}


# --- conflicts ---------------------------------------------------------------------------------


def test_conflict_is_flagged_not_merged(router: FhirRouter, uid: str) -> None:
    cccd, mrn = _cccd("male", 1980), f"BN-{uid}"
    by_cccd = _seed(router, (CCCD, cccd), name=[{"family": "Phạm"}])
    by_mrn = _seed(router, (MRN, mrn), name=[{"family": "Phạm"}])
    answered = _write(router, _mapped(_facts((CCCD, cccd), (MRN, mrn))))
    winner = _one(router, CCCD, cccd)
    assert winner["id"] == by_cccd  # CCCD outranks the MRN
    assert _observation_subject(router, answered) == f"Patient/{by_cccd}"
    assert (MRN, mrn) not in _keys(winner)  # the identifier of the other record is not moved
    assert _tags(winner) == {"possible-duplicate"}
    (other,) = _patients(router, MRN, mrn)
    assert other["id"] == by_mrn and other["meta"]["versionId"] == "1"  # untouched
    (flag,) = _flags(router, by_cccd)
    assert flag["code"]["text"] == "Possible duplicate patient records"
    assert flag["extension"] == [{"url": OTHER_RECORD, "valueReference": {"reference": f"Patient/{by_mrn}"}}]
    assert flag["subject"] == {"reference": f"Patient/{by_cccd}"}
    _write(router, _mapped(_facts((CCCD, cccd), (MRN, mrn))))  # again: no second flag
    assert len(_flags(router, by_cccd)) == 1


def test_one_identifier_matching_several_is_flagged(router: FhirRouter, uid: str) -> None:
    mrn = f"BN-{uid}"
    first, second = sorted([_seed(router, (MRN, mrn)), _seed(router, (MRN, mrn))])
    _write(router, _mapped(_facts((MRN, mrn), name=[{"family": "Võ"}])))
    by_id = {p["id"]: p for p in _patients(router, MRN, mrn)}
    assert set(by_id) == {first, second}
    assert by_id[first]["name"] == [{"family": "Võ"}]  # one of them is used, the same each time
    assert "name" not in by_id[second]
    (flag,) = _flags(router, first)
    assert flag["extension"][0]["valueReference"] == {"reference": f"Patient/{second}"}


def test_a_lower_level_breaks_a_tie(router: FhirRouter, uid: str) -> None:
    """The first identifier that matches exactly one Patient wins."""
    cccd, bhxh = _cccd(), _bhxh()
    twin = _seed(router, (CCCD, cccd))
    right = _seed(router, (CCCD, cccd), (BHXH, bhxh))
    _write(router, _mapped(_facts((CCCD, cccd), (BHYT, f"DN464{bhxh}"))))
    assert _one(router, BHXH, bhxh)["id"] == right
    (flag,) = _flags(router, right)
    assert flag["extension"][0]["valueReference"]["reference"] == f"Patient/{twin}"


def test_inconsistent_cccd_is_kept_flagged_and_not_matched(router: FhirRouter, uid: str) -> None:
    cccd = _cccd("male", 1975)  # digit 4 says male
    stored = _seed(router, (CCCD, cccd))
    mrn = f"BN-{uid}"
    # The message says female, born 1975: the CCCD cannot be hers, so it matches nobody.
    _write(router, _mapped(_facts((CCCD, cccd), (MRN, mrn), gender="female", birthDate="1975-05-05")))
    created = _one(router, MRN, mrn)
    assert created["id"] != stored
    assert (CCCD, cccd) in _keys(created)  # kept as the facility sent it
    assert _tags(created) == {"unmatched", "invalid-cccd"}
    codes = {f["code"]["coding"][0]["code"]: f for f in _flags(router, created["id"])}
    assert set(codes) == {"unmatched", "invalid-cccd"}
    assert "sex male" in codes["invalid-cccd"]["code"]["text"]

    bad_province = _cccd("female", 1990, province="003")
    mrn2 = f"BN2-{uid}"
    _write(router, _mapped(_facts((CCCD, bad_province), (MRN, mrn2), gender="female", birthDate="1990")))
    flagged = _one(router, MRN, mrn2)
    texts = [
        f["code"]["text"]
        for f in _flags(router, flagged["id"])
        if f["identifier"][0]["value"] == "invalid-cccd"
    ]
    assert len(texts) == 1 and "003" in texts[0]


def test_a_second_cccd_is_not_added(router: FhirRouter, uid: str) -> None:
    bhxh, cccd, other = _bhxh(), _cccd(), _cccd()
    patient_id = _seed(router, (CCCD, cccd), (BHXH, bhxh))
    _write(router, _mapped(_facts((CCCD, other), (BHYT, f"DN464{bhxh}"))))
    patient = _one(router, BHXH, bhxh)
    assert patient["id"] == patient_id
    assert (CCCD, other) not in _keys(patient)
    assert [f["code"]["coding"][0]["code"] for f in _flags(router, patient_id)] == ["cccd-differs"]


def _write_units(router: FhirRouter, units: list[Mapped]) -> list[dict[str, Any]]:
    """Several units of one message (the HOSO of a QĐ 130 file): each resolved, then one
    transaction for all, as the pipeline does."""
    with system_access("test-patients"), router.ctx.store.write() as conn:
        entries: list[dict[str, Any]] = []
        for unit in units:
            entries += resolve(conn, router, unit, HIS)
            entries += unit.entries
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        request = FhirRequest("POST", "", parsed_body=bundle, principal=system_principal())
        response = transaction_in(router, conn, request)
    assert response.status == 200, response.body
    answered: list[dict[str, Any]] = orjson.loads(response.body or b"{}")["entry"]
    return answered


def test_units_of_one_message_about_one_new_patient(router: FhirRouter, uid: str) -> None:
    cccd, bhxh = _cccd("male", 1970), _bhxh()
    first = _mapped(_facts((CCCD, cccd), (MRN, f"BN-{uid}"), birthDate="1970"))
    second = _mapped(_facts((BHYT, f"DN464{bhxh}"), (MRN, f"BN-{uid}"), birthDate="1970-01-02"))
    _write_units(router, [first, second])
    patient = _one(router, MRN, f"BN-{uid}")
    assert _keys(patient) == sorted([(CCCD, cccd), (MRN, f"BN-{uid}"), (BHYT, f"DN464{bhxh}"), (BHXH, bhxh)])
    assert patient["birthDate"] == "1970-01-02"
    subjects = {
        o["subject"]["reference"] for o in _get(router, "Observation", subject=f"Patient/{patient['id']}")
    }
    assert subjects == {f"Patient/{patient['id']}"}
    assert len(_get(router, "Observation", subject=f"Patient/{patient['id']}")) == 2
    assert [f["identifier"][0]["value"] for f in _flags(router, patient["id"])] == ["unmatched"]


def test_units_of_one_message_about_one_stored_patient(router: FhirRouter, uid: str) -> None:
    cccd = _cccd("female", 1999)
    patient_id = _seed(router, (CCCD, cccd))
    units = [
        _mapped(_facts((CCCD, cccd), (MRN, f"BN-{uid}"))),
        _mapped(_facts((CCCD, cccd), name=[{"family": "Đặng"}])),
    ]
    _write_units(router, units)  # one PUT Patient/<id>, not two (a transaction refuses two)
    patient = _one(router, CCCD, cccd)
    assert patient["id"] == patient_id and patient["meta"]["versionId"] == "2"
    assert (MRN, f"BN-{uid}") in _keys(patient) and patient["name"] == [{"family": "Đặng"}]
    assert len(_get(router, "Observation", subject=f"Patient/{patient_id}")) == 2


def test_a_patient_without_identifiers_is_rejected(router: FhirRouter) -> None:
    with (
        pytest.raises(Rejected, match="no identifier"),
        system_access("test-patients"),
        router.ctx.store.write() as conn,
    ):
        resolve(conn, router, _mapped(_facts(name=[{"family": "Đỗ"}])), HIS)


# --- merges ------------------------------------------------------------------------------------


def test_merge_links_the_records(router: FhirRouter, uid: str) -> None:
    old, new = f"OLD-{uid}", f"NEW-{uid}"
    retired_id = _seed(router, (MRN, old), name=[{"family": "Hồ"}])
    survivor_id = _seed(router, (MRN, new), name=[{"family": "Hồ"}])
    survivor = _facts((MRN, new), name=[{"family": "Hồ", "given": ["An"]}])
    merge = _mapped(survivor, merges=[(survivor.placeholder, [{"system": MRN, "value": old}])])
    _write(router, merge)
    retired = _one(router, MRN, old)
    assert retired["id"] == retired_id
    assert retired["active"] is False
    assert retired["link"] == [{"other": {"reference": f"Patient/{survivor_id}"}, "type": "replaced-by"}]
    kept = _one(router, MRN, new)
    assert kept["link"] == [{"other": {"reference": f"Patient/{retired_id}"}, "type": "replaces"}]
    assert kept["name"][0]["given"] == ["An"]

    # The merge again changes nothing; a message with the retired MRN reaches the survivor.
    versions = (retired["meta"]["versionId"], kept["meta"]["versionId"])
    _write(router, merge)
    assert (
        _one(router, MRN, old)["meta"]["versionId"],
        _one(router, MRN, new)["meta"]["versionId"],
    ) == versions
    answered = _write(router, _mapped(_facts((MRN, old))))
    assert _observation_subject(router, answered) == f"Patient/{survivor_id}"


def test_merge_into_a_new_patient(router: FhirRouter, uid: str) -> None:
    old, new = f"OLD-{uid}", f"NEW-{uid}"
    retired_id = _seed(router, (MRN, old))
    survivor = _facts((MRN, new))
    _write(router, _mapped(survivor, merges=[(survivor.placeholder, [{"system": MRN, "value": old}])]))
    created = _one(router, MRN, new)
    assert created["link"] == [{"other": {"reference": f"Patient/{retired_id}"}, "type": "replaces"}]
    retired = _one(router, MRN, old)
    assert retired["link"] == [{"other": {"reference": f"Patient/{created['id']}"}, "type": "replaced-by"}]


def test_merge_of_an_unknown_record_is_a_warning(router: FhirRouter, uid: str) -> None:
    survivor = _facts((MRN, f"NEW-{uid}"))
    mapped = _mapped(survivor, merges=[(survivor.placeholder, [{"system": MRN, "value": f"NONE-{uid}"}])])
    _write(router, mapped)
    assert mapped.warnings == ["merge: no stored Patient has the retired patient's identifiers"]
    assert _one(router, MRN, f"NEW-{uid}").get("link") is None


# --- concurrency -------------------------------------------------------------------------------


def test_concurrent_messages_of_one_new_patient_make_one(router: FhirRouter, uid: str) -> None:
    """Two workers resolve the same new citizen at once: both find nothing, both write a
    conditional create; the transaction's condition lock makes the second one find the first.
    SQLite has one writer: the second worker's write transaction (and its resolution)
    starts after the first commits, so there the two start together and no more."""
    threads = 2
    racing = backend() == "postgresql"
    cccd, mrn = _cccd("female", 2001), f"BN-{uid}"
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []
    subjects: list[str] = []

    def work() -> None:
        try:
            mapped = _mapped(_facts((CCCD, cccd), (MRN, mrn), gender="female"))
            if not racing:
                barrier.wait(timeout=30)
            with system_access("test-patients"), router.ctx.store.write() as conn:
                entries = resolve(conn, router, mapped, HIS)
                if racing:
                    assert entries[0]["request"]["method"] == "POST"  # neither saw the other's
                    barrier.wait(timeout=30)
                bundle = {
                    "resourceType": "Bundle",
                    "type": "transaction",
                    "entry": [*entries, *mapped.entries],
                }
                request = FhirRequest("POST", "", parsed_body=bundle, principal=system_principal())
                response = transaction_in(router, conn, request)
            assert response.status == 200, response.body
            subjects.append(_observation_subject(router, orjson.loads(response.body or b"{}")["entry"]))
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not errors, errors
    (patient,) = _patients(router, CCCD, cccd)
    assert subjects == [f"Patient/{patient['id']}"] * threads
    assert [f["identifier"][0]["value"] for f in _flags(router, patient["id"])] == ["unmatched"]


# --- valid FHIR --------------------------------------------------------------------------------


def test_what_resolution_stores_is_valid_fhir(
    router: FhirRouter,
    uid: str,
    validator: Any,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    cccd, mrn, bhxh = _cccd("female", 1990), f"BN-{uid}", _bhxh()
    other = _seed(router, (MRN, mrn))
    winner = _seed(router, (BHXH, bhxh))
    facts = _facts(
        (CCCD, cccd),
        (BHYT, f"DN464{bhxh}"),
        (MRN, mrn),
        name=[{"family": "Nguyễn", "given": ["Thị", "Hoa"]}],
        gender="male",  # the CCCD says female: an invalid-cccd flag
        birthDate="1990",
    )
    _write(router, _mapped(facts))
    patient = _one(router, BHXH, bhxh)
    assert patient["id"] == winner
    flags = _flags(router, winner)
    assert sorted(f["code"]["coding"][0]["code"] for f in flags) == ["invalid-cccd", "possible-duplicate"]
    assert (
        flags[0]["extension"][0]["valueReference"]["reference"] == f"Patient/{other}"
        or flags[1]["extension"][0]["valueReference"]["reference"] == f"Patient/{other}"
    )
    resources = [patient, *flags]
    path = tmp_path / "resolved.ndjson"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    code, output = validator(path)
    assert code == 0 and output.strip().splitlines()[-1].startswith("3 valid, 0 invalid"), output
