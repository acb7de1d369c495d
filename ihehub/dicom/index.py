"""Index rows of a stored instance and the SQL that writes them (SQLite and PostgreSQL).

`instance_record` decodes the stored data set with pydicom (values in their Specific Character Set,
PS3.5 6.1, e.g. ISO_IR 192 or GB18030) and returns the rows of the four levels; `write_batch` upserts a
batch of records in one transaction (run on the group-committing `ihehub.bus.db.Writer`) and refreshes
the counts C-FIND returns (PS3.4 C.3.4 Number of Study/Series Related Instances and friends).
"""

from __future__ import annotations

import dataclasses
import io
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from sqlalchemy import Connection, Table, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from ihehub.dicom import tables as t
from ihehub.dicom.elements import ElementCache
from ihehub.dicom.storage import StoredInstance

__all__ = ["InstanceRecord", "decode", "instance_record", "name_key", "person_name", "write_batch"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class InstanceRecord:
    """The rows of one instance, one per level; ``dataset`` is kept for the series metadata."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    stored: StoredInstance
    dataset: Dataset | None
    pixel_vr: str | None = None  # VR of the pixel data left out of ``dataset``, if the instance has any


PIXEL_TAGS = {0x7FE00008: "OF", 0x7FE00009: "OD", 0x7FE00010: "OW"}  # Float, Double Float, Pixel Data


def decode(stored: StoredInstance) -> tuple[Dataset, str | None]:
    """The stored data set as pydicom sees it (values decoded lazily, in their character set), up to its
    pixel data, and the VR of that pixel data (``None`` when there is none)."""
    fp = io.BytesIO(stored.dataset)
    ds = read_dataset(fp, stored.implicit, stored.little_endian,
                      stop_when=lambda tag, vr, length: int(tag) in PIXEL_TAGS)
    pos, data = fp.tell(), stored.dataset
    if pos + 8 > len(data):
        return ds, None
    group, element = struct.unpack_from("<HH" if stored.little_endian else ">HH", data, pos)
    tag = group << 16 | element
    if tag not in PIXEL_TAGS:
        return ds, None
    if not stored.implicit:
        return ds, bytes(data[pos + 4:pos + 6]).decode("ascii", errors="replace")
    if tag == 0x7FE00010 and int(ds.get("BitsAllocated", 16) or 16) <= 8:
        return ds, "OB"
    return ds, PIXEL_TAGS[tag]


def person_name(value: Any) -> str | None:
    """A PN value as text: all component groups, ``=``-separated, trailing empty groups dropped."""
    if value is None:
        return None
    text = str(value).rstrip("=").strip()
    return text or None


def name_key(name: str | None) -> str | None:
    """What C-FIND narrows names on: case-folded (matching itself stays per component group)."""
    return name.casefold() if name else None


def instance_record(stored: StoredInstance, *, now: float | None = None,
                    cache: ElementCache | None = None) -> InstanceRecord:
    """Rows for ``stored``; values that cannot be decoded are left empty rather than failing the instance.
    ``cache``: values converted for an earlier instance with the same bytes are taken from it."""
    now = time.time() if now is None else now
    ds: Dataset | None
    try:
        ds, pixel_vr = decode(stored)
    except Exception:  # the structure was checked at C-STORE; pydicom may still refuse a value encoding
        ds, pixel_vr = None, None
    get = _Getter(ds, cache)
    patient_name = person_name(get.raw("PatientName"))
    referring = person_name(get.raw("ReferringPhysicianName"))
    patient = {
        "patient_id": get.text("PatientID") or "",
        "issuer": get.text("IssuerOfPatientID") or "",
        "name": patient_name,
        "name_key": name_key(patient_name),
        "birth_date": get.date("PatientBirthDate"),
        "sex": get.text("PatientSex"),
        "updated_at": now,
    }
    study = {
        "study_uid": stored.study_uid,
        "study_date": get.date("StudyDate"),
        "study_time": get.text("StudyTime"),
        "accession_number": get.text("AccessionNumber"),
        "study_id": get.text("StudyID"),
        "description": get.text("StudyDescription"),
        "referring_physician": referring,
        "referring_key": name_key(referring),
        "created_at": now,
        "updated_at": now,
    }
    series = {
        "series_uid": stored.series_uid,
        "study_uid": stored.study_uid,
        "modality": get.text("Modality"),
        "series_number": get.integer("SeriesNumber"),
        "description": get.text("SeriesDescription"),
        "body_part": get.text("BodyPartExamined"),
        "series_date": get.date("SeriesDate"),
        "series_time": get.text("SeriesTime"),
        "updated_at": now,
    }
    instance = {
        "sop_instance_uid": stored.sop_instance_uid,
        "series_uid": stored.series_uid,
        "study_uid": stored.study_uid,
        "sop_class_uid": stored.sop_class_uid,
        "instance_number": get.integer("InstanceNumber"),
        "content_date": get.date("ContentDate"),
        "content_time": get.text("ContentTime"),
        "rows": get.integer("Rows"),
        "columns": get.integer("Columns"),
        "frames": get.integer("NumberOfFrames"),
        "transfer_syntax": stored.transfer_syntax,
        "path": stored.relpath,
        "size": stored.size,
        "calling_ae": stored.calling_ae or None,
        "received_at": stored.received_at,
        "indexed_at": now,
    }
    return InstanceRecord(patient=t.fit(t.patients, patient), study=t.fit(t.studies, study),
                          series=t.fit(t.series, series), instance=t.fit(t.instances, instance),
                          stored=stored, dataset=ds, pixel_vr=pixel_vr)


_TAGS = {k: int(tag_for_keyword(k) or 0) for k in (
    "PatientName", "ReferringPhysicianName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "Modality", "SeriesNumber",
    "SeriesDescription", "BodyPartExamined", "SeriesDate", "SeriesTime", "InstanceNumber", "ContentDate",
    "ContentTime", "Rows", "Columns", "NumberOfFrames")}


class _Getter:
    """Attribute values that never raise: a value pydicom cannot decode reads as absent."""

    def __init__(self, ds: Dataset | None, cache: ElementCache | None = None) -> None:
        self.ds = ds
        self.cache = cache

    def raw(self, keyword: str) -> Any:
        if self.ds is None:
            return None
        try:
            value = self.ds.get(keyword) if self.cache is None else self.cache.value(self.ds, _TAGS[keyword])
        except Exception:  # KeyError: absent
            return None
        if value is None or value == "":
            return None
        return value

    def text(self, keyword: str) -> str | None:
        value = self.raw(keyword)
        if value is None:
            return None
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            value = "\\".join(str(v) for v in value)
        text = str(value).strip()
        return text or None

    def date(self, keyword: str) -> str | None:
        text = self.text(keyword)
        if text is None:
            return None
        digits = "".join(ch for ch in text if ch.isdigit())
        return digits[:8] if len(digits) >= 8 else None

    def integer(self, keyword: str) -> int | None:
        value = self.raw(keyword)
        if value is None:
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            return None


# -- SQL -------------------------------------------------------------------------------------------


def _upsert(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str], *,
            keep: Iterable[str] = (), coalesce: bool = True) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE; ``keep`` columns keep their first value, the others take the
    new one (or, with ``coalesce``, keep the old one where the new one is NULL)."""
    if not rows:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table)
    skip = set(keys) | set(keep)
    changes = {}
    for name in rows[0]:
        if name in skip:
            continue
        new = stmt.excluded[name]
        changes[name] = func.coalesce(new, table.c[name]) if coalesce else new
    conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=changes), list(rows))


