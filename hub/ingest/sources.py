"""Finding importable units in files and folders.

Owns: which files are read, in what order, and how they split into units of work
(one Bundle, or a chunk of NDJSON lines).
Calls: gzip, orjson.  Called by: the import pipeline.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NDJSON_CHUNK_LINES = 500
# Synthea writes the organizations and practitioners that patient bundles reference into
# these files; they must be loaded first.
_LOAD_FIRST = ("hospitalInformation", "practitionerInformation")


@dataclass(frozen=True)
class Unit:
    source: str  # file path, with ":line" for NDJSON chunks
    kind: str  # "bundle" | "ndjson" | "resource"
    payload: bytes
    first_line: int = 1


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def _is_ndjson(path: Path) -> bool:
    return ".ndjson" in path.suffixes


def _is_json(path: Path) -> bool:
    return ".json" in path.suffixes and not _is_ndjson(path)


def _order(path: Path) -> tuple[int, str]:
    return (0 if path.name.startswith(_LOAD_FIRST) else 1, str(path))


def discover(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and (_is_json(p) or _is_ndjson(p))]
            files.extend(sorted(found, key=_order))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(path)
    return files


def units(files: list[Path]) -> Iterator[Unit]:
    for path in files:
        data = _read(path)
        if _is_ndjson(path):
            lines = data.splitlines()
            if lines and b'"resourceType"' not in lines[0]:
                continue  # a bulk-export log or other non-resource NDJSON
            for start in range(0, len(lines), NDJSON_CHUNK_LINES):
                chunk = b"\n".join(lines[start : start + NDJSON_CHUNK_LINES])
                yield Unit(f"{path}:{start + 1}", "ndjson", chunk, start + 1)
        else:
            yield Unit(str(path), "bundle" if b'"Bundle"' in data[:4096] else "resource", data)
