#!/usr/bin/env python3
"""ATNA search benchmark: N audit records bulk-loaded into PostgreSQL (COPY), then searches timed one by
one (p50 / p99 / max per kind):

* ``iti81``: ITI-81 ``GET /fhir/AuditEvent`` searches, built from their query strings by
  `ihehub.atna.fhir.parse_search` exactly as the route does, and run by `AuditStore.search` (newest
  event first, 50 a page): date only (hour, day, month), date + patient.identifier (month, year),
  date + agent (day, month, year), date + entity-id (month), date + outcome (day, month), date + type
  (day, month), date + subtype (day), and paging: pages 2 to 5 of a month, following the next link's
  ``_cursor`` (``--count`` a page).  Target (issue #5): p99 <= 100 ms over 10 million records.
* ``api``: the searches of ``/api/audit`` (newest received first) by patient, user, event id, event
  id + day, hour, day, patient + day, user + day and failures (``--kinds all``).

The records are synthetic but shaped like real ones: received in order over ``--days`` days, 1 million
patients (a patient has ~N/1M records), 2,000 users, 8 EventIDs, 2 search-index rows each (patient,
user).  Raw bytes are a short placeholder and the hash chain is not computed (`verify` is not the
subject here; bench/atna_ingest.py measures it).  Secondary indexes are dropped during the load and
built afterwards, then VACUUM (ANALYZE).  The data goes to its own database (``--database``, re-created; kept
with ``--keep`` to query it again with ``--no-load``).  Prints a table, then one JSON line.

    .venv/bin/python bench/atna_search.py [--records 10000000] [--queries 200] [--url postgresql://127.0.0.1:5432/test]
        [--database atna_search_bench] [--keep | --no-load] [--kinds iti81|api|all] [--count 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVENTS = (("110112", "ITI-9"), ("110110", "ITI-8"), ("110112", "ITI-18"), ("110106", "ITI-43"),
          ("110104", "DICOM-STORE"), ("110114", "LOGIN"), ("110113", "SECURITY-ALERT"), ("110100", "APP-START"))
PATIENTS = 1_000_000
USERS = 2_000
T0 = 1_767_225_600.0  # 2026-01-01


def patient(i: int) -> str:
    return f"MRN{i:07d}^^^HOSP-A&1.2.156.1&ISO"


def user(i: int) -> str:
    return f"APP{i:04d}|HOSP-A"


def load(engine: Any, n: int, days: float, seed: int) -> dict[str, float]:
    """COPY n records and their audit_ids rows; returns timings."""
    from sqlalchemy import text

    from ihehub.atna.tables import audit_chain, audit_ids, audit_records

    rnd = random.Random(seed)
    secondary = [ix for t in (audit_records, audit_ids) for ix in t.indexes]
    with engine.begin() as conn:
        for ix in secondary:
            conn.execute(text(f"DROP INDEX IF EXISTS {ix.name}"))
        # the index rows' primary key too: 2N rows in random key order (built once afterwards: 10M records,
        # index rows 780 s -> ~3 min)
        conn.execute(text("ALTER TABLE audit_ids DROP CONSTRAINT pk_audit_ids"))
    cols = ("seq", "received_at", "transport", "peer", "syslog_host", "syslog_app", "syslog_msgid", "event_id",
            "event_type", "action", "outcome", "event_time", "source_id", "ids", "valid", "body_at", "size", "raw",
            "hash")
    raw = b"<85>1 2026-01-01T00:00:00Z his-gw ihehub 1 IHE+RFC-3881 - <AuditMessage/>"
    step = days * 86400.0 / n
    t_start = time.perf_counter()
    raw_conn = engine.raw_connection()
    try:
        cur = raw_conn.cursor()
        with cur.copy(f"COPY audit_records ({','.join(cols)}) FROM STDIN") as rec_copy:
            for seq in range(1, n + 1):
                p, u = patient(rnd.randrange(PATIENTS)), user(rnd.randrange(USERS))
                ev, tx = EVENTS[seq % len(EVENTS)]
                at = T0 + seq * step
                ids = json.dumps([["patient", p], ["user", u]], separators=(",", ":"))
                rec_copy.write_row((seq, at + 0.5, "tls", "10.1.2.4:40000", "his-gw", "ihehub", "IHE+RFC-3881", ev,
                                    tx, "E", 0 if seq % 50 else 4, at, "node-1", ids, True, 37, len(raw), raw,
                                    f"{seq:064x}"))
        t_records = time.perf_counter()
        rnd = random.Random(seed)  # the same patients and users again
        with cur.copy("COPY audit_ids (kind, value, seq, event_time) FROM STDIN") as id_copy:
            for seq in range(1, n + 1):
                at = T0 + seq * step
                id_copy.write_row(("patient", patient(rnd.randrange(PATIENTS)), seq, at))
                id_copy.write_row(("user", user(rnd.randrange(USERS)), seq, at))
        raw_conn.commit()
    finally:
        raw_conn.close()
    t_ids = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL maintenance_work_mem = '512MB'"))
        conn.execute(text("ALTER TABLE audit_ids ADD CONSTRAINT pk_audit_ids PRIMARY KEY (kind, value, seq)"))
        for ix in secondary:
            ix.create(conn)
        conn.execute(audit_chain.delete())
        conn.execute(audit_chain.insert().values(name="main", last_seq=n, last_hash=f"{n:064x}", pruned_seq=0,
                                                 pruned_hash="0" * 64, pruned_at=None, updated_at=time.time()))
    t_index = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # VACUUM as autovacuum does on a live repository (sets the visibility map: index-only scans)
        conn.execute(text("VACUUM (ANALYZE) audit_records"))
        conn.execute(text("VACUUM (ANALYZE) audit_ids"))
    return {"copy_records_s": round(t_records - t_start, 1), "copy_ids_s": round(t_ids - t_records, 1),
            "index_s": round(t_index - t_ids, 1), "analyze_s": round(time.perf_counter() - t_index, 1)}


def measure(store: Any, make: Callable[[random.Random], Any], queries: int, rnd: random.Random) -> dict[str, float]:
    times, found = [], 0
    for _ in range(queries):
        q = make(rnd)
        t = time.perf_counter()
        page = store.search(q)
        times.append((time.perf_counter() - t) * 1000)
        found += len(page.records)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2), "p99_ms": round(times[min(len(times) - 1,
                                                                                       int(len(times) * 0.99))], 2),
            "max_ms": round(times[-1], 2), "avg_hits": round(found / queries, 1)}


def _as_route(make: Callable[[random.Random], Any]) -> Callable[[random.Random], Any]:
    """The queries ``GET /api/audit`` runs for ``make``'s: by event time when they have a time range."""
    def route(r: random.Random) -> Any:
        q = make(r)
        return dataclasses.replace(q, by_time=q.since is not None or q.until is not None)
    return route


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--days", type=float, default=365.0, help="the records' event times span this many days")
    ap.add_argument("--queries", type=int, default=200, help="searches per kind")
    ap.add_argument("--url", default="postgresql://127.0.0.1:5432/test", help="a server (its database is only "
                    "used to create --database)")
    ap.add_argument("--database", default="atna_search_bench")
    ap.add_argument("--no-load", action="store_true", help="query what an earlier --keep run left")
    ap.add_argument("--keep", action="store_true", help="keep the database")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--kinds", choices=("iti81", "api", "all"), default="iti81")
    ap.add_argument("--count", type=int, default=50, help="ITI-81 _count (page size)")
    args = ap.parse_args()

    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from ihehub.atna import AuditQuery, AuditStore
    from ihehub.bus import schema
    from ihehub.bus.db import Writer, make_engine

    admin = make_engine(args.url)
    if not args.no_load:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{args.database}"'))
    url = make_url(args.url).set(database=args.database).render_as_string(hide_password=False)
    engine = make_engine(url)
    res: dict[str, Any] = {"records": args.records, "queries_per_kind": args.queries}
    if not args.no_load:
        schema.upgrade(engine)
        res.update(load(engine, args.records, args.days, args.seed))
    store = AuditStore(engine, Writer(engine))
    n, span = args.records, args.days * 86400.0
    hour, day = 3600.0, 86400.0

    def window(rnd: random.Random, width: float) -> tuple[float, float]:
        start = T0 + rnd.uniform(0, span - width)
        return start, start + width

    api_kinds: dict[str, Callable[[random.Random], AuditQuery]] = {
        "patient": lambda r: AuditQuery(patient=patient(r.randrange(PATIENTS))),
        "patient_id_only": lambda r: AuditQuery(patient=f"MRN{r.randrange(PATIENTS):07d}"),
        "user": lambda r: AuditQuery(user=user(r.randrange(USERS))),
        "event_id": lambda r: AuditQuery(event_id=r.choice(EVENTS)[0]),
        "event_id_day": lambda r: AuditQuery(event_id=r.choice(EVENTS)[0], **dict(zip(
            ("since", "until"), window(r, day), strict=True))),
        "time_hour": lambda r: AuditQuery(**dict(zip(("since", "until"), window(r, hour), strict=True))),
        "time_day": lambda r: AuditQuery(**dict(zip(("since", "until"), window(r, day), strict=True))),
        "patient_day": lambda r: AuditQuery(patient=patient(r.randrange(PATIENTS)), **dict(zip(
            ("since", "until"), window(r, day), strict=True))),
        "user_day": lambda r: AuditQuery(user=user(r.randrange(USERS)), **dict(zip(
            ("since", "until"), window(r, day), strict=True))),
        "failures": lambda r: AuditQuery(outcome=[4, 8, 12]),
    }

    from ihehub.atna.fhir import next_cursor, parse_search

    def fhir_date(t: float) -> str:
        return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def iti81(width: float, name: str | None = None,
              value: Callable[[random.Random], str] | None = None) -> Callable[[random.Random], AuditQuery]:
        def make(r: random.Random) -> AuditQuery:
            since, until = window(r, width)
            items = [("date", f"ge{fhir_date(since)}"), ("date", f"lt{fhir_date(until)}"),
                     ("_count", str(args.count))]
            if name is not None and value is not None:
                items.append((name, value(r)))
            return parse_search(items).query
        return make

    def escaped_user(r: random.Random) -> str:
        return user(r.randrange(USERS)).replace("|", "\\|")  # a FHIR token: the pipe in the value escaped

    def page_after(first: Callable[[random.Random], AuditQuery], pages: int) -> Callable[[random.Random], AuditQuery]:
        """The query of page ``pages + 1``, reached through the next links (earlier pages not timed)."""
        def make(r: random.Random) -> AuditQuery:
            q = first(r)
            for _ in range(pages):
                cursor = next_cursor(store.search(q))
                if cursor is None:
                    break
                t, _, seq = cursor.partition(":")
                q = dataclasses.replace(q, before=int(seq), before_time=float(t))
            return q
        return make

    def pid(r: random.Random) -> str:
        return f"urn:oid:1.2.156.1|MRN{r.randrange(PATIENTS):07d}"

    month, year = 30 * day, 365 * day - day
    iti81_kinds: dict[str, Callable[[random.Random], AuditQuery]] = {
        "date_hour": iti81(hour),
        "date_day": iti81(day),
        "date_month": iti81(month),
        "date_patient_month": iti81(month, "patient.identifier", pid),
        "date_patient_year": iti81(year, "patient.identifier", pid),
        "date_agent_day": iti81(day, "agent.identifier", escaped_user),
        "date_agent_month": iti81(month, "agent.identifier", escaped_user),
        "date_agent_year": iti81(year, "agent.identifier", escaped_user),
        "date_entity_month": iti81(month, "entity-id", lambda r: patient(r.randrange(PATIENTS))),
        "date_outcome_day": iti81(day, "outcome", lambda r: "4"),
        "date_outcome_month": iti81(month, "outcome", lambda r: "4"),
        "date_type_day": iti81(day, "type", lambda r: r.choice(EVENTS)[0]),
        "date_type_month": iti81(month, "type", lambda r: r.choice(EVENTS)[0]),
        "date_subtype_day": iti81(day, "subtype", lambda r: r.choice(EVENTS)[1]),
        "date_month_page5": page_after(iti81(month), 4),
    }
    # /api/audit: a search with a time range is by event time, as the route does it
    api_kinds = {name: _as_route(make) for name, make in api_kinds.items()}
    kinds = {"iti81": iti81_kinds, "api": api_kinds, "all": {**iti81_kinds, **api_kinds}}[args.kinds]
    rnd = random.Random(args.seed + 1)
    for q in (api_kinds["event_id"](rnd), api_kinds["user"](rnd)):  # warm the cache a little
        store.search(q)
    worst = 0.0
    for name, make in kinds.items():
        r = measure(store, make, args.queries, rnd)
        res[name] = r
        if name in iti81_kinds:
            worst = max(worst, r["p99_ms"])
    res["worst_iti81_p99_ms"] = worst
    res["target_met"] = worst <= 100.0 and n >= 10_000_000 and args.kinds != "api"
    engine.dispose()
    if not args.keep:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)'))
    admin.dispose()
    print(f"ATNA search over {n:,} records (PostgreSQL), {args.queries} searches per kind, "
          f"{args.count} per ITI-81 page, 50 per /api/audit page")
    print(f"{'':20}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'hits':>8}")
    for name in kinds:
        r = res[name]
        print(f"{name:20}{r['p50_ms']:>10}{r['p99_ms']:>10}{r['max_ms']:>10}{r['avg_hits']:>8}")
    print(f"ITI-81 target p99 <= 100 ms over 10M records: {'met' if res['target_met'] else 'NOT met'} "
          f"(worst ITI-81 p99 {worst} ms)")
    print(json.dumps({"bench": "atna_search", **res}))


if __name__ == "__main__":
    main()
