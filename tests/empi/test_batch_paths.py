"""Batch de-duplication gives the same review items on PostgreSQL (candidate pairs found in one statement per
batch, from the stored blocking keys) as on SQLite (keys computed and looked up one by one), and as the
per-record matcher: same pairs, scores and explanations; exclusions are respected by both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ihehub.empi import Empi, Identifier, dedupe, import_records
from tests.empi.conftest import _build
from tests.empi.test_batch import corrupt, population


def _queue(empi: Empi) -> list[tuple[Any, ...]]:
    return sorted((q.record.value, q.candidate.value, q.score, q.fields) for q in empi.review_queue(limit=1000))


def _run(empi: Empi) -> dict[str, Any]:
    base = population(160)
    import_records(empi, "HOSP_A", base, match=False)
    import_records(empi, "HOSP_B", [corrupt(r, i) for i, r in enumerate(base[:80])], match=False)
    first = dedupe(empi, batch_size=37)  # batches that split blocks
    queue = _queue(empi)
    # the pair of a rejected item is kept apart: a second run opens nothing for it
    rejected = empi.review_queue(limit=1)[0]
    empi.reject(rejected.id, by="test")
    second = dedupe(empi, batch_size=500)
    # what the per-record matcher scores for the first queued pair
    rec, cand = queue[0][0], queue[0][1]
    domain = "HOSP_A" if not rec.startswith("Q") else "HOSP_B"
    scores = {m.record.value: (m.score, m.fields) for m in empi.candidates(Identifier(value=rec, domain=domain))}
    return {"first": (first.records, first.pairs, first.reviews), "queue": queue,
            "second": (second.records, second.pairs, second.reviews), "rejected": rejected.record.value,
            "matcher": scores[cand], "queued": (queue[0][2], queue[0][3])}


@pytest.mark.scaleout
def test_dedupe_is_the_same_on_sqlite_and_postgresql(tmp_path: Path, pg_database: tuple[str, str]) -> None:
    results = {}
    for backend, url in (("sqlite", f"sqlite:///{tmp_path}/d.sqlite"), ("postgresql", pg_database[1])):
        empi, _ = _build(url, None, False)
        try:
            results[backend] = _run(empi)
        finally:
            empi.engine.dispose()
    lite, pg = results["sqlite"], results["postgresql"]
    assert lite == pg
    records, pairs, reviews = lite["first"]
    assert records == 240 and pairs > reviews >= 70 and len(lite["queue"]) == reviews
    assert lite["second"] == (240, pairs - 2, 0)  # the rejected pair is no candidate from either side
    assert lite["matcher"] == lite["queued"]  # the batch picked what the per-record matcher scores
