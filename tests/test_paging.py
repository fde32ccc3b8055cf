"""Keyset paging and totals of searches (issue 10), over HTTP on the shared test server.

A walk follows the Bundles' ``next`` links (``_cursor``) with ``_count=20`` and must give
every match exactly once, in the order one big page gives, for each kind of sort: none
(pid), ``_lastUpdated``, a descending date with ties and missing values (NULLS LAST), a
string with ties. Rows written during a walk must not make an earlier row repeat or vanish.
A cursor is bound to its search (400 when altered or replayed on another) and grants
nothing: another user following it sees only what they may see. Totals are counted only
when asked (``_total=accurate``, ``_summary=count``).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from conftest import LiveServer, make_token

from hub.auth.principal import Role

SYSTEM = "urn:test:paging"
GIVEN = ["an", "binh", "chi", "dung", "em"]  # few names, so _sort=name has long runs of ties
PATIENT_SCOPES = "patient/*.rs"


def _transaction(http: httpx.Client, resources: list[dict[str, Any]]) -> list[str]:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "POST", "url": r["resourceType"]}} for r in resources
        ],
    }
    answer = http.post("/", json=bundle)
    assert answer.status_code == 200, answer.text
    return [e["response"]["location"].split("/_history")[0].rsplit("/", 1)[1] for e in answer.json()["entry"]]


def _patients(http: httpx.Client, uid: str, n: int, start: int = 0) -> list[str]:
    """Patients sharing the identifier ``SYSTEM|uid``; every seventh has no name at all."""
    resources = []
    for i in range(start, start + n):
        patient: dict[str, Any] = {
            "resourceType": "Patient",
            "identifier": [{"system": SYSTEM, "value": uid}],
        }
        if i % 7:
            patient["name"] = [{"family": f"Zfam{uid}", "given": [GIVEN[i % len(GIVEN)]]}]
        resources.append(patient)
    return _transaction(http, resources)


def _observations(http: httpx.Client, uid: str, subject: str, n: int, start: int = 0) -> list[str]:
    """Observations of one code; dates repeat every 40 and every ninth has none."""
    resources = []
    for i in range(start, start + n):
        observation: dict[str, Any] = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": SYSTEM, "code": uid}]},
            "subject": {"reference": subject},
        }
        if i % 9:
            observation["effectiveDateTime"] = f"2025-{1 + i % 12:02d}-{1 + (i % 40) % 28:02d}"
        resources.append(observation)
    return _transaction(http, resources)


def _ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def _link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((link["url"] for link in bundle.get("link", []) if link["relation"] == relation), None)


def _walk(
    client: httpx.Client,
    path: str,
    params: dict[str, str],
    between_pages: Callable[[int], None] = lambda page: None,
) -> list[str]:
    """Every match, following next links from the first page of ``_count=20``."""
    answer = client.get(path, params={**params, "_count": "20"})
    assert answer.status_code == 200, answer.text
    seen, page = _ids(answer.json()), 1
    following = _link(answer.json(), "next")
    while following is not None:
        assert page < 100, "the walk does not end: a cursor leads back"
        assert "_cursor=" in following and "_offset" not in following
        between_pages(page)
        answer = client.get(following)
        assert answer.status_code == 200, answer.text
        bundle = answer.json()
        assert 0 < len(_ids(bundle)) <= 20 and "total" not in bundle
        seen += _ids(bundle)
        following, page = _link(bundle, "next"), page + 1
    return seen


def _one_page(client: httpx.Client, path: str, params: dict[str, str]) -> list[str]:
    bundle = client.get(path, params={**params, "_count": "1000"}).json()
    assert _link(bundle, "next") is None
    return _ids(bundle)


@pytest.fixture(scope="module")
def world(live_server: LiveServer) -> tuple[str, list[str]]:
    """250 matching Patients, made once for the tests that only read them: (their uid, ids)."""
    marker = uuid.uuid4().hex[:12]
    with live_server.admin_client() as client:
        return marker, _patients(client, marker, 250)


@pytest.mark.parametrize("sort", [None, "_lastUpdated", "-_lastUpdated", "name", "-name,_id"])
def test_walk_gives_every_patient_once_in_order(
    http: httpx.Client, world: tuple[str, list[str]], sort: str | None
) -> None:
    uid, patients = world
    params = {"identifier": f"{SYSTEM}|{uid}", **({"_sort": sort} if sort else {})}
    walked = _walk(http, "/Patient", params)
    assert len(walked) == len(set(walked)) == 250
    assert set(walked) == set(patients)
    # Ties (and no _sort) go by pid, which is not creation order on PostgreSQL (each
    # connection takes its own block of the pid sequence): the walk must equal one big page.
    assert walked == _one_page(http, "/Patient", params)


def test_sort_by_name_ties_and_missing_names_last(http: httpx.Client, world: tuple[str, list[str]]) -> None:
    uid, patients = world
    params = {"identifier": f"{SYSTEM}|{uid}", "_sort": "name"}
    walked = _walk(http, "/Patient", params)
    given = {pid: (GIVEN[i % len(GIVEN)] if i % 7 else None) for i, pid in enumerate(patients)}

    # The smallest name part: a given name sorts before the family "Zfam…"; missing last.
    def key(p: str) -> tuple[bool, str]:
        return (given[p] is None, given[p] or "")

    assert [key(p) for p in walked] == sorted(key(p) for p in patients)
    assert walked == _one_page(http, "/Patient", params)  # ties by pid, the same on every page


def test_sort_by_date_descending_with_ties_and_missing_dates(http: httpx.Client, uid: str) -> None:
    subject = f"Patient/{_patients(http, uid, 1)[0]}"
    observations = _observations(http, uid, subject, 250)
    params = {"code": f"{SYSTEM}|{uid}", "_sort": "-date"}
    walked = _walk(http, "/Observation", params)
    assert len(walked) == len(set(walked)) == 250 and set(walked) == set(observations)
    assert walked == _one_page(http, "/Observation", params)
    # Latest first, undated last; ties by pid (descending, the last key's direction), which
    # is not creation order on PostgreSQL: the walk equals one big page (checked above).
    date_of = {
        observations[i]: (f"2025-{1 + i % 12:02d}-{1 + (i % 40) % 28:02d}" if i % 9 else "")
        for i in range(250)
    }
    dates = [date_of[o] for o in walked]
    undated = dates.index("")
    assert dates[:undated] == sorted(dates[:undated], reverse=True) and "" not in dates[:undated]
    assert set(dates[undated:]) == {""} and len(dates[undated:]) == sum(1 for i in range(250) if not i % 9)


@pytest.mark.parametrize("sort", [None, "_lastUpdated", "-date"])
def test_writes_during_a_walk_neither_repeat_nor_lose_rows(
    http: httpx.Client, uid: str, sort: str | None
) -> None:
    subject = f"Patient/{_patients(http, uid, 1)[0]}"
    before = _observations(http, uid, subject, 250)
    added: list[str] = []

    def write(page: int) -> None:
        if page in (3, 7):  # new matches, some dated before and some after the walk's position
            added.extend(_observations(http, uid, subject, 15, start=1000 + page))

    params = {"code": f"{SYSTEM}|{uid}", **({"_sort": sort} if sort else {})}
    walked = _walk(http, "/Observation", params, between_pages=write)
    assert len(walked) == len(set(walked)), "a row came twice"
    assert set(before) <= set(walked), "a row that existed when the walk began was skipped"
    assert set(walked) <= set(before) | set(added)
    # New rows sort after every old one by _lastUpdated, so that walk reaches them. Not by pid:
    # PostgreSQL's sequence hands each connection its own block of pids (cache 1000), so a
    # new row may get a pid below the walk's position; no sort promises to show rows added
    # during a walk, only never to repeat or skip the ones that were there.
    if sort == "_lastUpdated":
        assert set(walked) == set(before) | set(added)


def test_tampered_or_foreign_cursor_is_400(http: httpx.Client, world: tuple[str, list[str]]) -> None:
    uid, patients = world
    params = {"identifier": f"{SYSTEM}|{uid}", "_sort": "name", "_count": "20"}
    following = _link(http.get("/Patient", params=params).json(), "next")
    assert following is not None
    query = dict(parse_qsl(urlsplit(following).query))
    token = query["_cursor"]
    assert http.get("/Patient", params=query).status_code == 200

    def outcome(changed: dict[str, str]) -> httpx.Response:
        answer = http.get("/Patient", params=changed)
        assert answer.json()["resourceType"] == "OperationOutcome", answer.text
        return answer

    payload, digest = token.split(".")
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    forged = base64.urlsafe_b64encode(raw.replace(b'"an"', b'"em"')).rstrip(b"=").decode()
    assert raw != raw.replace(b'"an"', b'"em"')
    for bad in (f"{forged}.{digest}", token[:-2], "garbage", f"{payload}.", token + "A"):
        assert outcome({**query, "_cursor": bad}).status_code == 400
    # The same cursor on another search (other criteria, other sort) is refused too.
    assert outcome({**query, "_sort": "-name"}).status_code == 400
    assert outcome({**query, "identifier": f"{SYSTEM}|other"}).status_code == 400
    assert outcome({**query, "_offset": "20"}).status_code == 400
    # Changing only how the page is shown keeps the cursor valid.
    assert http.get("/Patient", params={**query, "_count": "5", "_elements": "id"}).status_code == 200


def test_a_cursor_grants_no_access(
    http: httpx.Client, live_server: LiveServer, client_for: Callable[[str | None], httpx.Client], uid: str
) -> None:
    mine, other = _patients(http, uid, 2)
    own = _observations(http, uid, f"Patient/{mine}", 30)
    theirs = _observations(http, uid, f"Patient/{other}", 30)
    params = {"code": f"{SYSTEM}|{uid}", "_count": "10"}
    first = http.get("/Observation", params=params).json()
    following = _link(first, "next")
    assert following is not None
    # Every match in the hub's order (pid: not creation order on PostgreSQL, whose sequence
    # hands each connection its own block of pids).
    everything = _ids(http.get("/Observation", params={**params, "_count": "100"}).json())
    assert _ids(first) == everything[:10]
    me = client_for(
        make_token(live_server, role=Role.PATIENT, fhir_user=f"Patient/{mine}", scopes=PATIENT_SCOPES)
    )
    seen: list[str] = []
    while following is not None:
        answer = me.get(following)
        assert answer.status_code == 200, answer.text
        seen += _ids(answer.json())
        following = _link(answer.json(), "next")
    assert seen and set(seen) <= set(own)
    assert not set(seen) & set(theirs)
    # The cursor only says where to start: after the admin's first ten, the patient's own.
    assert seen == [i for i in everything[10:] if i in set(own)]


def test_total_only_when_asked(http: httpx.Client, world: tuple[str, list[str]]) -> None:
    uid, patients = world
    criteria = {"identifier": f"{SYSTEM}|{uid}"}
    plain = http.get("/Patient", params=criteria).json()
    assert "total" not in plain and len(_ids(plain)) == 20
    assert http.get("/Patient", params={**criteria, "_total": "accurate"}).json()["total"] == 250
    assert "total" not in http.get("/Patient", params={**criteria, "_total": "none"}).json()
    # estimate: exact when the first page holds every match, absent otherwise
    assert "total" not in http.get("/Patient", params={**criteria, "_total": "estimate"}).json()
    small = http.get("/Patient", params={"_id": ",".join(patients[:3]), "_total": "estimate"}).json()
    assert small["total"] == 3
    counted = http.get("/Patient", params={**criteria, "_summary": "count"}).json()
    assert counted["total"] == 250 and "entry" not in counted
    # A walk with _total=accurate carries it on every page.
    following = _link(
        http.get("/Patient", params={**criteria, "_total": "accurate", "_count": "100"}).json(), "next"
    )
    assert following is not None
    assert http.get(following).json()["total"] == 250


def test_offset_paging_still_works(http: httpx.Client, world: tuple[str, list[str]]) -> None:
    uid, patients = world
    criteria = {"identifier": f"{SYSTEM}|{uid}", "_sort": "name"}
    walked = _walk(http, "/Patient", criteria)
    page = http.get("/Patient", params={**criteria, "_count": "20", "_offset": "40"}).json()
    assert _ids(page) == walked[40:60]
    previous = _link(page, "previous")
    assert previous is not None and _ids(http.get(previous).json()) == walked[20:40]
    following = _link(page, "next")
    assert following is not None and "_cursor=" in following
    assert _ids(http.get(following).json()) == walked[60:80]
