"""The bulk loader (`bulk_load`, `ihehub empi import --no-match`) writes the rows the per-record feed writes
without matching — same records, history, names, blocking keys, patients, links and events — on SQLite and
PostgreSQL, in process and with worker processes; known identifiers go through the feed's update."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from ihehub.empi import Empi, Identifier, PatientRecord, PersonName, bulk_load, dedupe, import_records
from ihehub.empi import tables as t
from tests.empi.conftest import _build, make_ric, person
from tests.empi.test_batch import corrupt, population

TIMES = {"created_at", "updated_at", "at"}


def _input() -> list[PatientRecord]:
    recs = population(150)
    recs += [corrupt(r, i) for i, r in enumerate(recs[:30])]  # people twice: still one patient each (no match)
    recs.append(person("W1", "O'Neil-Smith", "Mary Ann", birth="1961-02-03", sex="female",
                       phones=("+86 139 0000 1111",)))
    recs.append(PatientRecord(pid="W2", names=(PersonName(family="张", given="三"),
                                               PersonName(family="ZHANG", given="SAN")),
                              birth_date="19800101", sex="M",
                              national_id=make_ric("19800202"), extra={"note": "tab\tand\nnewline \\ back"}))
    recs.append(person("BAD", "李四", birth="19801340"))  # refused by normalisation: reported
    recs.append(person("P7", "王五", birth="19700707"))  # repeated in the input: the feed's update
    recs.append(person("OLD", "赵六", birth="19600606", sex="F"))  # known before the load: an update
    return recs


def _dump(empi: Empi) -> dict[str, Any]:
    """Every EMPI table, without surrogate ids of child rows and without times (rows sorted)."""
    out: dict[str, Any] = {}
    with empi.engine.connect() as conn:
        for table, drop in ((t.patients, set()), (t.records, set()), (t.history, {"id"}), (t.names, {"id"}),
                            (t.block_keys, set()), (t.links, {"id"}), (t.events, {"id"}), (t.reviews, {"id"})):
            rows = []
            for r in conn.execute(select(table)).mappings():
                d = {k: v for k, v in r.items() if k not in drop and k not in TIMES}
                if table is t.events:
                    payload = json.loads(d["payload"])
                    payload.pop("at")
                    d["payload"] = payload
                rows.append(json.dumps(d, sort_keys=True, ensure_ascii=False, default=str))
            out[table.name] = sorted(rows)
    return out


def _load(url: str, how: str) -> tuple[dict[str, Any], Any]:
    empi, writer = _build(url, None, how == "bulk-writer")
    try:
        empi.register("HOSP_A", person("OLD", "赵六", birth="19600606", sex="M"))
        recs = _input()
        if how == "feed":
            report = import_records(empi, "HOSP_A", recs, batch_size=40, match=False)
        else:
            seen: list[int] = []
            report = bulk_load(empi, "HOSP_A", recs, chunk_size=64, workers=2 if how == "bulk-2" else 1,
                               progress=seen.append)
            assert sum(seen) == len(recs)
        return _dump(empi), report
    finally:
        if writer is not None:
            writer.close()
        empi.engine.dispose()


def _check(reference: tuple[dict[str, Any], Any], other: tuple[dict[str, Any], Any]) -> None:
    (want, rep_a), (got, rep_b) = reference, other
    assert rep_b.total == rep_a.total == 185
    assert dict(rep_b.outcomes) == dict(rep_a.outcomes) == {"new": 182, "updated": 2}
    assert [(e.index, e.pid, e.field, e.code) for e in rep_b.errors] == [(182, "BAD", "birth_date", "102")]
    assert rep_b.events == rep_a.events == 184
    for table in want:
        assert got[table] == want[table], table
    assert len(want["empi_records"]) == 183 and len(want["empi_patients"]) == 183


def test_bulk_load_writes_what_the_feed_writes_on_sqlite(tmp_path: Path) -> None:
    feed = _load(f"sqlite:///{tmp_path}/feed.sqlite", "feed")
    _check(feed, _load(f"sqlite:///{tmp_path}/bulk.sqlite", "bulk-writer"))
    _check(feed, _load(f"sqlite:///{tmp_path}/bulk2.sqlite", "bulk-2"))


@pytest.mark.scaleout
def test_bulk_load_writes_what_the_feed_writes_on_postgresql(pg_database: tuple[str, str], tmp_path: Path) -> None:
    """... and the feed's one-statement insert on PostgreSQL writes what its statements write on SQLite."""
    import psycopg

    from tests.conftest import PG_ADMIN_URL

    admin = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = pg_database[0] + "_feed"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        feed = _load(pg_database[1].rsplit("/", 1)[0] + "/" + name, "feed")
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _check(_load(f"sqlite:///{tmp_path}/feed.sqlite", "feed"), feed)
    _check(feed, _load(pg_database[1], "bulk"))
    # a value the database refuses (a pinyin name longer than its column) fails its chunk's COPY: the chunk
    # is fed record by record and that record is named; its neighbours load
    empi, _ = _build(pg_database[1], None, False)
    try:
        recs = population(10, seed=9)
        recs[4] = person("LONG", "王" * 100, "伟")
        report = bulk_load(empi, "HOSP_C", recs)
        assert report.outcomes == {"new": 9}
        assert [(e.pid, e.field) for e in report.errors] == [("LONG", "record")]
        assert "value too long" in report.errors[0].message
    finally:
        empi.engine.dispose()


