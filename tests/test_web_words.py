"""Unit tests of the portal's plain-word modules: hub.web.consent_words and hub.web.access_log.

AuditEvents are built by the hub's own builder (hub.audit.events.build_audit_event), so the
access log is tested against the shape the trail really stores.
"""

from __future__ import annotations

from datetime import UTC, datetime

from consent.derive import _consent_grants
from hub.audit.events import AccessEvent, build_audit_event
from hub.auth.principal import Principal, Role
from hub.auth.scopes import ScopeSet
from hub.web import access_log
from hub.web.consent_words import (
    consent_actors,
    consent_state,
    describe_consent,
    grant_consent,
    grants_sensitive,
    has_deny,
    policy_reasons,
)

GIALAI = "Organization/vn-demo-org-bvdk-gialai"
NAMES = {GIALAI: "Bệnh viện Đa khoa tỉnh Gia Lai", "Practitioner/dr-1": "Phạm Minh Tuấn"}


def same(message: str) -> str:
    return message


def vi_date(value: str) -> str:
    year, month, day = value[:10].split("-")
    return f"{day}/{month}/{year}"


def test_grant_reads_as_the_issue_example() -> None:
    consent = grant_consent("p1", GIALAI, "TREAT", ["N"], "2027-12-31")
    assert describe_consent(consent, NAMES, same, vi_date) == [
        "Bệnh viện Đa khoa tỉnh Gia Lai may see ordinary data for treatment until 31/12/2027"
    ]


def test_grant_means_what_the_hub_enforces() -> None:
    """The Consent the form writes derives exactly the grant its sentence describes."""
    consent = {**grant_consent("p1", GIALAI, "TREAT", ["N", "PSY"], "2027-12-31"), "id": "c1"}
    rows = list(_consent_grants(consent))
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("p1", GIALAI, "TREAT", "permit")]
    assert describe_consent(consent, NAMES, same, vi_date) == [
        "Bệnh viện Đa khoa tỉnh Gia Lai may see ordinary data and mental-health data for treatment"
        " until 31/12/2027"
    ]
    assert grants_sensitive(consent)
    assert not grants_sensitive(grant_consent("p1", GIALAI, "TREAT", ["N"]))


def test_deny_without_actor_is_no_one_and_nested_provisions_inherit() -> None:
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "patient": {"reference": "Patient/p1"},
        "provision": {
            "type": "deny",
            "securityLabel": [{"code": "HIV"}],
            "provision": [
                {
                    "type": "permit",
                    "actor": [{"reference": {"reference": "Practitioner/dr-1"}}],
                    "purpose": [{"code": "TREAT"}, {"code": "ETREAT"}],
                    "securityLabel": [{"code": "HIV"}],
                    "period": {"start": "2026-01-01", "end": "2026-06-30"},
                },
                {"actor": [{"reference": {"reference": "Organization/unknown-org"}}]},
            ],
        },
    }
    assert describe_consent(consent, NAMES, same, vi_date) == [
        "No one may see HIV data",
        "Phạm Minh Tuấn may see HIV data for treatment or for emergency treatment"
        " from 01/01/2026 until 30/06/2026",
        # inherits deny; no labels on a deny means everything; the unnamed actor says what it is
        "facility unknown-org may not see any of the data",
    ]
    assert consent_actors(consent) == ["Practitioner/dr-1", "Organization/unknown-org"]
    assert has_deny(consent) and not has_deny(grant_consent("p1", GIALAI, "TREAT", ["N"]))


def test_withdrawn_and_pending_consents_say_so_first() -> None:
    withdrawn = {**grant_consent("p1", GIALAI, "HRESCH", ["GDIS", "V"]), "status": "inactive"}
    words = describe_consent(withdrawn, NAMES, same, vi_date)
    assert consent_state(withdrawn) == "withdrawn"
    assert words[0].startswith("Withdrawn")
    assert (
        words[1]
        == "Bệnh viện Đa khoa tỉnh Gia Lai may see genetic data and very restricted data for research"
    )
    assert consent_state({"status": "rejected"}) == "withdrawn"
    assert consent_state({"status": "proposed"}) == "pending"
    assert consent_state({"status": "entered-in-error"}) == "error"


def test_scope_purpose_and_any_purpose() -> None:
    consent = {
        "status": "active",
        "scope": {"coding": [{"code": "research"}]},
        "provision": {"type": "permit", "securityLabel": [{"code": "N"}, {"code": "SEX"}, {"code": "ETH"}]},
    }
    assert describe_consent(consent, {}, same, vi_date) == [
        "Anyone may see ordinary data, sexual and reproductive health data and alcohol and drug use data"
        " for research"
    ]
    no_purpose = {
        "status": "active",
        "provision": {"type": "permit", "actor": [{"reference": {"reference": GIALAI}}]},
    }
    assert describe_consent(no_purpose, NAMES, same, vi_date) == [
        "Bệnh viện Đa khoa tỉnh Gia Lai may see ordinary data for any purpose"
    ]


def test_gettext_translates_every_piece() -> None:
    catalogue = {
        "{who} may see {what}": "{who} được xem {what}",
        "ordinary data": "dữ liệu thông thường",
        "for treatment": "để điều trị",
        "until {end}": "đến hết {end}",
    }
    consent = grant_consent("p1", GIALAI, "TREAT", ["N"], "2027-12-31")
    assert describe_consent(consent, NAMES, lambda m: catalogue.get(m, m), vi_date) == [
        "Bệnh viện Đa khoa tỉnh Gia Lai được xem dữ liệu thông thường để điều trị đến hết 31/12/2027"
    ]