def write_batch(conn: Connection, records: Sequence[InstanceRecord]) -> None:
    """Upsert the rows of ``records`` (later ones win) and refresh the counts of their series and studies."""
    pats = {(r.patient["patient_id"], r.patient["issuer"]): r.patient for r in records}
    _upsert(conn, t.patients, list(pats.values()), ("patient_id", "issuer"))
    pks: dict[tuple[str, str], int] = {}
    for pid, issuer in pats:
        pk = conn.execute(select(t.patients.c.id).where(t.patients.c.patient_id == pid,
                                                        t.patients.c.issuer == issuer)).scalar_one()
        pks[(pid, issuer)] = int(pk)
    studies: dict[str, dict[str, Any]] = {}
    for r in records:
        studies[r.study["study_uid"]] = dict(r.study, patient_pk=pks[(r.patient["patient_id"], r.patient["issuer"])],
                                             num_series=0, num_instances=0)
    _upsert(conn, t.studies, list(studies.values()), ("study_uid",), keep=("created_at", "num_series",
                                                                            "num_instances"))
    series = {r.series["series_uid"]: dict(r.series, num_instances=0) for r in records}
    _upsert(conn, t.series, list(series.values()), ("series_uid",), keep=("num_instances",))
    inst = {r.instance["sop_instance_uid"]: r.instance for r in records}
    _upsert(conn, t.instances, list(inst.values()), ("sop_instance_uid",), coalesce=False)
    refresh_counts(conn, series_uids=list(series), study_uids=list(studies))


def refresh_counts(conn: Connection, *, series_uids: Sequence[str], study_uids: Sequence[str]) -> None:
    """Recount instances per series and series/instances/modalities/SOP classes per study."""
    i, s, st = t.instances, t.series, t.studies
    for chunk in _chunks(series_uids):
        conn.execute(update(s).where(s.c.series_uid.in_(chunk)).values(
            num_instances=select(func.count()).where(i.c.series_uid == s.c.series_uid).scalar_subquery()))
    for chunk in _chunks(study_uids):
        conn.execute(update(st).where(st.c.study_uid.in_(chunk)).values(
            num_series=select(func.count()).where(s.c.study_uid == st.c.study_uid).scalar_subquery(),
            num_instances=select(func.count()).where(i.c.study_uid == st.c.study_uid).scalar_subquery()))
        modalities: dict[str, set[str]] = {uid: set() for uid in chunk}
        for uid, modality in conn.execute(select(s.c.study_uid, s.c.modality).distinct()
                                          .where(s.c.study_uid.in_(chunk))):
            if modality:
                modalities[uid].add(modality)
        classes: dict[str, set[str]] = {uid: set() for uid in chunk}
        for uid, cls in conn.execute(select(i.c.study_uid, i.c.sop_class_uid).distinct()
                                     .where(i.c.study_uid.in_(chunk))):
            classes[uid].add(cls)
        conn.execute(update(st).where(st.c.study_uid == bindparam("b_uid")).values(
            modalities=bindparam("b_modalities"), sop_classes=bindparam("b_classes")),
            [{"b_uid": uid, "b_modalities": "\\".join(sorted(modalities[uid]))[:64] or None,
              "b_classes": "\\".join(sorted(classes[uid]))[:1024] or None} for uid in chunk])


def _chunks(items: Sequence[str], size: int = 500) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])
