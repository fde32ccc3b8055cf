"""Synthetic Vietnamese patients for the search benchmark, replicated from the Synthea set.

Patient number ``i`` is a copy of Synthea patient bundle ``i % 300`` where every ``urn:uuid``
of the bundle's own resources (fullUrls, references, and the identifiers that repeat them) is
replaced by a fresh uuid, consistently; the hospital's Organizations and Practitioners keep
theirs, so references to them still resolve to the shared ``hospitalInformation`` /
``practitionerInformation`` bundles. The patient gets a Vietnamese name with diacritics
(``name.text`` = "Nguyễn Văn Minh"), a 12-digit CCCD and a BHYT card number. Everything is
drawn from ``random.Random`` seeded with ``(seed, i)``, so patient ``i`` is the same whatever
the requested size: the 1k set is the first tenth of the 10k set, and files already in the cache
are reused.

Mixes: ``full`` keeps every entry; ``core`` keeps Patient, Encounter, Observation, Condition,
Procedure, Immunization, MedicationRequest and DiagnosticReport (about half the resources).

Layout: ``<cache>/<mix>-seed<seed>/shared/`` (the two hospital bundles),
``chunk-0000/`` ... (1,000 patient bundles each, ``.json.gz``) and ``patients.jsonl`` (what
the query runner needs per patient: id, CCCD, name query, LOINC codes, encounter dates).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

SOURCE = Path("/work/shared/data/synthea/bundles_r4_300_patients_gz")
SHARED_PREFIXES = ("hospitalInformation", "practitionerInformation")
CHUNK = 1000
CORE_TYPES = frozenset(
    {
        "Patient",
        "Encounter",
        "Observation",
        "Condition",
        "Procedure",
        "Immunization",
        "MedicationRequest",
        "DiagnosticReport",
    }
)
CCCD = "https://ehealth-hub.vn/sid/cccd"
BHYT = "https://ehealth-hub.vn/sid/bhyt"

FAMILIES = (
    "Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ",
    "Võ", "Đặng", "Bùi", "Đỗ", "Hồ", "Ngô", "Dương", "Lý",
)  # fmt: skip
MIDDLE = {"male": ("Văn", "Đức", "Minh", "Quang", "Hữu"), "female": ("Thị", "Ngọc", "Thu", "Thanh", "Kim")}
GIVEN = {
    "male": ("Anh", "Bình", "Cường", "Dũng", "Hải", "Hùng", "Khánh", "Long", "Nam", "Phong", "Quân", "Sơn", "Tuấn", "Việt"),
    "female": ("Anh", "Chi", "Dung", "Hà", "Hằng", "Hoa", "Hương", "Lan", "Linh", "Mai", "Nga", "Phương", "Thảo", "Yến"),
}  # fmt: skip
PLACES = (("Pleiku", "064"), ("An Khê", "064"), ("Ia Grai", "064"), ("Chư Sê", "064"), ("Đức Cơ", "064"))
_UUID_RE = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class PatientInfo:
    index: int
    id: str
    cccd: str
    name_query: str  # family and first given name without accents: "nguyen van"
    loinc: list[str]  # LOINC codes of this patient's Observations (most frequent first)
    encounter_days: list[str]  # sorted start dates (YYYY-MM-DD) of the Encounters


def fold_ascii(text: str) -> str:
    import unicodedata

    text = text.replace("đ", "d").replace("Đ", "D")
    return "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c)).lower()


@lru_cache(maxsize=1)
def _sources() -> tuple[list[Path], list[Path]]:
    files = sorted(SOURCE.glob("*.json.gz"))
    shared = [p for p in files if p.name.startswith(SHARED_PREFIXES)]
    patients = [p for p in files if not p.name.startswith(SHARED_PREFIXES)]
    assert len(patients) == 300 and len(shared) == 2, f"unexpected source layout in {SOURCE}"
    return shared, patients


def shared_sources() -> list[Path]:
    """The hospital's Organizations and Practitioners bundles, hospital first (load them first)."""
    return sorted(_sources()[0], key=lambda p: not p.name.startswith("hospital"))


@lru_cache(maxsize=8)
def _template(index: int, mix: str) -> tuple[bytes, frozenset[bytes]]:
    """The source bundle (filtered to the mix) and the uuids of its own, non-shared entries."""
    bundle = json.loads(gzip.decompress(_sources()[1][index].read_bytes()))
    if mix == "core":
        bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] in CORE_TYPES]
    own = frozenset(
        e["fullUrl"].removeprefix("urn:uuid:").encode()
        for e in bundle["entry"]
        if e["resource"]["resourceType"] not in ("Organization", "Practitioner")
    )
    return json.dumps(bundle, ensure_ascii=False).encode(), own


