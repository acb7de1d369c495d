"""Modality Worklist: scheduled procedure steps kept in SQL and the MWL C-FIND SCP matching
(PS3.4 Annex K, Modality Worklist Information Model - FIND; IHE RAD-5 Query Modality Worklist).

`ScheduledStep` is one Scheduled Procedure Step of one Requested Procedure, as an order filler schedules it
(IHE RAD-4 "Procedure Scheduled": ORM^O01 or OMI^O23, read by `ihehub.actors.mwl`).  `schedule` upserts
steps by (Accession Number, Scheduled Procedure Step ID); `cancel` removes them.

`find` answers an MWL identifier: the attributes of PS3.4 K.6.1.2.2 at the top level (Patient's Name and
ID, Accession Number, Requested Procedure ID, Study Instance UID ...) and inside the Scheduled Procedure
Step Sequence (Scheduled Station AE Title, Start Date/Time with ranges, Modality, Performing Physician,
Step ID); the matching rules are those of C-FIND (`ihehub.dicom.query`: single value, wildcards, ranges,
person names per component group).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from sqlalchemy import Connection, Engine, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from ihehub.dicom import query as q
from ihehub.dicom import tables as t
from ihehub.dicom.index import name_key

__all__ = ["SPS_KEYS", "TOP_KEYS", "ScheduledStep", "WorklistError", "cancel", "find", "schedule"]


class WorklistError(ValueError):
    """The MWL identifier cannot be answered; ``status`` is the C-FIND failure status."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ScheduledStep:
    """One Scheduled Procedure Step and what the worklist returns with it (PS3.3 C.4.10, C.4.11)."""

    accession_number: str
    sps_id: str
    patient_id: str
    issuer: str = ""
    patient_name: str | None = None  # PN text, component groups joined by "="
    birth_date: str | None = None
    sex: str | None = None
    requested_procedure_id: str | None = None
    study_uid: str | None = None
    placer_order: str | None = None
    filler_order: str | None = None
    modality: str | None = None
    station_ae: str | None = None
    station_name: str | None = None
    start_date: str | None = None
    start_time: str | None = None
    description: str | None = None
    code_value: str | None = None
    code_scheme: str | None = None
    referring_physician: str | None = None
    performing_physician: str | None = None


def _k(keyword: str, column: str, match: str) -> q.Key:
    return q.Key(keyword=keyword, level=0, column=column, match=match)


# keyword -> (column of dicom_worklist, matching kind of ihehub.dicom.query)
TOP_KEYS: dict[str, q.Key] = {k.keyword: k for k in (
    _k("PatientName", "patient_name", "pn"),
    _k("PatientID", "patient_id", "text"),
    _k("IssuerOfPatientID", "issuer", "text"),
    _k("PatientBirthDate", "birth_date", "date"),
    _k("PatientSex", "sex", "text"),
    _k("AccessionNumber", "accession_number", "text"),
    _k("RequestedProcedureID", "requested_procedure_id", "text"),
    _k("RequestedProcedureDescription", "description", "text"),
    _k("StudyInstanceUID", "study_uid", "uid"),
    _k("ReferringPhysicianName", "referring_physician", "pn"),
    _k("PlacerOrderNumberImagingServiceRequest", "placer_order", "text"),
    _k("FillerOrderNumberImagingServiceRequest", "filler_order", "text"),
)}
SPS_KEYS: dict[str, q.Key] = {k.keyword: k for k in (
    _k("ScheduledStationAETitle", "station_ae", "text"),
    _k("ScheduledStationName", "station_name", "text"),
    _k("ScheduledProcedureStepStartDate", "start_date", "date"),
    _k("ScheduledProcedureStepStartTime", "start_time", "time"),
    _k("Modality", "modality", "text"),
    _k("ScheduledPerformingPhysicianName", "performing_physician", "pn"),
    _k("ScheduledProcedureStepDescription", "description", "text"),
    _k("ScheduledProcedureStepID", "sps_id", "text"),
)}
_CONTROL = {"SpecificCharacterSet"}


def schedule(engine: Engine, steps: Sequence[ScheduledStep]) -> None:
    """Insert or replace ``steps`` (one transaction)."""
    now = time.time()
    rows = [t.fit(t.worklist, dict(dataclasses.asdict(s), name_key=name_key(s.patient_name), updated_at=now,
                                   charset=None if _ascii(s) else "ISO_IR 192")) for s in steps]
    if not rows:
        return
    with engine.begin() as conn:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(t.worklist)
        changes = {c: stmt.excluded[c] for c in rows[0] if c not in ("accession_number", "sps_id")}
        conn.execute(stmt.on_conflict_do_update(index_elements=["accession_number", "sps_id"], set_=changes), rows)


