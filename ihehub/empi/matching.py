"""Candidate retrieval, scoring and the link decision for one record, inside the feed's transaction.

Candidates are the active records sharing a blocking key (`ihehub.empi.blocking`), minus the records a
person has declared different (rejected reviews, unlinks).  Each is compared field by field and scored by
the profile; a patient's score is that of its best record.  The decision follows the two thresholds, with
two guards against wrong automatic links:

* two or more patients above the auto-link threshold are ambiguous: all go to review;
* a patient that already holds a record of the same domain is a duplicate inside one source: review
  (or ignored, ``same_domain: ignore``), never an automatic link.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import Connection, Row

from ihehub.empi import store
from ihehub.empi.compare import compare
from ihehub.empi.context import Ctx
from ihehub.empi.model import MatchScore
from ihehub.empi.normalize import NormRecord
from ihehub.empi.scoring import Scored, decide


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """The best-scoring record of one candidate patient."""

    row: Row[Any]
    patient_id: int
    scored: Scored
    decision: str  # link, review, none


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    link: Candidate | None
    reviews: tuple[tuple[Candidate, str], ...]  # (candidate, reason)
    best: Candidate | None
    skipped_keys: tuple[str, ...]


def candidates(conn: Connection, ctx: Ctx, record_id: int | None, norm: NormRecord,
               keys: list[str]) -> tuple[list[Candidate], list[str]]:
    """Scored candidate patients of a record, best first (one entry per patient)."""
    ids, skipped = store.candidate_ids(conn, keys, ctx.config.max_block)
    excluded: set[int] = set()
    if record_id is not None:
        ids.discard(record_id)
        excluded = store.exclusions_of(conn, record_id)
    rows = [r for r in store.records_by_ids(conn, sorted(ids)) if r.status == "active"]
    blocked_patients = {r.patient_id for r in rows if r.id in excluded}
    best: dict[int, Candidate] = {}
    for row in rows:
        if row.patient_id in blocked_patients:
            continue
        other = store.norm_of(row)
        scored = ctx.profile.score(compare(norm, other), norm, other)
        cur = best.get(row.patient_id)
        if cur is None or scored.score > cur.scored.score:
            best[row.patient_id] = Candidate(row=row, patient_id=row.patient_id, scored=scored,
                                             decision=decide(ctx.profile, scored.score))
    return sorted(best.values(), key=lambda c: (-c.scored.score, c.row.id)), skipped


def decide_links(conn: Connection, ctx: Ctx, domain_id: int, cands: list[Candidate], *,
                 own_patient_id: int | None = None, skipped: list[str] | None = None) -> Decision:
    """Pick the automatic link (if any) and the review items for a record of ``domain_id``."""
    cands = [c for c in cands if c.patient_id != own_patient_id]
    best = cands[0] if cands else None
    linkable = [c for c in cands if c.decision == "link"]
    reviews: list[tuple[Candidate, str]] = []
    link: Candidate | None = None
    if len(linkable) > 1:
        reviews += [(c, f"ambiguous: {len(linkable)} patients above the auto-link threshold") for c in linkable]
    elif linkable:
        target = linkable[0]
        same = [r for r in store.patient_records(conn, target.patient_id) if r.domain_id == domain_id]
        if same:
            if ctx.config.same_domain == "review":
                reviews.append((target, f"possible duplicate in domain {ctx.domains[domain_id].namespace} "
                                        f"(record {same[0].pid})"))
        else:
            link = target
    reviews += [(c, "score between the review and auto-link thresholds") for c in cands if c.decision == "review"]
    return Decision(link=link, reviews=tuple(reviews[: ctx.config.max_reviews]), best=best,
                    skipped_keys=tuple(skipped or ()))


def match_score(ctx: Ctx, cand: Candidate, epid: str) -> MatchScore:
    s = cand.scored
    return MatchScore(record=ctx.ident(cand.row), patient=epid, score=s.score, probability=s.probability,
                      decision=cand.decision, fields=s.fields)
