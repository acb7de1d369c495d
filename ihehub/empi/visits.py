"""Visits: the PV1 of each feed, kept per record and visit number, and the ITI-22 visit query.

IHE ITI TF-2a 3.22 (Patient Demographics and Visit Query): the consumer asks with demographics and visit
fields (QPD-3 ``@PV1.2`` patient class, ``@PV1.3.1`` point of care, ``@PV1.7.1`` attending doctor,
``@PV1.10`` hospital service, ``@PV1.19.1`` visit number); the supplier answers one PID/PV1 pair per
matching visit.  A feed without PV1-19 keeps its visit under the empty visit number, so the latest PV1 of
such a feed replaces the previous one.  Visits never decide matching; they follow their record through
links and merges because they hang on the record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, and_, select

from ihehub.empi import store
from ihehub.empi import tables as t
from ihehub.empi.context import Ctx
from ihehub.empi.errors import MissingField
from ihehub.empi.model import HD, Identifier, PatientQuery, Visit, VisitMatch, VisitQuery, VisitResult
from ihehub.empi.normalize import fold, key
from ihehub.empi.queries import conditions, post_filters, post_match, text_filter


def upsert(conn: Connection, record_id: int, visit: Visit, at: float) -> None:
    """Insert or replace the visit ``(record_id, visit.visit_number)``."""
    v = t.visits
    values = {f.name: getattr(visit, f.name) or None for f in dataclasses.fields(Visit)}
    values["visit_number"] = visit.visit_number or ""
    values["pv1"] = visit.pv1 or ""
    values["attending_key"] = key(visit.attending_key) if visit.attending_key else None
    found = conn.execute(select(v.c.id).where(v.c.record_id == record_id,
                                              v.c.visit_number == values["visit_number"])).first()
    if found is None:
        conn.execute(v.insert().values(record_id=record_id, updated_at=at, **values))
    else:
        conn.execute(v.update().where(v.c.id == found.id).values(updated_at=at, **values))


def _visit(row: Any) -> Visit:
    return Visit(**{f.name: getattr(row, f.name) or "" for f in dataclasses.fields(Visit)})


def find(conn: Connection, ctx: Ctx, query: PatientQuery, visit: VisitQuery, domains: Sequence[str | HD] | None, *,
         limit: int, offset: int) -> VisitResult:
    """ITI-22: one match per visit of an active record that fits both the demographics and the visit fields,
    newest visit first within a patient."""
    r, n, v = t.records, t.names, t.visits
    where, use_names, targets = conditions(conn, ctx, query, domains, required=False)
    if visit.patient_class:
        where.append(text_filter(v.c.patient_class, visit.patient_class, str.upper))
    if visit.point_of_care:
        where.append(text_filter(v.c.point_of_care, visit.point_of_care, fold))
    if visit.attending:
        where.append(text_filter(v.c.attending_key, visit.attending, key))
    if visit.hospital_service:
        where.append(text_filter(v.c.hospital_service, visit.hospital_service, str.upper))
    if visit.visit_number:
        where.append(text_filter(v.c.visit_number, visit.visit_number, str.strip))
    if len(where) == 1 + (1 if targets else 0):
        raise MissingField("a visit query needs at least one demographics or visit field", field="query")
    src = r.join(v, v.c.record_id == r.c.id)
    if use_names:
        src = src.join(n, n.c.record_id == r.c.id)
    cap = ctx.config.find_limit
    q = (select(r, v.c.id.label("visit_id")).select_from(src).where(and_(*where))
         .order_by(r.c.patient_id, v.c.updated_at.desc(), v.c.id).distinct().limit(cap * 4))
    post = post_filters(query)
    seen: dict[int, Any] = {}
    for row in conn.execute(q).all():
        if row.visit_id not in seen and post_match(row, post):
            seen[row.visit_id] = row
            if len(seen) >= cap:
                break
    page = list(seen.items())[offset:offset + limit]
    visit_rows = {row.id: row for row in conn.execute(select(v).where(v.c.id.in_([vid for vid, _ in page])))}
    wanted = {d.namespace for d in targets}
    out = []
    for vid, row in page:
        pat = store.patient_row(conn, id=row.patient_id)
        if pat is None:
            continue
        ids: tuple[Identifier, ...] = ctx.identifiers(conn, row.patient_id, pat.epid)
        if wanted:
            ids = tuple(i for i in ids if i.domain in wanted)
        out.append(VisitMatch(patient=pat.epid, identifiers=ids, visit=_visit(visit_rows[vid]),
                              record=store.source_record(row, ctx.ident(row), pat.epid, None)))
    return VisitResult(total=len(seen), offset=offset, matches=tuple(out))


def of_record(conn: Connection, record_id: int) -> list[Visit]:
    """The visits of a record, newest first."""
    v = t.visits
    rows = conn.execute(select(v).where(v.c.record_id == record_id).order_by(v.c.updated_at.desc(), v.c.id.desc()))
    return [_visit(row) for row in rows]
