"""SQL access of the EMPI: small functions on a `Connection` inside the caller's transaction.

The service (`ihehub.empi.service`) composes them into one transaction per call; nothing here commits.
Rows are turned into the typed values of `ihehub.empi.model` at this edge.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Connection,
    Row,
    and_,
    any_,
    bindparam,
    cast,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)

from ihehub.empi import tables as t
from ihehub.empi.blocking import blocking_keys
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
    """A new active patient and its enterprise id ``prefix`` + the number zero-padded to ``width`` digits (on
    PostgreSQL in one statement, the number drawn from the key's sequence first)."""
    if conn.dialect.name == "postgresql":
        row = conn.execute(text(
            "WITH n AS (SELECT nextval(pg_get_serial_sequence('empi_patients', 'id')) AS id) "
            "INSERT INTO empi_patients (id, epid, status, created_at, updated_at) "
            "SELECT id, CAST(:prefix AS text) || lpad(CAST(id AS text), greatest(:width, length(CAST(id AS text))),"
            " '0'), 'active', :at, :at FROM n RETURNING id, epid"), {"prefix": prefix, "width": width, "at": at}).one()
        return int(row.id), str(row.epid)
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


def record_row(conn: Connection, domain_id: int, pid: str, *, lock: Sequence[str] = ()) -> Row[Any] | None:
    """The record ``pid`` of a domain; ``lock``: first take the blocking-key locks of `lock_keys` (on
    PostgreSQL in the same statement, one round trip for both)."""
    if lock and conn.dialect.name == "postgresql":
        return conn.execute(_LOCKED_RECORD, {"ks": _lock_ids(lock), "d": domain_id, "p": pid}).first()
    lock_keys(conn, lock)
    return conn.execute(select(t.records).where(t.records.c.domain_id == domain_id,
                                                t.records.c.pid == pid)).first()


# the locks are taken (in ascending order: the ORDER BY keeps the subquery from being flattened) before the
# record is read: a lateral join on the lock count makes the planner run the lock subquery first
_LOCKED_RECORD = text(
    "SELECT r.* FROM (SELECT count(pg_advisory_xact_lock(k)) AS n FROM "
    "(SELECT k FROM unnest(CAST(:ks AS bigint[])) AS u(k) ORDER BY k) AS s) AS l "
    "CROSS JOIN LATERAL (SELECT * FROM empi_records WHERE domain_id = :d AND pid = :p AND l.n >= 0) AS r")


def record_by_id(conn: Connection, record_id: int) -> Row[Any] | None:
    return conn.execute(select(t.records).where(t.records.c.id == record_id)).first()


def records_by_ids(conn: Connection, ids: Iterable[int]) -> list[Row[Any]]:
    ids = list(ids)
    out: list[Row[Any]] = []
    for i in range(0, len(ids), 500):
        out += conn.execute(select(t.records).where(t.records.c.id.in_(ids[i:i + 500]))).all()
    return out


_MATCH_COLUMNS: list[Any] = [t.records.c.id, t.records.c.domain_id, t.records.c.pid, t.records.c.patient_id,
                             t.records.c.status, t.records.c.norm]


def match_rows(conn: Connection, ids: Iterable[int]) -> list[Row[Any]]:
    """The columns the matcher reads (id, domain_id, pid, patient_id, status, norm) of records, by id, with
    their patient's enterprise id (``epid``)."""
    ids = sorted(set(ids))
    out: list[Row[Any]] = []
    r, p = t.records, t.patients
    q = select(*_MATCH_COLUMNS, p.c.epid).select_from(r.join(p, p.c.id == r.c.patient_id)).order_by(r.c.id)
    for part in _chunks(conn, ids):
        out.extend(typing.cast(list[Row[Any]], conn.execute(q.where(_in(conn, r.c.id, part))).all()))
    return out


def _chunks(conn: Connection, ids: Sequence[int]) -> list[Sequence[int]]:
    """``ids`` in parts for `_in`: large on PostgreSQL (one array parameter each), 500 on SQLite."""
    n = 20000 if conn.dialect.name == "postgresql" else 500
    return [ids[i:i + n] for i in range(0, len(ids), n)]


def _in(conn: Connection, col: Any, ids: Sequence[int]) -> Any:
    """``col IN ids``; on PostgreSQL ``col = ANY(array)``, one parameter instead of thousands of placeholders."""
    if conn.dialect.name == "postgresql":
        return col == any_(cast(literal(_int_array(ids)), ARRAY(BigInteger)))
    return col.in_(ids)


def _int_array(ids: Iterable[int]) -> str:
    """A PostgreSQL array literal of integers (sent as one text parameter and cast in the server: quicker
    than the driver adapting a list of thousands of ints)."""
    return "{" + ",".join(str(int(i)) for i in ids) + "}"


def patient_records(conn: Connection, patient_id: int) -> list[Row[Any]]:
    return list(conn.execute(select(t.records).where(t.records.c.patient_id == patient_id,
                                                     t.records.c.status == "active").order_by(t.records.c.id)))


def _xref_queries() -> tuple[Any, Any]:
    """The statements of `active_patient_records`, built once: by enterprise id, and by source record."""
    p, r, o = t.patients, t.records.alias("r"), t.records.alias("o")
    others = and_(o.c.patient_id == p.c.id, o.c.status == "active")
    by_epid = (select(p.c.epid, p.c.status.label("patient_status"), literal("active").label("record_status"),
                      o.c.pid, o.c.domain_id).select_from(p.outerjoin(o, others))
               .where(p.c.epid == bindparam("value")))
    by_record = (select(p.c.epid, p.c.status.label("patient_status"), r.c.status.label("record_status"), o.c.pid,
                        o.c.domain_id).select_from(r.join(p, p.c.id == r.c.patient_id).outerjoin(o, others))
                 .where(r.c.domain_id == bindparam("domain_id"), r.c.pid == bindparam("value")))
    return by_epid, by_record


_XREF_BY_EPID, _XREF_BY_RECORD = _xref_queries()


def active_patient_records(conn: Connection, domain_id: int | None, value: str) -> tuple[str, list[Row[Any]]] | None:
    """In one statement: the enterprise id and the active records (``pid``, ``domain_id``) of the patient of the
    record ``value`` of source domain ``domain_id``, or of the enterprise id ``value`` (``domain_id`` None).
    None unless that record and its patient exist and are active (the caller then looks closer)."""
    if domain_id is None:
        rows = conn.execute(_XREF_BY_EPID, {"value": value}).all()
    else:
        rows = conn.execute(_XREF_BY_RECORD, {"domain_id": domain_id, "value": value}).all()
    if not rows or rows[0].patient_status != "active" or rows[0].record_status != "active":
        return None
    return str(rows[0].epid), [x for x in rows if x.pid is not None]


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


# the enterprise id of a new patient inside an event payload written before the id is known (`insert_new_record`)
EPID_PLACEHOLDER = "\x00"
_EPID_JSON = json.dumps(EPID_PLACEHOLDER)


def insert_new_record(conn: Connection, *, domain_id: int, record: PatientRecord, norm: NormRecord,
                      warnings: Sequence[str], keys: Sequence[str], patient: tuple[int, str] | None, prefix: str,
                      width: int, event: str, message_id: str | None, link_score: float | None,
                      link_fields: Sequence[FieldScore], link_reason: str, by: str, event_payload: str,
                      at: float) -> tuple[int, int, str, int]:
    """Write a new source record with everything that goes with it: a new patient (``patient`` None) or the
    link to ``patient`` (id, enterprise id), history version 1, search names and blocking keys, the open
    ``auto`` link, and the ``registered`` event (``event_payload``: its JSON, `EPID_PLACEHOLDER` standing for
    a new patient's enterprise id).  (record id, patient id, enterprise id, event id).

    On PostgreSQL one statement (data-modifying CTEs: one round trip instead of seven); on SQLite the
    statements one by one."""
    data = record_to_json(record)
    norm_json = json.dumps(norm_to_json(norm), ensure_ascii=False)
    warn = json.dumps(list(warnings), ensure_ascii=False)
    fields = fields_to_json(link_fields) if link_fields else None
    if conn.dialect.name == "postgresql":
        names = norm.names
        row = conn.execute(_INSERT_NEW_PATIENT if patient is None else _INSERT_LINKED, {
            "prefix": prefix, "width": width, "pat": patient[0] if patient else None,
            "epid": patient[1] if patient else None, "domain_id": domain_id, "pid": record.pid, "data": data,
            "norm": norm_json, "warnings": warn, **_search_columns(norm), "at": at, "event": event,
            "message_id": message_id, "fam": [n.family for n in names], "giv": [n.given for n in names],
            "fh": [n.family_hanzi or None for n in names], "gh": [n.given_hanzi or None for n in names],
            "keys": list(dict.fromkeys(k[:160] for k in keys)), "score": link_score, "fields": fields,
            "reason": link_reason, "by": by, "payload": event_payload, "ph": _EPID_JSON}).one()
        return int(row.rid), int(row.pat), str(row.epid), int(row.eid)
    patient_id, epid = patient if patient is not None else insert_patient(conn, prefix, width, at)
    rid = insert_record(conn, domain_id=domain_id, record=record, norm=norm, warnings=warnings,
                        patient_id=patient_id, at=at)
    add_history(conn, rid, 1, event, data, message_id, at)
    write_index(conn, rid, norm, keys, new=True)
    conn.execute(insert(t.links).values(record_id=rid, patient_id=patient_id, kind=LinkKind.AUTO.value,
                                        score=link_score, fields=fields, reason=link_reason, created_at=at,
                                        created_by=by))
    eid = conn.execute(insert(t.events).values(
        type=EventType.REGISTERED.value, patient=epid, at=at,
        payload=event_payload.replace(_EPID_JSON, json.dumps(epid, ensure_ascii=False)))
        .returning(t.events.c.id)).scalar_one()
    return rid, patient_id, epid, int(eid)


def _insert_new_sql(patient: str) -> Any:
    return text(
        f"WITH p AS ({patient}), "
        "r AS (INSERT INTO empi_records (domain_id, pid, patient_id, status, version, data, norm, warnings, "
        " birth_date, sex, national_id, postcode, city, created_at, updated_at) "
        " SELECT :domain_id, :pid, p.id, 'active', 1, :data, :norm, :warnings, CAST(:birth_date AS text), "
        " CAST(:sex AS text), CAST(:national_id AS text), CAST(:postcode AS text), CAST(:city AS text), :at, :at "
        " FROM p RETURNING id, patient_id), "
        "h AS (INSERT INTO empi_record_history (record_id, version, event, data, message_id, at) "
        " SELECT r.id, 1, :event, :data, CAST(:message_id AS text), :at FROM r), "
        "n AS (INSERT INTO empi_names (record_id, family, given, family_hanzi, given_hanzi) "
        " SELECT r.id, x.f, x.g, x.fh, x.gh FROM r, unnest(CAST(:fam AS text[]), CAST(:giv AS text[]), "
        " CAST(:fh AS text[]), CAST(:gh AS text[])) WITH ORDINALITY AS x(f, g, fh, gh, o) ORDER BY x.o), "
        "k AS (INSERT INTO empi_block_keys (key, record_id) "
        " SELECT x.k, r.id FROM r, unnest(CAST(:keys AS text[])) WITH ORDINALITY AS x(k, o) ORDER BY x.o), "
        "l AS (INSERT INTO empi_links (record_id, patient_id, kind, score, fields, reason, created_at, created_by) "
        " SELECT r.id, r.patient_id, 'auto', CAST(:score AS double precision), CAST(:fields AS text), :reason, "
        " :at, :by FROM r), "
        "e AS (INSERT INTO empi_events (type, patient, payload, at) "
        " SELECT 'registered', p.epid, replace(:payload, :ph, to_json(p.epid)::text), :at FROM p RETURNING id) "
        "SELECT r.id AS rid, p.id AS pat, p.epid, e.id AS eid FROM r, p, e")


_INSERT_NEW_PATIENT = _insert_new_sql(
    "INSERT INTO empi_patients (id, epid, status, created_at, updated_at) "
    "SELECT id, CAST(:prefix AS text) || lpad(CAST(id AS text), greatest(:width, length(CAST(id AS text))), '0'), "
    "'active', :at, :at FROM (SELECT nextval(pg_get_serial_sequence('empi_patients', 'id')) AS id) AS s "
    "RETURNING id, epid")
_INSERT_LINKED = _insert_new_sql("SELECT CAST(:pat AS bigint) AS id, CAST(:epid AS text) AS epid")


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


def write_index(conn: Connection, record_id: int, norm: NormRecord, keys: Sequence[str], *,
                new: bool = False) -> None:
    """(Re)write the search names and blocking keys of a record (``new``: just inserted, nothing to drop)."""
    if not new:
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
    in a fixed (sorted) order by one statement, so that two feeds never deadlock.  SQLite has one writer
    already."""
    if conn.dialect.name != "postgresql" or not keys:
        return
    # the ORDER BY keeps the subquery from being flattened, so the locks are taken in ascending order
    conn.execute(text("SELECT count(pg_advisory_xact_lock(k)) FROM "
                      "(SELECT k FROM unnest(CAST(:ks AS bigint[])) AS u(k) ORDER BY k) AS s"), {"ks": _lock_ids(keys)})


def _lock_ids(keys: Sequence[str]) -> list[int]:
    return sorted({int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big", signed=True)
                   for k in keys})


def block_members(conn: Connection, keys: Sequence[str], max_block: int) -> tuple[dict[str, list[int]], list[str]]:
    """The record ids under each of ``keys`` (at most ``max_block`` each); keys whose block is larger are
    left out of the mapping and returned second, in the order given.

    On PostgreSQL one statement answers for all the keys (a lateral, limited index scan per key); SQLite,
    in-process, asks key by key.
    """
    short = {k: k[:160] for k in keys}
    wanted = list(dict.fromkeys(short.values()))
    found: dict[str, list[int]] = {}
    if conn.dialect.name == "postgresql":
        for i in range(0, len(wanted), 20000):
            rows = conn.execute(text(
                "SELECT k.key, b.record_id FROM unnest(CAST(:keys AS text[])) AS k(key) CROSS JOIN LATERAL "
                "(SELECT record_id FROM empi_block_keys WHERE key = k.key LIMIT :n) AS b"),
                {"keys": wanted[i:i + 20000], "n": max_block + 1})
            for k, rid in rows.all():
                found.setdefault(k, []).append(rid)
    else:
        for k in wanted:
            found[k] = [int(r) for r in conn.execute(select(t.block_keys.c.record_id).where(t.block_keys.c.key == k)
                                                     .limit(max_block + 1)).scalars()]
    members: dict[str, list[int]] = {}
    skipped: list[str] = []
    for k in keys:
        ids = found.get(short[k], [])
        if len(ids) > max_block:
            skipped.append(k)
        else:
            members[k] = ids
    return members, skipped


def batch_candidate_ids(conn: Connection, records: Mapping[int, NormRecord], max_block: int) -> dict[int, set[int]]:
    """For each record of a batch, the other records sharing one of its blocking keys (keys with more than
    ``max_block`` records skipped), as `candidate_ids` finds them one record at a time.

    On PostgreSQL one statement pairs them in the server from the keys stored with the batch's records (written
    from the same normalised forms, `write_index`); SQLite looks the computed keys up.
    """
    out: dict[int, set[int]] = {i: set() for i in records}
    if conn.dialect.name == "postgresql":
        ids = sorted(records)
        for i in range(0, len(ids), 20000):
            rows = conn.execute(text(
                "SELECT s.record_id, m.record_id FROM empi_block_keys AS s CROSS JOIN LATERAL "
                "(SELECT record_id, count(*) OVER () AS n FROM "
                " (SELECT record_id FROM empi_block_keys WHERE key = s.key LIMIT :n) AS b) AS m "
                "WHERE s.record_id = ANY(CAST(:ids AS bigint[])) AND m.n <= :max AND m.record_id <> s.record_id "
                "GROUP BY 1, 2"), {"ids": _int_array(ids[i:i + 20000]), "n": max_block + 1, "max": max_block})
            for a, b in rows.all():
                out[a].add(b)
        return out
    keys = {i: blocking_keys(norm) for i, norm in records.items()}
    members, _ = block_members(conn, [k for ks in keys.values() for k in ks], max_block)
    for i, ks in keys.items():
        out[i].update(r for k in ks for r in members.get(k, ()))
        out[i].discard(i)
    return out


def candidate_ids(conn: Connection, keys: Sequence[str], max_block: int) -> tuple[set[int], list[str]]:
    """Record ids sharing a key with ``keys``; keys whose block is larger than ``max_block`` are skipped and
    returned second."""
    members, skipped = block_members(conn, keys, max_block)
    out: set[int] = set()
    for ids in members.values():
        out.update(ids)
    return out, skipped


def candidate_rows(conn: Connection, keys: Sequence[str], max_block: int, max_candidates: int, *,
                   exclude: int | None = None) -> tuple[list[Row[Any]], list[str]]:
    """`match_rows` of the records sharing a key with ``keys`` (`candidate_ids`; keys holding more than
    ``max_block`` records skipped and returned second), ``exclude`` left out: the ``max_candidates`` sharing
    the most keys, then those sharing the rarest key (a resident ID or phone block before a common name and
    birth year), then the oldest; in record id order.  On PostgreSQL one statement: the limited index scan
    per key, the block sizes, the ranking and the records with their patients' enterprise ids."""
    short = {k: k[:160] for k in keys}
    if conn.dialect.name != "postgresql":
        members, skipped = block_members(conn, keys, max_block)
        shared: dict[int, int] = {}
        smallest: dict[int, int] = {}
        for ids in {short[k]: ids for k, ids in members.items()}.values():
            for rid in ids:
                if rid != exclude:
                    shared[rid] = shared.get(rid, 0) + 1
                    smallest[rid] = min(smallest.get(rid, len(ids)), len(ids))
        best = sorted(shared, key=lambda r: (-shared[r], smallest[r], r))[:max_candidates]
        return match_rows(conn, best), skipped
    rows = conn.execute(_CANDIDATES, {"keys": list(dict.fromkeys(short.values())), "n": max_block + 1,
                                      "max": max_block, "cap": max_candidates, "ex": exclude}).all()
    big = {r.skipped for r in rows if r.skipped is not None}
    return [r for r in rows if r.skipped is None], [k for k in keys if short[k] in big]


