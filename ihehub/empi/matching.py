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
from collections.abc import Iterable, Sequence, Set
from typing import Any

from sqlalchemy import Connection, Row

from ihehub.empi import store
from ihehub.empi.compare import Comparison, compare
from ihehub.empi.context import Ctx
from ihehub.empi.model import MatchScore
from ihehub.empi.normalize import NormRecord
from ihehub.empi.scoring import Scored, decide


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """The best-scoring record of one candidate patient."""

    row: Row[Any]  # `store.match_rows`: with the patient's enterprise id
    patient_id: int
    scored: Scored
    decision: str  # link, review, none

    @property
    def epid(self) -> str:
        return str(self.row.epid)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    link: Candidate | None
    reviews: tuple[tuple[Candidate, str], ...]  # (candidate, reason)
    best: Candidate | None
    skipped_keys: tuple[str, ...]


def candidates(conn: Connection, ctx: Ctx, record_id: int | None, norm: NormRecord,
               keys: list[str], *, explain: bool = True) -> tuple[list[Candidate], list[str]]:
    """Scored candidate patients of a record, best first (one entry per patient).  Without ``explain`` only
    the best and those at or above the review threshold get the per-field explanation (the rest, which
    decide nothing, carry their score alone)."""
    rows, skipped = store.candidate_rows(conn, keys, ctx.config.max_block, ctx.config.max_candidates,
                                         exclude=record_id)
    excluded = store.exclusions_of(conn, record_id) if record_id is not None else set()
    ranked = sorted((best_match(ctx, norm, group) for group in by_patient(rows, excluded).values()),
                    key=lambda b: (-b[3], b[0].id))
    review = ctx.profile.review_threshold
    out = []
    for i, (row, cmp, other, score) in enumerate(ranked):
        if explain or i == 0 or score >= review:
            out.append(candidate(ctx, norm, row, cmp, other))
        else:
            out.append(Candidate(row=row, patient_id=row.patient_id, decision="none",
                                 scored=Scored(score=score, probability=0.0, fields=())))
    return out, skipped


def by_patient(rows: Iterable[Row[Any]], excluded: Set[int]) -> dict[int, list[Row[Any]]]:
    """The active candidate records grouped by patient, each group in record id order; a patient holding a
    record declared different (``excluded``) is left out whole."""
    active = sorted((r for r in rows if r.status == "active"), key=lambda r: r.id)
    blocked = {r.patient_id for r in active if r.id in excluded}
    groups: dict[int, list[Row[Any]]] = {}
    for r in active:
        if r.patient_id not in blocked:
            groups.setdefault(r.patient_id, []).append(r)
    return groups


def best_of(ctx: Ctx, norm: NormRecord, rows: Sequence[Row[Any]]) -> Candidate:
    """The best-scoring of one patient's candidate records (the first of equal scores), scored in full."""
    row, cmp, other, _ = best_match(ctx, norm, rows)
    return candidate(ctx, norm, row, cmp, other)


def best_match(ctx: Ctx, norm: NormRecord, rows: Sequence[Row[Any]]) -> tuple[Row[Any], Comparison, NormRecord, float]:
    """(record, comparison, its normalised form, score) of the best-scoring of ``rows`` (the first of equal
    scores), without the per-field explanation."""
    profile = ctx.profile
    best: tuple[Row[Any], Comparison, NormRecord, float] | None = None
    for row in rows:
        other = store.norm_of(row)
        cmp = compare(norm, other)
        s = profile.rank(cmp, norm, other)
        if best is None or s > best[3]:
            best = (row, cmp, other, s)
    if best is None:
        raise ValueError("best_match needs at least one record")
    return best


def candidate(ctx: Ctx, norm: NormRecord, row: Row[Any], cmp: Comparison, other: NormRecord) -> Candidate:
    scored = ctx.profile.score(cmp, norm, other)
    return Candidate(row=row, patient_id=row.patient_id, scored=scored, decision=decide(ctx.profile, scored.score))


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


def match_score(ctx: Ctx, cand: Candidate) -> MatchScore:
    s = cand.scored
    return MatchScore(record=ctx.ident(cand.row), patient=cand.epid, score=s.score, probability=s.probability,
                      decision=cand.decision, fields=s.fields)
