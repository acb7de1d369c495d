"""Merge, unmerge, link, unlink and the review decisions — each one transaction, nothing destroyed.

* **A40 merge** (IHE ITI TF-2a 3.8.4.2.3; HL7 v2.5 3.6.2.1.2 "merge patient – patient identifier list"):
  the subsumed record (MRG-1) and the surviving one (PID-3) are in the same domain; the subsumed record is
  marked ``merged`` and leaves the cross-reference, and when the two belonged to different enterprise
  patients the subsumed patient's other records move to the surviving patient, which then stands for
  both (the subsumed patient is marked ``merged``).
* **Manual merge** of two enterprise patients moves every record of the subsumed one.
* **Unmerge** reverses a merge from its snapshot: the links it closed are opened again, the links it
  opened are closed, statuses come back.  A record that a person moved since is left where it is and
  named in the event.
* **Link / unlink** move one record by hand; an unlink also records that the record differs from the
  patient's other records, so the matcher will not join them again.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, Row, select, update

from ihehub.empi import store
from ihehub.empi import tables as t
from ihehub.empi.blocking import blocking_keys
from ihehub.empi.context import Ctx
from ihehub.empi.errors import Conflict, InvalidData, NotFound
from ihehub.empi.model import ChangeResult, DomainType, EventType, Identifier, LinkKind, Merge, PatientEvent


def _move_all(conn: Connection, ctx: Ctx, from_id: int, to_id: int, reason: str, by: str, at: float,
              kind: LinkKind | None = None) -> tuple[list[int], list[int]]:
    """Move every active record of one patient to another; returns (closed link ids, opened link ids)."""
    closed, opened = [], []
    for rec in store.patient_records(conn, from_id):
        link = store.active_link(conn, rec.id)
        if link is not None:
            store.close_link(conn, link.id, reason, at)
            closed.append(int(link.id))
        opened.append(store.open_link(
            conn, record_id=rec.id, patient_id=to_id, kind=kind or LinkKind(link.kind if link else "auto"),
            score=link.score if link else None, fields=store.fields_from_json(link.fields if link else None),
            reason=reason, by=by, at=at))
        store.set_record(conn, rec.id, at, patient_id=to_id)
    return closed, opened


def _merge_row(conn: Connection, *, kind: str, p1: int, p2: int, r1: int | None, r2: int | None, by: str,
               at: float) -> int:
    mid = conn.execute(t.merges.insert().values(kind=kind, surviving_patient_id=p1, subsumed_patient_id=p2,
                                                surviving_record_id=r1, subsumed_record_id=r2, snapshot="{}",
                                                at=at, by=by).returning(t.merges.c.id)).scalar_one()
    return int(mid)


def merge(conn: Connection, ctx: Ctx, surviving: Identifier, subsumed: Identifier, *, by: str, event: str,
          message_id: str | None) -> ChangeResult:
    at = store.now()
    sdom = ctx.domain(surviving.domain, field="identifier.domain")
    tdom = ctx.domain(subsumed.domain, field="subsumed.domain")
    enterprise = DomainType.ENTERPRISE
    if (sdom.type is enterprise) != (tdom.type is enterprise):
        raise InvalidData("a merge joins two enterprise patients or two records of one domain, not one of each",
                          field="subsumed.domain")
    if sdom.type is enterprise:
        p1 = ctx.resolve_patient(conn, surviving, field="identifier")
        p2 = ctx.resolve_patient(conn, subsumed, field="subsumed")
        if p1.id == p2.id:
            raise Conflict(f"cannot merge patient {surviving.value} into itself", field="subsumed")
        mid = _merge_row(conn, kind="manual", p1=p1.id, p2=p2.id, r1=None, r2=None, by=by, at=at)
        closed, opened = _move_all(conn, ctx, p2.id, p1.id, f"merge #{mid}", by, at)
        store.set_patient(conn, p2.id, at, status="merged", merged_into=p1.id)
        snapshot = {"closed": closed, "opened": opened, "record": None, "patient_status": p2.status}
        rec_ident, sub_ident = None, None
    else:
        if sdom.id != tdom.id:
            raise InvalidData(f"an A40 merge joins two identifiers of one domain; {surviving.domain} and "
                              f"{subsumed.domain} differ (link them instead)", field="subsumed.domain")
        _, srow = ctx.resolve_record(conn, surviving, field="identifier")
        _, trow = ctx.resolve_record(conn, subsumed, field="subsumed")
        if srow.id == trow.id:
            raise Conflict(f"cannot merge {surviving.value} into itself", field="subsumed")
        s_pat = store.patient_row(conn, id=srow.patient_id)
        t_pat = store.patient_row(conn, id=trow.patient_id)
        if s_pat is None or t_pat is None:
            raise Conflict("a record has no patient", field="identifier")
        p1, p2 = s_pat, t_pat
        mid = _merge_row(conn, kind="A40", p1=p1.id, p2=p2.id, r1=srow.id, r2=trow.id, by=by, at=at)
        closed, opened = [], []
        link = store.active_link(conn, trow.id)
        if link is not None:
            store.close_link(conn, link.id, f"merge #{mid}: merged into {surviving}", at)
            closed.append(int(link.id))
        store.set_record(conn, trow.id, at, status="merged", merged_into=srow.id)
        store.add_history(conn, trow.id, trow.version, event, trow.data, message_id, at)
        store.drop_index(conn, trow.id)
        store.obsolete_reviews(conn, trow.id, at, f"merged into {surviving}")
        if p2.id != p1.id:
            c2, o2 = _move_all(conn, ctx, p2.id, p1.id, f"merge #{mid}", by, at)
            closed += c2
            opened += o2
            store.set_patient(conn, p2.id, at, status="merged", merged_into=p1.id)
        snapshot = {"closed": closed, "opened": opened, "record": trow.id, "patient_status": p2.status}
        rec_ident, sub_ident = ctx.ident(srow), ctx.ident(trow)
    conn.execute(update(t.merges).where(t.merges.c.id == mid).values(snapshot=json.dumps(snapshot)))
    other = p2.epid if p2.id != p1.id else None
    ev = store.add_event(conn, type=EventType.MERGED, patient=p1.epid, at=at, record=rec_ident,
                         subsumed=sub_ident or Identifier(value=p2.epid, domain=ctx.enterprise.namespace),
                         other_patient=other, identifiers=ctx.identifiers(conn, p1.id, p1.epid),
                         detail={"merge": mid, "kind": "A40" if rec_ident else "manual", "event": event, "by": by})
    m = Merge(id=mid, kind="A40" if rec_ident else "manual", surviving_patient=p1.epid, subsumed_patient=p2.epid,
              surviving=rec_ident, subsumed=sub_ident, at=at, by=by)
    return ChangeResult(patient=p1.epid, events=(ev,), merge=m)


def find_merge(conn: Connection, ctx: Ctx, key: int | Identifier) -> Row[Any]:
    """A merge by id, or the newest merge (not undone) that subsumed this record or enterprise patient."""
    c = t.merges.c
    if isinstance(key, int):
        row = conn.execute(select(t.merges).where(c.id == key)).first()
        if row is None:
            raise NotFound(f"no merge #{key}", field="merge")
        return row
    dom = ctx.domain(key.domain, field="subsumed.domain")
    if dom.type is DomainType.ENTERPRISE:
        pat = store.patient_row(conn, epid=key.value)
        where = c.subsumed_patient_id == (pat.id if pat else -1)
    else:
        rec = store.record_row(conn, dom.id, key.value)
        where = c.subsumed_record_id == (rec.id if rec else -1)
    row = conn.execute(select(t.merges).where(where, c.undone_at.is_(None)).order_by(c.id.desc())).first()
    if row is None:
        raise NotFound(f"no merge subsumed {key.value} ({key.domain})", field="subsumed")
    return row


def unmerge(conn: Connection, ctx: Ctx, key: int | Identifier, *, by: str) -> ChangeResult:
    at = store.now()
    m = find_merge(conn, ctx, key)
    if m.undone_at is not None:
        raise Conflict(f"merge #{m.id} was already undone", field="merge")
    p1 = store.patient_row(conn, id=m.surviving_patient_id)
    p2 = store.patient_row(conn, id=m.subsumed_patient_id)
    if p1 is None or p2 is None:
        raise Conflict(f"merge #{m.id} names a patient that no longer exists", field="merge")
    if p2.id != p1.id and not (p2.status == "merged" and p2.merged_into == p1.id):
        raise Conflict(f"patient {p2.epid} changed after merge #{m.id} ({p2.status}); unmerge by hand", field="merge")
    snap = json.loads(m.snapshot)
    reason = f"unmerge of merge #{m.id}"
    opened = set(snap["opened"])
    for lid in opened:
        store.close_link(conn, lid, reason, at)
    skipped = []
    if snap["record"] is not None:
        rec = store.record_by_id(conn, snap["record"])
        if rec is not None and rec.status == "merged":
            store.set_record(conn, rec.id, at, status="active", merged_into=None)
            norm = store.norm_of(rec)
            store.write_index(conn, rec.id, norm, blocking_keys(norm))
    for lid in snap["closed"]:
        old = store.link_by_id(conn, lid)
        if old is None:
            continue
        current = store.active_link(conn, old.record_id)
        rec = store.record_by_id(conn, old.record_id)
        if rec is None or rec.status != "active" or (current is not None and current.id not in opened):
            skipped.append(old.record_id)
            continue
        store.open_link(conn, record_id=old.record_id, patient_id=old.patient_id, kind=LinkKind(old.kind),
                        score=old.score, fields=store.fields_from_json(old.fields), reason=reason, by=by, at=at)
        store.set_record(conn, old.record_id, at, patient_id=old.patient_id)
    if p2.id != p1.id:
        store.set_patient(conn, p2.id, at, status="active", merged_into=None)
    conn.execute(update(t.merges).where(t.merges.c.id == m.id).values(undone_at=at, undone_by=by))
    events: list[PatientEvent] = []
    sub_rec = store.record_by_id(conn, snap["record"]) if snap["record"] is not None else None
    skipped_ids = [str(ctx.ident(r)) for r in store.records_by_ids(conn, skipped)]
    events.append(store.add_event(
        conn, type=EventType.UNMERGED, patient=p1.epid, at=at, other_patient=p2.epid if p2.id != p1.id else None,
        subsumed=ctx.ident(sub_rec) if sub_rec is not None else Identifier(value=p2.epid,
                                                                           domain=ctx.enterprise.namespace),
        identifiers=ctx.identifiers(conn, p1.id, p1.epid),
        detail={"merge": m.id, "by": by, "left_in_place": skipped_ids,
                "other_identifiers": [str(i) for i in ctx.identifiers(conn, p2.id, p2.epid)]}))
    return ChangeResult(patient=p1.epid, events=tuple(events))


def link(conn: Connection, ctx: Ctx, record: Identifier, target: Identifier, *, by: str, reason: str,
         kind: LinkKind = LinkKind.MANUAL, score: float | None = None, fields: Any = ()) -> ChangeResult:
    at = store.now()
    _, row = ctx.resolve_record(conn, record, field="identifier")
    tpat = ctx.resolve_patient(conn, target, field="target")
    if row.patient_id == tpat.id:
        raise Conflict(f"{record} is already linked to {tpat.epid}", field="target")
    events: list[PatientEvent] = []
    _relink(conn, ctx, row, record, tpat.id, tpat.epid, kind=kind, score=score, fields=fields,
            reason=reason or "linked by hand", by=by, at=at, events=events, event_type=EventType.LINKED)
    store.remove_exclusions(conn, row.id, [r.id for r in store.patient_records(conn, tpat.id)])
    return ChangeResult(patient=tpat.epid, events=tuple(events))


def unlink(conn: Connection, ctx: Ctx, record: Identifier, *, by: str, reason: str) -> ChangeResult:
    at = store.now()
    _, row = ctx.resolve_record(conn, record, field="identifier")
    others = [r for r in store.patient_records(conn, row.patient_id) if r.id != row.id]
    if not others:
        raise Conflict(f"{record} is the only record of its patient; nothing to unlink", field="identifier")
    new_id, new_epid = ctx.new_patient(conn, at)
    events: list[PatientEvent] = []
    _relink(conn, ctx, row, record, new_id, new_epid, kind=LinkKind.MANUAL, score=None, fields=(),
            reason=reason or "unlinked by hand", by=by, at=at, events=events, event_type=EventType.UNLINKED)
    for o in others:
        store.add_exclusion(conn, row.id, o.id, reason or "unlinked by hand", by, at)
    return ChangeResult(patient=new_epid, events=tuple(events))


def _relink(conn: Connection, ctx: Ctx, row: Row[Any], ident: Identifier, patient_id: int, epid: str, *,
            kind: LinkKind, score: float | None, fields: Any, reason: str, by: str, at: float,
            events: list[PatientEvent], event_type: EventType) -> None:
    old_id = row.patient_id
    old_epid = ctx.epid(conn, old_id)
    cur = store.active_link(conn, row.id)
    if cur is not None:
        store.close_link(conn, cur.id, reason, at)
    store.open_link(conn, record_id=row.id, patient_id=patient_id, kind=kind, score=score, fields=fields,
                    reason=reason, by=by, at=at)
    store.set_record(conn, row.id, at, patient_id=patient_id)
    store.obsolete_reviews(conn, row.id, at, reason)
    events.append(store.add_event(
        conn, type=event_type, patient=epid, at=at, record=ident, other_patient=old_epid,
        identifiers=ctx.identifiers(conn, patient_id, epid),
        detail={"reason": reason, "by": by, "kind": kind.value,
                "other_identifiers": [str(i) for i in ctx.identifiers(conn, old_id, old_epid)[1:]]}))
    ctx.retire_if_empty(conn, old_id, at, by, events)


def accept(conn: Connection, ctx: Ctx, review_id: int, *, by: str) -> ChangeResult:
    """Accept a review item: the record and the candidate are one person (IHE PIX manual linking)."""
    at = store.now()
    rv = _open_review(conn, review_id)
    rec, cand = store.record_by_id(conn, rv.record_id), store.record_by_id(conn, rv.candidate_id)
    if rec is None or cand is None or rec.status != "active" or cand.status != "active":
        raise Conflict(f"review #{review_id} is obsolete: one of its records is no longer active", field="review")
    fields = store.fields_from_json(rv.fields)
    events: list[PatientEvent] = []
    epid = ctx.epid(conn, cand.patient_id)
    if rec.patient_id != cand.patient_id:
        rec_alone = len(store.patient_records(conn, rec.patient_id)) == 1
        cand_alone = len(store.patient_records(conn, cand.patient_id)) == 1
        reason = f"review #{review_id} accepted"
        mover, target = (rec, cand) if rec_alone else (cand, rec) if cand_alone else (None, cand)
        if mover is not None:
            epid = ctx.epid(conn, target.patient_id)
            _relink(conn, ctx, mover, ctx.ident(mover), target.patient_id, epid, kind=LinkKind.REVIEW,
                    score=rv.score, fields=fields, reason=reason, by=by, at=at, events=events,
                    event_type=EventType.LINKED)
        else:  # both patients have other records: the patients are one person
            res = merge(conn, ctx, Identifier(value=ctx.epid(conn, cand.patient_id), domain=ctx.enterprise.namespace),
                        Identifier(value=ctx.epid(conn, rec.patient_id), domain=ctx.enterprise.namespace),
                        by=by, event="review", message_id=None)
            events += res.events
            epid = res.patient
    _decide(conn, review_id, "accepted", at, by)
    return ChangeResult(patient=epid, events=tuple(events))


def reject(conn: Connection, ctx: Ctx, review_id: int, *, by: str) -> ChangeResult:
    """Reject a review item: the two records are different people and will not be proposed again."""
    at = store.now()
    rv = _open_review(conn, review_id)
    store.add_exclusion(conn, rv.record_id, rv.candidate_id, f"review #{review_id} rejected", by, at)
    _decide(conn, review_id, "rejected", at, by)
    rec = store.record_by_id(conn, rv.record_id)
    return ChangeResult(patient=ctx.epid(conn, rec.patient_id) if rec else "", events=())


def _open_review(conn: Connection, review_id: int) -> Row[Any]:
    rv = store.review_row(conn, review_id)
    if rv is None:
        raise NotFound(f"no review item #{review_id}", field="review")
    if rv.state != "open":
        raise Conflict(f"review #{review_id} is {rv.state}, not open", field="review")
    return rv


def _decide(conn: Connection, review_id: int, state: str, at: float, by: str) -> None:
    conn.execute(update(t.reviews).where(t.reviews.c.id == review_id).values(state=state, decided_at=at,
                                                                              decided_by=by))