_CANDIDATES = text(
    "WITH m AS (SELECT k.key, b.record_id FROM unnest(CAST(:keys AS text[])) AS k(key) CROSS JOIN LATERAL "
    " (SELECT record_id FROM empi_block_keys WHERE key = k.key LIMIT :n) AS b), "
    "s AS (SELECT key, count(*) AS n FROM m GROUP BY key), "
    "ids AS (SELECT m.record_id FROM m JOIN s ON s.key = m.key "
    " WHERE s.n <= :max AND m.record_id IS DISTINCT FROM CAST(:ex AS bigint) "
    " GROUP BY m.record_id ORDER BY count(*) DESC, min(s.n), m.record_id LIMIT :cap) "
    "SELECT r.id, r.domain_id, r.pid, r.patient_id, r.status, r.norm, p.epid, CAST(NULL AS text) AS skipped "
    "FROM ids JOIN empi_records AS r ON r.id = ids.record_id JOIN empi_patients AS p ON p.id = r.patient_id "
    "UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, key FROM s WHERE n > :max "
    "ORDER BY 1")


def exclusions_of(conn: Connection, record_id: int) -> set[int]:
    return exclusions_of_many(conn, [record_id]).get(record_id, set())


def exclusions_of_many(conn: Connection, record_ids: Sequence[int]) -> dict[int, set[int]]:
    """The records each of ``record_ids`` has been declared different from (rejected reviews, unlinks)."""
    out: dict[int, set[int]] = {}
    c = t.exclusions.c
    for part in _chunks(conn, record_ids):
        for a, b in conn.execute(select(c.record_a, c.record_b).where(or_(_in(conn, c.record_a, part),
                                                                          _in(conn, c.record_b, part)))):
            out.setdefault(a, set()).add(b)
            out.setdefault(b, set()).add(a)
    wanted = set(record_ids)
    return {k: v for k, v in out.items() if k in wanted}


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
               reason: str, at: float, new: bool = False) -> int | None:
    """Open a review item unless one is already open for the same pair (either way round; ``new``: the record
    was just inserted, no item can name it yet)."""
    c = t.reviews.c
    dup = None if new else conn.execute(select(c.id).where(c.state == "open", or_(
        and_(c.record_id == record_id, c.candidate_id == candidate_id),
        and_(c.record_id == candidate_id, c.candidate_id == record_id)))).first()
    if dup:
        return None
    rid = conn.execute(insert(t.reviews).values(record_id=record_id, candidate_id=candidate_id, score=score,
                                                fields=fields_to_json(fields), state="open", reason=reason,
                                                created_at=at).returning(c.id)).scalar_one()
    return int(rid)


