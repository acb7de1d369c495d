"""Patient identity feed steps (IHE ITI TF-2a 3.8, ITI-8: A01/A04/A05 register, A08 update; A23/A29 delete).

Each function runs inside ONE transaction that the service opened: the record, its history row, its search
index, its link, its review items and its events are written together or not at all.

* register: a new identifier of a domain gets a source record (history version 1), is matched, and is
  linked to the best patient above the auto-link threshold or founds a new enterprise patient; review items
  are opened for the candidates between the thresholds.  A register of an identifier that already exists
  is an update (ITI-8 allows A01/A04/A05 for a known patient).
* update: a changed record gets a new history version; an automatically linked record is matched again
  (it may leave its patient when its own patient's records no longer look like it, or join another when
  it was alone); manual and reviewed links stay as a person set them.
* delete: the record is marked deleted and unlinked; nothing is removed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Row

from ihehub.empi import store
from ihehub.empi.blocking import blocking_keys
from ihehub.empi.compare import compare
from ihehub.empi.context import Ctx
from ihehub.empi.errors import SubsumedPatient
from ihehub.empi.matching import Candidate, Decision, candidates, decide_links, match_score
from ihehub.empi.model import (
    ChangeResult,
    Domain,
    EventType,
    FeedResult,
    FieldScore,
    Identifier,
    LinkKind,
    MatchScore,
    PatientEvent,
    PatientRecord,
    ReviewItem,
)
from ihehub.empi.normalize import NormRecord
from ihehub.empi.scoring import decide


def register(conn: Connection, ctx: Ctx, dom: Domain, record: PatientRecord, norm: NormRecord,
             warnings: Sequence[str], *, event: str, message_id: str | None, by: str, match: bool) -> FeedResult:
    at = store.now()
    keys = blocking_keys(norm)
    # without matching there is no candidate to race for (a bulk load takes no key locks)
    existing = store.record_row(conn, dom.id, record.pid, lock=keys if match else ())
    if existing is not None:
        if existing.status == "merged":
            survivor = store.record_by_id(conn, existing.merged_into)
            raise SubsumedPatient(record.pid, dom.namespace,
                                  (survivor.pid if survivor else "", dom.namespace))
        return update(conn, ctx, dom, existing, record, norm, warnings, event=event, message_id=message_id,
                      by=by, match=match)
    dec = _decide(conn, ctx, dom, None, norm, keys, match=match)
    ident = Identifier(value=record.pid, domain=dom.namespace)
    detail = _detail("linked" if dec.link is not None else "review" if dec.reviews else "new", dec, event, warnings)
    outcome = detail["match"]
    # a new patient holds this record alone; a linked one, its records and this one
    if dec.link is None:
        patient, epid = None, store.EPID_PLACEHOLDER
        identifiers = (*ctx.cross_reference(epid, ()), ident)
    else:
        patient, epid = (dec.link.patient_id, dec.link.epid), dec.link.epid
        identifiers = ctx.cross_reference(epid, [*store.patient_records(conn, dec.link.patient_id),
                                                 _Ref(pid=record.pid, domain_id=dom.id)])
    score, fields, reason = _link_values(ctx, dec.link)
    payload = PatientEvent(id=0, type=EventType.REGISTERED, patient=epid, at=at, record=ident,
                           identifiers=identifiers, detail=detail).to_json()
    rid, _, epid, event_id = store.insert_new_record(
        conn, domain_id=dom.id, record=record, norm=norm, warnings=warnings, keys=keys, patient=patient,
        prefix=ctx.config.epid_prefix, width=ctx.config.epid_width, event=event, message_id=message_id,
        link_score=score, link_fields=fields, link_reason=reason, by=by, at=at,
        event_payload=json.dumps(payload, ensure_ascii=False))
    if dec.link is None:
        identifiers = (*ctx.cross_reference(epid, ()), ident)
    reviews = _reviews(conn, ctx, rid, ident, dec, at, new=True)
    events = [PatientEvent(id=event_id, type=EventType.REGISTERED, patient=epid, at=at, record=ident,
                           identifiers=identifiers, detail=detail)]
    return FeedResult(identifier=ident, patient=epid, created=True, outcome=outcome,
                      best=_best(ctx, dec), review=reviews, warnings=tuple(warnings), events=tuple(events))


def update(conn: Connection, ctx: Ctx, dom: Domain, row: Row[Any], record: PatientRecord, norm: NormRecord,
           warnings: Sequence[str], *, event: str, message_id: str | None, by: str, match: bool) -> FeedResult:
    at = store.now()
    ident = Identifier(value=record.pid, domain=dom.namespace)
    data = store.record_to_json(record)
    if row.status == "active" and data == row.data:
        epid = ctx.epid(conn, row.patient_id)
        return FeedResult(identifier=ident, patient=epid, created=False, outcome="unchanged", best=None, review=(),
                          warnings=tuple(warnings), events=())
    revived = row.status == "deleted"
    version = row.version + 1
    store.update_record(conn, row.id, record=record, norm=norm, warnings=warnings, version=version, at=at)
    store.add_history(conn, row.id, version, event, data, message_id, at)
    keys = blocking_keys(norm)
    store.lock_keys(conn, keys)
    store.write_index(conn, row.id, norm, keys)
    store.obsolete_reviews(conn, row.id, at)
    events: list[PatientEvent] = []
    patient_id = row.patient_id
    if revived:  # a deleted record fed again comes back on a patient of its own, then is matched
        patient_id, _ = ctx.new_patient(conn, at)
        store.set_record(conn, row.id, at, status="active", patient_id=patient_id)
        store.open_link(conn, record_id=row.id, patient_id=patient_id, kind=LinkKind.AUTO, score=None, fields=(),
                        reason="new patient (record fed again after deletion)", by=by, at=at)
    epid = ctx.epid(conn, patient_id)
    events.append(store.add_event(conn, type=EventType.UPDATED, patient=epid, at=at, record=ident,
                                  identifiers=ctx.identifiers(conn, patient_id, epid),
                                  detail={"event": event, "version": version, "warnings": list(warnings)}))
    link = store.active_link(conn, row.id)
    dec = Decision(link=None, reviews=(), best=None, skipped_keys=())
    outcome = "updated"
    if match and link is not None and link.kind == LinkKind.AUTO.value:
        others = [r for r in store.patient_records(conn, patient_id) if r.id != row.id]
        if not others or not _fits(ctx, norm, others):
            dec = _decide(conn, ctx, dom, row.id, norm, keys, match=True, own_patient_id=patient_id)
            if dec.link is not None:
                patient_id, epid = _move(conn, ctx, row, ident, patient_id, dec.link, by=by, at=at, events=events)
                outcome = "linked"
            elif others:
                new_id, new_epid = ctx.new_patient(conn, at)
                _move(conn, ctx, row, ident, patient_id, None, by=by, at=at, events=events,
                      new_patient=(new_id, new_epid))
                patient_id, epid = new_id, new_epid
                outcome = "unlinked"
        else:
            dec = _decide(conn, ctx, dom, row.id, norm, keys, match=True, own_patient_id=patient_id)
            dec = Decision(link=None, reviews=dec.reviews, best=dec.best, skipped_keys=dec.skipped_keys)
    reviews = _reviews(conn, ctx, row.id, ident, dec, at)
    if outcome == "updated" and reviews:
        outcome = "review"
    return FeedResult(identifier=ident, patient=epid, created=False, outcome=outcome, best=_best(ctx, dec),
                      review=reviews, warnings=tuple(warnings), events=tuple(events))


def delete(conn: Connection, ctx: Ctx, ident: Identifier, *, by: str) -> ChangeResult:
    at = store.now()
    _, row = ctx.resolve_record(conn, ident)
    link = store.active_link(conn, row.id)
    if link is not None:
        store.close_link(conn, link.id, "record deleted", at)
    store.set_record(conn, row.id, at, status="deleted")
    store.drop_index(conn, row.id)
    store.obsolete_reviews(conn, row.id, at, "record deleted")
    epid = ctx.epid(conn, row.patient_id)
    retired = not store.patient_records(conn, row.patient_id)
    if retired:
        store.set_patient(conn, row.patient_id, at, status="retired")
    ev = store.add_event(conn, type=EventType.DELETED, patient=epid, at=at, record=ident,
                         identifiers=() if retired else ctx.identifiers(conn, row.patient_id, epid),
                         detail={"patient_retired": retired, "by": by})
    return ChangeResult(patient=epid, events=(ev,))


# -- steps ------------------------------------------------------------------------------------------

def _decide(conn: Connection, ctx: Ctx, dom: Domain, record_id: int | None, norm: NormRecord, keys: list[str], *,
            match: bool, own_patient_id: int | None = None) -> Decision:
    if not match:
        return Decision(link=None, reviews=(), best=None, skipped_keys=())
    cands, skipped = candidates(conn, ctx, record_id, norm, keys, explain=False)
    return decide_links(conn, ctx, dom.id, cands, own_patient_id=own_patient_id, skipped=skipped)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Ref:
    """A record not yet written, as `Ctx.cross_reference` reads records."""

    pid: str
    domain_id: int


def _link_values(ctx: Ctx, cand: Candidate | None) -> tuple[float | None, Sequence[FieldScore], str]:
    """(score, fields, reason) of the automatic link of a record to ``cand``'s patient, or to a new one."""
    if cand is None:
        return None, (), "new patient"
    s = cand.scored
    return s.score, s.fields, (f"matched {ctx.ident(cand.row)} with score {s.score} "
                               f">= auto-link threshold {ctx.profile.link_threshold}")


