"""Bulk load: many new source records at once, without matching (`ihehub empi import --no-match`).

The per-record feed (`ihehub.empi.feed.register`) runs a dozen statements per record (record, history, names,
keys, patient, link, event, each a round trip): about 15 records/s on PostgreSQL when matching, a few hundred
without.  A migration of a hospital's patient list needs more.  `bulk_load` writes exactly the rows that
``register(match=False)`` writes for a new identifier — a source record (version 1), its history row, its
search names and blocking keys, a new enterprise patient holding it alone, its ``auto`` link ("new patient")
and the ``registered`` event — but:

* normalisation (pinyin, resident ID checks, blocking keys, the JSON documents) runs in ``workers`` processes,
  a chunk of records at a time, while the parent writes the previous chunk;
* each chunk is ONE transaction: the patient and record ids are drawn from their sequences in one statement
  each, then every table is written in one statement — PostgreSQL ``COPY`` through psycopg, an executemany
  on SQLite;
* nothing is matched: each new record founds its own patient.  Matching is deferred to `dedupe`
  (`ihehub empi dedupe`), which scores every record against its blocking candidates and opens review items
  for the pairs to join; a reviewer (or `accept`) links them.  Matching inside the load would have to be
  the feed's matching to give the same answers, and that is the slow part.

An identifier the domain already holds (or one repeated in the input) is fed through the per-record path
right after its chunk (an update, as ``import_records(match=False)`` does; its events follow the chunk's); a
record that fails normalisation is reported and the others go in; if the database refuses a chunk (a value
longer than its column), that chunk is fed record by record, each in a savepoint, so the bad record is named
and its neighbours still load.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import time
import typing
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, insert, select, text
from sqlalchemy.exc import DBAPIError

from ihehub.empi import feed, store
from ihehub.empi import tables as t
from ihehub.empi.batch import ImportReport, RecordError
from ihehub.empi.blocking import blocking_keys
from ihehub.empi.errors import EmpiError, InvalidData
from ihehub.empi.model import EventType, Identifier, PatientEvent, PatientRecord
from ihehub.empi.normalize import norm_to_json, normalize_feed

if TYPE_CHECKING:
    from ihehub.empi.model import HD, Domain
    from ihehub.empi.service import Empi

Progress = Callable[[int], None]

# the enterprise id of a record's new patient, unknown while a worker prepares the event payload: the JSON
# string "\u0000" stands for it (no identifier can hold a NUL: PostgreSQL text refuses it)
_EPID = "\x00"
_EPID_JSON = json.dumps(_EPID)

# (index, pid, record columns after patient_id, names, keys, event payload with _EPID) of a prepared record,
# or (index, pid, field, code, message) of one that failed normalisation
Prepared = tuple[int, str, tuple[Any, ...], list[tuple[str, str, str | None, str | None]], list[str], str]
Failed = tuple[int, str, str | None, str, str]


def _prepare(args: tuple[list[tuple[int, PatientRecord]], bool, str, str, str, float]
             ) -> tuple[list[Prepared], list[Failed]]:
    """Normalise a chunk (in a worker process): the column values of each record's rows."""
    items, strict, enterprise, domain, event, at = args
    ok: list[Prepared] = []
    bad: list[Failed] = []
    for i, rec in items:
        try:
            norm, warnings = normalize_feed(rec, strict_national_id=strict)
        except EmpiError as exc:
            bad.append((i, rec.pid, exc.field, exc.code, exc.message))
            continue
        data = store.record_to_json(rec)
        cols = (data, json.dumps(norm_to_json(norm), ensure_ascii=False),
                json.dumps(list(warnings), ensure_ascii=False), norm.birth_date, norm.sex, norm.national_id,
                norm.postcode, norm.city)
        names = [(n.family, n.given, n.family_hanzi or None, n.given_hanzi or None) for n in norm.names]
        keys = list(dict.fromkeys(k[:160] for k in blocking_keys(norm)))
        ident = Identifier(value=rec.pid, domain=domain)
        detail: dict[str, Any] = {"match": "new", "event": event}  # feed._detail of an unmatched record
        if warnings:
            detail["warnings"] = list(warnings)
        ev = PatientEvent(id=0, type=EventType.REGISTERED, patient=_EPID, at=at, record=ident,
                          identifiers=(Identifier(value=_EPID, domain=enterprise), ident), detail=detail)
        ok.append((i, rec.pid, cols, names, keys, json.dumps(ev.to_json(), ensure_ascii=False)))
    return ok, bad


