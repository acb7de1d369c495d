"""ITI-42 refusals: every error of ITI TF-3 Table 4.2.4.1-2 the registry raises, each with nothing registered.

Each refusal is a Failure ``rs:RegistryResponse`` valid against rs.xsd whose RegistryError names the
object and the attribute (codeContext) and leaves the tables as they were (all-or-nothing).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from ihehub.xds import ebrim as E
from ihehub.xds import tables as t
from ihehub.xds.errors import SUCCESS, XdsFailure
from ihehub.xds.registry import XdsRegistry, _Plan
from tests.xds.registry_builders import Builder, counts, cx, nist_request, nothing_stored, refused, registry_engine


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    eng = registry_engine(request.param, tmp_path, request)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    eng = registry_engine("sqlite", tmp_path, request)
    yield eng
    eng.dispose()


DE_REQUIRED = ["creationTime", "languageCode", "sourcePatientId", "hash", "size", "repositoryUniqueId",
               "classCode", "confidentialityCode", "formatCode", "healthcareFacilityTypeCode", "practiceSettingCode",
               "typeCode", "patientId", "uniqueId", "mimeType"]
SS_REQUIRED = ["submissionTime", "sourceId", "uniqueId", "patientId", "contentTypeCode"]


@pytest.mark.parametrize("attribute", DE_REQUIRED)
def test_document_entry_required_attributes(sqlite: Engine, attribute: str) -> None:
    b = Builder()
    b.document("Document01")
    b.document("Document02", omit=[attribute])
    refused(XdsRegistry(sqlite).register(b.request()), "XDSRegistryMetadataError",
            "DocumentEntry Document02", attribute)
    nothing_stored(sqlite)  # Document01 was fine but is not registered either


@pytest.mark.parametrize("attribute", SS_REQUIRED)
def test_submission_set_required_attributes(sqlite: Engine, attribute: str) -> None:
    b = Builder(omit=[attribute])
    b.document()
    refused(XdsRegistry(sqlite).register(b.request()), "XDSRegistryMetadataError", "SubmissionSet SubmissionSet01",
            attribute)
    nothing_stored(sqlite)


@pytest.mark.parametrize(("slot", "value", "fragment"), [
    ("creationTime", "2024-11-27", "creationTime '2024-11-27' is not a DTM"),
    ("hash", "not-a-sha1", "hash 'not-a-sha1'"),
    ("size", "twelve", "size 'twelve' is not an integer"),
    ("size", "-1", "size -1 is negative"),
])
def test_document_entry_malformed_values(sqlite: Engine, slot: str, value: str, fragment: str) -> None:
    b = Builder()
    b.document()
    request = b.request()
    E.set_slot(request.find(f".//{E.RIM}ExtrinsicObject"), slot, [value])
    refused(XdsRegistry(sqlite).register(request), "XDSRegistryMetadataError", fragment)
    nothing_stored(sqlite)


def test_code_needs_coding_scheme_and_single_class_code(sqlite: Engine) -> None:
    b = Builder()
    b.document("Document01", omit=["typeCode.codingScheme"])
    refused(XdsRegistry(sqlite).register(b.request()), "XDSRegistryMetadataError", "Document01", "typeCode",
            "codingScheme")
    b = Builder()
    b.document("Document01")
    request = b.request()
    eo = request.find(f".//{E.RIM}ExtrinsicObject")
    eo.append(etree.fromstring(etree.tostring(E.classifications(eo, E.DE_CLASS_CODE)[0])))
    refused(XdsRegistry(sqlite).register(request), "XDSRegistryMetadataError", "classCode given 2 times")
    nothing_stored(sqlite)


def test_limited_metadata_is_refused(sqlite: Engine) -> None:
    b = Builder()
    b.document("Document01")
    request = b.request()
    eo = request.find(f".//{E.RIM}ExtrinsicObject")
    eo.find(f"{E.RIM}ExternalIdentifier").addprevious(etree.Element(
        f"{E.RIM}Classification", classifiedObject="Document01", classificationNode=E.DE_LIMITED_METADATA))
    refused(XdsRegistry(sqlite).register(request), "XDSRegistryMetadataError", "Document01", "limited metadata")


def test_patient_id_must_be_cx(sqlite: Engine) -> None:
    b = Builder("12345")
    b.document()
    refused(XdsRegistry(sqlite).register(b.request()), "XDSRegistryMetadataError", "patientId '12345' is not a CX")


@pytest.mark.parametrize("what", ["document", "folder"])
def test_patient_id_does_not_match(engine: Engine, what: str) -> None:
    b = Builder(cx("P-1"))
    if what == "document":
        b.document("Document01", patient=cx("P-2"))
    else:
        b.document("Document01")
        b.folder("Folder01", patient=cx("P-2"), members=["Document01"])
    refused(XdsRegistry(engine).register(b.request()), "XDSPatientIdDoesNotMatch",
            "Document01" if what == "document" else "Folder01", cx("P-2"), cx("P-1"))
    nothing_stored(engine)


def test_unknown_patient_id(engine: Engine) -> None:
    b = Builder(cx("无名氏"))
    b.document()
    result = XdsRegistry(engine, patient_known=lambda pid: pid == cx("P-1")).register(b.request())
    refused(result, "XDSUnknownPatientId", cx("无名氏"))

    def broken(pid: str) -> bool:
        raise ConnectionError("EMPI down")

    refused(XdsRegistry(engine, patient_known=broken).register(b.request()), "XDSRegistryError",
            "patient identity lookup failed: ConnectionError")
    nothing_stored(engine)


def test_duplicate_unique_id_in_message(engine: Engine) -> None:
    b = Builder()
    uid = b.document("Document01")
    b.document("Document02", unique_id=uid)
    refused(XdsRegistry(engine).register(b.request()), "XDSRegistryDuplicateUniqueIdInMessage", uid, "Document02")
    b = Builder(ss_unique_id="1.2.156.7.7.7")
    b.document()
    b.folder(unique_id="1.2.156.7.7.7")
    refused(XdsRegistry(engine).register(b.request()), "XDSRegistryDuplicateUniqueIdInMessage", "1.2.156.7.7.7")
    nothing_stored(engine)


def test_registered_unique_id_with_other_hash_or_size(engine: Engine) -> None:
    registry = XdsRegistry(engine)
    first = Builder(ss_unique_id="1.2.156.8.1")
    uid = first.document(content=b"original bytes")
    assert registry.register(first.request()).status == SUCCESS
    before = counts(engine)
    other = Builder()
    other.document(unique_id=uid, content=b"other bytes!!!")
    refused(registry.register(other.request()), "XDSNonIdenticalHash", uid)
    same_hash = Builder()
    same_hash.document(unique_id=uid, content=b"original bytes")
    request = same_hash.request()
    E.set_slot(request.find(f".//{E.RIM}ExtrinsicObject"), "size", ["999"])
    refused(registry.register(request), "XDSNonIdenticalSize", uid, "999")
    resubmitted_set = Builder(ss_unique_id="1.2.156.8.1")
    resubmitted_set.document()
    refused(registry.register(resubmitted_set.request()), "XDSRegistryDuplicateUniqueIdInMessage", "1.2.156.8.1",
            "already registered")
    nothing_stored(engine, before)


def test_value_set_refuses_unknown_code(engine: Engine) -> None:
    b = Builder()
    b.document("Document01", codes={"classCode": ("99999-9", "2.16.840.1.113883.6.1")})
    registry = XdsRegistry(engine, value_sets={"classCode": {("11490-0", "2.16.840.1.113883.6.1")}})
    refused(registry.register(b.request()), "XDSRegistryMetadataError", "Document01", "classCode 99999-9",
            "not in the configured value set")
    b = Builder()
    b.document("Document01", codes={"classCode": ("11490-0", "other-scheme")})
    refused(registry.register(b.request()), "XDSRegistryMetadataError", "classCode 11490-0 (codingScheme other-scheme)")
    nothing_stored(engine)


def test_structure_errors(sqlite: Engine) -> None:
    registry = XdsRegistry(sqlite)
    not_a_submission = etree.Element(f"{{{E.NS['lcm']}}}RemoveObjectsRequest")
    refused(registry.register(not_a_submission), "XDSRegistryMetadataError", "expected lcm:SubmitObjectsRequest")
    b = Builder()
    b.document()
    request = b.request()
    object_list = request[0]
    for c in object_list.findall(f"{E.RIM}Classification"):  # the SubmissionSet is no longer classified as one
        object_list.remove(c)
    refused(registry.register(request), "XDSRegistryMetadataError", "exactly one SubmissionSet, found 0")
    b = Builder()
    b.document("Document01", member=False)
    refused(registry.register(b.request()), "XDSRegistryMetadataError", "Document01", "not a member")
    b = Builder()
    b.document("Document01")
    b.association(E.ASSOC_HAS_MEMBER, "SubmissionSet01", "Document99", status="Original")
    refused(registry.register(b.request()), "UnresolvedReferenceException", "Document99")
    b = Builder()
    b.document("Document01")
    b.association("urn:example:Likes", "Document01", "SubmissionSet01")
    refused(registry.register(b.request()), "XDSRegistryMetadataError", "urn:example:Likes")
    b = Builder()
    b.document("Document01", member=False)
    b.association(E.ASSOC_HAS_MEMBER, "SubmissionSet01", "Document01")  # without SubmissionSetStatus
    refused(registry.register(b.request()), "XDSRegistryMetadataError", "SubmissionSetStatus")
    b = Builder()
    b.document("Document01")
    b.document("Document01")
    refused(registry.register(b.request()), "XDSRegistryMetadataError", "id Document01 is used by more than one")
    b = Builder()
    b.document("urn:uuid:not-a-uuid")
    refused(registry.register(b.request()), "XDSRegistryMetadataError", "urn:uuid:not-a-uuid is not a valid urn:uuid")
    nothing_stored(sqlite)


def test_entry_uuid_already_registered(engine: Engine) -> None:
    registry = XdsRegistry(engine)
    doc = "urn:uuid:7a0c1d4e-3b1f-4c55-9a39-2d1f4f1c9e01"
    first = Builder()
    first.document(doc)
    assert registry.register(first.request()).status == SUCCESS
    before = counts(engine)
    second = Builder()
    second.document(doc)
    refused(registry.register(second.request()), "XDSRegistryMetadataError", doc, "already registered")
    nothing_stored(engine, before)


def test_database_failure_rolls_back_everything(engine: Engine) -> None:
    """A database error after rows were written: XDSRegistryError and none of the rows is kept."""

    class FailingAfterWrites(XdsRegistry):
        def _store(self, conn: Connection, plan: _Plan) -> None:
            super()._store(conn, plan)
            assert counts_in(conn) > 0  # written inside the transaction ...
            raise OperationalError("INSERT", {}, Exception("disk full"))

    def counts_in(conn: Connection) -> int:
        return int(conn.execute(select(func.count()).select_from(t.objects)).scalar_one())

    result = FailingAfterWrites(engine).register(nist_request("NoXop"))
    refused(result, "XDSRegistryError", "database error")
    nothing_stored(engine)  # ... and rolled back


def test_xml_safety() -> None:
    bomb = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            b'<l>&b;</l>')
    with pytest.raises(XdsFailure) as exc:
        E.parse_xml(bomb)
    assert exc.value.errors[0].code == "XDSRegistryMetadataError" and "DOCTYPE" in exc.value.errors[0].context
    with pytest.raises(XdsFailure, match="not well-formed"):
        E.parse_xml(b"<lcm:SubmitObjectsRequest")
