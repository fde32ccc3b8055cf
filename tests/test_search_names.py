"""Multi-word name search (issue 10): what a clinician types finds the patient.

``Patient?name=nguyen thi hoa`` matches when every word of the query starts some word of
some part of the parameter's values (family, given, prefix, suffix, text), accents and case
folded, in any order. One word keeps the plain starts-with of a whole part, ``:exact`` and
``:contains`` are unchanged (hub/search/words.py, docs/storage.md §2 idx_string).

Every fixture resource carries a tag unique to this module's run and every query filters on
it, so other tests writing to the same database cannot change the answers.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import ADMIN_AUTH, LiveServer, make_token

from consent.context import system_access
from hub.auth.principal import Role
from hub.db.schema import idx_string, resource
from hub.rest import FhirRouter
from hub.search.normalize import fold
from hub.search.words import word_identity, words
from hub.store.reindex import reindex

LOINC = "http://loinc.org"

# key: (names, managing organization key). Names are (family, [given...]) or a full HumanName.
PEOPLE: dict[str, tuple[list[dict[str, Any]], str]] = {
    "hoa": ([{"family": "Nguyễn", "given": ["Thị", "Hoa"]}], "bv"),
    "hoa1": ([{"family": "Nguyễn", "given": ["Thị Hoa"]}], "pk"),  # given as one part
    "vanhoa": ([{"family": "Nguyễn", "given": ["Văn", "Hoà"]}], "bv"),
    "addie": ([{"family": "Tremblay80", "given": ["Addie621"], "prefix": ["Mrs."]}], "bv"),  # Synthea
    "dung": ([{"family": "Đặng", "given": ["Dũng"]}], "bv"),  # đ folds to d
    "anne": ([{"family": "O'Brien-Lê", "given": ["Anne-Marie"]}], "bv"),  # punctuation splits words
    "zed": ([{"family": "Zed", "given": ["Zoe Abe"]}], "bv"),  # a word row would sort it first
    "text": ([{"text": "Trần Văn Bình"}], "bv"),
    "two": ([{"family": "Lê", "given": ["Thu"]}, {"family": "Phan", "given": ["Thu Trang"], "use": "old"}], "bv"),
    "noname": ([], "bv"),
}  # fmt: skip


def _tagged(body: dict[str, Any], tag: str) -> dict[str, Any]:
    return {**body, "meta": {"tag": [{"system": "urn:hub-test", "code": tag}]}}


@pytest.fixture(scope="module")
def world(live_server: LiveServer) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    ids = {key: f"{key}-{tag}" for key in PEOPLE}
    orgs = {key: f"org-{key}-{tag}" for key in ("bv", "pk")}
    bodies: list[dict[str, Any]] = [
        {"resourceType": "Organization", "id": o, "name": o} for o in orgs.values()
    ]
    for key, (names, org) in PEOPLE.items():
        patient: dict[str, Any] = {
            "resourceType": "Patient",
            "id": ids[key],
            "managingOrganization": {"reference": f"Organization/{orgs[org]}"},
        }
        if names:
            patient["name"] = names
        bodies.append(patient)
    for key in ("hoa", "hoa1", "vanhoa", "addie"):
        bodies.append(
            {
                "resourceType": "Observation",
                "id": f"obs-{ids[key]}",
                "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "8867-4" if key != "hoa1" else "29463-7"}]},
                "subject": {"reference": f"Patient/{ids[key]}"},
            }
        )
    bodies += [
        {"resourceType": "Practitioner", "id": f"doc-{tag}", "name": [{"family": "Phạm", "given": ["Minh Tuấn"]}]},
        {"resourceType": "RelatedPerson", "id": f"rp-{tag}", "patient": {"reference": f"Patient/{ids['hoa']}"},
         "name": [{"family": "Nguyễn", "given": ["Văn", "Nam"]}]},
    ]  # fmt: skip
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": _tagged(b, tag),
                "request": {"method": "PUT", "url": f"{b['resourceType']}/{b['id']}"},
            }
            for b in bodies
        ],
    }
    response = httpx.post(live_server.base, json=bundle, timeout=60, headers=ADMIN_AUTH)
    assert response.status_code == 200, response.text
    return {"tag": tag, "ids": ids, "orgs": orgs, "server": live_server}


def _bundle(world: dict[str, Any], path: str, headers: dict[str, str] | None = None, **params: str) -> Any:
    query = {"_tag": f"urn:hub-test|{world['tag']}", "_count": "100", **params}
    response = httpx.get(
        f"{world['server'].base}/{path}", params=query, timeout=30, headers=headers or ADMIN_AUTH
    )
    assert response.status_code == 200, response.text
    return response.json()


def found(world: dict[str, Any], path: str = "Patient", headers: dict[str, str] | None = None, **params: str) -> set[str]:  # fmt: skip
    """The keys of PEOPLE (or the raw ids of other resources) a search matches."""
    keys = {v: k for k, v in world["ids"].items()}
    entries = _bundle(world, path, headers, **params).get("entry", [])
    return {
        keys.get(e["resource"]["id"], e["resource"]["id"]) for e in entries if e["search"]["mode"] == "match"
    }


def _parts(names: list[dict[str, Any]], code: str) -> list[str]:
    keys = {
        "name": ("family", "given", "prefix", "suffix", "text"),
        "family": ("family",),
        "given": ("given",),
    }
    out: list[str] = []
    for name in names:
        for key in keys[code]:
            value = name.get(key)
            out += value if isinstance(value, list) else [value] if isinstance(value, str) else []
    return out


def oracle(code: str, query: str) -> set[str]:
    """The rule, worked out in Python: one word starts a whole part; several words each
    start some word of some part."""
    query_words = words(fold(query))
    matched = set()
    for key, (names, _) in PEOPLE.items():
        parts = [fold(p) for p in _parts(names, code)]
        if len(query_words) <= 1:
            hit = any(p.startswith(fold(query)) for p in parts)
        else:
            part_words = [w for p in parts for w in words(p)]
            hit = all(any(w.startswith(q) for w in part_words) for q in query_words)
        if hit:
            matched.add(key)
    return matched


def test_what_a_clinician_types_finds_her(world: dict[str, Any]) -> None:
    for typed in ("nguyen thi hoa", "Nguyễn Thị Hoa", "thi hoa", "ng th ho", "Hoa thị NGUYỄN"):
        assert found(world, name=typed) == {"hoa", "hoa1"}, typed
    for typed in ("Hoa Nguyễn", "NGUYEN HOA"):  # Nguyễn Văn Hoà too
        assert found(world, name=typed) == {"hoa", "hoa1", "vanhoa"}, typed
    # No "van" in her name; his has one (Hoà folds to hoa).
    assert found(world, name="nguyen van hoa") == {"vanhoa"}
    assert found(world, name="Tremblay Addie") == {"addie"}
    assert found(world, name="addie tremblay mrs") == {"addie"}
    assert found(world, name="dang dung") == {"dung"}  # đ → d
    assert found(world, name="brien le marie") == {"anne"}  # hyphen and apostrophe split words
    assert found(world, name="tran binh") == {"text"}  # HumanName.text is a part too
    assert found(world, name="thu phan") == {"two"}  # words from two names of one patient


def test_family_and_given_search_their_own_parts(world: dict[str, Any]) -> None:
    assert found(world, given="thi hoa") == {"hoa", "hoa1"}
    assert found(world, given="hoa thi") == {"hoa", "hoa1"}
    assert found(world, family="nguyen thi") == set()  # "thi" is a given name, not a family name
    assert found(world, family="o brien le") == {"anne"}
    assert found(world, given="marie anne") == {"anne"}


def test_one_word_is_still_the_start_of_a_whole_part(world: dict[str, Any]) -> None:
    # "Thị Hoa" as one part starts with "thi", not "hoa": as before this issue.
    assert found(world, name="hoa") == {"hoa", "vanhoa"}
    assert found(world, given="hoa") == {"hoa", "vanhoa"}
    assert found(world, name="abe") == set()
    assert found(world, name="brien") == set()  # "O'Brien-Lê" starts with "o'brien"
    assert found(world, name="o'bri") == {"anne"}  # the words "o" and "bri"


def test_the_rule_against_an_oracle(world: dict[str, Any]) -> None:
    queries = [
        "nguyen", "nguyen thi", "thi nguyen", "hoa", "h n", "van", "van nguyen", "tr ad", "zoe abe",
        "abe zed", "abe", "le", "le thu", "thu trang", "trang", "o'brien", "anne-marie", "mrs addie",
        "nguyen nguyen", "x nguyen", "phan le", "minh tuan",
    ]  # fmt: skip
    for code in ("name", "family", "given"):
        for query in queries:
            assert found(world, **{code: query}) == oracle(code, query), (code, query)


def test_exact_and_contains_stay_per_part(world: dict[str, Any]) -> None:
    assert found(world, **{"given:exact": "Thị Hoa"}) == {"hoa1"}
    assert found(world, **{"given:exact": "Hoa"}) == {"hoa"}
    assert found(world, **{"name:exact": "Thị"}) == {"hoa"}
    assert found(world, **{"name:exact": "Nguyễn Thị Hoa"}) == set()  # no part is that
    assert found(world, **{"name:exact": "hoa"}) == set()  # exact is case-sensitive, words too
    assert found(world, **{"name:contains": "hi ho"}) == {"hoa1"}  # within one part
    assert found(world, **{"name:contains": "abe"}) == {"zed"}


def test_alternatives_missing_and_sort(world: dict[str, Any]) -> None:
    assert found(world, name="nguyen thi hoa,tremblay addie") == {"hoa", "hoa1", "addie"}
    assert found(world, name="dang dung,zed") == {"dung", "zed"}
    assert found(world, **{"name:missing": "true"}) == {"noname"}
    assert found(world, **{"given:missing": "true"}) == {"noname", "text"}
    assert found(world, **{"name:missing": "false"}) == set(PEOPLE) - {"noname"}
    # _sort=name sorts by the smallest folded part: word rows do not count ("zed", not "abe").
    keys = {v: k for k, v in world["ids"].items()}
    entries = _bundle(world, "Patient", _sort="name", **{"name:missing": "false"})["entry"]
    order = [keys[e["resource"]["id"]] for e in entries]
    smallest = {k: min(fold(p) for p in _parts(names, "name")) for k, (names, _) in PEOPLE.items() if names}
    assert order == sorted(smallest, key=lambda k: (smallest[k], order.index(k)))
    assert order[-1] == "zed" and order[0] == "addie"


def test_chains_and_has(world: dict[str, Any]) -> None:
    ids = world["ids"]
    observations = found(world, "Observation", **{"subject:Patient.name": "nguyen hoa"})
    assert observations == {f"obs-{ids[k]}" for k in ("hoa", "hoa1", "vanhoa")}
    observations = found(world, "Observation", **{"patient.name": "thi hoa,tremblay addie"})
    assert observations == {f"obs-{ids[k]}" for k in ("hoa", "hoa1", "addie")}
    heart_rate = f"{LOINC}|8867-4"
    assert found(world, name="nguyen hoa", **{"_has:Observation:subject:code": heart_rate}) == {
        "hoa",
        "vanhoa",
    }


def test_practitioner_and_related_person(world: dict[str, Any]) -> None:
    tag = world["tag"]
    assert found(world, "Practitioner", name="tuan pham") == {f"doc-{tag}"}
    assert found(world, "Practitioner", given="minh tuan") == {f"doc-{tag}"}
    assert found(world, "Practitioner", name="tuan") == set()  # one word: a whole part's start
    assert found(world, "RelatedPerson", name="nam nguyen") == {f"rp-{tag}"}
    assert found(world, "RelatedPerson", name="nam nguyen thi") == set()


def test_a_clinician_without_access_does_not_find_her(world: dict[str, Any]) -> None:
    server, orgs = world["server"], world["orgs"]

    def doctor_of(org: str) -> dict[str, str]:
        token = make_token(
            server, role=Role.CLINICIAN, fhir_user=f"Practitioner/dr-{org}", organizations=[org]
        )
        return {"Authorization": f"Bearer {token}"}

    bv, pk = doctor_of(orgs["bv"]), doctor_of(orgs["pk"])
    assert found(world, headers=bv, name="nguyen thi hoa") == {"hoa"}
    assert found(world, headers=pk, name="nguyen thi hoa") == {"hoa1"}
    assert found(world, headers=pk, name="thi hoa,tremblay addie") == {"hoa1"}
    assert found(world, "Observation", headers=pk, **{"subject:Patient.name": "nguyen hoa"}) == {
        f"obs-{world['ids']['hoa1']}"
    }
    stranger = make_token(server, role=Role.CLINICIAN, fhir_user="Practitioner/dr-nowhere", organizations=[])
    assert found(world, headers={"Authorization": f"Bearer {stranger}"}, name="nguyen thi hoa") == set()


def test_reindex_makes_the_word_rows(world: dict[str, Any], router: FhirRouter) -> None:
    """A database written before the word rows existed gets them from ``hub reindex``."""
    store = router.ctx.store
    hoa1 = world["ids"]["hoa1"]
    word_ids = [word_identity("Patient", code) for code in ("name", "given", "phonetic")]
    with store.write() as conn:
        pid = conn.execute(sa.select(resource.c.pid).where(resource.c.res_id == hoa1)).scalar_one()
        words_of = sa.select(sa.func.count()).where(
            idx_string.c.pid == pid, idx_string.c.hash_identity.in_(word_ids)
        )
        assert conn.execute(words_of).scalar_one() == 3  # "hoa" of "Thị Hoa": name, given, phonetic
        conn.execute(
            idx_string.delete().where(idx_string.c.pid == pid, idx_string.c.hash_identity.in_(word_ids))
        )
    assert found(world, name="nguyen thi hoa") == {"hoa"}  # her second word is gone
    assert found(world, name="nguyen thi") == {"hoa", "hoa1"}  # a part's first word needs no word row
    with system_access("test-reindex"):
        reindex(store, "Patient")
    assert found(world, name="nguyen thi hoa") == {"hoa", "hoa1"}
    with store.read() as conn:
        assert conn.execute(words_of).scalar_one() == 3
