"""Work on many records at once: bulk import, EM training of the matcher, batch de-duplication.

* `import_records` feeds records in batches of one transaction each; every record is applied in its own
  savepoint, so a bad record is reported (index, field, HL7 code) and its neighbours still go in.
* `train` estimates the Fellegi–Sunter parameters: u from random record pairs, m and the share of matches by
  EM over records paired with their blocking candidates (`ihehub.empi.scoring.estimate`); the result is
  stored and used from then on.
* `dedupe` scores every active record against its candidates and opens review items for the pairs of
  different patients above the review threshold (the batch counterpart of the per-feed matching).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, select

from ihehub.empi import feed, store
from ihehub.empi import tables as t
from ihehub.empi.blocking import blocking_keys
from ihehub.empi.compare import compare
from ihehub.empi.context import Ctx
from ihehub.empi.errors import EmpiError
from ihehub.empi.matching import best_match, candidate
from ihehub.empi.model import FeedResult, PatientRecord
from ihehub.empi.scoring import (
    DEFAULT_PARAMETERS,
    FellegiSunter,
    FieldParams,
    FSParameters,
    Scored,
    estimate,
    u_from_random_pairs,
)

if TYPE_CHECKING:
    from ihehub.empi.model import HD
    from ihehub.empi.service import Empi

Progress = Callable[[int], None]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RecordError:
    index: int
    pid: str
    field: str | None
    code: str
    message: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ImportReport:
    total: int
    outcomes: Mapping[str, int]  # new, linked, review, updated, unchanged, ...
    errors: tuple[RecordError, ...]
    events: int
    seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainReport:
    params: FSParameters
    records: int
    pairs: int
    seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DedupeReport:
    records: int
    pairs: int  # candidate pairs scored
    reviews: int  # review items opened
    seconds: float


def _error(i: int, pid: str, exc: EmpiError) -> RecordError:
    return RecordError(index=i, pid=pid, field=exc.field, code=exc.code, message=exc.message)


def import_records(empi: Empi, domain: str | HD, records: Iterable[PatientRecord], *, batch_size: int = 500,
                   match: bool = True, by: str = "import", event: str = "import",
                   progress: Progress | None = None) -> ImportReport:
    """Feed ``records`` into ``domain``, ``batch_size`` records per transaction, each in a savepoint.

    On PostgreSQL a batch also stops at a lock budget: every savepoint and every blocking-key advisory lock
    (`store.lock_keys`, taken when matching) holds an entry of the server's shared lock table
    (max_locks_per_transaction x max_connections), and a batch that overflows it fails with "out of shared
    memory".  A batch uses at most a quarter of the table.
    """
    start = time.perf_counter()
    dom = empi._source_domain(domain)
    outcomes: dict[str, int] = {}
    errors: list[RecordError] = []
    events = 0
    total = 0
    chunk: list[tuple[int, PatientRecord, Any, tuple[str, ...]]] = []
    budget = _lock_budget(empi)
    cost = 0

    def flush() -> None:
        nonlocal events, cost
        cost = 0
        if not chunk:
            return
        ctx = empi._ctx()
        items = list(chunk)

        def op(conn: Connection) -> list[tuple[int, FeedResult | EmpiError]]:
            out: list[tuple[int, FeedResult | EmpiError]] = []
            for i, rec, norm, warnings in items:
                sp = conn.begin_nested()
                try:
                    res = feed.register(conn, ctx, dom, rec, norm, warnings, event=event, message_id=None, by=by,
                                        match=match)
                except EmpiError as exc:
                    sp.rollback()
                    out.append((i, exc))
                else:
                    sp.commit()
                    out.append((i, res))
            return out

        pids = {i: rec.pid for i, rec, _, _ in items}
        for i, res in empi._write(op):
            if isinstance(res, EmpiError):
                errors.append(_error(i, pids[i], res))
            else:
                outcomes[res.outcome] = outcomes.get(res.outcome, 0) + 1
                events += len(res.events)
        if progress is not None:
            progress(len(items))
        chunk.clear()

    for i, rec in enumerate(records):
        total += 1
        try:
            norm, warnings = empi._normalize(rec)
        except EmpiError as exc:
            errors.append(_error(i, rec.pid, exc))
            if progress is not None:
                progress(1)
            continue
        chunk.append((i, rec, norm, warnings))
        cost += 1 + (len(blocking_keys(norm)) if match and budget is not None else 0)
        if len(chunk) >= batch_size or (budget is not None and cost >= budget):
            flush()
    flush()
    return ImportReport(total=total, outcomes=outcomes, errors=tuple(errors), events=events,
                        seconds=round(time.perf_counter() - start, 3))


def _lock_budget(empi: Empi) -> int | None:
    """A quarter of PostgreSQL's shared lock table (None on SQLite, which has no such limit)."""
    if empi.engine.dialect.name != "postgresql":
        return None
    with empi.engine.connect() as conn:
        per_tx = int(conn.exec_driver_sql("SHOW max_locks_per_transaction").scalar_one())
        conns = int(conn.exec_driver_sql("SHOW max_connections").scalar_one())
    return max(50, per_tx * conns // 4)


def sample_levels(empi: Empi, *, sample: int, seed: int = 0,
                  max_pairs: int = 500_000) -> tuple[list[tuple[int, ...]], int]:
    """Comparison vectors of up to ``sample`` random records with each of their blocking candidates."""
    ctx = empi._ctx()

    def fn(conn: Connection) -> tuple[list[tuple[int, ...]], int]:
        ids = conn.execute(select(t.records.c.id).where(t.records.c.status == "active")).scalars().all()
        rng = random.Random(seed)
        chosen = rng.sample(list(ids), min(sample, len(ids)))
        seen: set[tuple[int, int]] = set()
        levels: list[tuple[int, ...]] = []
        for row in store.records_by_ids(conn, chosen):
            norm = store.norm_of(row)
            cids, _ = store.candidate_ids(conn, blocking_keys(norm), ctx.config.max_block)
            cids.discard(row.id)
            for cand in store.records_by_ids(conn, sorted(cids)):
                pair = (min(row.id, cand.id), max(row.id, cand.id))
                if cand.status != "active" or pair in seen:
                    continue
                seen.add(pair)
                levels.append(compare(norm, store.norm_of(cand)).levels)
                if len(levels) >= max_pairs:
                    return levels, len(chosen)
        return levels, len(chosen)

    return empi._read(fn)


def random_levels(empi: Empi, *, pairs: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Comparison vectors of ``pairs`` random pairs of active records (for u)."""

    def fn(conn: Connection) -> list[tuple[int, ...]]:
        ids = list(conn.execute(select(t.records.c.id).where(t.records.c.status == "active")).scalars().all())
        if len(ids) < 2:
            return []
        rng = random.Random(seed + 1)
        chosen = [tuple(rng.sample(ids, 2)) for _ in range(pairs)]
        norms = {r.id: store.norm_of(r) for r in store.records_by_ids(conn, {i for p in chosen for i in p})}
        return [compare(norms[a], norms[b]).levels for a, b in chosen]

    return empi._read(fn)


def train(empi: Empi, *, sample: int = 5000, random_pairs: int = 20000, seed: int = 0,
          save: bool = True) -> TrainReport:
    """Estimate the Fellegi–Sunter parameters from the index and (``save``) use them from now on.

    m and the prior come from EM over the comparison vectors of blocked candidate pairs, with u estimated
    there too; u comes from random record pairs.  The two u differ on purpose.  Blocked pairs share a
    blocking key, so among them strangers agree on names, birth years and (relatives) phones far more often
    than in the population: EM needs that u to tell matches from relatives, or it puts most blocked pairs
    in the match class and learns m from strangers (seen on the synthetic Chinese 100,000-record set: prior
    0.91 for a true 0.03, precision 0.87).  Scoring, though, weighs agreement against the population, whose u
    the random pairs give (the thresholds are in those bits); with the blocked-pair u, agreement on a name
    is worth little and recall drops (0.82 on the same sample).  Hence m and prior from the first, u from
    the second, as Splink does."""
    start = time.perf_counter()
    levels, n = sample_levels(empi, sample=sample, seed=seed)
    if not levels:
        raise EmpiError("no candidate pairs to train on: the index holds no records sharing a blocking key",
                        field="sample")
    prof = empi.profile
    init = prof.params if isinstance(prof, FellegiSunter) else DEFAULT_PARAMETERS
    u = u_from_random_pairs(random_levels(empi, pairs=random_pairs, seed=seed), init)
    fitted = estimate(levels, init)
    params = dataclasses.replace(fitted, fields=MappingProxyType(
        {f: FieldParams(m=p.m, u=tuple(u.get(f, p.u))) for f, p in fitted.fields.items()}))
    if save:
        empi.save_parameters(params, pairs=len(levels))
    return TrainReport(params=params, records=n, pairs=len(levels), seconds=round(time.perf_counter() - start, 3))


def dedupe(empi: Empi, *, batch_size: int = 500, by: str = "dedupe", progress: Progress | None = None,
           workers: int = 1) -> DedupeReport:
    """Open review items for every pair of different patients scoring at least the review threshold.

    Each pair is opened once, from its lower record id, with that record's best-scoring record of the other
    patient (the decision the per-feed matcher takes).  A batch of records is read in a few statements (its
    records, their candidate pairs, their exclusions, the candidates' records: `store.batch_candidate_ids`),
    then scored in memory; a candidate patient whose records all precede the record is counted but not
    scored, since the pair was looked at from the other side.  With ``workers`` > 1 the batches are read and
    scored in that many processes (each with its own connection) and this one writes the review items, batch
    after batch in order: the same items as one process opens, since scoring reads no review item.
    """
    if workers < 1:
        raise EmpiError(f"workers {workers} must be at least 1", field="workers")
    start = time.perf_counter()
    ctx = empi._ctx()
    records, pairs, opened = 0, 0, 0
    reason = f"batch de-duplication by {by}"

    def batches() -> Iterator[list[int]]:
        after = 0
        while ids := empi.active_record_ids(after=after, limit=batch_size):
            after = ids[-1]
            yield ids

    def settle(ids: list[int], found: list[tuple[int, int, Scored]], scored: int) -> None:
        nonlocal records, pairs, opened

        def op(conn: Connection) -> int:
            return store.add_reviews(conn, [(rid, cid, s.score, s.fields) for rid, cid, s in found], reason=reason,
                                     at=store.now())

        records += len(ids)
        pairs += scored
        opened += empi._write(op) if found else 0
        if progress is not None:
            progress(len(ids))

    if workers == 1:
        for ids in batches():
            def fn(conn: Connection, ids: list[int] = ids) -> tuple[list[tuple[int, int, Scored]], int]:
                return _dedupe_batch(conn, ctx, ids)

            settle(ids, *empi._read(fn))
    else:
        url = empi.engine.url.render_as_string(hide_password=False)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_worker_init, initargs=(url, empi.config)) as pool:
            window: collections.deque[tuple[list[int], concurrent.futures.Future[Any]]] = collections.deque()
            for ids in batches():
                window.append((ids, pool.submit(_worker_batch, ids)))
                if len(window) > workers:
                    done, fut = window.popleft()
                    settle(done, *fut.result())
            while window:
                done, fut = window.popleft()
                settle(done, *fut.result())
    return DedupeReport(records=records, pairs=pairs, reviews=opened, seconds=round(time.perf_counter() - start, 3))


_WORKER: dict[str, Any] = {}


def _worker_init(url: str, config: Any) -> None:
    """A dedupe worker process: its own engine and EMPI (domains and trained parameters read as the parent's)."""
    from ihehub.bus.db import make_engine
    from ihehub.empi.service import Empi

    empi = Empi(make_engine(url), config)
    empi.setup()
    _WORKER["empi"] = empi


def _worker_batch(ids: list[int]) -> tuple[list[tuple[int, int, Scored]], int]:
    empi = _WORKER["empi"]
    ctx = empi._ctx()
    result: tuple[list[tuple[int, int, Scored]], int] = empi._read(lambda conn: _dedupe_batch(conn, ctx, ids))
    return result


def _dedupe_batch(conn: Connection, ctx: Ctx, ids: list[int]) -> tuple[list[tuple[int, int, Scored]], int]:
    """(record, candidate, score) of the pairs of a batch to review, and the number of candidate patients."""
    rows = store.match_rows(conn, ids)
    cand_ids = store.batch_candidate_ids(conn, {r.id: store.norm_of(r) for r in rows}, ctx.config.max_block)
    excluded = store.exclusions_of_many(conn, [r.id for r in rows])
    by_id = {r.id: r for r in rows}
    by_id.update((r.id, r) for r in store.match_rows(conn, set().union(*cand_ids.values()) - by_id.keys()))
    found: list[tuple[int, int, Scored]] = []
    scored = 0
    review = ctx.profile.review_threshold
    for row in rows:
        # `matching.by_patient`, on ids sorted once: active candidates grouped by patient in id order, the
        # patients holding a record declared different from this one left out
        ex = excluded.get(row.id)
        groups: dict[int, list[Any]] = {}
        blocked: set[int] = set()
        for i in sorted(cand_ids[row.id]):
            cand = by_id.get(i)
            if cand is None or cand.status != "active":
                continue
            if ex and i in ex:
                blocked.add(cand.patient_id)
            groups.setdefault(cand.patient_id, []).append(cand)
        for patient_id in blocked:
            del groups[patient_id]
        scored += len(groups)
        norm = store.norm_of(row)
        for patient_id, group in groups.items():
            if patient_id == row.patient_id or group[-1].id < row.id:
                continue
            best, cmp, other, score = best_match(ctx, norm, group)
            if score >= review and best.id > row.id:  # decision review or link
                found.append((row.id, best.id, candidate(ctx, norm, best, cmp, other).scored))
    return found, scored