def test_grant_refuses_unknown_codes() -> None:
    for bad in (("TREAT", ["XYZ"]), ("SELL", ["N"])):
        try:
            grant_consent("p1", GIALAI, bad[0], bad[1])
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_policy_reasons() -> None:
    patient = {
        "managingOrganization": {"reference": GIALAI},
        "generalPractitioner": [{"reference": "Practitioner/dr-1"}],
    }
    teams = [
        {"id": "t1", "name": "Nhóm chăm sóc tiểu đường", "status": "active"},
        {"id": "t2", "status": "inactive"},
    ]
    assert policy_reasons(patient, teams, NAMES, same) == [
        "Bệnh viện Đa khoa tỉnh Gia Lai manages this record: its health workers may see ordinary data for treatment",
        "The family doctor Phạm Minh Tuấn may see ordinary data for treatment",
        "The care team Nhóm chăm sóc tiểu đường may see ordinary data for treatment",
    ]


def _event(**kwargs: object) -> dict[str, object]:
    principal = Principal(
        subject="bs.lan",
        role=Role.CLINICIAN,
        scopes=ScopeSet.parse("user/*.cruds"),
        fhir_user="Practitioner/dr-1",
        token_id="jti-1",
    )
    fields: dict[str, object] = {
        "principal": principal,
        "interaction": "search-type",
        "action": "E",
        "resource_type": "Observation",
        "query": "patient=p1&category=laboratory",
        "patients": ["p1"],
        "entities": ["Observation/o1", "Observation/o2"],
        "recorded": datetime(2026, 3, 10, 8, 30, tzinfo=UTC),
    }
    fields.update(kwargs)
    audit = build_audit_event(AccessEvent(**fields), "http://hub.test/fhir", "hub")  # type: ignore[arg-type]
    audit["id"] = "ae1"
    return audit


def test_search_by_a_clinician_reads_plainly() -> None:
    entry = access_log.describe_event(
        _event(), "Patient/p1", NAMES, {"Practitioner/dr-1": "Trạm Y tế xã Ia Krái"}, same, lambda v: v[:16]
    )
    assert entry.who == "Phạm Minh Tuấn"
    assert entry.role == "health worker"
    assert entry.facility == "Trạm Y tế xã Ia Krái"
    assert entry.what == "searched test results and measurements"
    assert entry.why == "treatment"
    assert entry.when == "2026-03-10T08:30"
    assert entry.ok and not entry.break_glass and entry.reason == ""


def test_break_glass_is_flagged_with_its_reason() -> None:
    event = _event(
        interaction="read",
        action="R",
        resource_type="Patient",
        resource_id="p1",
        query=None,
        entities=["Patient/p1"],
        break_glass_reason="Bất tỉnh khi nhập viện",
        break_glass_id=7,
    )
    entry = access_log.describe_event(event, "Patient/p1", NAMES, {}, same, str)
    assert entry.break_glass
    assert entry.reason == "Bất tỉnh khi nhập viện"
    assert entry.what == "opened personal details"
    assert entry.why == "treatment, emergency treatment"


def test_own_reads_refusals_and_operations() -> None:
    me = Principal(
        subject="hoa", role=Role.PATIENT, scopes=ScopeSet.parse("patient/*.rs"), fhir_user="Patient/p1"
    )
    everything = _event(
        principal=me, interaction="operation", action="E", resource_type="Patient", resource_id="p1",
        operation="$everything", query=None, entities=[],
    )  # fmt: skip
    refused = _event(outcome_status=403, recorded=datetime(2026, 3, 11, tzinfo=UTC))
    entries = access_log.describe_events([everything, refused], "Patient/p1", NAMES, {}, same, str)
    assert [e.what for e in entries] == ["searched test results and measurements", "opened the whole record"]
    assert entries[0].outcome == "Refused or failed" and not entries[0].ok
    assert entries[1].who == "You" and entries[1].role == "patient"
    assert access_log.people_to_name([everything, refused], [{"clinician": "Practitioner/dr-9"}]) == [
        "Patient/p1",
        "Practitioner/dr-1",
        "Practitioner/dr-9",
    ]


def test_alerts() -> None:
    alert = {
        "id": 3,
        "clinician": "Practitioner/dr-1",
        "user": "bs.lan",
        "reason": "Cấp cứu",
        "started": "2026-03-10T08:30:00+00:00",
        "expires": "2026-03-10T09:30:00+00:00",
        "status": "reviewed",
        "reviews": [{"verdict": "justified"}],
    }
    entry = access_log.describe_alert(
        alert, NAMES, {"Practitioner/dr-1": "Trạm Y tế"}, same, lambda v: v[11:16]
    )
    assert (entry.who, entry.facility, entry.when, entry.until, entry.reason) == (
        "Phạm Minh Tuấn", "Trạm Y tế", "08:30", "09:30", "Cấp cứu",
    )  # fmt: skip
    assert entry.status == "Reviewed: justified"
    assert (
        access_log.describe_alert({**alert, "status": "open", "reviews": []}, {}, {}, same, str).who
        == "bs.lan"
    )
