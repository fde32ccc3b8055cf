"""The transaction path's batching (issue 11: connector traffic): conditional writes looked
up together per type, conditional references resolved together and not locked, PUTs of a
free id joining the bulk create, and unchanged PUTs writing nothing.

Each test runs a transaction Bundle through ``hub.rest.transaction.transaction_in`` in a
write transaction of the real store (as the connectors' pipeline does), counting the SQL
statements it sends with a ``before_cursor_execute`` listener.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from consent.context import serving, system_access_for
from hub.crypto.policy import CCCD
from hub.errors import FhirError
from hub.rest.messages import FhirRequest
from hub.rest.router import FhirRouter
from hub.rest.transaction import transaction_in

SYSTEM = "https://batching.example/id"


@contextmanager
def _counting(engine: sa.Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        statements.append(" ".join(statement.split()))

    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)


def _run(
    router: FhirRouter, entries: list[dict[str, Any]], *, locks: list[int] | None = None
) -> list[dict[str, Any]]:
    """The Bundle's response entries; ``locks`` (PostgreSQL) receives how many advisory locks
    the transaction held just before its commit."""
    access = system_access_for("test-batching")
    with router.ctx.store.write() as conn, serving(access):
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        response = transaction_in(
            router, conn, FhirRequest("POST", "", parsed_body=bundle, principal=access.principal)
        )
        if locks is not None and conn.dialect.name == "postgresql":
            locks.append(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
                ).scalar_one()
            )
    assert response.body is not None
    answered: list[dict[str, Any]] = orjson.loads(response.body)["entry"]
    return answered


def _observation(value: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "batching"},
        "identifier": [{"system": SYSTEM, "value": value}],
        **extra,
    }


def _put_if(value: str, **extra: Any) -> dict[str, Any]:
    return {
        "resource": _observation(value, **extra),
        "request": {"method": "PUT", "url": f"Observation?identifier={SYSTEM}|{value}"},
    }


def _id_of(entry: dict[str, Any]) -> str:
    location: str = entry["response"]["location"]  # [base/]Type/id/_history/n
    return location.split("/_history/")[0].rsplit("/", 1)[1]


def test_conditional_puts_of_one_type_are_looked_up_in_one_statement(router: FhirRouter, uid: str) -> None:
    first = _run(router, [_put_if(f"{uid}-0"), _put_if(f"{uid}-1")])
    assert [e["response"]["status"] for e in first] == ["201", "201"]
    with _counting(router.ctx.store.engine) as statements:
        again = _run(router, [_put_if(f"{uid}-{i}", valueString="new") for i in range(30)])
    assert [e["response"]["status"] for e in again] == ["200", "200"] + ["201"] * 28
    assert [_id_of(e) for e in again[:2]] == [_id_of(e) for e in first]  # matched, not duplicated
    assert len({_id_of(e) for e in again}) == 30
    lookups = [s for s in statements if "JOIN idx_token" in s and s.startswith("SELECT")]
    assert len(lookups) == 1, lookups
    # No lookup of its own per entry (find_ids' statement).
    assert not [s for s in statements if s.startswith("SELECT resource.res_id FROM resource WHERE")]


def test_a_batched_condition_with_two_matches_is_412(router: FhirRouter, uid: str) -> None:
    _run(router, [{"resource": _observation(uid), "request": {"method": "POST", "url": "Observation"}}])
    _run(router, [{"resource": _observation(uid), "request": {"method": "POST", "url": "Observation"}}])
    with pytest.raises(FhirError) as failed:
        _run(router, [_put_if(f"{uid}-other"), _put_if(uid)])
    assert failed.value.status == 412
    assert "Bundle.entry[1]" in failed.value.issues[0].diagnostics


def test_keyed_identifiers_match_in_the_batched_lookup(router: FhirRouter, uid: str) -> None:
    """A CCCD is indexed under its keyed hash (hub.crypto.blind): the batched lookup finds it
    as a search does, so a re-sent patient is updated, not created twice."""
    cccd = f"0791{int(uuid.UUID(int=int(uid, 16)).int % 10**8):08d}"
    patient = {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": cccd}], "gender": "male"}
    created = _run(
        router,
        [{"resource": patient, "request": {"method": "PUT", "url": f"Patient?identifier={CCCD}|{cccd}"}}],
    )
    answered = _run(
        router,
        [
            {
                "resource": {**patient, "gender": "female"},
                "request": {"method": "PUT", "url": f"Patient?identifier={CCCD}|{cccd}"},
            },
            _put_if(uid),
        ],
    )
    assert answered[0]["response"]["status"] == "200"
    assert _id_of(answered[0]) == _id_of(created[0])


def test_conditional_references_resolve_together_without_locks(router: FhirRouter, uid: str) -> None:
    organizations = [
        {
            "resourceType": "Organization",
            "identifier": [{"system": SYSTEM, "value": f"{uid}-org{i}"}],
            "name": f"O{i}",
        }
        for i in range(3)
    ]
    made = _run(
        router, [{"resource": o, "request": {"method": "POST", "url": "Organization"}} for o in organizations]
    )
    refs = [f"Organization?identifier={SYSTEM}|{uid}-org{i}" for i in range(3)]
    entries = [_put_if(f"{uid}-{i}", performer=[{"reference": refs[i % 3]}]) for i in range(6)]
    locks: list[int] = []
    with _counting(router.ctx.store.engine) as statements:
        answered = _run(router, entries, locks=locks)
    assert all(e["response"]["status"] == "201" for e in answered)
    lookups = [s for s in statements if "JOIN idx_token" in s and s.startswith("SELECT")]
    assert len(lookups) == 2, lookups  # the conditions, then the references
    with router.ctx.store.read() as conn, serving(system_access_for("test-batching")):
        stored = [router.ctx.store.get(conn, "Observation", _id_of(e)).content for e in answered]
    performers = [orjson.loads(c or b"{}")["performer"][0]["reference"] for c in stored]
    assert performers == [f"Organization/{_id_of(made[i % 3])}" for i in range(6)]
    if locks:  # PostgreSQL: the six conditional writes are locked, the references are not
        alone: list[int] = []
        _run(router, [_put_if(f"{uid}-alone")], locks=alone)  # one lock, plus the audit chain's
        assert locks == [alone[0] + 5]


def test_a_reference_that_matches_nothing_is_412_naming_its_entry(router: FhirRouter, uid: str) -> None:
    entries = [
        _put_if(f"{uid}-a"),
        _put_if(f"{uid}-b", performer=[{"reference": f"Organization?identifier={SYSTEM}|{uid}-none"}]),
    ]
    with pytest.raises(FhirError) as failed:
        _run(router, entries)
    assert failed.value.status == 412
    assert "Bundle.entry[1]" in failed.value.issues[0].diagnostics


def test_puts_of_free_ids_join_the_bulk_create_and_unchanged_ones_write_nothing(
    router: FhirRouter, uid: str
) -> None:
    ids = [f"{uid}-p{i}" for i in range(4)]

    def puts(**extra: Any) -> list[dict[str, Any]]:
        return [
            {
                "resource": {**_observation(i, **extra), "id": i},
                "request": {"method": "PUT", "url": f"Observation/{i}"},
            }
            for i in ids
        ]

    with _counting(router.ctx.store.engine) as statements:
        created = _run(router, puts())
    assert [e["response"]["status"] for e in created] == ["201"] * 4
    assert [_id_of(e) for e in created] == ids
    assert [e["response"]["etag"] for e in created] == ['W/"1"'] * 4
    # One insert for the four (the other one is the transaction's AuditEvent).
    assert len([s for s in statements if s.startswith("INSERT INTO resource ")]) == 2
    with _counting(router.ctx.store.engine) as statements:
        same = _run(router, puts())
    assert [e["response"]["status"] for e in same] == ["200"] * 4
    assert [e["response"]["etag"] for e in same] == ['W/"1"'] * 4
    assert not [s for s in statements if s.startswith(("INSERT INTO resource_history", "UPDATE resource "))]
    # The four current versions read (and locked) with one statement, not one each.
    reads = [s for s in statements if s.startswith("SELECT resource.pid, resource.res_type, resource.res_id")]
    assert len(reads) == 1, reads
    with _counting(router.ctx.store.engine) as statements:
        changed = _run(router, puts(status="amended"))
    assert [e["response"]["status"] for e in changed] == ["200"] * 4
    assert [e["response"]["etag"] for e in changed] == ['W/"2"'] * 4
    # The four new versions written together: one UPDATE (executemany), one archive.
    assert len([s for s in statements if s.startswith("UPDATE resource ")]) == 1
    assert len([s for s in statements if s.startswith("INSERT INTO resource_history")]) == 1
    from hub.search import engine as search_engine

    registry = router.ctx.registry
    with router.ctx.store.read() as conn, serving(system_access_for("test-batching")):
        for res_id in ids:
            by_status = {
                status: search_engine.find_ids(
                    conn,
                    registry,
                    "Observation",
                    [("identifier", f"{SYSTEM}|{res_id}"), ("status", status)],
                    "",
                )
                for status in ("final", "amended")
            }
            assert by_status == {"final": [], "amended": [res_id]}  # the index rows were replaced
            first = router.ctx.store.get_version(conn, "Observation", res_id, 1)
            assert orjson.loads(first.content or b"{}")["status"] == "final"  # history kept
            history, total = router.ctx.store.history(conn, res_type="Observation", res_id=res_id)
            assert [h.version for h in history] == [2, 1] and total == 2


def test_conditions_of_several_types_share_one_lookup_and_keep_their_type(
    router: FhirRouter, uid: str
) -> None:
    """The same identifier on an Observation and an Encounter: each condition matches its own
    type only, from one statement."""
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"code": "AMB"},
        "identifier": [{"system": SYSTEM, "value": uid}],
    }
    put_encounter = {
        "resource": encounter,
        "request": {"method": "PUT", "url": f"Encounter?identifier={SYSTEM}|{uid}"},
    }
    first = _run(router, [_put_if(uid), put_encounter])
    with _counting(router.ctx.store.engine) as statements:
        again = _run(router, [put_encounter, _put_if(uid, valueString="v2")])
    assert [e["response"]["status"] for e in again] == ["200", "200"]
    assert [_id_of(e) for e in again] == [_id_of(first[1]), _id_of(first[0])]
    assert len([s for s in statements if "JOIN idx_token" in s and s.startswith("SELECT")]) == 1


def test_the_batched_lookup_sees_only_what_the_caller_may_see(router: FhirRouter, uid: str) -> None:
    """Hidden is unknown: a patient's batched lookup matches their own Observation and not
    another patient's, exactly as ``find_ids`` does criterion by criterion."""
    from consent.decision import decide
    from hub.auth.principal import Principal, Role
    from hub.auth.scopes import ScopeSet
    from hub.search import engine as search_engine

    patients = [f"{uid}-pa", f"{uid}-pb"]
    _run(
        router,
        [
            {
                "resource": {"resourceType": "Patient", "id": p},
                "request": {"method": "PUT", "url": f"Patient/{p}"},
            }
            for p in patients
        ],
    )
    made = _run(
        router,
        [
            {
                "resource": _observation(f"{uid}-{n}", subject={"reference": f"Patient/{p}"}),
                "request": {"method": "POST", "url": "Observation"},
            }
            for n, p in enumerate(patients)
        ],
    )
    own = Principal(
        patients[0],
        Role.PATIENT,
        ScopeSet.parse("patient/*.rs"),
        fhir_user=f"Patient/{patients[0]}",
        patient=patients[0],
    )
    criteria = [("Observation", [("identifier", f"{SYSTEM}|{uid}-{n}")]) for n in range(2)]
    registry = router.ctx.registry
    with router.ctx.store.read() as conn:
        access = decide(conn, own, registry, purpose=None, policy="moh")
        with serving(access):
            batched = search_engine.find_ids_many(conn, registry, criteria, "")
            alone = [search_engine.find_ids(conn, registry, t, c, "") for t, c in criteria]
    assert batched == alone == [[_id_of(made[0])], []]
