"""ITI-42 Register Document Set-b: accepted submissions and what the registry stores (SQLite and PostgreSQL).

The NIST ProvideAndRegister bodies (corpus/nist/pnr) give real-world metadata; generated submissions
cover Chinese titles and author names, symbolic ids, folders.  Every response validates against rs.xsd.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import Engine, select

from ihehub.xds import ebrim as E
from ihehub.xds import tables as t
from ihehub.xds.errors import SUCCESS
from ihehub.xds.registry import XdsRegistry
from tests.xds.registry_builders import (
    NIST_BODIES,
    REPOSITORY,
    Builder,
    assert_valid_response,
    counts,
    cx,
    nist_request,
    registry_engine,
    rs_schema,
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    eng = registry_engine(request.param, tmp_path, request)
    yield eng
    eng.dispose()


@pytest.mark.parametrize("body", NIST_BODIES)
def test_nist_submissions_are_registered(engine: Engine, body: str) -> None:
    request = nist_request(body)
    before = etree.tostring(request)
    result = XdsRegistry(engine).register(request)
    assert result.status == SUCCESS, result.errors
    assert etree.tostring(request) == before  # the caller's request is left as it was
    assert_valid_response(result.to_xml())
    assert result.to_xml().get("status") == SUCCESS
    (unique_id,) = result.document_unique_ids
    assert result.patient_id and result.patient_id.endswith("&ISO")
    with engine.connect() as conn:
        objects = conn.execute(select(t.objects).order_by(t.objects.c.id)).all()
        assocs = conn.execute(select(t.associations)).all()
        codes = conn.execute(select(t.codes.c.scheme)).scalars().all()
        slot_names = set(conn.execute(select(t.slots.c.name)).scalars())
    assert sorted(o.kind for o in objects) == ["DocumentEntry", "SubmissionSet"]
    de = next(o for o in objects if o.kind == "DocumentEntry")
    ss = next(o for o in objects if o.kind == "SubmissionSet")
    assert ss.entry_uuid == result.submission_set_uuid
    assert de.unique_id == unique_id and de.status == E.APPROVED and de.repository_unique_id == REPOSITORY
    assert de.patient_id == ss.patient_id == result.patient_id
    assert de.creation_time and de.creation_time.isdigit() and ss.submission_time
    assert de.mime_type in ("text/plain", "application/dicom") and len(de.hash) == 40 and de.size == 0
    for scheme in (E.DE_CLASS_CODE, E.DE_CONFIDENTIALITY_CODE, E.DE_FORMAT_CODE, E.DE_HEALTHCARE_FACILITY_TYPE_CODE,
                   E.DE_PRACTICE_SETTING_CODE, E.DE_TYPE_CODE, E.SS_CONTENT_TYPE_CODE):
        assert scheme in codes
    assert {"authorPerson", "sourcePatientId", "languageCode"} <= slot_names
    (assoc,) = assocs
    assert (assoc.type, assoc.source_uuid, assoc.target_uuid) == (E.ASSOC_HAS_MEMBER, ss.entry_uuid, de.entry_uuid)
    # the stored xml is the object as registered: UUIDs everywhere, Approved, ids on nested objects
    for row in (de, ss):
        el = E.parse_xml(row.xml.encode())
        assert el.get("id") == row.entry_uuid == el.get("lid") and el.get("status") == E.APPROVED
        for child in el.iterchildren(f"{E.RIM}Classification", f"{E.RIM}ExternalIdentifier"):
            assert child.get("id", "").startswith("urn:uuid:")
            assert row.entry_uuid in (child.get("classifiedObject"), child.get("registryObject"))
    ss_el = E.parse_xml(ss.xml.encode())
    assert any(c.get("classificationNode") == E.SS_CLASSIFICATION_NODE
               for c in ss_el.iterchildren(f"{E.RIM}Classification"))
    assert E.parse_xml(assoc.xml.encode()).get("status") == E.APPROVED
    found = XdsRegistry(engine).document(unique_id)
    assert found is not None and found.entry_uuid == de.entry_uuid
    assert XdsRegistry(engine).document("1.2.3.4.5.6.unknown") is None


def test_symbolic_ids_replaced_consistently_with_chinese_metadata(engine: Engine) -> None:
    b = Builder(cx("浙-0001"), title="出院资料 · 第一次提交")
    uid1 = b.document("Document01", title="出院小结：张三（心内科）")
    uid2 = b.document("Document02", title="检验报告：血常规")
    folder_uid = b.folder("Folder01", members=["Document01", "Document02"], title="住院病历夹 2024")
    result = XdsRegistry(engine).register(b.request())
    assert result.status == SUCCESS, result.errors
    assert sorted(result.document_unique_ids) == sorted([uid1, uid2])
    with engine.connect() as conn:
        objects = {o.unique_id: o for o in conn.execute(select(t.objects))}
        assocs = conn.execute(select(t.associations)).all()
        authors = set(conn.execute(select(t.slots.c.value).where(t.slots.c.name == "authorPerson")).scalars())
    assert authors == {"^王^芳^^^", "^李^明^^^"}
    uuids = {o.entry_uuid for o in objects.values()} | {a.entry_uuid for a in assocs}
    assert all(u.startswith("urn:uuid:") for u in uuids) and len(uuids) == 3 + 1 + 1 + 6
    doc1, doc2, folder = objects[uid1], objects[uid2], objects[folder_uid]
    ss = objects[next(k for k, o in objects.items() if o.kind == "SubmissionSet")]
    assert "出院小结：张三（心内科）" in doc1.xml and "住院病历夹 2024" in folder.xml
    pairs = {(a.source_uuid, a.target_uuid) for a in assocs}
    assert {(ss.entry_uuid, doc1.entry_uuid), (ss.entry_uuid, doc2.entry_uuid), (ss.entry_uuid, folder.entry_uuid),
            (folder.entry_uuid, doc1.entry_uuid), (folder.entry_uuid, doc2.entry_uuid)} <= pairs
    folder_members = {a.entry_uuid for a in assocs if a.source_uuid == folder.entry_uuid}
    assert {a.target_uuid for a in assocs if a.source_uuid == ss.entry_uuid} >= folder_members  # SS has the links
    assert not any(a.source_uuid.startswith("Document") or a.target_uuid.startswith("Folder") for a in assocs)
    assert folder.last_update_time and len(folder.last_update_time) == 14
    assert E.slot_values(E.parse_xml(folder.xml.encode()), "lastUpdateTime") == [folder.last_update_time]
    assert "XDSFolder.uniqueId" in folder.xml and folder.patient_id == cx("浙-0001")


def test_uuid_ids_are_kept_and_clock_sets_folder_time(engine: Engine) -> None:
    doc_uuid = "urn:uuid:0f6a2a44-1e0e-4cbb-9f0b-6f5ad2f8d1a1"
    b = Builder(ss_id="urn:uuid:5c1c6c2e-5a6a-4f4b-8a8a-2b1b8d3c0e11")
    b.document(doc_uuid)
    b.folder("urn:uuid:a6d0c0f0-7c8e-4d0e-9b55-0b3d0f1c2e33", members=[doc_uuid])
    result = XdsRegistry(engine, clock=lambda: 1_700_000_000.0).register(b.request())
    assert result.status == SUCCESS, result.errors
    assert result.submission_set_uuid == "urn:uuid:5c1c6c2e-5a6a-4f4b-8a8a-2b1b8d3c0e11"
    with engine.connect() as conn:
        kinds = {r.entry_uuid: r.kind for r in conn.execute(select(t.objects.c.entry_uuid, t.objects.c.kind))}
        folder_time = conn.execute(select(t.objects.c.last_update_time).where(t.objects.c.kind == "Folder")).scalar()
    assert kinds[doc_uuid] == "DocumentEntry" and kinds["urn:uuid:a6d0c0f0-7c8e-4d0e-9b55-0b3d0f1c2e33"] == "Folder"
    assert folder_time == "20231114221320"  # 1_700_000_000 in UTC


def test_resubmitted_document_with_same_hash_is_accepted(engine: Engine) -> None:
    """ITI TF-3 Table 4.2.4.1-2 only refuses a duplicate uniqueId whose hash or size differs."""
    registry = XdsRegistry(engine)
    first = Builder()
    uid = first.document(content=b"same bytes")
    assert registry.register(first.request()).status == SUCCESS
    again = Builder()
    again.document(unique_id=uid, content=b"same bytes")
    result = registry.register(again.request())
    assert result.status == SUCCESS, result.errors
    with engine.connect() as conn:
        rows = conn.execute(select(t.objects.c.entry_uuid).where(t.objects.c.unique_id == uid)
                            .order_by(t.objects.c.id)).scalars().all()
    assert len(rows) == 2
    found = registry.document(uid)
    assert found is not None and found.entry_uuid == rows[-1]  # the newest Approved entry


def test_on_demand_entry_needs_no_hash_or_size(engine: Engine) -> None:
    b = Builder()
    b.document(on_demand=True)
    result = XdsRegistry(engine).register(b.request())
    assert result.status == SUCCESS, result.errors
    with engine.connect() as conn:
        row = conn.execute(select(t.objects).where(t.objects.c.kind == "DocumentEntry")).one()
    assert row.object_type == E.DE_OBJECT_TYPE_ON_DEMAND and row.hash is None and row.size is None


def test_value_sets_accept_configured_codes(engine: Engine) -> None:
    value_sets = {"classCode": {("11490-0", "2.16.840.1.113883.6.1")},
                  E.DE_CONFIDENTIALITY_CODE: {("N", "2.16.840.1.113883.5.25"), ("R", "2.16.840.1.113883.5.25")}}
    b = Builder()
    b.document()
    result = XdsRegistry(engine, value_sets=value_sets).register(b.request())
    assert result.status == SUCCESS, result.errors
    assert counts(engine)["xds_objects"] == 2


def test_patient_known_callback_sees_the_submission_patient(engine: Engine) -> None:
    seen: list[str] = []

    def known(pid: str) -> bool:
        seen.append(pid)
        return True

    b = Builder(cx("P-77"))
    b.document()
    assert XdsRegistry(engine, patient_known=known).register(b.request()).status == SUCCESS
    assert seen == [cx("P-77")]


def test_stored_objects_are_valid_ebrim(engine: Engine) -> None:
    """The stored xml (returned as is by LeafClass queries) validates against rim.xsd (via rs.xsd)."""
    registry = XdsRegistry(engine)
    for body in NIST_BODIES:
        assert registry.register(nist_request(body)).status == SUCCESS
    b = Builder()
    b.document("Document01", title="影像报告")
    b.folder("Folder01", members=["Document01"])
    assert registry.register(b.request()).status == SUCCESS
    schema = rs_schema()
    with engine.connect() as conn:
        stored = [*conn.execute(select(t.objects.c.xml)).scalars(),
                  *conn.execute(select(t.associations.c.xml)).scalars()]
    assert len(stored) == 4 * 3 + 3 + 4  # NIST: SS, DE, HasMember each; ours: SS, DE, Folder + 4 associations
    for xml in stored:
        assert schema.validate(etree.fromstring(xml.encode())), (schema.error_log, xml[:200])