def test_bulk_loaded_records_are_matched_by_dedupe_and_refused_values_are_named(tmp_path: Path) -> None:
    empi, _ = _build(f"sqlite:///{tmp_path}/e.sqlite", None, False)
    try:
        base = population(60)
        bulk_load(empi, "HOSP_A", base)
        report = bulk_load(empi, "HOSP_B", [corrupt(r, i) for i, r in enumerate(base[:30])], chunk_size=7)
        assert report.outcomes == {"new": 30} and not report.errors
        assert dedupe(empi).reviews >= 20  # the duplicates the load did not match are queued for review
        x = empi.cross_reference(Identifier(value="QP1", domain="HOSP_B"))
        assert x.patient.startswith("E") and x.identifiers == (Identifier(value=x.patient, domain="IHEHUB"),)
        with pytest.raises(Exception, match="chunk_size"):
            bulk_load(empi, "HOSP_A", base, chunk_size=0)
    finally:
        empi.engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def test_a_feed_compares_the_candidates_sharing_most_then_rarest_keys(backend: str, tmp_path: Path,
                                                                      request: pytest.FixtureRequest) -> None:
    """``max_candidates`` bounds the comparisons of one feed: the records sharing two keys first, then the one
    sharing the rarest key (a resident ID), then the oldest of a common block; the same on both databases."""
    from ihehub.empi import EmpiConfig

    url = (f"sqlite:///{tmp_path}/c.sqlite" if backend == "sqlite" else request.getfixturevalue("pg_database")[1])
    empi, _ = _build(url, EmpiConfig(max_candidates=3), False)
    try:
        nid = make_ric("19800101", "123")
        for i in range(5):  # strangers sharing one key (birth date + initial W) with the fed record
            empi.register("HOSP_A", person(f"S{i}", "吴强", birth="19800101", sex="F"))
        empi.register("HOSP_A", person("TWO", "吴军", birth="19800101", sex="F", phones=("13912345678",)))
        empi.register("HOSP_A", person("NID", "李四", birth=None, sex="M", national_id=nid))
        empi.register("HOSP_B", person("T", "王伟", birth="19800101", sex="M", phones=("13912345678",),
                                       national_id=nid))
        got = {m.record.value for m in empi.candidates(Identifier(value="T", domain="HOSP_B"))}
        assert got == {"TWO", "NID", "S0"}
        wide = Empi(empi.engine, EmpiConfig(max_candidates=50))
        assert len(wide.candidates(Identifier(value="T", domain="HOSP_B"))) == 7
    finally:
        empi.engine.dispose()


def test_dedupe_in_worker_processes_opens_the_same_review_items(tmp_path: Path) -> None:
    queues = []
    for workers in (1, 2):
        empi, _ = _build(f"sqlite:///{tmp_path}/w{workers}.sqlite", None, False)
        try:
            base = population(120)
            bulk_load(empi, "HOSP_A", base)
            bulk_load(empi, "HOSP_B", [corrupt(r, i) for i, r in enumerate(base[:60])])
            seen: list[int] = []
            report = dedupe(empi, batch_size=25, workers=workers, progress=seen.append)
            assert report.records == sum(seen) == 180 and report.reviews >= 40
            queues.append(sorted((q.record.value, q.candidate.value, q.score, q.fields)
                                 for q in empi.review_queue(limit=1000)))
        finally:
            empi.engine.dispose()
    assert queues[0] == queues[1]
