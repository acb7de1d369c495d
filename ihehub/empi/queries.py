"""Read-only questions to the index: PIX cross-reference (ITI-9), PDQ demographics query (ITI-21/22),
and the views of a patient, a record, its history and the review queue.

IHE ITI TF-2a 3.9.4.2.2.6 (ITI-9): the answer lists the patient's identifiers in the asked domains, never
the queried identifier itself; an unknown identifier or domain is an error (204), a known patient with no
identifier in the asked domains is an empty answer.  ITI TF-2a 3.21.4.1.2 (ITI-21): every given QPD-3 field
must match, ``*`` is a wildcard, QPD-8 limits the answer to patients with an identifier in those domains.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Row, and_, exists, or_, select

from ihehub.empi import store
from ihehub.empi import tables as t
from ihehub.empi.chinese import clean_hanzi, has_hanzi
from ihehub.empi.context import Ctx
from ihehub.empi.errors import InvalidData, MissingField, UnknownPatient
from ihehub.empi.model import (
    HD,
    CrossReference,
    Domain,
    DomainType,
    FindResult,
    Identifier,
    Link,
    Merge,
    PatientMatch,
    PatientQuery,
    PatientView,
    RecordVersion,
    ReviewItem,
    SourceRecord,
)
from ihehub.empi.normalize import fold, key, normalize_phone, parse_sex


def cross_reference(conn: Connection, ctx: Ctx, ident: Identifier,
                    target_domains: Sequence[str | HD] | None = None) -> CrossReference:
    qdom = ctx.domain(ident.domain, field="identifier.domain")
    targets = [ctx.domain(d, field="what_domains") for d in target_domains or ()]
    if not ident.value:
        raise MissingField("the query has no patient identifier", field="identifier.value")
    found = store.active_patient_records(conn, None if qdom.type is DomainType.ENTERPRISE else qdom.id, ident.value)
    if found is not None:  # one statement for the usual case
        epid, rows = found
        all_ids = ctx.cross_reference(epid, rows)
    else:  # unknown, merged, deleted or retired: the step by step checks name the error
        pat = ctx.resolve_patient(conn, ident, field="identifier")
        epid, all_ids = pat.epid, ctx.identifiers(conn, pat.id, pat.epid)
    ids = [i for i in all_ids if not (i.value == ident.value and i.domain == qdom.namespace)]
    if targets:
        wanted = {d.namespace for d in targets}
        ids = [i for i in ids if i.domain in wanted]
    return CrossReference(patient=epid, query=Identifier(value=ident.value, domain=qdom.namespace),
                          identifiers=tuple(ids))


def _pattern(value: str, norm: Any) -> tuple[str, bool]:
    """(SQL pattern or value, whether it is a LIKE pattern); ``*`` is the PDQ wildcard."""
    if "*" in value:
        return "%".join(norm(p) for p in value.split("*")), True
    return norm(value), False


def text_filter(col: Any, value: str, norm: Any) -> Any:
    pat, like = _pattern(value, norm)
    return col.like(pat) if like else col == pat


def conditions(conn: Connection, ctx: Ctx, query: PatientQuery, domains: Sequence[str | HD] | None, *,
               required: bool = True) -> tuple[list[Any], bool, list[Domain]]:
    """The SQL conditions on ``records`` (and ``names`` when the second value is True) of a demographics
    query, and the QPD-8 target domains; `MissingField` when ``required`` and the query names nothing."""
    r, n = t.records, t.names
    where: list[Any] = [r.c.status == "active"]
    use_names = False
    for attr in ("family", "given"):
        value = getattr(query, attr)
        if value is None or not value.strip("* "):
            continue
        use_names = True
        if has_hanzi(value):
            col = getattr(n.c, f"{attr}_hanzi")
            cond = text_filter(col, value, clean_hanzi)
            if attr == "family":  # a whole name in the family field ("张三")
                cond = or_(cond, text_filter(n.c.family_hanzi + n.c.given_hanzi, value, clean_hanzi))
            where.append(cond)
        else:
            where.append(text_filter(getattr(n.c, attr), value, key))
    if query.birth_date:
        bd = query.birth_date.replace("-", "").strip()
        if not bd.replace("*", "").isdigit() or len(bd.replace("*", "")) > 8:
            raise InvalidData(f"birth date {query.birth_date!r} is not YYYY[MM[DD]]", field="birth_date")
        where.append(r.c.birth_date.like(bd.replace("*", "") + "%") if len(bd) < 8 or "*" in bd
                     else r.c.birth_date == bd)
    if query.sex:
        sex = parse_sex(query.sex)
        if sex is not None:
            where.append(r.c.sex == sex)
    if query.identifier is not None:
        dom = ctx.domain(query.identifier.domain, field="identifier.domain")
        if dom.type is DomainType.ENTERPRISE:
            pat = store.patient_row(conn, epid=query.identifier.value)
            where.append(r.c.patient_id == (pat.id if pat else -1))
        else:
            where += [r.c.domain_id == dom.id, text_filter(r.c.pid, query.identifier.value, str.strip)]
    if query.national_id:
        where.append(r.c.national_id == query.national_id.replace(" ", "").upper())
    if query.phone:
        phone = normalize_phone(query.phone)
        if phone is None:
            raise InvalidData(f"phone {query.phone!r} has too few digits", field="phones")
        where.append(exists().where(t.block_keys.c.record_id == r.c.id, t.block_keys.c.key == f"p:{phone}"))
    if query.city:
        where.append(text_filter(r.c.city, query.city, fold))
    if query.postcode:
        where.append(text_filter(r.c.postcode, query.postcode, lambda v: v.replace(" ", "").upper()))
    if len(where) == 1 and required:
        raise MissingField("a demographics query needs at least one of name, birth date, identifier, national id, "
                           "phone, city or postcode", field="query")
    targets = [ctx.domain(d, field="what_domains") for d in domains or ()]
    if targets:
        r2 = t.records.alias("r2")
        where.append(r.c.patient_id.in_(select(r2.c.patient_id).where(
            r2.c.domain_id.in_([d.id for d in targets]), r2.c.status == "active")))
    return where, use_names, targets


def post_filters(query: PatientQuery) -> list[tuple[str, str, Any]]:
    """Conditions checked on the normalised record after SQL (street line, mother's maiden name)."""
    post: list[tuple[str, str, Any]] = []
    if query.line1:
        post.append(("line1", query.line1, fold))
    if query.mother_maiden_name:
        post.append(("mother_maiden_name", query.mother_maiden_name, key))
    return post


def post_match(row: Row[Any], post: Sequence[tuple[str, str, Any]]) -> bool:
    if not post:
        return True
    norm = store.norm_of(row)
    return all(_like(getattr(norm, f) or "", v, fn) for f, v, fn in post)


def find(conn: Connection, ctx: Ctx, query: PatientQuery, domains: Sequence[str | HD] | None, *,
         limit: int, offset: int) -> FindResult:
    r, n = t.records, t.names
    where, use_names, targets = conditions(conn, ctx, query, domains)
    src = r.join(n, n.c.record_id == r.c.id) if use_names else r
    cap = ctx.config.find_limit
    q = select(r).select_from(src).where(and_(*where)).order_by(r.c.patient_id, r.c.id).distinct()
    rows = conn.execute(q.limit(cap * 4)).all()
    post = post_filters(query)
    first: dict[int, Row[Any]] = {}
    for row in rows:
        if row.patient_id in first or not post_match(row, post):
            continue
        first[row.patient_id] = row
        if len(first) >= cap:
            break
    pids = list(first)
    page = pids[offset: offset + limit]
    wanted = {d.namespace for d in targets}
    out = []
    for pid in page:
        pat = store.patient_row(conn, id=pid)
        if pat is None:
            continue
        ids = ctx.identifiers(conn, pid, pat.epid)
        if wanted:
            ids = tuple(i for i in ids if i.domain in wanted)
        row = first[pid]
        out.append(PatientMatch(patient=pat.epid, identifiers=ids,
                                record=store.source_record(row, ctx.ident(row), pat.epid, None)))
    return FindResult(total=len(pids), offset=offset, matches=tuple(out))


def _like(actual: str, wanted: str, norm: Any) -> bool:
    return fnmatch.fnmatchcase(actual, "*".join(norm(p) for p in wanted.split("*")))


# -- views ----------------------------------------------------------------------------------------

def _patient_any(conn: Connection, ctx: Ctx, ident: Identifier) -> Row[Any]:
    dom = ctx.domain(ident.domain)
    if dom.type is DomainType.ENTERPRISE:
        row = store.patient_row(conn, epid=ident.value)
    else:
        rec = store.record_row(conn, dom.id, ident.value)
        row = store.patient_row(conn, id=rec.patient_id) if rec else None
    if row is None:
        raise UnknownPatient(ident.value, dom.namespace)
    return row


def patient_view(conn: Connection, ctx: Ctx, ident: Identifier, *, events: int = 200) -> PatientView:
    pat = _patient_any(conn, ctx, ident)
    rec_rows = conn.execute(select(t.records).where(t.records.c.patient_id == pat.id).order_by(t.records.c.id)).all()
    link_rows = conn.execute(select(t.links).where(t.links.c.patient_id == pat.id).order_by(t.links.c.id)).all()
    merge_rows = conn.execute(select(t.merges).where(or_(t.merges.c.surviving_patient_id == pat.id,
                                                         t.merges.c.subsumed_patient_id == pat.id))
                              .order_by(t.merges.c.id)).all()
    rec_ids = {lr.record_id for lr in link_rows} | {m.surviving_record_id for m in merge_rows} | {
        m.subsumed_record_id for m in merge_rows}
    by_id = {r.id: r for r in store.records_by_ids(conn, [i for i in rec_ids if i is not None])}
    by_id.update({r.id: r for r in rec_rows})
    idents = {i: ctx.ident(r) for i, r in by_id.items()}
    pids = {m.surviving_patient_id for m in merge_rows} | {m.subsumed_patient_id for m in merge_rows} | {pat.id}
    epids = {p: ctx.epid(conn, p) for p in pids}
    merged_into = ctx.epid(conn, pat.merged_into) if pat.merged_into else None
    records = tuple(_source(conn, ctx, r, pat.epid, by_id) for r in rec_rows)
    links: list[Link] = [store.link_from_row(lr, idents[lr.record_id], pat.epid) for lr in link_rows]
    merges: list[Merge] = [store.merge_from_row(m, epids, idents) for m in merge_rows]
    evs = store.events_after(conn, 0, events, patient=pat.epid)
    return PatientView(patient=pat.epid, status=pat.status, merged_into=merged_into, records=records,
                       links=tuple(links), merges=tuple(merges), events=tuple(evs))


def _source(conn: Connection, ctx: Ctx, row: Row[Any], epid: str, by_id: dict[int, Row[Any]]) -> SourceRecord:
    into = None
    if row.merged_into:
        target = by_id.get(row.merged_into) or store.record_by_id(conn, row.merged_into)
        into = ctx.ident(target) if target is not None else None
    return store.source_record(row, ctx.ident(row), epid, into)


def record_view(conn: Connection, ctx: Ctx, ident: Identifier) -> SourceRecord:
    _, row = ctx.resolve_record(conn, ident, active=False)
    return _source(conn, ctx, row, ctx.epid(conn, row.patient_id), {})


def history(conn: Connection, ctx: Ctx, ident: Identifier) -> list[RecordVersion]:
    _, row = ctx.resolve_record(conn, ident, active=False)
    return store.history_of(conn, row.id, ctx.ident(row))


def review_list(conn: Connection, ctx: Ctx, *, state: str, limit: int, offset: int) -> list[ReviewItem]:
    rows = conn.execute(select(t.reviews).where(t.reviews.c.state == state)
                        .order_by(t.reviews.c.score.desc(), t.reviews.c.id).limit(limit).offset(offset)).all()
    recs = {r.id: r for r in store.records_by_ids(conn, {x.record_id for x in rows} | {x.candidate_id for x in rows})}
    out = []
    for rv in rows:
        rec, cand = recs.get(rv.record_id), recs.get(rv.candidate_id)
        if rec is None or cand is None:
            continue
        out.append(store.review_from_row(rv, ctx.ident(rec), ctx.ident(cand), ctx.epid(conn, cand.patient_id)))
    return out

