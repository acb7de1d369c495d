#!/usr/bin/env python3
"""EMPI at scale on PostgreSQL (issue #4): an index of ``--size`` patients (default 1,000,000), then

* ITI-8 feed latency: ``--feeds`` new records registered one transaction each, matched against the whole index
  (the work the PIX Manager does per A01/A04 before it answers) — p50/p99;
* ITI-9 query latency: ``--queries`` cross-references of random indexed records — p50/p99;
* batch dedupe of ``--dedupe`` records (default 100,000; done first, on an index of that many records, each
  scored against its blocking candidates, review items opened).

Baseline in the same run: a bare primary-key lookup on the same table (``SELECT ... WHERE id = ?``), the floor
any query of this index pays on this machine.  Targets: feed p99 <= 20 ms, ITI-9 p99 <= 10 ms, dedupe of
100,000 <= 60 s.  The index is the synthetic Chinese population of bench/empi_quality.py (hanzi names, pinyin,
resident ID numbers, phones), loaded by the bulk loader (`bulk_load`: no matching, COPY, normalisation in
``--workers`` processes, as ``ihehub empi import --no-match`` does) into a database of its own (``--database``,
created and kept for reruns with ``--reuse``; ``--drop`` drops it at the end).

    .venv/bin/python bench/empi_scale.py --size 1000000 --database ihehub_scale       # load ~15 min on 2 busy cores
    .venv/bin/python bench/empi_scale.py --size 1000000 --database ihehub_scale --reuse --dedupe 0   # latencies
    .venv/bin/python bench/empi_scale.py --size 100000 --dedupe 20000 --drop

Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from empi_quality import chinese_dataset  # noqa: E402
from sqlalchemy import func, select, text  # noqa: E402

from ihehub.bus import schema  # noqa: E402
from ihehub.bus.db import make_engine  # noqa: E402
from ihehub.empi import Empi, EmpiConfig, EmpiError, Identifier, PatientRecord, bulk_load, dedupe  # noqa: E402
from ihehub.empi.tables import records  # noqa: E402

ADMIN = "postgresql://127.0.0.1:5432/test"


def database(name: str, *, reuse: bool) -> str:
    import psycopg

    with psycopg.connect(ADMIN, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists and not reuse:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            exists = None
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://127.0.0.1:5432/{name}"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


def people(size: int, *, seed: int, start: int) -> Iterator[PatientRecord]:
    """``size`` people of the synthetic Chinese population (domain A of bench/empi_quality.py), pids S<start>...,
    generated 100,000 at a time."""
    done = 0
    while done < size:
        n = min(100_000, size - done)
        a, _, _ = chinese_dataset(n * 2, seed=seed + start + done)  # A: n people
        for i, r in enumerate(a[:n]):
            yield dataclasses.replace(r, pid=f"S{start + done + i}")
        done += n


def load(empi: Empi, size: int, *, seed: int, workers: int) -> dict[str, Any]:
    """Fill the index to ``size`` records in domain HOSP_A (what is there already counts) with the bulk loader
    (`bulk_load`: no matching, COPY, normalisation in ``workers`` processes)."""
    have = empi.record_count()
    out: dict[str, Any] = {"records_before": have}
    if have >= size:
        return out
    t0 = time.perf_counter()
    done = [have]

    def progress(n: int) -> None:
        done[0] += n
        if (done[0] - have) % 100_000 < n or done[0] == size:
            rate = (done[0] - have) / (time.perf_counter() - t0)
            print(f"  loaded {done[0]:,} records ({rate:,.0f}/s)", file=sys.stderr, flush=True)

    report = bulk_load(empi, "HOSP_A", people(size - have, seed=seed, start=have), chunk_size=5000,
                       workers=workers, progress=progress)
    if report.errors:
        print(f"  {len(report.errors)} records refused, e.g. {report.errors[0]}", file=sys.stderr)
    out["load_seconds"] = round(time.perf_counter() - t0, 1)
    out["load_per_second"] = round((size - have) / out["load_seconds"], 1)
    t1 = time.perf_counter()
    settle(empi)
    out["vacuum_analyze_seconds"] = round(time.perf_counter() - t1, 1)
    return out


def settle(empi: Empi) -> None:
    """VACUUM ANALYZE the index after a bulk load, as a migration would (and autovacuum does later): planner
    statistics, and the visibility map that lets the blocking-key lookups be index-only scans."""
    with empi.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for table in ("empi_records", "empi_patients", "empi_block_keys", "empi_names", "empi_links"):
            conn.execute(text(f"VACUUM ANALYZE {table}"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--feeds", type=int, default=500)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dedupe", type=int, default=100_000, help="records for the batch-dedupe timing (0: skip)")
    ap.add_argument("--database", default="ihehub_bench_empi")
    ap.add_argument("--reuse", action="store_true", help="keep an index loaded by an earlier run")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="processes normalising records for the load and scoring batches of the dedupe")
    ap.add_argument("--drop", action="store_true", help="drop the database at the end")
    args = ap.parse_args()

    url = database(args.database, reuse=args.reuse)
    engine = make_engine(url)
    schema.upgrade(engine)
    empi = Empi(engine, EmpiConfig())
    empi.setup()
    for ns, oid in (("HOSP_A", "1.2.156.1.1"), ("HOSP_B", "1.2.156.1.2"), ("HOSP_DD", "1.2.156.1.3")):
        empi.add_domain(ns, universal_id=oid)
    figures: dict[str, Any] = {"size": args.size}

    # batch dedupe first, on an index of --dedupe records (dedupe scores every active record)
    if args.dedupe:
        loaded = load(empi, args.dedupe, seed=args.seed, workers=args.workers)
        figures.update({f"dedupe_{k}": v for k, v in loaded.items()})
        t0 = time.perf_counter()
        rep = dedupe(empi, batch_size=2000, workers=args.workers)
        figures["dedupe_records"] = rep.records
        figures["dedupe_seconds"] = round(time.perf_counter() - t0, 1)
        figures["dedupe_pairs"] = rep.pairs
        figures["dedupe_reviews"] = rep.reviews
    figures.update(load(empi, args.size, seed=args.seed, workers=args.workers))
    with engine.connect() as conn:
        figures["records"] = conn.execute(select(func.count()).select_from(records)).scalar_one()
        max_id = conn.execute(select(func.max(records.c.id))).scalar_one()

    rng = random.Random(args.seed)
    # ITI-8: new records of another hospital (people of a population drawn for this run, some sharing names,
    # birth dates and phones with indexed ones, so candidates are found and scored); identifiers and people
    # new to the run, so that a rerun (--reuse) registers new records rather than updates or duplicates
    run = int(time.time())
    _, b, _ = chinese_dataset(args.feeds * 2, seed=args.seed + 999_983 + run % 100_000)
    feeds = [r.__class__(**{**{f: getattr(r, f) for f in r.__dataclass_fields__}, "pid": f"F{run}-{i}"})
             for i, r in enumerate(b[:args.feeds])]
    lat: list[float] = []
    outcomes: dict[str, int] = {}
    for r in feeds:
        t0 = time.perf_counter()
        try:
            outcome = empi.register("HOSP_B", r).outcome
        except EmpiError as exc:  # the corrupted set has bad resident ids: the PIX Manager answers AE (ERR 102)
            outcome = f"error {exc.code}"
        lat.append(time.perf_counter() - t0)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    figures["feed_p50_ms"], figures["feed_p99_ms"] = round(pct(lat, 0.5), 2), round(pct(lat, 0.99), 2)
    figures["feed_outcomes"] = outcomes

    # ITI-9 against random indexed records; baseline: primary-key lookups of the same rows
    hosp_a = empi.domain("HOSP_A").id
    with engine.connect() as conn:
        ids = [rng.randint(1, max_id) for _ in range(args.queries)]
        rows = conn.execute(select(records.c.id, records.c.pid)
                            .where(records.c.id.in_(ids), records.c.domain_id == hosp_a)).all()
    qlat, blat = [], []
    with engine.connect() as conn:
        for row in rows:
            t0 = time.perf_counter()
            conn.execute(select(records).where(records.c.id == row.id)).first()
            blat.append(time.perf_counter() - t0)
    for row in rows:
        t0 = time.perf_counter()
        empi.cross_reference(Identifier(value=row.pid, domain="HOSP_A"))
        qlat.append(time.perf_counter() - t0)
    figures["iti9_p50_ms"], figures["iti9_p99_ms"] = round(pct(qlat, 0.5), 2), round(pct(qlat, 0.99), 2)
    figures["baseline_pk_p50_ms"] = round(pct(blat, 0.5), 3)
    figures["baseline_pk_p99_ms"] = round(pct(blat, 0.99), 3)
    figures["iti9_mean_ms"] = round(statistics.mean(qlat) * 1000, 2)
    engine.dispose()

    print(f"{'figure':28} {'value':>12}  target")
    print(f"{'records in index':28} {figures['records']:>12,}")
    if "load_per_second" in figures:
        print(f"{'bulk load rec/s':28} {figures['load_per_second']:>12,.0f}")
        print(f"{'bulk load seconds':28} {figures['load_seconds']:>12}")
    if args.dedupe:
        print(f"{'dedupe records':28} {figures['dedupe_records']:>12,}")
        print(f"{'dedupe seconds':28} {figures['dedupe_seconds']:>12}  <= 60 s per 100,000")
    print(f"{'ITI-8 feed p50 / p99 ms':28} {figures['feed_p50_ms']:>5} / {figures['feed_p99_ms']:<5}  p99 <= 20")
    print(f"{'ITI-9 query p50 / p99 ms':28} {figures['iti9_p50_ms']:>5} / {figures['iti9_p99_ms']:<5}  p99 <= 10")
    print(f"{'baseline PK p50 / p99 ms':28} {figures['baseline_pk_p50_ms']:>5} / {figures['baseline_pk_p99_ms']}")
    print(json.dumps({"bench": "empi_scale", **figures}, ensure_ascii=False))
    if args.drop:
        import psycopg

        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