def _link(conn: Connection, ctx: Ctx, record_id: int, patient_id: int, cand: Candidate | None, *, by: str,
          at: float) -> None:
    score, fields, reason = _link_values(ctx, cand)
    store.open_link(conn, record_id=record_id, patient_id=patient_id, kind=LinkKind.AUTO, score=score, fields=fields,
                    reason=reason, by=by, at=at)


def _move(conn: Connection, ctx: Ctx, row: Row[Any], ident: Identifier, old_patient: int, target: Candidate | None,
          *, by: str, at: float, events: list[PatientEvent], new_patient: tuple[int, str] | None = None
          ) -> tuple[int, str]:
    """Move an automatically linked record to ``target``'s patient (LINKED) or to a new one (UNLINKED)."""
    link = store.active_link(conn, row.id)
    if link is not None:
        store.close_link(conn, link.id, "re-matched after an update", at)
    old_epid = ctx.epid(conn, old_patient)
    if target is not None:
        pid, epid = target.patient_id, target.epid
    else:
        pid, epid = new_patient if new_patient else ctx.new_patient(conn, at)
    store.set_record(conn, row.id, at, patient_id=pid)
    _link(conn, ctx, row.id, pid, target, by=by, at=at)
    other_ids = ctx.identifiers(conn, old_patient, old_epid)
    events.append(store.add_event(
        conn, type=EventType.LINKED if target is not None else EventType.UNLINKED, patient=epid, at=at,
        record=ident, other_patient=old_epid, identifiers=ctx.identifiers(conn, pid, epid),
        detail={"reason": "re-matched after an update", "other_identifiers": [str(i) for i in other_ids[1:]]}))
    ctx.retire_if_empty(conn, old_patient, at, by, events)
    return pid, epid


