"""The QĐ 130 XML feed (``xml130``): the format a facility's HIS exports after each episode
for the health-insurance assessment, read into the citizen record.

Owns: ``FORMAT`` (``peek``: message type "XML130", control id = the MA_LK of every HOSO
joined by ";", ordering key = the first HOSO's patient: CCCD, else the BHXH number of the
BHYT card, else the facility MRN; ``map``: one ``Mapped`` per HOSO), and the checks that
span a file: the facility of the file is the source's, every row belongs to its episode
(MA_LK), row numbers (STT) are unique per table. A file with any field error is refused
as a whole, every error named ("HOSO[1]/XML2[3]/SO_LUONG: ...").
Calls: ``connectors.xml130.envelope`` (reading), ``.fields`` (rows), ``.mapping`` and
``.clinical`` (FHIR), ``.episode``, ``connectors.identifiers``.
Called by: ``connectors.pipeline`` (``format_for("xml130")``), ``connectors.inbox``
(peek on receipt), ``connectors.xml130.folder`` and the upload API (through the inbox).
"""

from __future__ import annotations

from connectors.identifiers import BHXH, CCCD, facility_system, parse_bhyt
from connectors.model import Mapped, Peek, Rejected, Source
from connectors.xml130 import clinical, envelope
from connectors.xml130.episode import Episode
from connectors.xml130.fields import Problems, Row
from connectors.xml130.mapping import map_xml0, map_xml1, patient_facts, patient_row, unmapped

__all__ = ["FORMAT", "Xml130Format"]

MESSAGE_TYPE = "XML130"
MAPPED_TABLES = frozenset({"XML0", "XML1", "XML2", "XML3", "XML4", "XML5", "XML7", "XML8", "XML13", "XML14"})
SINGLE = frozenset({"XML1", "XML7", "XML8", "XML13", "XML14"})  # one record per episode


def _rows(table: str, records: list[dict[str, str]], problems: Problems, prefix: str) -> list[Row]:
    rows = []
    seen: set[str] = set()
    for n, values in enumerate(records, 1):
        if table in SINGLE:
            pos = None
        else:
            pos = values.get("STT") or str(n)
            if pos in seen:
                problems.add(f"{prefix}{table}[{pos}]/STT", "appears twice in the table")
            seen.add(pos)
        rows.append(Row(f"{prefix}{table}", pos, values, problems))
    return rows


def _key_table(hoso: envelope.Hoso) -> str | None:
    """The table that names the episode and its patient: XML1, else XML0."""
    return "XML1" if "XML1" in hoso.tables else "XML0" if "XML0" in hoso.tables else None


def _episode_key(hoso: envelope.Hoso, table: str, records: list[dict[str, str]]) -> str:
    """The MA_LK of a HOSO, from its XML1 (or XML0) records."""
    if not records:
        raise Rejected(f"{table} holds no record with MA_LK", hoso.where(table))
    ma_lk = records[0].get("MA_LK", "")
    if not ma_lk:
        raise Rejected("MA_LK is required", f"{hoso.where(table)}/MA_LK")
    return ma_lk


class Xml130Format:
    """The ``Format`` of QĐ 130 files (``connectors.model.Format``)."""

    name = "xml130"

    def peek(self, raw: bytes) -> Peek:
        env = envelope.read(raw)
        keys: list[str] = []
        first: Row | None = None
        for hoso in env.hosos:
            table = _key_table(hoso)
            if table is None:
                continue
            records = envelope.records(hoso.tables[table], hoso.where(table))
            keys.append(_episode_key(hoso, table, records))
            first = first or Row(table, None, records[0], Problems())
        control_id = ";".join(keys) if keys else f"{env.facility or '?'}-{env.created or '?'}"
        return Peek(MESSAGE_TYPE, control_id[:1000], _ordering_key(first, env.facility))

    def map(self, raw: bytes, source: Source) -> list[Mapped]:
        env = envelope.read(raw)
        facility = source.facility_code
        if env.facility and env.facility != facility:
            raise Rejected(
                f"the file is from facility {env.facility}, this source is facility {facility}",
                "THONGTINDONVI/MACSKCB",
            )
        problems = Problems()
        out: list[Mapped] = []
        keys: set[str] = set()
        for hoso in env.hosos:
            mapped = _map_hoso(hoso, facility, problems, keys)
            if mapped is not None:
                out.append(mapped)
        problems.raise_if_any()
        _one_entry_per_resource(out)
        if not out:
            raise Rejected(
                "no HOSO holds XML1 or XML0: nothing to map", "GIAMDINHHS/THONGTINHOSO/DANHSACHHOSO"
            )
        return out


