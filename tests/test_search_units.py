"""The search building blocks on their own: folding, dates, expression compiling, hashing."""

from __future__ import annotations

from hub.crypto.keys import Keyring
from hub.crypto.keys import using as using_keys
from hub.search.dates import date_range, from_micros
from hub.search.extract import compile_expression
from hub.search.hashing import hash64
from hub.search.index import extract_index_rows
from hub.search.normalize import fold
from hub.search.registry import get_registry


def test_fold_handles_vietnamese() -> None:
    assert fold("Nguyễn Thị Đào") == "nguyen thi dao"
    assert fold("  Phạm   Văn  Đồng ") == "pham van dong"
    assert fold("TRẦN") == "tran"


def test_date_ranges_follow_precision() -> None:
    low, high = date_range("2020")
    assert from_micros(low).isoformat() == "2020-01-01T00:00:00+00:00"
    assert from_micros(high).isoformat() == "2020-12-31T23:59:59.999999+00:00"
    low, high = date_range("2020-02")
    assert from_micros(high).day == 29
    low, high = date_range("2020-03-01T10:00:00+07:00")
    assert from_micros(low).isoformat() == "2020-03-01T03:00:00+00:00"
    assert high - low == 999_999
    low, high = date_range("2020-03-01T10:00:00.25Z")
    assert high - low == 9_999


def test_hash_is_stable_and_separates_parts() -> None:
    assert hash64("Patient", "identifier") == hash64("Patient", "identifier")
    assert hash64("ab", "c") != hash64("a", "bc")
    assert -(2**63) <= hash64("x") < 2**63


def test_compiled_expressions_cover_the_registry() -> None:
    registry = get_registry()
    fallbacks = [
        (t, p.code) for t in registry.resource_types for p in registry.indexed_params(t) if not p.compiled
    ]
    assert len(fallbacks) <= 2, fallbacks
    extract, compiled = compile_expression(
        "(Observation.value as Quantity) | (Observation.value as SampledData)", "Observation"
    )
    assert compiled
    assert extract({"resourceType": "Observation", "valueQuantity": {"value": 5}}) == [{"value": 5}]
    choice, _ = compile_expression("Observation.effective", "Observation")
    assert choice({"effectivePeriod": {"start": "2020"}}) == [{"start": "2020"}]
    where, _ = compile_expression("Patient.telecom.where(system='phone')", "Patient")
    assert where({"telecom": [{"system": "email", "value": "a@b"}, {"system": "phone", "value": "09"}]}) == [
        {"system": "phone", "value": "09"}
    ]


def test_identifier_keeps_system_and_contact_point_does_not() -> None:
    patient = {
        "resourceType": "Patient",
        "identifier": [{"use": "official", "system": "https://vnhub.example/cccd", "value": "079090001234"}],
        "telecom": [{"system": "phone", "value": "0905123456", "use": "mobile"}],
    }
    # Without keys: with them, phone numbers are indexed as keyed hashes (test_encryption.py).
    with using_keys(Keyring.empty()):
        rows = extract_index_rows(get_registry(), "Patient", patient)["token"]
    assert ("https://vnhub.example/cccd", "079090001234") in {(r[4], r[5]) for r in rows}
    assert (None, "0905123456") in {(r[4], r[5]) for r in rows}


def test_hash_scheme_is_frozen() -> None:
    # The hashes are stored on disk; changing the scheme silently would break every index.
    assert hash64("Patient", "identifier") == 3525566837276235228
    assert hash64("Patient", "identifier", None) == hash64("Patient", "identifier", "")