def add_reviews(conn: Connection, pairs: Sequence[tuple[int, int, float, Sequence[FieldScore]]], *, reason: str,
                at: float) -> int:
    """Open review items for (record, candidate, score, fields) pairs, skipping those already open (either way
    round) and repeats; the number opened.  The batch form of `add_review`."""
    c = t.reviews.c
    ids = sorted({i for p in pairs for i in p[:2]})
    seen: set[tuple[int, int]] = set()
    for part in _chunks(conn, ids):
        for a, b in conn.execute(select(c.record_id, c.candidate_id).where(
                c.state == "open", or_(_in(conn, c.record_id, part), _in(conn, c.candidate_id, part)))):
            seen.update(((a, b), (b, a)))
    rows = []
    for rid, cid, score, fields in pairs:
        if (rid, cid) in seen:
            continue
        seen.update(((rid, cid), (cid, rid)))
        rows.append({"record_id": rid, "candidate_id": cid, "score": score, "fields": fields_to_json(fields),
                     "state": "open", "reason": reason, "created_at": at})
    if rows:
        conn.execute(insert(t.reviews), rows)
    return len(rows)


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
    return _norm(row.norm)


@functools.lru_cache(maxsize=65536)
def _norm(raw: str) -> NormRecord:
    """The parsed normalised form, kept for the records matched most often (a pure function of the JSON;
    `NormRecord` is immutable)."""
    return norm_from_json(json.loads(raw))


def count(conn: Connection, table: Any, *where: Any) -> int:
    return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())
