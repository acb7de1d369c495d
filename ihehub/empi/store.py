"""SQL access of the EMPI: small functions on a `Connection` inside the caller's transaction.

The service (`ihehub.empi.service`) composes them into one transaction per call; nothing here commits.
Rows are turned into the typed values of `ihehub.empi.model` at this edge.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Row, and_, delete, func, insert, or_, select, text, update

from ihehub.empi import tables as t
from ihehub.empi.model import (
    Address,
    Domain,
    DomainType,
    EventType,
    FieldScore,
    Identifier,
    Link,
    LinkKind,
    Merge,
    PatientEvent,
    PatientRecord,
    PersonName,
    RecordVersion,
    ReviewItem,
    SourceRecord,
)
from ihehub.empi.normalize import NormRecord, norm_from_json, norm_to_json


def now() -> float:
    return time.time()


# -- JSON of records and explanations -----------------------------------------------------------

def record_to_json(rec: PatientRecord) -> str:
    def enc(o: Any) -> Any:
        if hasattr(o, "isoformat"):
            return o.isoformat()
        raise TypeError(type(o).__name__)

    data = {
        "pid": rec.pid,
        "names": [dict(vars_of(n)) for n in rec.names],
        "birth_date": rec.birth_date,
        "sex": rec.sex,
        "phones": list(rec.phones),
        "addresses": [dict(vars_of(a)) for a in rec.addresses],
        "national_id": rec.national_id,
        "national_id_type": rec.national_id_type,
        "mother_maiden_name": rec.mother_maiden_name,
        "department": rec.department,
        "extra": dict(rec.extra),
    }
    return json.dumps(data, ensure_ascii=False, default=enc, sort_keys=True)


def vars_of(obj: Any) -> dict[str, Any]:
    return {s: getattr(obj, s) for s in obj.__slots__}


def record_from_json(raw: str) -> PatientRecord:
    d = json.loads(raw)
    return PatientRecord(
        pid=d["pid"], names=tuple(PersonName(**n) for n in d.get("names", ())), birth_date=d.get("birth_date"),
        sex=d.get("sex"), phones=tuple(d.get("phones", ())),
        addresses=tuple(Address(**a) for a in d.get("addresses", ())), national_id=d.get("national_id"),
        national_id_type=d.get("national_id_type", "CN-RIC"), mother_maiden_name=d.get("mother_maiden_name"),
        department=d.get("department"), extra=d.get("extra", {}))


def fields_to_json(fields: Sequence[FieldScore]) -> str:
    return json.dumps([[f.field, f.level, f.similarity, f.weight] for f in fields])


def fields_from_json(raw: str | None) -> tuple[FieldScore, ...]:
    if not raw:
        return ()
    return tuple(FieldScore(field=a, level=b, similarity=c, weight=d) for a, b, c, d in json.loads(raw))


# -- domains ------------------------------------------------------------------------------------

def load_domains(conn: Connection) -> list[Domain]:
    return [Domain(id=r.id, namespace=r.namespace, universal_id=r.universal_id,
                   universal_id_type=r.universal_id_type, type=DomainType(r.type), description=r.description or "")
            for r in conn.execute(select(t.domains).order_by(t.domains.c.id))]


def insert_domain(conn: Connection, namespace: str, universal_id: str | None, universal_id_type: str | None,
                  type_: DomainType, description: str) -> None:
    conn.execute(insert(t.domains).values(namespace=namespace, universal_id=universal_id,
                                          universal_id_type=universal_id_type, type=type_.value,
                                          description=description, created_at=now()))


# -- patients and records -----------------------------------------------------------------------

def insert_patient(conn: Connection, prefix: str, width: int, at: float) -> tuple[int, str]:
    pid = conn.execute(insert(t.patients).values(status="active", created_at=at, updated_at=at)
                       .returning(t.patients.c.id)).scalar_one()
    epid = f"{prefix}{pid:0{width}d}"
    conn.execute(update(t.patients).where(t.patients.c.id == pid).values(epid=epid))
    return int(pid), epid


def patient_row(conn: Connection, *, id: int | None = None, epid: str | None = None) -> Row[Any] | None:
    q = select(t.patients).where(t.patients.c.id == id if id is not None else t.patients.c.epid == epid)
    return conn.execute(q).first()


def set_patient(conn: Connection, patient_id: int, at: float, **values: Any) -> None:
    conn.execute(update(t.patients).where(t.patients.c.id == patient_id).values(updated_at=at, **values))


def record_row(conn: Connection, domain_id: int, pid: str) -> Row[Any] | None:
    return conn.execute(select(t.records).where(t.records.c.domain_id == domain_id,
                                                t.records.c.pid == pid)).first()


def record_by_id(conn: Connection, record_id: int) -> Row[Any] | None:
    return conn.execute(select(t.records).where(t.records.c.id == record_id)).first()


def records_by_ids(conn: Connection, ids: Iterable[int]) -> list[Row[Any]]:
    ids = list(ids)
    out: list[Row[Any]] = []
    for i in range(0, len(ids), 500):
        out += conn.execute(select(t.records).where(t.records.c.id.in_(ids[i:i + 500]))).all()
    return out


def patient_records(conn: Connection, patient_id: int) -> list[Row[Any]]:
    return list(conn.execute(select(t.records).where(t.records.c.patient_id == patient_id,
                                                     t.records.c.status == "active").order_by(t.records.c.id)))


def _search_columns(norm: NormRecord) -> dict[str, Any]:
    return {"birth_date": norm.birth_date, "sex": norm.sex, "national_id": norm.national_id,
            "postcode": norm.postcode, "city": norm.city}


def insert_record(conn: Connection, *, domain_id: int, record: PatientRecord, norm: NormRecord,
                  warnings: Sequence[str], patient_id: int, at: float) -> int:
    rid = conn.execute(insert(t.records).values(
        domain_id=domain_id, pid=record.pid, patient_id=patient_id, status="active", version=1,
        data=record_to_json(record), norm=json.dumps(norm_to_json(norm), ensure_ascii=False),
        warnings=json.dumps(list(warnings), ensure_ascii=False), created_at=at, updated_at=at,
        **_search_columns(norm)).returning(t.records.c.id)).scalar_one()
    return int(rid)


def update_record(conn: Connection, record_id: int, *, record: PatientRecord, norm: NormRecord,
                  warnings: Sequence[str], version: int, at: float) -> None:
    conn.execute(update(t.records).where(t.records.c.id == record_id).values(
        data=record_to_json(record), norm=json.dumps(norm_to_json(norm), ensure_ascii=False),
        warnings=json.dumps(list(warnings), ensure_ascii=False), version=version, updated_at=at,
        **_search_columns(norm)))


def set_record(conn: Connection, record_id: int, at: float, **values: Any) -> None:
    conn.execute(update(t.records).where(t.records.c.id == record_id).values(updated_at=at, **values))


def add_history(conn: Connection, record_id: int, version: int, event: str, data: str,
                message_id: str | None, at: float) -> None:
    conn.execute(insert(t.history).values(record_id=record_id, version=version, event=event, data=data,
                                          message_id=message_id, at=at))


def write_index(conn: Connection, record_id: int, norm: NormRecord, keys: Sequence[str]) -> None:
    """(Re)write the search names and blocking keys of a record."""
    drop_index(conn, record_id)
    rows = [{"record_id": record_id, "family": n.family, "given": n.given,
             "family_hanzi": n.family_hanzi or None, "given_hanzi": n.given_hanzi or None} for n in norm.names]
    if rows:
        conn.execute(insert(t.names), rows)
    if keys:
        conn.execute(insert(t.block_keys), [{"key": k[:160], "record_id": record_id} for k in dict.fromkeys(keys)])


def drop_index(conn: Connection, record_id: int) -> None:
    conn.execute(delete(t.names).where(t.names.c.record_id == record_id))
    conn.execute(delete(t.block_keys).where(t.block_keys.c.record_id == record_id))


def lock_keys(conn: Connection, keys: Sequence[str]) -> None:
    """On PostgreSQL, serialise concurrent feeds that share a blocking key (two processes registering the
    same person at once would otherwise both create a patient).  Transaction-scoped advisory locks, taken
    in a fixed order so that two feeds never deadlock.  SQLite has one writer already."""
    if conn.dialect.name != "postgresql" or not keys:
        return
    ids = sorted({int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big", signed=True)
                  for k in keys})
    for k in ids:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": k})


def candidate_ids(conn: Connection, keys: Sequence[str], max_block: int) -> tuple[set[int], list[str]]:
    """Record ids sharing a key with ``keys``; keys whose block is larger than ``max_block`` are skipped and
    returned second."""
    out: set[int] = set()
    skipped = []
    for k in keys:
        ids = conn.execute(select(t.block_keys.c.record_id).where(t.block_keys.c.key == k[:160])
                           .limit(max_block + 1)).scalars().all()
        if len(ids) > max_block:
            skipped.append(k)
            continue
        out.update(int(i) for i in ids)
    return out, skipped


def exclusions_of(conn: Connection, record_id: int) -> set[int]:
    q = select(t.exclusions.c.record_a, t.exclusions.c.record_b).where(
        or_(t.exclusions.c.record_a == record_id, t.exclusions.c.record_b == record_id))
    return {b if a == record_id else a for a, b in conn.execute(q)}


def add_exclusion(conn: Connection, a: int, b: int, reason: str, by: str, at: float) -> None:
    lo, hi = min(a, b), max(a, b)
    exists = conn.execute(select(t.exclusions.c.record_a).where(t.exclusions.c.record_a == lo,
                                                                t.exclusions.c.record_b == hi)).first()
    if not exists:
        conn.execute(insert(t.exclusions).values(record_a=lo, record_b=hi, reason=reason, created_at=at,
                                                 created_by=by))


def remove_exclusions(conn: Connection, record_id: int, others: Iterable[int]) -> None:
    for o in others:
        lo, hi = min(record_id, o), max(record_id, o)
        conn.execute(delete(t.exclusions).where(t.exclusions.c.record_a == lo, t.exclusions.c.record_b == hi))


# -- links ----------------------------------------------------------------------------------------

def open_link(conn: Connection, *, record_id: int, patient_id: int, kind: LinkKind, score: float | None,
              fields: Sequence[FieldScore], reason: str, by: str, at: float) -> int:
    lid = conn.execute(insert(t.links).values(
        record_id=record_id, patient_id=patient_id, kind=kind.value, score=score,
        fields=fields_to_json(fields) if fields else None, reason=reason, created_at=at, created_by=by)
        .returning(t.links.c.id)).scalar_one()
    return int(lid)


def active_link(conn: Connection, record_id: int) -> Row[Any] | None:
    return conn.execute(select(t.links).where(t.links.c.record_id == record_id, t.links.c.closed_at.is_(None))
                        .order_by(t.links.c.id.desc())).first()


def link_by_id(conn: Connection, link_id: int) -> Row[Any] | None:
    return conn.execute(select(t.links).where(t.links.c.id == link_id)).first()


def close_link(conn: Connection, link_id: int, reason: str, at: float) -> None:
    conn.execute(update(t.links).where(t.links.c.id == link_id, t.links.c.closed_at.is_(None))
                 .values(closed_at=at, closed_reason=reason))


# -- review items ----------------------------------------------------------------------------------

def add_review(conn: Connection, *, record_id: int, candidate_id: int, score: float, fields: Sequence[FieldScore],
               reason: str, at: float) -> int | None:
    """Open a review item unless one is already open for the same pair (either way round)."""
    c = t.reviews.c
    dup = conn.execute(select(c.id).where(c.state == "open", or_(
        and_(c.record_id == record_id, c.candidate_id == candidate_id),
        and_(c.record_id == candidate_id, c.candidate_id == record_id)))).first()
    if dup:
        return None
    rid = conn.execute(insert(t.reviews).values(record_id=record_id, candidate_id=candidate_id, score=score,
                                                fields=fields_to_json(fields), state="open", reason=reason,
                                                created_at=at).returning(c.id)).scalar_one()
    return int(rid)


def review_row(conn: Connection, review_id: int) -> Row[Any] | None:
    return conn.execute(select(t.reviews).where(t.reviews.c.id == review_id)).first()


def obsolete_reviews(conn: Connection, record_id: int, at: float, reason: str = "record changed") -> None:
    c = t.reviews.c
    conn.execute(update(t.reviews).where(c.state == "open", or_(c.record_id == record_id, c.candidate_id == record_id))
                 .values(state="obsolete", decided_at=at, decided_by=reason))


# -- events ---------------------------------------------------------------------------------------

def add_event(conn: Connection, *, type: EventType, patient: str, identifiers: tuple[Identifier, ...], at: float,
              record: Identifier | None = None, other_patient: str | None = None,
              subsumed: Identifier | None = None, detail: Mapping[str, Any] | None = None) -> PatientEvent:
    ev = PatientEvent(id=0, type=type, patient=patient, identifiers=identifiers, at=at, record=record,
                      other_patient=other_patient, subsumed=subsumed, detail=dict(detail or {}))
    eid = conn.execute(insert(t.events).values(type=type.value, patient=patient, at=at,
                                               payload=json.dumps(ev.to_json(), ensure_ascii=False))
                       .returning(t.events.c.id)).scalar_one()
    return PatientEvent(id=int(eid), type=type, patient=patient, identifiers=identifiers, at=at, record=record,
                        other_patient=other_patient, subsumed=subsumed, detail=dict(detail or {}))


def event_from_row(row: Row[Any]) -> PatientEvent:
    d = json.loads(row.payload)

    def ident(x: Mapping[str, str] | None) -> Identifier | None:
        return None if x is None else Identifier(value=x["value"], domain=x["domain"])

    return PatientEvent(id=int(row.id), type=EventType(row.type), patient=row.patient, at=row.at,
                        identifiers=tuple(Identifier(value=i["value"], domain=i["domain"]) for i in d["identifiers"]),
                        record=ident(d.get("record")), other_patient=d.get("other_patient"),
                        subsumed=ident(d.get("subsumed")), detail=d.get("detail", {}))


def events_after(conn: Connection, after_id: int, limit: int, patient: str | None = None) -> list[PatientEvent]:
    q = select(t.events).where(t.events.c.id > after_id)
    if patient is not None:
        q = q.where(t.events.c.patient == patient)
    return [event_from_row(r) for r in conn.execute(q.order_by(t.events.c.id).limit(limit))]


# -- typed views --------------------------------------------------------------------------------

def link_from_row(row: Row[Any], ident: Identifier, epid: str) -> Link:
    return Link(id=int(row.id), record=ident, patient=epid, kind=LinkKind(row.kind), score=row.score,
                fields=fields_from_json(row.fields), reason=row.reason, created_at=row.created_at,
                created_by=row.created_by, closed_at=row.closed_at, closed_reason=row.closed_reason)


def review_from_row(row: Row[Any], record: Identifier, candidate: Identifier, epid: str) -> ReviewItem:
    return ReviewItem(id=int(row.id), record=record, candidate=candidate, patient=epid, score=row.score,
                      fields=fields_from_json(row.fields), state=row.state, reason=row.reason,
                      created_at=row.created_at, decided_at=row.decided_at, decided_by=row.decided_by)


def source_record(row: Row[Any], ident: Identifier, epid: str, merged_into: Identifier | None) -> SourceRecord:
    return SourceRecord(identifier=ident, patient=epid, status=row.status, version=row.version,
                        record=record_from_json(row.data), warnings=tuple(json.loads(row.warnings or "[]")),
                        created_at=row.created_at, updated_at=row.updated_at, merged_into=merged_into)


def history_of(conn: Connection, record_id: int, ident: Identifier) -> list[RecordVersion]:
    rows = conn.execute(select(t.history).where(t.history.c.record_id == record_id).order_by(t.history.c.version))
    return [RecordVersion(identifier=ident, version=r.version, event=r.event, record=record_from_json(r.data),
                          at=r.at, message_id=r.message_id) for r in rows]


def merge_from_row(row: Row[Any], epids: Mapping[int, str], idents: Mapping[int, Identifier]) -> Merge:
    return Merge(id=int(row.id), kind=row.kind, surviving_patient=epids[row.surviving_patient_id],
                 subsumed_patient=epids[row.subsumed_patient_id],
                 surviving=idents.get(row.surviving_record_id) if row.surviving_record_id else None,
                 subsumed=idents.get(row.subsumed_record_id) if row.subsumed_record_id else None,
                 at=row.at, by=row.by, undone_at=row.undone_at)


def norm_of(row: Row[Any]) -> NormRecord:
    return norm_from_json(json.loads(row.norm))


def count(conn: Connection, table: Any, *where: Any) -> int:
    return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())
