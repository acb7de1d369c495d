"""The EMPI service end to end on SQLite and PostgreSQL: feed, cross-reference, merge/unmerge, review, PDQ."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Table, func, select

from ihehub.empi import (
    Address,
    Conflict,
    Empi,
    EventType,
    Identifier,
    InvalidData,
    LinkKind,
    MissingField,
    NotFound,
    PatientQuery,
    PatientRecord,
    PersonName,
    SubsumedPatient,
    UnknownDomain,
    UnknownPatient,
    UnknownValue,
)
from ihehub.empi import tables as t
from tests.empi.conftest import make_ric, person


def A(v: str) -> Identifier:
    return Identifier(value=v, domain="HOSP_A")


def B(v: str) -> Identifier:
    return Identifier(value=v, domain="HOSP_B")


def C(v: str) -> Identifier:
    return Identifier(value=v, domain="HOSP_C")


def rows(empi: Empi, table: Table) -> int:
    with empi.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


ZHANG_RIC = make_ric("19800101", "011")


def zhang(pid: str, **kw: Any) -> PatientRecord:
    base: dict[str, Any] = {"phones": ("13812345678",), "national_id": ZHANG_RIC}
    base.update(kw)
    return person(pid, "张三", birth="19800101", sex="M", **base)


def test_register_links_hanzi_and_pinyin_records_and_cross_references(empi: Empi) -> None:
    r1 = empi.register("HOSP_A", zhang("A1"))
    assert r1.created and r1.outcome == "new" and r1.patient.startswith("E")
    assert [e.type for e in r1.events] == [EventType.REGISTERED]
    # a pinyin-only spelling from another hospital, addressed by its OID, with the phone written differently
    r2 = empi.register("1.2.156.1.2", person("B1", "ZHANG", "SAN", birth="1980-01-01", sex="M",
                                             phones=("+86 138-1234-5678",), national_id=ZHANG_RIC))
    assert r2.outcome == "linked" and r2.patient == r1.patient
    assert r2.best is not None and r2.best.decision == "link" and r2.best.record == A("A1")
    assert {f.field: f.level for f in r2.best.fields}["family"] == "exact"
    ev = r2.events[0]
    assert ev.type is EventType.REGISTERED and ev.record == B("B1")
    assert set(ev.identifiers) == {Identifier(value=r1.patient, domain="IHEHUB"), A("A1"), B("B1")}

    xref = empi.cross_reference(A("A1"))
    assert xref.patient == r1.patient and A("A1") not in xref.identifiers
    assert set(xref.identifiers) == {Identifier(value=r1.patient, domain="IHEHUB"), B("B1")}
    assert empi.cross_reference(A("A1"), ["1.2.156.1.2"]).identifiers == (B("B1"),)
    assert empi.cross_reference(A("A1"), ["HOSP_C"]).identifiers == ()  # known patient, nothing there: NF
    assert empi.cross_reference(Identifier(value=r1.patient, domain="IHEHUB"), ["HOSP_A"]).identifiers == (A("A1"),)
    with pytest.raises(UnknownPatient) as unknown:
        empi.cross_reference(A("NOPE"))
    assert unknown.value.code == "204" and unknown.value.query_location == "QPD^1^3^1^1"
    with pytest.raises(UnknownDomain) as dom:
        empi.cross_reference(Identifier(value="A1", domain="NOWHERE"))
    assert dom.value.code == "204" and dom.value.query_location == "QPD^1^3^1^4"
    with pytest.raises(UnknownDomain) as target:
        empi.cross_reference(A("A1"), ["NOWHERE"])
    assert target.value.field == "what_domains" and target.value.query_location == "QPD^1^4"


@pytest.mark.parametrize(("record", "error", "field", "code"), [
    (person("X1", "李四", national_id="110105198001010012"), InvalidData, "national_id", "102"),
    (person("X1", "李四", birth="20230230"), InvalidData, "birth_date", "102"),
    (person("X1", "李四", birth="21000101"), InvalidData, "birth_date", "102"),
    (person("X1", "李四", sex="Q"), UnknownValue, "sex", "103"),
    (PatientRecord(pid="X1", birth_date="19800101"), MissingField, "names", "101"),
    (person("", "李四"), MissingField, "identifier.value", "101"),
    (person("X" * 200, "李四"), InvalidData, "identifier.value", "102"),
])
def test_bad_input_is_refused_naming_the_field_and_nothing_is_stored(
        empi: Empi, record: PatientRecord, error: type[Exception], field: str, code: str) -> None:
    with pytest.raises(error) as exc:
        empi.register("HOSP_A", record)
    assert exc.value.field == field and exc.value.code == code  # type: ignore[attr-defined]
    assert rows(empi, t.records) == rows(empi, t.events) == rows(empi, t.patients) == 0
    with pytest.raises(UnknownDomain) as dom:
        empi.register("NOWHERE", person("X1", "李四"))
    assert dom.value.location == "PID^1^3^1^4"
    with pytest.raises(InvalidData, match="source domain"):
        empi.register("IHEHUB", person("X1", "李四"))


def test_a_feed_that_fails_midway_leaves_nothing_behind(empi: Empi, monkeypatch: pytest.MonkeyPatch) -> None:
    from ihehub.empi import feed

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(feed, "_reviews", broken)  # after the record, its index, link and event are written
    with pytest.raises(RuntimeError):
        empi.register("HOSP_A", zhang("A1"))
    for table in (t.records, t.patients, t.links, t.history, t.block_keys, t.names, t.events):
        assert rows(empi, table) == 0, table.name


def test_update_keeps_every_version_and_rematches_an_automatic_link(empi: Empi) -> None:
    first = empi.register("HOSP_A", zhang("A1"))
    empi.register("HOSP_B", zhang("B1"))
    same = empi.update("HOSP_A", zhang("A1"))
    assert same.outcome == "unchanged" and same.events == ()
    changed = empi.update("HOSP_A", zhang("A1", phones=("13900000000",)), message_id="MSG-2")
    assert changed.outcome == "updated" and [e.type for e in changed.events] == [EventType.UPDATED]
    hist = empi.history(A("A1"))
    assert [(h.version, h.event) for h in hist] == [(1, "A01"), (2, "A08")]
    assert hist[0].record.phones == ("13812345678",) and hist[1].record.phones == ("13900000000",)
    assert hist[1].message_id == "MSG-2"
    # B1 becomes somebody else entirely: it leaves the patient, which keeps A1
    moved = empi.update("HOSP_B", person("B1", "欧阳娜娜", birth="19990909", sex="F"))
    assert moved.outcome == "unlinked" and moved.patient != first.patient
    assert [e.type for e in moved.events] == [EventType.UPDATED, EventType.UNLINKED]
    assert empi.cross_reference(A("A1"), ["HOSP_B"]).identifiers == ()
    with pytest.raises(UnknownPatient):
        empi.update("HOSP_C", zhang("C9"))
    assert empi.update("HOSP_C", zhang("C9"), create=True).outcome == "linked"


def _two_patients(empi: Empi) -> tuple[str, str]:
    p1 = empi.register("HOSP_A", zhang("A1")).patient
    assert empi.register("HOSP_B", zhang("B1")).patient == p1
    p2 = empi.register("HOSP_A", person("A2", "欧阳娜娜", birth="19990909", sex="F", phones=("13700000000",))).patient
    assert empi.register("HOSP_C", person("C1", "欧阳娜娜", birth="19990909", sex="F",
                                          phones=("13700000000",))).patient == p2
    assert p1 != p2
    return p1, p2


def test_a40_merge_moves_the_subsumed_patient_and_unmerge_restores_it(empi: Empi) -> None:
    p1, p2 = _two_patients(empi)
    res = empi.merge(A("A1"), A("A2"), message_id="A40-1")
    assert res.patient == p1 and res.merge is not None and res.merge.kind == "A40"
    ev = res.events[0]
    assert ev.type is EventType.MERGED and ev.subsumed == A("A2") and ev.other_patient == p2
    assert set(empi.cross_reference(A("A1")).identifiers) == {Identifier(value=p1, domain="IHEHUB"), B("B1"), C("C1")}
    with pytest.raises(SubsumedPatient) as sub:
        empi.cross_reference(A("A2"))
    assert sub.value.surviving == ("A1", "HOSP_A") and sub.value.code == "204"
    with pytest.raises(SubsumedPatient):
        empi.register("HOSP_A", person("A2", "欧阳娜娜"))
    with pytest.raises(SubsumedPatient):
        empi.cross_reference(Identifier(value=p2, domain="IHEHUB"))
    view = empi.patient(A("A1"))
    assert view.status == "active" and len(view.merges) == 1
    assert {r.identifier for r in view.records if r.status == "active"} == {A("A1"), B("B1"), C("C1")}
    assert any(lk.closed_at is not None for lk in empi.patient(Identifier(value=p2, domain="IHEHUB")).links)
    assert empi.record(A("A2")).status == "merged" and empi.record(A("A2")).merged_into == A("A1")

    undone = empi.unmerge(A("A2"), by="nurse")
    assert [e.type for e in undone.events] == [EventType.UNMERGED]
    assert set(empi.cross_reference(A("A1")).identifiers) == {Identifier(value=p1, domain="IHEHUB"), B("B1")}
    assert set(empi.cross_reference(A("A2")).identifiers) == {Identifier(value=p2, domain="IHEHUB"), C("C1")}
    assert empi.patient(A("A1")).merges[0].undone_at is not None
    with pytest.raises(NotFound):
        empi.unmerge(A("A2"), by="nurse")
    with pytest.raises(Conflict):
        empi.unmerge(res.merge.id, by="nurse")


def test_merge_errors_name_the_field(empi: Empi) -> None:
    _two_patients(empi)
    with pytest.raises(UnknownPatient) as missing:
        empi.merge(A("A1"), A("NOPE"))
    assert missing.value.field == "subsumed.value" and missing.value.location == "MRG^1^1^1^1"
    with pytest.raises(UnknownPatient) as missing_surv:
        empi.merge(A("NOPE"), A("A1"))
    assert missing_surv.value.field == "identifier.value"
    with pytest.raises(InvalidData) as cross:
        empi.merge(A("A1"), B("B1"))
    assert cross.value.field == "subsumed.domain"
    with pytest.raises(Conflict):
        empi.merge(A("A1"), A("A1"))
    with pytest.raises(UnknownDomain) as dom:
        empi.merge(A("A1"), Identifier(value="X", domain="NOWHERE"))
    assert dom.value.field == "subsumed.domain"


def test_manual_merge_of_enterprise_patients_and_unmerge_by_id(empi: Empi) -> None:
    p1, p2 = _two_patients(empi)
    res = empi.merge(Identifier(value=p1, domain="IHEHUB"), Identifier(value=p2, domain="IHEHUB"), by="admin")
    assert res.merge is not None and res.merge.kind == "manual"
    assert len(empi.cross_reference(C("C1")).identifiers) == 4  # E, A1, A2, B1
    empi.unmerge(res.merge.id, by="admin")
    assert empi.cross_reference(C("C1")).patient == p2


def test_review_accept_and_reject(empi: Empi) -> None:
    a = empi.register("HOSP_A", person("A1", "王伟", birth="19800101", sex="M"))
    # same name, same year, another day and month: between the thresholds
    b = empi.register("HOSP_B", person("B1", "王伟", birth="19800315", sex="M"))
    assert b.outcome == "review" and b.patient != a.patient and len(b.review) == 1
    queue = empi.review_queue()
    assert [(q.record, q.candidate) for q in queue] == [(B("B1"), A("A1"))]
    assert {f.field for f in queue[0].fields} >= {"family", "given", "birth_date"}
    accepted = empi.accept(queue[0].id, by="reviewer")
    assert accepted.patient == a.patient
    assert [e.type for e in accepted.events] == [EventType.LINKED, EventType.DELETED]
    assert accepted.events[1].patient == b.patient  # B1's own patient is left empty: retired
    assert B("B1") in empi.cross_reference(A("A1")).identifiers
    links = [lk for lk in empi.patient(B("B1")).links if lk.closed_at is None and lk.record == B("B1")]
    assert links[0].kind is LinkKind.REVIEW and links[0].score == queue[0].score
    with pytest.raises(Conflict):
        empi.accept(queue[0].id, by="reviewer")
    with pytest.raises(NotFound):
        empi.reject(999, by="reviewer")

    c = empi.register("HOSP_C", person("C1", "王伟", birth="19800620", sex="M"))
    item = c.review[0]
    assert empi.reject(item.id, by="reviewer").events == ()
    assert empi.review_queue(state="rejected")[0].id == item.id
    # fed again with a change: the rejected pair is not proposed again
    again = empi.update("HOSP_C", person("C1", "王伟", birth="19800620", sex="M", phones=("010-1234567",)))
    assert all(r.candidate.domain != "HOSP_A" for r in again.review)


def test_duplicate_inside_one_domain_goes_to_review_never_auto_link(empi: Empi) -> None:
    first = empi.register("HOSP_A", zhang("A1"))
    dup = empi.register("HOSP_A", zhang("A9"))
    assert dup.patient != first.patient and dup.outcome == "review"
    assert "possible duplicate" in dup.review[0].reason


def test_link_and_unlink_by_hand(empi: Empi) -> None:
    p1, p2 = _two_patients(empi)
    res = empi.link(C("C1"), Identifier(value=p1, domain="IHEHUB"), by="admin", reason="same person, checked")
    assert res.patient == p1 and res.events[0].type is EventType.LINKED and res.events[0].other_patient == p2
    assert C("C1") in empi.cross_reference(A("A1")).identifiers
    with pytest.raises(Conflict):
        empi.link(C("C1"), A("A1"), by="admin")
    un = empi.unlink(C("C1"), by="admin")
    assert un.patient not in (p1, p2) and un.events[0].type is EventType.UNLINKED
    # a later feed of C1 does not move it: a link set by a person is not re-matched automatically
    again = empi.update("HOSP_C", person("C1", "欧阳娜娜", birth="19990909", sex="F", phones=("13700000001",)))
    assert again.outcome == "updated" and again.patient == un.patient
    lone = empi.register("HOSP_C", person("C7", "赵六", birth="19700101", sex="F"))
    with pytest.raises(Conflict):
        empi.unlink(C("C7"), by="admin")
    assert lone.outcome == "new"


def test_delete_retires_a_patient_left_without_records(empi: Empi) -> None:
    r = empi.register("HOSP_A", person("A5", "赵六", birth="19700101", sex="F"))
    res = empi.delete(A("A5"), by="feed")
    assert res.events[0].type is EventType.DELETED and res.events[0].detail["patient_retired"] is True
    with pytest.raises(UnknownPatient):
        empi.cross_reference(A("A5"))
    assert empi.patient(Identifier(value=r.patient, domain="IHEHUB")).status == "retired"
    back = empi.register("HOSP_A", person("A5", "赵六", birth="19700101", sex="F"))
    assert back.outcome in ("updated", "linked") and empi.record(A("A5")).status == "active"


def test_find_with_wildcards_pinyin_and_domains(empi: Empi) -> None:
    _two_patients(empi)
    empi.register("HOSP_B", PatientRecord(pid="B7", names=(PersonName(family="Smith", given="John"),),
                                          birth_date="19550505", sex="M",
                                          addresses=(Address(line1="1 High St", city="Leeds", postcode="LS1 1AA"),)))
    assert empi.find(PatientQuery(family="张三")).total == 1
    assert empi.find(PatientQuery(family="张")).total == 1
    assert empi.find(PatientQuery(family="ZHANG*")).total == 1
    assert empi.find(PatientQuery(family="ouyang", given="nana")).total == 1
    assert empi.find(PatientQuery(family="SM*", birth_date="1955")).total == 1
    assert empi.find(PatientQuery(birth_date="1999*", sex="F")).total == 1
    assert empi.find(PatientQuery(phone="+86 137 0000 0000")).total == 1
    assert empi.find(PatientQuery(postcode="LS11AA", line1="1 HIGH*")).total == 1
    assert empi.find(PatientQuery(national_id=ZHANG_RIC)).total == 1
    got = empi.find(PatientQuery(identifier=A("A1")), domains=["HOSP_B"])
    assert got.total == 1 and got.matches[0].identifiers == (B("B1"),)
    assert empi.find(PatientQuery(family="ouyang"), domains=["HOSP_B"]).total == 0
    page = empi.find(PatientQuery(birth_date="19*"), limit=2, offset=2)
    assert page.total == 3 and len(page.matches) == 1 and page.offset == 2
    with pytest.raises(MissingField):
        empi.find(PatientQuery())
    with pytest.raises(UnknownDomain) as dom:
        empi.find(PatientQuery(family="张三"), domains=["NOWHERE"])
    assert dom.value.field == "what_domains"


def test_events_are_an_ordered_outbox(empi: Empi) -> None:
    _two_patients(empi)
    empi.merge(A("A1"), A("A2"))
    evs = empi.events()
    assert [e.id for e in evs] == sorted(e.id for e in evs)
    assert [e.type for e in evs][-1] is EventType.MERGED
    assert evs[-1].to_json()["subsumed"] == {"value": "A2", "domain": "HOSP_A"}
    assert empi.events(after=evs[-2].id) == [evs[-1]]