def _reviews(conn: Connection, ctx: Ctx, record_id: int, ident: Identifier, dec: Decision,
             at: float, *, new: bool = False) -> tuple[ReviewItem, ...]:
    out = []
    for cand, reason in dec.reviews:
        rid = store.add_review(conn, record_id=record_id, candidate_id=cand.row.id, score=cand.scored.score,
                               fields=cand.scored.fields, reason=reason, at=at, new=new)
        if rid is None:
            continue
        out.append(ReviewItem(id=rid, record=ident, candidate=ctx.ident(cand.row),
                              patient=cand.epid, score=cand.scored.score,
                              fields=cand.scored.fields, state="open", reason=reason, created_at=at))
    return tuple(out)


def _fits(ctx: Ctx, norm: NormRecord, others: Sequence[Row[Any]]) -> bool:
    """Whether the record still scores at least the review threshold against a record of its patient."""
    for other in others:
        o = store.norm_of(other)
        if decide(ctx.profile, ctx.profile.score(compare(norm, o), norm, o).score) != "none":
            return True
    return False


def _best(ctx: Ctx, dec: Decision) -> MatchScore | None:
    return None if dec.best is None else match_score(ctx, dec.best)


def _detail(outcome: str, dec: Decision, event: str, warnings: Sequence[str]) -> dict[str, Any]:
    d: dict[str, Any] = {"match": outcome, "event": event}
    if dec.best is not None:
        d["score"] = dec.best.scored.score
    if warnings:
        d["warnings"] = list(warnings)
    if dec.skipped_keys:
        d["skipped_block_keys"] = list(dec.skipped_keys)
    return d