def _map_hoso(hoso: envelope.Hoso, facility: str, problems: Problems, keys: set[str]) -> Mapped | None:
    prefix = f"{hoso.where()}/"
    key_table = _key_table(hoso)
    if key_table is None:
        problems.add(hoso.where(), "holds neither XML1 nor XML0 (the episode's MA_LK is unknown)")
        return None
    parsed = {t: envelope.records(d, hoso.where(t)) for t, d in hoso.tables.items() if t in MAPPED_TABLES}
    ma_lk = _episode_key(hoso, key_table, parsed[key_table])
    if len(ma_lk) > 100 or any(c in ma_lk for c in ",|$\\"):
        problems.add(f"{prefix}{key_table}/MA_LK", "more than 100 characters or one of , | $ \\")
        return None
    if ma_lk in keys:
        problems.add(f"{prefix}{key_table}/MA_LK", f"episode {ma_lk} appears twice in the file")
        return None
    keys.add(ma_lk)
    ep = Episode(facility, ma_lk, problems)
    ep.warnings.extend(f"{hoso.where()}: {unmapped(t)}" for t in hoso.tables if t not in MAPPED_TABLES)
    tables: dict[str, list[Row]] = {}
    for table, records in parsed.items():
        tables[table] = _rows(table, records, problems, prefix)
        for row in tables[table]:
            if row.values.get("MA_LK") != ma_lk:
                row.bad("MA_LK", f"{row.values.get('MA_LK')!r} is not the episode's MA_LK {ma_lk!r}")
            own = row.text("MA_CSKCB")
            if table in ("XML0", "XML1") and own is not None and own != facility:
                row.bad("MA_CSKCB", f"{own!r} is not this source's facility {facility}")
    main = patient_row(tables)
    assert main is not None
    facts = patient_facts(ep, main)
    if tables.get("XML1"):
        map_xml1(ep, tables["XML1"][0])
    elif tables.get("XML0"):
        map_xml0(ep, tables["XML0"][0])
    clinical.map_tables(ep, tables)
    return Mapped(MESSAGE_TYPE, ma_lk, [facts], ep.entries, warnings=ep.warnings)


def _one_entry_per_resource(units: list[Mapped]) -> None:
    """The pipeline writes every unit of a file in one transaction: a resource two episodes
    share (the Coverage of a patient's BHYT card) is written once, as the later episode has
    it. Two conditional PUTs of one resource in one Bundle would each create it. Its fullUrl
    names it (made from its type and identifier), so references to it still resolve."""
    last: dict[str, int] = {}
    for n, unit in enumerate(units):
        for entry in unit.entries:
            last[entry["fullUrl"]] = n
    if len(last) == sum(len(u.entries) for u in units):
        return
    for n, unit in enumerate(units):
        unit.entries = [e for e in unit.entries if last[e["fullUrl"]] == n]


def _ordering_key(row: Row | None, facility: str | None) -> str | None:
    """The strongest patient identifier of the first episode, "system|value"."""
    if row is None:
        return None
    cccd = row.text("SO_CCCD")
    if cccd and cccd.isdigit() and len(cccd) == 12:
        return f"{CCCD}|{cccd}"
    for code in row.codes("MA_THE_BHYT"):
        card = parse_bhyt(code)
        if card is not None:
            return f"{BHXH}|{card.bhxh}"
    mrn = row.text("MA_BN")
    facility = facility or row.text("MA_CSKCB")
    if mrn and facility:
        return f"{facility_system('mrn', facility)}|{mrn}"
    return None


FORMAT = Xml130Format()
