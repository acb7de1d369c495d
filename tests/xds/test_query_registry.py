"""ITI-42 then ITI-18: submissions registered through :class:`XdsRegistry` (the NIST bodies and generated ones
with a folder and a replacement) are found by the stored queries, as LeafClass valid per query.xsd."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import Engine

from ihehub.xds.errors import SUCCESS
from ihehub.xds.query import StoredQueries
from ihehub.xds.registry import XdsRegistry
from tests.xds.query_fixtures import E, adhoc, by_tag, ids, open_registry, own_pg_database, q, ql
from tests.xds.registry_builders import NIST_BODIES, Builder, cx, nist_request

SCHEMA = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus" / "nist" / "schema" / "query.xsd"


@pytest.fixture(scope="module")
def xsd() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(SCHEMA.resolve())))


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('xdsr')}/registry.sqlite"
        else:  # a database of the module's own: the NIST bodies carry fixed uniqueIds
            request.getfixturevalue("pg_url")  # fails with the start command when PostgreSQL is down
            url = stack.enter_context(own_pg_database())
        eng = open_registry(url)
        stack.callback(eng.dispose)
        yield eng


def query(sq: StoredQueries, xsd: etree.XMLSchema, name: str, params: dict[str, str],
          return_type: str = "LeafClass") -> etree._Element:
    response = sq.run(adhoc(name, params, return_type=return_type))
    xsd.assertValid(response)
    assert response.get("status") == SUCCESS, etree.tostring(response, encoding="unicode")[:1500]
    return response


def test_registered_submission_lifecycle(engine: Engine, xsd: etree.XMLSchema) -> None:
    patient = cx(f"HZ-{secrets.token_hex(4)}")
    registry, sq = XdsRegistry(engine), StoredQueries(engine)
    first = Builder(patient)
    uid1 = first.document("Document01", title="出院小结：张三")
    uid2 = first.document("Document02", title="检验报告")
    first.folder("Folder01", members=["Document01"])
    result = registry.register(first.request())
    assert result.status == SUCCESS, result.errors
    original = registry.document(uid1)
    assert original is not None

    approved = {"$XDSDocumentEntryPatientId": q(patient), "$XDSDocumentEntryStatus": ql(E.APPROVED)}
    leaf = query(sq, xsd, "FindDocuments", approved)
    titles = {e.get("value") for e in leaf.iter("{*}LocalizedString")}
    assert {"出院小结：张三", "检验报告"} <= titles
    assert len(by_tag(leaf)["ExtrinsicObject"]) == 2

    # replace Document01 (RPLC): the original is deprecated, the replacement joins its folder
    second = Builder(patient, ss_id="SubmissionSet02")
    uid3 = second.document("Document03", title="出院小结：张三（修订）")
    second.association(E.ASSOC_RPLC, "Document03", original.entry_uuid)
    result = registry.register(second.request())
    assert result.status == SUCCESS, result.errors
    replacement = registry.document(uid3)
    assert replacement is not None

    found = set(ids(query(sq, xsd, "FindDocuments", approved, return_type="ObjectRef")))
    doc2 = registry.document(uid2)
    assert doc2 is not None
    assert found == {doc2.entry_uuid, replacement.entry_uuid}
    old = query(sq, xsd, "GetDocuments", {"$XDSDocumentEntryUniqueId": ql(uid1)})
    [entry] = old.iterfind("{*}RegistryObjectList/{*}ExtrinsicObject")
    assert entry.get("status") == E.DEPRECATED

    related = query(sq, xsd, "GetRelatedDocuments", {"$XDSDocumentEntryUniqueId": q(uid3),
                                                     "$AssociationTypes": ql(E.ASSOC_RPLC)})
    assert by_tag(related)["ExtrinsicObject"] == {original.entry_uuid, replacement.entry_uuid}

    contents = query(sq, xsd, "GetSubmissionSetAndContents",
                     {"$XDSSubmissionSetEntryUUID": q(result.submission_set_uuid or "")})
    assert replacement.entry_uuid in by_tag(contents)["ExtrinsicObject"]

    folders = query(sq, xsd, "FindFolders", {"$XDSFolderPatientId": q(patient), "$XDSFolderStatus": ql(E.APPROVED)})
    [folder] = by_tag(folders)["RegistryPackage"]
    in_folder = query(sq, xsd, "GetFolderAndContents", {"$XDSFolderEntryUUID": q(folder)})
    assert by_tag(in_folder)["ExtrinsicObject"] == {original.entry_uuid, replacement.entry_uuid}
    approved_sets = ql(E.APPROVED)
    everything = query(sq, xsd, "GetAll", {"$patientId": q(patient),
                                           "$XDSDocumentEntryStatus": ql(E.APPROVED, E.DEPRECATED),
                                           "$XDSSubmissionSetStatus": approved_sets, "$XDSFolderStatus": approved_sets})
    tags = by_tag(everything)
    assert len(tags["ExtrinsicObject"]) == 3 and len(tags["RegistryPackage"]) == 3  # 2 sets + folder
    packages = everything.iterfind("{*}RegistryObjectList/{*}RegistryPackage")
    nodes = [c.get("classificationNode") for p in packages for c in p.iterfind("{*}Classification")]
    assert nodes.count(E.SS_CLASSIFICATION_NODE) == 2 and nodes.count(E.FOLDER_CLASSIFICATION_NODE) == 1


def test_nist_submissions_are_found(engine: Engine, xsd: etree.XMLSchema) -> None:
    registry, sq = XdsRegistry(engine), StoredQueries(engine)
    for body in NIST_BODIES:
        result = registry.register(nist_request(body))
        assert result.status == SUCCESS, (body, result.errors)
        params = {"$XDSDocumentEntryPatientId": q(result.patient_id or ""),
                  "$XDSDocumentEntryStatus": ql(E.APPROVED)}
        found = by_tag(query(sq, xsd, "FindDocuments", params))["ExtrinsicObject"]
        doc = registry.document(result.document_unique_ids[0])
        assert doc is not None and doc.entry_uuid in found, body
        sets = query(sq, xsd, "GetSubmissionSets", {"$uuid": ql(doc.entry_uuid)}, return_type="ObjectRef")
        assert result.submission_set_uuid in ids(sets), body