def _chunks(records: Iterable[PatientRecord], size: int) -> Iterator[list[tuple[int, PatientRecord]]]:
    chunk: list[tuple[int, PatientRecord]] = []
    for i, rec in enumerate(records):
        chunk.append((i, rec))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def bulk_load(empi: Empi, domain: str | HD, records: Iterable[PatientRecord], *, chunk_size: int = 5000,
              workers: int = 1, by: str = "import", event: str = "import",
              progress: Progress | None = None) -> ImportReport:
    """Load ``records`` into ``domain`` without matching, ``chunk_size`` records per transaction, normalised in
    ``workers`` processes (1: in this one).  Outcomes: ``new`` for each record that founded its patient; the
    outcomes of the per-record path for identifiers already known (``updated``, ``unchanged``)."""
    if chunk_size < 1 or workers < 1:
        raise InvalidData(f"chunk_size {chunk_size} and workers {workers} must be at least 1", field="chunk_size")
    start = time.perf_counter()
    dom = empi._source_domain(domain)
    ctx = empi._ctx()
    static = (empi.config.strict_national_id, ctx.enterprise.namespace, dom.namespace, event)
    outcomes: dict[str, int] = {}
    errors: list[RecordError] = []
    events = 0
    total = 0

    def settle(chunk: list[tuple[int, PatientRecord]], prepared: tuple[list[Prepared], list[Failed]]) -> None:
        nonlocal events, total
        ok, bad = prepared
        total += len(chunk)
        errors.extend(RecordError(index=i, pid=pid, field=f, code=c, message=m) for i, pid, f, c, m in bad)
        recs = dict(chunk)
        try:
            written, later = empi._write(lambda conn: _write_chunk(conn, empi, dom, ok, recs, by=by, event=event))
        except DBAPIError:  # one value the database refuses: find it record by record
            written, later = 0, [(i, recs[i]) for i, *_ in ok]
        if written:
            outcomes["new"] = outcomes.get("new", 0) + written
            events += written
        if later:
            res = _one_by_one(empi, dom, later, by=by, event=event)
            for i, r in res:
                if isinstance(r, EmpiError):
                    errors.append(RecordError(index=i, pid=recs[i].pid, field=r.field, code=r.code,
                                              message=r.message))
                else:
                    outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
                    events += len(r.events)
        if progress is not None:
            progress(len(chunk))

    def job(chunk: list[tuple[int, PatientRecord]]) -> tuple[Any, ...]:
        return (chunk, *static, store.now())

    if workers == 1:
        for chunk in _chunks(records, chunk_size):
            settle(chunk, _prepare(job(chunk)))
    else:
        # spawn: the workers only normalise; they must not inherit the parent's database connections
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            window: deque[tuple[list[tuple[int, PatientRecord]], concurrent.futures.Future[Any]]] = deque()
            for chunk in _chunks(records, chunk_size):
                window.append((chunk, pool.submit(_prepare, job(chunk))))
                if len(window) > workers:
                    done, fut = window.popleft()
                    settle(done, fut.result())
            while window:
                done, fut = window.popleft()
                settle(done, fut.result())
    errors.sort(key=lambda e: e.index)
    return ImportReport(total=total, outcomes=outcomes, errors=tuple(errors), events=events,
                        seconds=round(time.perf_counter() - start, 3))


