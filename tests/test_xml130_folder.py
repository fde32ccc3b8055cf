"""The QĐ 130 watched folder (connectors.xml130.folder) and the feed end to end, on a database
of this module's own: files into the inbox and out of the folder (done/, rejected/ with the
error), never read twice (also when the hub stopped between receipt and move), incomplete
files left alone (.part, still being written); then inbox -> Pipeline.process_ids -> the
record: the FHIR the episode became, read back through the router, written again without
duplicates, and a check-in completed by the closing file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
import xml130_factory as f

from connectors import inbox, sources
from connectors.identifiers import CCCD, facility_system
from connectors.model import Source
from connectors.pipeline import Pipeline
from connectors.xml130.folder import watch
from hub.app_factory import build_router
from hub.auth.principal import system_principal
from hub.db.schema import connector_message
from hub.rest import FhirRequest, FhirRouter
from hub.settings import Settings

MA_LK_SYSTEM = facility_system("ma-lk", f.FACILITY)


@pytest.fixture(scope="module")
def hub(fresh_database_url: Any) -> Iterator[FhirRouter]:
    router = build_router(Settings(database_url=fresh_database_url("xml130")))
    yield router
    router.ctx.store.engine.dispose()


def _source(router: FhirRouter, name: str, folder: Path) -> Source:
    folder.mkdir(parents=True, exist_ok=True)
    return sources.add(
        router,
        Source(
            name,
            f.FACILITY,
            "Bệnh viện Đa khoa tỉnh Gia Lai",
            "provincial",
            "xml130",
            {"folder": str(folder)},
        ),
        replace=True,
    )


def _drop(folder: Path, name: str, data: bytes, age: float = 10.0) -> Path:
    """A file written ``age`` seconds ago (complete, for the watcher)."""
    path = folder / name
    path.write_bytes(data)
    moment = time.time() - age
    os.utime(path, (moment, moment))
    return path


def _rows(router: FhirRouter, source: str) -> list[tuple[int, str, str | None]]:
    with router.ctx.store.engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.select(connector_message.c.id, connector_message.c.state, connector_message.c.control_id)
                .where(connector_message.c.source == source)
                .order_by(connector_message.c.id)
            ).all()
        ]


def _search(router: FhirRouter, res_type: str, **query: str) -> list[dict[str, Any]]:
    response = router.handle(
        FhirRequest("GET", res_type, query=list(query.items()), principal=system_principal("system:test"))
    )
    assert response.status == 200, response.body
    return [e["resource"] for e in orjson.loads(response.body or b"{}").get("entry", [])]


# --- the folder -------------------------------------------------------------------------------


def test_ready_files_go_to_the_inbox_once_and_leave_the_folder(hub: FhirRouter, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    source = _source(hub, "xml-folder", folder)
    engine = hub.ctx.store.engine
    _drop(folder, "a.xml", f.envelope([f.episode(11), f.episode(12)]), age=30)
    _drop(folder, "b.XML", f.envelope([f.episode(13)]), age=20)
    _drop(folder, "c.xml.part", f.envelope([f.episode(14)]))  # still being written
    _drop(folder, "d.xml", f.envelope([f.episode(15)]), age=0)  # just written: not settled
    _drop(folder, "notes.txt", b"not an episode")

    received = watch(engine, source)
    assert [(r.state, r.duplicate) for r in received] == [("queued", False), ("queued", False)]
    assert [r.peek.control_id for r in received if r.peek] == [
        "640010240700011;640010240700012",
        "640010240700013",
    ]
    assert sorted(p.name for p in (folder / "done").iterdir()) == ["a.xml", "b.XML"]
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["c.xml.part", "d.xml", "notes.txt"]
    assert [state for _, state, _ in _rows(hub, source.name)] == ["queued", "queued"]

    assert watch(engine, source) == []  # nothing read twice
    (folder / "c.xml.part").rename(folder / "c.xml")
    os.utime(folder / "d.xml", (time.time() - 10, time.time() - 10))
    os.utime(folder / "c.xml", (time.time() - 5, time.time() - 5))
    later = watch(engine, source)
    assert [r.peek.control_id for r in later if r.peek] == [
        "640010240700015",
        "640010240700014",
    ]  # oldest first
    assert len(_rows(hub, source.name)) == 4
    assert (folder / "notes.txt").exists()


def test_an_unreadable_file_goes_to_rejected_with_its_error(hub: FhirRouter, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    source = _source(hub, "xml-folder-bad", folder)
    _drop(folder, "broken.xml", b"<GIAMDINHHS><THONGTINHOSO>")
    (result,) = watch(hub.ctx.store.engine, source)
    assert result.state == "rejected" and "not well-formed XML" in (result.error or "")
    assert not (folder / "broken.xml").exists()
    assert (folder / "rejected" / "broken.xml").read_bytes() == b"<GIAMDINHHS><THONGTINHOSO>"
    error = (folder / "rejected" / "broken.xml.error.txt").read_text("utf-8")
    assert error.startswith(f"inbox message {result.id}: ") and "not well-formed XML" in error
    assert [state for _, state, _ in _rows(hub, source.name)] == ["rejected"]


def test_a_restart_between_receipt_and_move_stores_nothing_twice(hub: FhirRouter, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    source = _source(hub, "xml-folder-restart", folder)
    data = f.envelope([f.episode(21)])
    # The previous pass committed the file to the inbox, then the hub stopped before moving it.
    (first,) = inbox.receive(hub.ctx.store.engine, source, [data])
    _drop(folder, "e.xml", data)
    (again,) = watch(hub.ctx.store.engine, source)
    assert again.duplicate and again.id == first.id
    assert (folder / "done" / "e.xml").exists() and not (folder / "e.xml").exists()
    assert len(_rows(hub, source.name)) == 1
    # A new file under a name already in done/ keeps both.
    _drop(folder, "e.xml", f.envelope([f.episode(22)]))
    (other,) = watch(hub.ctx.store.engine, source)
    assert not other.duplicate
    assert {p.name for p in (folder / "done").iterdir()} == {"e.xml", f"e.{other.id}.xml"}


# --- end to end ---------------------------------------------------------------------------------


def test_an_episode_through_the_pipeline_into_the_record(hub: FhirRouter, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    source = _source(hub, "xml-e2e", folder)
    ep = f.episode(31)
    ep.update(XML7=f.discharge_paper(ep), XML13=f.referral(ep), XML14=f.revisit(ep))
    _drop(folder, "episode.xml", f.envelope([ep], quirks=["bad-xsi", "self-closing"], one_line=True))
    (received,) = watch(hub.ctx.store.engine, source)
    pipeline = Pipeline(hub)
    outcome = pipeline.process_ids([received.id])[received.id]
    assert outcome.state == "processed", outcome
    written = sorted({r.split("/")[0] for r in outcome.resources})
    assert {
        "Patient", "Coverage", "Encounter", "Condition", "Procedure", "Observation", "Appointment",
        "MedicationRequest", "MedicationDispense", "DiagnosticReport", "Composition", "ChargeItem",
        "ClinicalImpression", "ServiceRequest", "Provenance",
    } <= set(written)  # fmt: skip

    (patient,) = _search(hub, "Patient", identifier=f"{CCCD}|{ep['XML1']['SO_CCCD']}")
    assert patient["birthDate"] == "1985-03-15" and patient["gender"] == "female"
    (encounter,) = _search(hub, "Encounter", identifier=f"{MA_LK_SYSTEM}|{ep['XML1']['MA_LK']}")
    assert encounter["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert encounter["status"] == "finished" and encounter["serviceProvider"]["reference"].startswith(
        "Organization/"
    )
    observations = _search(hub, "Observation", subject=f"Patient/{patient['id']}", _count="100")
    assert len(observations) == 6 + 1 + 2  # 6 indicators, the ECG, weight, blood group
    notes = _search(
        hub,
        "ClinicalImpression",
        patient=f"Patient/{patient['id']}",
        encounter=f"Encounter/{encounter['id']}",
    )
    assert len(notes) == 2 and all(n["summary"] for n in notes)
    (charge,) = _search(hub, "ChargeItem", context=f"Encounter/{encounter['id']}")
    assert charge["subject"] == {"reference": f"Patient/{patient['id']}"}
    (used_in,) = _search(hub, "Procedure", _id=charge["service"][0]["reference"].split("/")[1])
    assert charge["productCodeableConcept"]["coding"][0]["code"] in {
        c["coding"][0]["code"] for c in used_in["usedCode"]
    }
    (discharge,) = _search(
        hub, "Composition", patient=f"Patient/{patient['id']}", type="http://loinc.org|18842-5"
    )
    assert discharge["encounter"] == {"reference": f"Encounter/{encounter['id']}"}
    (panel,) = _search(
        hub, "DiagnosticReport", identifier=f"{MA_LK_SYSTEM}|{ep['XML1']['MA_LK']}/XML4/{f.LAB_SERVICE}"
    )
    by_ref = {f"Observation/{o['id']}": o for o in observations}
    assert [by_ref[r["reference"]]["code"]["coding"][0]["code"] for r in panel["result"]] == [
        "GLU", "URE", "CRE", "CHOL", "TG", "AST",
    ]  # fmt: skip
    assert all(o["encounter"]["reference"] == f"Encounter/{encounter['id']}" for o in observations)
    diagnoses = [d["condition"]["reference"] for d in encounter["diagnosis"]]
    conditions = {
        f"Condition/{c['id']}": c for c in _search(hub, "Condition", subject=f"Patient/{patient['id']}")
    }
    assert [conditions[d]["code"]["coding"][0]["code"] for d in diagnoses] == ["I10", "E11.9", "E78.5"]
    (coverage,) = _search(hub, "Coverage", beneficiary=f"Patient/{patient['id']}")
    assert coverage["identifier"][0]["value"] == ep["XML1"]["MA_THE_BHYT"]

    # The same episode again (a corrected re-export, replayed): the same resources, no more.
    assert inbox.replay(hub.ctx.store.engine, ids=[received.id]) == 1
    again = pipeline.process_ids([received.id])[received.id]
    assert again.state == "processed"
    # (the review Flag of a new patient is written once, with the patient)
    assert sorted(r for r in again.resources if not r.startswith("Provenance/")) == sorted(
        r for r in outcome.resources if not r.startswith(("Provenance/", "Flag/"))
    )
    assert len(_search(hub, "Observation", subject=f"Patient/{patient['id']}", _count="100")) == 9
    assert len(_search(hub, "MedicationDispense", patient=f"Patient/{patient['id']}")) == 5
    # The new patient's review Flag is found by patient and by what it is about (one).
    (flag,) = _search(hub, "Flag", patient=f"Patient/{patient['id']}")
    assert flag["code"]["coding"][0]["code"] == "unmatched"
    key = flag["identifier"][0]
    assert [f["id"] for f in _search(hub, "Flag", identifier=f"{key['system']}|unmatched")] == [flag["id"]]
    assert len(_search(hub, "Encounter", subject=f"Patient/{patient['id']}")) == 1


def test_a_check_in_is_completed_by_the_closing_file(hub: FhirRouter, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    source = _source(hub, "xml-checkin", folder)
    closing = f.episode(41)
    check_in = {"XML0": f.check_in(closing)}
    ma_lk = closing["XML1"]["MA_LK"]
    _drop(folder, "0.xml", f.envelope([check_in]), age=30)
    (first,) = watch(hub.ctx.store.engine, source)
    pipeline = Pipeline(hub)
    assert pipeline.process_ids([first.id])[first.id].state == "processed"
    (opened,) = _search(hub, "Encounter", identifier=f"{MA_LK_SYSTEM}|{ma_lk}")
    assert opened["status"] == "in-progress" and "end" not in opened["period"]
    _drop(folder, "1.xml", f.envelope([closing]))
    (second,) = watch(hub.ctx.store.engine, source)
    assert pipeline.process_ids([second.id])[second.id].state == "processed"
    (closed,) = _search(hub, "Encounter", identifier=f"{MA_LK_SYSTEM}|{ma_lk}")
    assert closed["id"] == opened["id"] and closed["status"] == "finished"
    assert closed["period"]["end"] == "2025-07-01T10:15:00+07:00"
    # A late check-in never reopens it.
    assert inbox.replay(hub.ctx.store.engine, ids=[first.id]) == 1
    assert pipeline.process_ids([first.id])[first.id].state == "processed"
    (still,) = _search(hub, "Encounter", identifier=f"{MA_LK_SYSTEM}|{ma_lk}")
    assert still["status"] == "finished"


def test_a_file_the_mapping_refuses_is_rejected_with_the_field(hub: FhirRouter, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    source = _source(hub, "xml-refused", folder)
    _drop(folder, "bad.xml", f.envelope([f.episode(51, NGAY_SINH="19851399")]))
    (received,) = watch(hub.ctx.store.engine, source)
    assert received.state == "queued"  # the envelope itself is fine: peek passed
    outcome = Pipeline(hub).process_ids([received.id])[received.id]
    assert outcome.state == "rejected" and outcome.where == "HOSO[1]/XML1/NGAY_SINH", outcome
    assert "not a birth date" in (outcome.error or "")


def test_two_episodes_of_one_patient_in_one_file(hub: FhirRouter, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    source = _source(hub, "xml-same-patient", folder)
    first, second = f.episode(71), f.episode(72)
    for field in ("MA_BN", "SO_CCCD", "MA_THE_BHYT"):
        second["XML1"][field] = first["XML1"][field]
    _drop(folder, "two.xml", f.envelope([first, second]))
    (received,) = watch(hub.ctx.store.engine, source)
    outcome = Pipeline(hub).process_ids([received.id])[received.id]
    assert outcome.state == "processed", outcome
    (patient,) = _search(hub, "Patient", identifier=f"{CCCD}|{first['XML1']['SO_CCCD']}")
    assert len(_search(hub, "Encounter", subject=f"Patient/{patient['id']}")) == 2
    (coverage,) = _search(
        hub, "Coverage", identifier=f"https://ehealth-hub.vn/sid/bhyt|{first['XML1']['MA_THE_BHYT']}"
    )
    assert coverage["beneficiary"] == {"reference": f"Patient/{patient['id']}"}
