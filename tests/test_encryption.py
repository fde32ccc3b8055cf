"""Encryption at rest: envelopes in the database, plaintext over the API, keyed-hash search,
tamper and swap detection, key rotation, bulk import and $export.

The shared server (``http``) checks the REST behaviour on the session database with the
default master key. Rotation, import and mixed on/off states run on fresh databases with
a master key of their own in ``tmp_path``, so nothing here changes a key another test uses.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import sqlalchemy as sa
from conftest import REPO

from consent.context import system_access
from hub.app_factory import build_router
from hub.auth.principal import system_principal
from hub.crypto import blind, is_sealed, keys, open_content
from hub.db.schema import data_key, idx_string, idx_token, resource, resource_history
from hub.ingest.pipeline import Importer
from hub.rest import FhirRequest, FhirRouter
from hub.settings import Settings

CCCD = "https://ehealth-hub.vn/sid/cccd"
BHYT = "https://ehealth-hub.vn/sid/bhyt"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


def _digits(uid: str, n: int) -> str:
    return "".join(str(int(c, 16) % 10) for c in (uid * 3))[:n]


def _patient(uid: str) -> tuple[dict[str, Any], dict[str, str]]:
    secrets = {
        "cccd": "0010" + _digits(uid, 8),
        "bhyt": "DN479" + _digits(uid[::-1], 10),
        "phone": "09" + _digits(uid[3:] + uid, 8),
    }
    body = {
        "resourceType": "Patient",
        "identifier": [
            {"use": "official", "system": CCCD, "value": secrets["cccd"]},
            {"system": BHYT, "value": secrets["bhyt"]},
        ],
        "name": [{"family": "Nguyễn", "given": ["Thị", f"Hoa{uid}"]}],
        "telecom": [{"system": "phone", "value": secrets["phone"], "use": "mobile"}],
        "gender": "female",
        "birthDate": "1985-03-14",
    }
    return body, secrets


def _raw(engine: sa.Engine, res_type: str, res_id: str) -> tuple[int, bytes]:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(resource.c.pid, resource.c.content).where(
                resource.c.res_type == res_type, resource.c.res_id == res_id
            )
        ).one()
    content = row.content if isinstance(row.content, bytes) else row.content.encode()
    return row.pid, content


def _index_text(engine: sa.Engine, pid: int) -> str:
    with engine.connect() as conn:
        tokens = conn.execute(
            sa.select(idx_token.c.system, idx_token.c.value, idx_token.c.display).where(
                idx_token.c.pid == pid
            )
        ).all()
        strings = conn.execute(
            sa.select(idx_string.c.value_norm, idx_string.c.value_exact).where(idx_string.c.pid == pid)
        ).all()
    return repr(tokens) + repr(strings)


def _set_content(engine: sa.Engine, pid: int, content: bytes) -> None:
    with engine.begin() as conn:
        conn.execute(resource.update().where(resource.c.pid == pid).values(content=content.decode()))


def _ids(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {e["resource"]["id"] for e in response.json().get("entry", []) if e["search"]["mode"] == "match"}


# --- the shared server ------------------------------------------------------------------


def test_identifiers_and_phone_never_reach_the_database_in_the_clear(
    http: httpx.Client, engine: sa.Engine, uid: str
) -> None:
    body, secrets = _patient(uid)
    created = http.post("/Patient", json=body)
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]

    pid, stored = _raw(engine, "Patient", patient_id)
    assert is_sealed(stored)
    envelope = orjson.loads(stored)
    assert set(envelope) == {"resourceType", "id", "meta", "_enc"}
    assert envelope["_enc"]["alg"] == "A256GCM" and envelope["_enc"]["kid"].startswith("dek-")
    index = _index_text(engine, pid)
    for value in (*secrets.values(), f"Hoa{uid}".lower()):
        assert value not in stored.decode()
    for value in secrets.values():
        assert value not in index
    assert "hmac:" in index
    assert f"hoa{uid}" in index  # names are not hidden: only the listed identifiers are

    # Reads give back exactly the bytes the create returned (what a plain store keeps).
    read = http.get(f"/Patient/{patient_id}")
    assert read.status_code == 200
    assert read.content == created.content
    assert read.json()["identifier"] == body["identifier"]
    assert read.json()["telecom"] == body["telecom"]


def test_search_on_hashed_identifiers_and_phone(http: httpx.Client, uid: str) -> None:
    body, secrets = _patient(uid)
    patient_id = http.post("/Patient", json=body).json()["id"]
    cccd, bhyt, phone = secrets["cccd"], secrets["bhyt"], secrets["phone"]
    spaced = f"{phone[:4]} {phone[4:7]} {phone[7:]}"
    for params in (
        {"identifier": f"{CCCD}|{cccd}"},
        {"identifier": cccd},
        {"identifier": f"{BHYT}|{bhyt}"},
        {"identifier": bhyt},
        {"phone": phone},
        {"phone": spaced},
        {"telecom": phone},
        {"telecom": f"|{phone}"},
        {"identifier": f"{CCCD}|{cccd},{CCCD}|000000000000"},
    ):
        assert patient_id in _ids(http.get("/Patient", params=params)), params
    for params in (
        {"identifier": f"{BHYT}|{cccd}"},  # right value, wrong system
        {"identifier": f"http://example.org/mrn|{cccd}"},
        {"phone": phone[:-1]},
    ):
        assert patient_id not in _ids(http.get("/Patient", params=params)), params
    negated = _ids(http.get("/Patient", params={"identifier:not": f"{CCCD}|{cccd}", "given": f"Hoa{uid}"}))
    assert patient_id not in negated
    assert patient_id in _ids(
        http.get("/Patient", params={"identifier:missing": "false", "given": f"Hoa{uid}"})
    )


def test_history_and_vread_decrypt(http: httpx.Client, uid: str) -> None:
    body, secrets = _patient(uid)
    first = http.post("/Patient", json=body)
    patient_id = first.json()["id"]
    changed = {**first.json(), "birthDate": "1985-03-15"}
    second = http.put(f"/Patient/{patient_id}", json=changed)
    assert second.status_code == 200, second.text
    assert http.get(f"/Patient/{patient_id}/_history/1").content == first.content
    assert http.get(f"/Patient/{patient_id}/_history/2").content == second.content
    history = http.get(f"/Patient/{patient_id}/_history")
    assert history.status_code == 200
    versions = {e["resource"]["meta"]["versionId"]: e["resource"] for e in history.json()["entry"]}
    assert versions["1"]["birthDate"] == "1985-03-14" and versions["2"]["birthDate"] == "1985-03-15"
    assert versions["1"]["identifier"][0]["value"] == secrets["cccd"]


def test_sensitive_resource_is_sealed(http: httpx.Client, engine: sa.Engine, uid: str) -> None:
    patient_id = http.post("/Patient", json={"resourceType": "Patient", "name": [{"family": uid}]}).json()[
        "id"
    ]
    pid, stored = _raw(engine, "Patient", patient_id)
    assert not is_sealed(stored)  # nothing sensitive: stored as plain JSON
    observation = {
        "resourceType": "Observation",
        "meta": {"security": [{"system": ACT_CODE, "code": "HIV"}]},
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "75622-1"}], "text": f"HIV {uid}"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "valueString": f"result-{uid}",
    }
    created = http.post("/Observation", json=observation)
    assert created.status_code == 201, created.text
    _, stored = _raw(engine, "Observation", created.json()["id"])
    assert is_sealed(stored) and f"result-{uid}".encode() not in stored
    assert http.get(f"/Observation/{created.json()['id']}").content == created.content
    found = http.get(
        "/Observation", params={"subject": f"Patient/{patient_id}", "_include": "Observation:subject"}
    )
    assert created.json()["id"] in _ids(found)
    entries = found.json()["entry"]
    assert {
        e["resource"]["valueString"] for e in entries if e["resource"]["resourceType"] == "Observation"
    } == {f"result-{uid}"}
    assert any(e["resource"]["id"] == patient_id for e in entries)
    everything = http.get(f"/Patient/{patient_id}/$everything")
    assert everything.status_code == 200, everything.text
    assert f"result-{uid}" in everything.text


def test_tampered_ciphertext_is_a_500_not_garbage(http: httpx.Client, engine: sa.Engine, uid: str) -> None:
    body, _ = _patient(uid)
    patient_id = http.post("/Patient", json=body).json()["id"]
    pid, stored = _raw(engine, "Patient", patient_id)
    envelope = orjson.loads(stored)
    ct = bytearray(base64.b64decode(envelope["_enc"]["ct"]))
    ct[len(ct) // 2] ^= 0x01
    envelope["_enc"]["ct"] = base64.b64encode(bytes(ct)).decode()
    _set_content(engine, pid, orjson.dumps(envelope))
    try:
        for path, params in ((f"/Patient/{patient_id}", None), ("/Patient", {"_id": patient_id})):
            response = http.get(path, params=params)
            assert response.status_code == 500, response.text
            outcome = response.json()
            assert outcome["resourceType"] == "OperationOutcome"
            assert "cannot be decrypted" in outcome["issue"][0]["diagnostics"]
    finally:
        _set_content(engine, pid, stored)
    assert http.get(f"/Patient/{patient_id}").status_code == 200


def test_swapped_rows_are_detected(http: httpx.Client, engine: sa.Engine, uid: str) -> None:
    a = http.post("/Patient", json=_patient(uid)[0]).json()["id"]
    b = http.post("/Patient", json=_patient(uid[::-1])[0]).json()["id"]
    pid_a, stored_a = _raw(engine, "Patient", a)
    _, stored_b = _raw(engine, "Patient", b)
    _set_content(engine, pid_a, stored_b)  # B's envelope under A's row
    try:
        response = http.get(f"/Patient/{a}")
        assert response.status_code == 500
        assert "integrity" in response.json()["issue"][0]["diagnostics"]
    finally:
        _set_content(engine, pid_a, stored_a)
    assert http.get(f"/Patient/{a}").json()["id"] == a


def test_export_writes_plaintext(http: httpx.Client, uid: str) -> None:
    body, secrets = _patient(uid)
    created = http.post("/Patient", json=body)
    patient_id = created.json()["id"]
    kick_off = http.get(
        "/$export",
        params={"_type": "Patient", "_typeFilter": f"Patient?identifier={CCCD}|{secrets['cccd']}"},
        headers={"Prefer": "respond-async"},
    )
    assert kick_off.status_code == 202, kick_off.text
    status_url = kick_off.headers["Content-Location"]
    deadline = time.monotonic() + 30
    while (status := http.get(status_url)).status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status.status_code == 200, status.text
    (output,) = status.json()["output"]
    ndjson = http.get(output["url"])
    assert ndjson.status_code == 200
    lines = ndjson.content.splitlines()
    assert lines == [created.content]  # the _typeFilter matched through the keyed hash
    assert orjson.loads(lines[0])["id"] == patient_id
    http.delete(status_url)


# --- fresh databases, keys of their own -------------------------------------------------


def _settings(url: str, key_dir: Path, **overrides: Any) -> Settings:
    return Settings(database_url=url, master_key_file=key_dir / "master.key", **overrides)


def _handle(router: FhirRouter, method: str, path: str, body: Any = None, query: Any = ()) -> Any:
    response = router.handle(
        FhirRequest(
            method,
            path,
            list(query),
            body=orjson.dumps(body) if body is not None else None,
            principal=system_principal(),
        )
    )
    return response


def _data_keys(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {r.kid: r for r in conn.execute(sa.select(data_key)).all()}


def _kids_in_use(engine: sa.Engine) -> set[str]:
    kids = set()
    with engine.connect() as conn:
        for table in (resource, resource_history):
            for (content,) in conn.execute(sa.select(table.c.content).where(table.c.content.is_not(None))):
                content = content if isinstance(content, bytes) else content.encode()
                if is_sealed(content):
                    kids.add(orjson.loads(content)["_enc"]["kid"])
    return kids


def test_rotate_rewraps_keys_and_reads_still_work(fresh_database_url: Any, tmp_path: Path) -> None:
    url = fresh_database_url("keys_rotate")
    settings = _settings(url, tmp_path)
    router = build_router(settings)
    engine = router.ctx.store.engine
    body, secrets = _patient("a1b2c3d4e5f6")
    created = _handle(router, "POST", "Patient", body)
    assert created.status == 201
    patient_id = orjson.loads(created.body)["id"]
    before = _data_keys(engine)
    old_master = keys.master_kid((tmp_path / "master.key").read_bytes())
    assert {r.master_kid for r in before.values()} == {old_master}
    assert {k.split("-")[0] for k in before} == {"dek", "hmac"}

    env = {
        **os.environ,
        "DATABASE_URL": url,
        "MASTER_KEY_FILE": str(tmp_path / "master.key"),
        "COLUMNS": "250",
    }
    env.pop("HUB_MASTER_KEY", None)
    hub = str(Path(sys.executable).parent / "hub")
    done = subprocess.run(
        [hub, "keys", "rotate"], env=env, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    after = _data_keys(engine)
    new_master = keys.master_kid((tmp_path / "master.key").read_bytes())
    assert new_master != old_master
    assert sorted(tmp_path.iterdir()) == [tmp_path / "master.key"]  # no .old/.new left behind
    assert set(before) < set(after) and len(after) == len(before) + 1
    assert {r.master_kid for r in after.values()} == {new_master}
    active = [k for k, r in after.items() if r.active and k.startswith("dek-")]
    assert len(active) == 1 and active[0] not in before
    hmac_kid = next(k for k in before if k.startswith("hmac-"))
    assert hmac_kid in after  # re-wrapped, not replaced: the index stays valid

    # This process still holds the old unwrapped keys; a fresh load must use the new master.
    keys.forget(engine)
    read = _handle(router, "GET", f"Patient/{patient_id}")
    assert read.status == 200 and read.body == created.body
    found = _handle(router, "GET", "Patient", query=[("identifier", f"{CCCD}|{secrets['cccd']}")])
    assert patient_id in {e["resource"]["id"] for e in orjson.loads(found.body)["entry"]}
    second = _handle(router, "POST", "Patient", _patient("f6e5d4c3b2a1")[0])
    assert second.status == 201
    _, stored = _raw(engine, "Patient", orjson.loads(second.body)["id"])
    assert orjson.loads(stored)["_enc"]["kid"] == active[0]
    status = subprocess.run([hub, "keys", "status"], env=env, capture_output=True, text=True, cwd=REPO)
    assert status.returncode == 0, status.stdout + status.stderr
    assert new_master in status.stdout and active[0] in status.stdout

    # --reencrypt: another rotation, then every sealed row is under the newest DEK.
    done = subprocess.run(
        [hub, "keys", "rotate", "--reencrypt"], env=env, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    newest = next(k for k, r in _data_keys(engine).items() if r.active and k.startswith("dek-"))
    assert _kids_in_use(engine) == {newest}
    keys.forget(engine)
    assert _handle(router, "GET", f"Patient/{patient_id}").body == created.body
    engine.dispose()


def test_bulk_import_seals_and_indexes_hashes(fresh_database_url: Any, tmp_path: Path) -> None:
    url = fresh_database_url("keys_import")
    router = build_router(_settings(url, tmp_path / "keys"))
    engine = router.ctx.store.engine
    patients = [_patient(uid) for uid in ("0a1b2c3d4e5f", "5f4e3d2c1b0a")]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:7d0c8c1e-0000-4000-8000-00000000000{i}",
                "resource": body,
                "request": {"method": "POST", "url": "Patient"},
            }
            for i, (body, _) in enumerate(patients)
        ],
    }
    path = tmp_path / "bundle.json"
    path.write_bytes(orjson.dumps(bundle))
    for workers in (1, 2):  # in process, and in worker processes given only the index key
        with system_access("test-import"):
            report = Importer(router, workers=workers).run([path])
        assert not report.errors and report.created["Patient"] == 2
    with engine.connect() as conn:
        rows = conn.execute(sa.select(resource.c.pid, resource.c.res_id, resource.c.content)).all()
    assert len(rows) == 4
    for row in rows:
        content = row.content if isinstance(row.content, bytes) else row.content.encode()
        assert is_sealed(content)
        index = _index_text(engine, row.pid)
        for _, secrets in patients:
            for value in secrets.values():
                assert value not in content.decode() and value not in index
    for _, secrets in patients:
        for query in (("identifier", secrets["cccd"]), ("phone", secrets["phone"])):
            found = _handle(router, "GET", "Patient", query=[query])
            assert len(orjson.loads(found.body)["entry"]) == 2, query  # imported twice
    engine.dispose()


def test_encryption_off_still_reads_sealed_rows(fresh_database_url: Any, tmp_path: Path) -> None:
    url = fresh_database_url("keys_mixed")
    on = build_router(_settings(url, tmp_path))
    body, secrets = _patient("00ff00ff00ff")
    sealed = _handle(on, "POST", "Patient", body)
    sealed_id = orjson.loads(sealed.body)["id"]
    on.ctx.store.engine.dispose()

    off = build_router(_settings(url, tmp_path, encrypt_at_rest=False))
    engine = off.ctx.store.engine
    plain = _handle(off, "POST", "Patient", {**body, "name": [{"family": "Trần"}]})
    plain_id = orjson.loads(plain.body)["id"]
    assert not is_sealed(_raw(engine, "Patient", plain_id)[1])
    assert is_sealed(_raw(engine, "Patient", sealed_id)[1])
    assert _handle(off, "GET", f"Patient/{sealed_id}").body == sealed.body
    found = _handle(off, "GET", "Patient", query=[("identifier", f"{CCCD}|{secrets['cccd']}")])
    assert {e["resource"]["id"] for e in orjson.loads(found.body)["entry"]} == {sealed_id, plain_id}
    found = _handle(off, "GET", "Patient", query=[("phone", secrets["phone"])])
    assert {e["resource"]["id"] for e in orjson.loads(found.body)["entry"]} == {sealed_id, plain_id}
    engine.dispose()


def test_missing_master_key_fails_loudly(fresh_database_url: Any, tmp_path: Path) -> None:
    url = fresh_database_url("keys_missing")
    router = build_router(_settings(url, tmp_path / "a"))
    patient_id = orjson.loads(_handle(router, "POST", "Patient", _patient("abcdefabcdef")[0]).body)["id"]
    router.ctx.store.engine.dispose()
    other = build_router(_settings(url, tmp_path / "b"))  # no key there: not silently a new one
    response = _handle(other, "GET", f"Patient/{patient_id}")
    assert response.status == 500
    assert "not configured" in orjson.loads(response.body)["issue"][0]["diagnostics"]
    assert not (tmp_path / "b").exists()
    other.ctx.store.engine.dispose()


# --- units ------------------------------------------------------------------------------


def test_normalization_and_plain_passthrough() -> None:
    assert blind.normalize_phone(" +84 905-120-001 ") == "+84905120001"
    assert blind.normalize_phone("0905 120 001") == "0905120001"
    assert blind.normalize_identifier(" 0010 8501 2345 ") == "001085012345"
    plain = b'{"resourceType":"Patient","id":"x","text":{"div":"\\"_enc\\""}}'
    assert open_content(plain, "Patient", "x") is plain


def test_plain_database_has_no_keys_until_needed(fresh_database_url: Any, tmp_path: Path) -> None:
    url = fresh_database_url("keys_none")
    router = build_router(_settings(url, tmp_path, encrypt_at_rest=False))
    assert _handle(router, "POST", "Patient", _patient("123456abcdef")[0]).status == 201
    assert _data_keys(router.ctx.store.engine) == {}
    assert not (tmp_path / "master.key").exists()
    router.ctx.store.engine.dispose()