def _write_chunk(conn: Connection, empi: Empi, dom: Domain, ok: list[Prepared], recs: dict[int, PatientRecord], *,
                 by: str, event: str) -> tuple[int, list[tuple[int, PatientRecord]]]:
    """Write the new records of a chunk in one statement per table; (how many, the records for the per-record
    path: identifiers the domain holds already, or repeated in the chunk)."""
    known = _known_pids(conn, dom.id, [p[1] for p in ok])
    new: list[Prepared] = []
    later: list[tuple[int, PatientRecord]] = []
    for p in ok:
        if p[1] in known:
            later.append((p[0], recs[p[0]]))
        else:
            known.add(p[1])
            new.append(p)
    if not new:
        return 0, later
    at = store.now()
    n = len(new)
    patient_ids = _reserve(conn, "empi_patients", n)
    record_ids = _reserve(conn, "empi_records", n)
    cfg = empi.config
    epids = [f"{cfg.epid_prefix}{pid:0{cfg.epid_width}d}" for pid in patient_ids]
    patients = [(pid, epid, "active", None, at, at) for pid, epid in zip(patient_ids, epids, strict=True)]
    rows = [(rid, dom.id, p[1], pat, "active", None, 1, *p[2], at, at)
            for rid, pat, p in zip(record_ids, patient_ids, new, strict=True)]
    history = [(rid, 1, event, p[2][0], None, at) for rid, p in zip(record_ids, new, strict=True)]
    names = [(rid, *nm) for rid, p in zip(record_ids, new, strict=True) for nm in p[3]]
    keys = [(k, rid) for rid, p in zip(record_ids, new, strict=True) for k in p[4]]
    links = [(rid, pat, "auto", None, None, "new patient", at, by, None, None)
             for rid, pat in zip(record_ids, patient_ids, strict=True)]
    events = [("registered", epid, p[5].replace(_EPID_JSON, json.dumps(epid, ensure_ascii=False)), at)
              for epid, p in zip(epids, new, strict=True)]
    _put(conn, t.patients, ("id", "epid", "status", "merged_into", "created_at", "updated_at"), patients)
    _put(conn, t.records, ("id", "domain_id", "pid", "patient_id", "status", "merged_into", "version", "data", "norm",
                           "warnings", "birth_date", "sex", "national_id", "postcode", "city", "created_at",
                           "updated_at"), rows)
    _put(conn, t.history, ("record_id", "version", "event", "data", "message_id", "at"), history)
    _put(conn, t.names, ("record_id", "family", "given", "family_hanzi", "given_hanzi"), names)
    _put(conn, t.block_keys, ("key", "record_id"), keys)
    _put(conn, t.links, ("record_id", "patient_id", "kind", "score", "fields", "reason", "created_at", "created_by",
                         "closed_at", "closed_reason"), links)
    _put(conn, t.events, ("type", "patient", "payload", "at"), events)
    return n, later


def _one_by_one(empi: Empi, dom: Domain, items: Sequence[tuple[int, PatientRecord]], *, by: str,
                event: str) -> list[tuple[int, Any]]:
    """Feed ``items`` through the per-record path in one transaction, each in a savepoint."""
    ctx = empi._ctx()

    def op(conn: Connection) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        for i, rec in items:
            sp = conn.begin_nested()
            try:
                norm, warnings = normalize_feed(rec, strict_national_id=empi.config.strict_national_id)
                res = feed.register(conn, ctx, dom, rec, norm, warnings, event=event, message_id=None, by=by,
                                    match=False)
            except EmpiError as exc:
                sp.rollback()
                out.append((i, exc))
            except DBAPIError as exc:
                sp.rollback()
                out.append((i, InvalidData(f"the database refused the record: {exc.orig}", field="record")))
            else:
                sp.commit()
                out.append((i, res))
        return out

    return empi._write(op)


def _known_pids(conn: Connection, domain_id: int, pids: Sequence[str]) -> set[str]:
    c = t.records.c
    out: set[str] = set()
    if conn.dialect.name == "postgresql":
        out.update(conn.execute(text("SELECT pid FROM empi_records WHERE domain_id = :d AND pid = ANY(:p)"),
                                {"d": domain_id, "p": list(pids)}).scalars())
        return out
    for i in range(0, len(pids), 500):
        out.update(conn.execute(select(c.pid).where(c.domain_id == domain_id, c.pid.in_(pids[i:i + 500]))).scalars())
    return out


def _reserve(conn: Connection, table: str, n: int) -> list[int]:
    """``n`` new primary keys of ``table``: from its sequence on PostgreSQL (one statement), after the largest
    on SQLite (whose single writer holds the database while this transaction runs)."""
    if conn.dialect.name == "postgresql":
        return sorted(int(x) for x in conn.execute(text(
            f"SELECT nextval(pg_get_serial_sequence('{table}', 'id')) FROM generate_series(1, :n)"), {"n": n})
            .scalars())
    top = int(conn.execute(text(f"SELECT coalesce(max(id), 0) FROM {table}")).scalar_one())
    return list(range(top + 1, top + n + 1))


def _put(conn: Connection, table: Any, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    """Rows into ``table``: COPY on PostgreSQL (psycopg), one executemany on SQLite."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        raw = typing.cast(Any, conn.connection.driver_connection)  # psycopg.Connection
        statement = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
        dbapi_error = conn.dialect.loaded_dbapi.Error
        try:
            with raw.cursor() as cur, cur.copy(statement) as cp:
                for row in rows:
                    cp.write_row(row)
        except dbapi_error as exc:  # as SQLAlchemy would have wrapped it
            raise DBAPIError.instance(statement, None, exc, dbapi_error) from exc
        return
    conn.execute(insert(table), [dict(zip(columns, row, strict=True)) for row in rows])