def cancel(engine: Engine, accession_number: str, sps_ids: Sequence[str] = ()) -> int:
    """Remove the steps of an order (all of them, or those in ``sps_ids``); returns how many were removed."""
    w = t.worklist
    stmt = delete(w).where(w.c.accession_number == accession_number)
    if sps_ids:
        stmt = stmt.where(w.c.sps_id.in_(list(sps_ids)))
    with engine.begin() as conn:
        return int(conn.execute(stmt).rowcount or 0)


def _ascii(step: ScheduledStep) -> bool:
    return all(v.isascii() for v in dataclasses.astuple(step) if isinstance(v, str))


@dataclasses.dataclass(frozen=True, slots=True)
class _Query:
    conditions: tuple[q.Condition, ...]
    top: tuple[str, ...]  # requested top-level keywords, in order
    sps: tuple[str, ...] | None  # requested keywords of the SPS item (None: the sequence was not requested)
    charset: tuple[str, ...]


def _parse(identifier: Dataset) -> _Query:
    conditions: list[q.Condition] = []
    top: list[str] = []
    sps: list[str] | None = None
    try:
        for elem in identifier:
            keyword = elem.keyword
            if not keyword or keyword in _CONTROL:
                continue
            if keyword == "ScheduledProcedureStepSequence":
                sps = []
                items = list(elem.value or [])
                if len(items) > 1:
                    raise WorklistError(0xA900, "Scheduled Procedure Step Sequence with more than one item")
                for sub in items[0] if items else []:
                    if not sub.keyword:
                        continue
                    sps.append(sub.keyword)
                    key = SPS_KEYS.get(sub.keyword)
                    value = q._as_text(sub.value)
                    if key is not None and value:
                        conditions.append(q.Condition(key=key, value=value))
                continue
            top.append(keyword)
            key = TOP_KEYS.get(keyword)
            value = q._as_text(elem.value)
            if key is not None and value:
                conditions.append(q.Condition(key=key, value=value))
    except WorklistError:
        raise
    except Exception as exc:
        raise WorklistError(0xC000, f"Cannot decode the identifier: {type(exc).__name__}") from exc
    charset = identifier.get("SpecificCharacterSet") or ()
    charset = (charset,) if isinstance(charset, str) else tuple(str(c) for c in charset)
    return _Query(conditions=tuple(conditions), top=tuple(top), sps=None if sps is None else tuple(sps),
                  charset=charset)


def find(conn: Connection, identifier: Dataset, *, limit: int = 10_000) -> Iterator[Dataset]:
    """The response identifiers for an MWL C-FIND identifier (PS3.4 K.6.1.2); `WorklistError` if unreadable."""
    query = _parse(identifier)
    w = t.worklist
    stmt = select(w).order_by(w.c.start_date, w.c.start_time, w.c.accession_number, w.c.sps_id)
    for cond in query.conditions:  # SQL narrows on the indexed columns; every row is checked exactly below
        if cond.key.column == "start_date":
            lo, hi = q._date_range(cond.value)
            stmt = stmt.where(w.c.start_date >= lo) if lo else stmt
            stmt = stmt.where(w.c.start_date <= hi) if hi else stmt
        elif cond.key.column == "patient_id" and "*" not in cond.value and "?" not in cond.value:
            stmt = stmt.where(w.c.patient_id == cond.value)
    count = 0
    for row in conn.execute(stmt).mappings():
        if all(q._matches(c, row[str(c.key.column)]) for c in query.conditions):
            yield _response(query, row)
            count += 1
            if count >= limit:
                return


def _response(query: _Query, row: Any) -> Dataset:
    ds = Dataset()
    texts = [v for v in row.values() if isinstance(v, str)]
    charset = q.response_charset(query.charset, texts)
    if charset:
        ds.SpecificCharacterSet = charset
    for keyword in query.top:
        _set(ds, keyword, row, TOP_KEYS.get(keyword))
    if query.sps is not None:
        item = Dataset()
        for keyword in query.sps:
            _set(item, keyword, row, SPS_KEYS.get(keyword))
        ds.ScheduledProcedureStepSequence = DicomSequence([item])
    return ds


def _set(ds: Dataset, keyword: str, row: Any, key: q.Key | None) -> None:
    if keyword == "RequestedProcedureCodeSequence" and row["code_value"]:
        code = Dataset()
        code.CodeValue = row["code_value"]
        code.CodingSchemeDesignator = row["code_scheme"] or "L"
        code.CodeMeaning = (row["description"] or row["code_value"])[:64]
        ds.RequestedProcedureCodeSequence = DicomSequence([code])
        return
    value = row[key.column] if key is not None and key.column else None
    try:
        setattr(ds, keyword, value)
    except Exception:  # a requested attribute we do not keep (or cannot hold): returned empty
        setattr(ds, keyword, None)