def make_patient(index: int, seed: int, mix: str) -> tuple[bytes, PatientInfo]:
    """Bundle JSON and query facts for synthetic patient ``index``."""
    rng = random.Random(f"{seed}:{index}")
    template, own = _template(index % 300, mix)
    mapping = {old: str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode() for old in sorted(own)}
    text = _UUID_RE.sub(lambda m: mapping.get(m.group(0), m.group(0)), template)
    bundle = json.loads(text)
    patient = bundle["entry"][0]["resource"]
    assert patient["resourceType"] == "Patient"
    gender = patient.get("gender") if patient.get("gender") in MIDDLE else rng.choice(("male", "female"))
    family, middle, given = rng.choice(FAMILIES), rng.choice(MIDDLE[gender]), rng.choice(GIVEN[gender])
    city, province = rng.choice(PLACES)
    born = patient.get("birthDate", "1970-01-01")
    century_gender = {("male", 19): "0", ("female", 19): "1", ("male", 20): "2", ("female", 20): "3"}
    cccd = f"{province}{century_gender.get((gender, int(born[:2])), '0')}{born[2:4]}{index:06d}"
    patient["name"] = [
        {"use": "official", "family": family, "given": [middle, given], "text": f"{family} {middle} {given}"}
    ]
    patient["identifier"] = [
        {"system": CCCD, "value": cccd},
        {"system": BHYT, "value": f"GD4{province[1:]}{index:010d}"},
    ] + [i for i in patient.get("identifier", []) if i.get("system") == "http://hospital.smarthealthit.org"]
    patient["address"] = [
        {"line": [f"Thôn {rng.randint(1, 12)}"], "city": city, "state": "Gia Lai", "country": "VN"}
    ]
    patient.pop("text", None)
    loinc: dict[str, int] = {}
    days: list[str] = []
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Observation":
            for coding in resource.get("code", {}).get("coding", []):
                if coding.get("system") == "http://loinc.org":
                    loinc[coding["code"]] = loinc.get(coding["code"], 0) + 1
        elif resource["resourceType"] == "Encounter":
            days.append(resource["period"]["start"][:10])
    info = PatientInfo(
        index=index,
        id=patient["id"],
        cccd=cccd,
        name_query=f"{fold_ascii(family)} {fold_ascii(middle)}",
        loinc=sorted(loinc, key=lambda c: -loinc[c]),
        encounter_days=sorted(days),
    )
    return json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode(), info


def _write_chunk(args: tuple[Path, int, int, int, str]) -> list[dict[str, Any]]:
    folder, start, stop, seed, mix = args
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    infos = []
    for index in range(start, stop):
        body, info = make_patient(index, seed, mix)
        (tmp / f"p{index:06d}.json.gz").write_bytes(gzip.compress(body, compresslevel=1))
        infos.append(asdict(info))
    (tmp / "patients.jsonl").write_text("".join(json.dumps(i) + "\n" for i in infos))
    tmp.rename(folder)  # a chunk is complete or absent
    return infos


def ensure_dataset(
    cache: Path, patients: int, seed: int, mix: str, workers: int = 2
) -> tuple[list[Path], list[PatientInfo]]:
    """Generate what is missing; return the paths to import (shared first) and the patient facts."""
    root = cache / f"{mix}-seed{seed}"
    shared_dir = root / "shared"
    if not shared_dir.exists():
        shared_dir.mkdir(parents=True)
        for path in _sources()[0]:
            shutil.copy(path, shared_dir / path.name)
    chunks = [
        (root / f"chunk-{c:04d}", c * CHUNK, min((c + 1) * CHUNK, patients))
        for c in range(-(-patients // CHUNK))
    ]
    todo = [(folder, start, stop, seed, mix) for folder, start, stop in chunks if not folder.exists()]
    for folder, start, stop in chunks:
        if folder.exists() and len(list(folder.glob("p*.json.gz"))) != stop - start:
            raise SystemExit(f"{folder} holds a different number of patients; delete it")
    if todo:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_chunk, todo))
    infos = [
        PatientInfo(**json.loads(line))
        for folder, _, _ in chunks
        for line in (folder / "patients.jsonl").read_text().splitlines()
    ]
    shared = sorted(shared_dir.glob("*.json.gz"), key=lambda p: not p.name.startswith("hospital"))
    return shared + [folder for folder, _, _ in chunks], infos


def iter_resources(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """Every resource in the dataset (for sanity checks)."""
    for path in paths:
        for file in sorted(path.glob("*.json.gz")) if path.is_dir() else [path]:
            for entry in json.loads(gzip.decompress(file.read_bytes()))["entry"]:
                yield entry["resource"]
