"""ebRIM helpers: the ITI TF-3 4.2.5 identifiers, safe parsing, submissions, slots and RegistryResponses."""

from __future__ import annotations

import re

import pytest
from lxml import etree

from ihehub.xds import ebrim as E
from ihehub.xds.errors import (
    FAILURE,
    PARTIAL_SUCCESS,
    SEVERITY_WARNING,
    SUCCESS,
    XdsError,
    XdsFailure,
    error_list,
    registry_response,
)
from tests.xds.registry_builders import NIST_BODIES, NIST_PNR, Builder, assert_valid_response, cx, nist_request

UUID_RE = re.compile(r"^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
IDENTIFIERS = {name: value for name, value in vars(E).items()
               if re.match(r"^(DE|SS|FOLDER)_", name) and isinstance(value, str)}


def test_identifiers_are_distinct_uuids() -> None:
    assert len(IDENTIFIERS) == 25  # DocumentEntry 13, SubmissionSet 7, Folder 5 (ITI TF-3 4.2.5)
    assert all(UUID_RE.match(v) for v in IDENTIFIERS.values()), IDENTIFIERS
    assert len(set(IDENTIFIERS.values())) == len(IDENTIFIERS)
    assert set(E.CODE_SCHEMES) <= set(IDENTIFIERS.values())
    assert E.ASSOC_HAS_MEMBER == "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
    assert {a.rsplit(":", 1)[1] for a in E.DOCUMENT_RELATIONSHIPS} == {"RPLC", "XFRM", "APND", "XFRM_RPLC", "signs"}


@pytest.mark.parametrize("body", NIST_BODIES)
def test_nist_bodies_use_our_identifiers(body: str) -> None:
    """Every scheme / node / objectType UUID of the NIST metadata is one of ours (by name)."""
    text = (NIST_PNR / body / "body.txt").read_text(encoding="utf-8")
    used = set(re.findall(r'(?:classificationScheme|identificationScheme|classificationNode|objectType)='
                          r'"(urn:uuid:[0-9a-f-]+)"', text))
    assert used and used <= set(IDENTIFIERS.values()), used - set(IDENTIFIERS.values())


@pytest.mark.parametrize("body", NIST_BODIES)
def test_parse_nist_submissions(body: str) -> None:
    sub = E.parse_submission(nist_request(body))
    assert sub.submission_set.get("id") == sub.submission_set_uuid
    assert sub.patient_id and re.match(r"^[^^]+\^\^\^&[0-9.]+&ISO$", sub.patient_id)
    (doc,) = sub.documents
    assert doc.unique_id and doc.patient_id == sub.patient_id
    assert doc.object_type == E.DE_OBJECT_TYPE_STABLE and doc.mime_type
    assert doc.hash and len(doc.hash) == 40 and doc.size == 0 and doc.repository_unique_id
    assert sub.folders == [] and len(sub.associations) == 1
    codes = {E.CODE_SCHEMES[c.scheme] for c in E.codes(doc.element)}
    assert {"classCode", "confidentialityCode", "formatCode", "healthcareFacilityTypeCode", "practiceSettingCode",
            "typeCode"} <= codes
    assert all(c.coding_scheme for c in E.codes(doc.element))
    assert E.slot_values(doc.element, "creationTime")[0].isdigit()
    assert E.authors(doc.element) and E.authors(sub.submission_set)


def test_parse_generated_submission_with_folder() -> None:
    b = Builder(cx("杭-1"))
    b.document("Document01", title="病理报告")
    b.folder("Folder01", members=["Document01"])
    sub = E.parse_submission(b.request())
    assert [f.get("id") for f in sub.folders] == ["Folder01"] and sub.submission_set_uuid == "SubmissionSet01"
    assert sub.patient_id == cx("杭-1") and sub.documents[0].entry_uuid == "Document01"
    assert E.localized(sub.documents[0].element) == "病理报告"
    assert len(sub.classifications) == 2 and len(sub.associations) == 4


def test_parse_submission_structure_errors() -> None:
    def errors_of(request: etree._Element) -> list[str]:
        with pytest.raises(XdsFailure) as exc:
            E.parse_submission(request)
        assert all(e.code == "XDSRegistryMetadataError" for e in exc.value.errors)
        return [e.context for e in exc.value.errors]

    b = Builder()
    b.document()
    request = b.request()
    object_list = request[0]
    etree.SubElement(object_list, "{urn:example}Other")
    etree.SubElement(object_list, f"{E.RIM}RegistryPackage", id="Loose")
    etree.SubElement(object_list, f"{E.RIM}ExtrinsicObject")
    etree.SubElement(object_list, f"{E.RIM}Service", id="svc")
    found = errors_of(request)
    assert any("unexpected element {urn:example}Other" in c for c in found)
    assert any("RegistryPackage Loose is classified neither" in c for c in found)
    assert any("rim:ExtrinsicObject without id" in c for c in found)
    assert any("rim:Service svc not allowed" in c for c in found)
    two = Builder().request()
    two[0].extend(Builder(ss_id="SubmissionSet02").request()[0])
    assert any("exactly one SubmissionSet, found 2" in c for c in errors_of(two))
    no_list = etree.Element(f"{E.LCM}SubmitObjectsRequest")
    assert errors_of(no_list) == ["SubmitObjectsRequest without rim:RegistryObjectList"]


def test_slots_and_external_ids() -> None:
    eo = etree.Element(f"{E.RIM}ExtrinsicObject", id="d")
    etree.SubElement(etree.SubElement(eo, f"{E.RIM}Name"), f"{E.RIM}LocalizedString", value="标题")
    E.set_slot(eo, "creationTime", ["20241127"])
    E.set_slot(eo, "languageCode", ["zh-CN"])
    E.set_slot(eo, "creationTime", ["20241128", "x"])  # replaced, not added
    tags = [etree.QName(c).localname for c in eo]
    assert tags == ["Slot", "Slot", "Name"]  # ebRIM order: Slots first
    assert E.slot_values(eo, "creationTime") == ["20241128", "x"] and E.slot_value(eo, "languageCode") == "zh-CN"
    assert E.slot_values(eo, "missing") == [] and E.slot_value(eo, "missing") is None
    etree.SubElement(eo, f"{E.RIM}ExternalIdentifier", identificationScheme=E.DE_UNIQUE_ID, value="1.2.3")
    assert E.external_id(eo, E.DE_UNIQUE_ID) == "1.2.3" and E.external_id(eo, E.DE_PATIENT_ID) is None
    assert E.localized(eo) == "标题" and E.localized(eo, "Description") is None


def test_parse_xml_is_safe() -> None:
    secret = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>'
    with pytest.raises(XdsFailure, match="DOCTYPE"):
        E.parse_xml(secret)
    with pytest.raises(XdsFailure, match="too large"):
        E.parse_xml(b" " * (E.MAX_XML_BYTES + 1))
    with pytest.raises(XdsFailure, match="not well-formed"):
        E.parse_xml(b"\xff\xfe<a>")
    assert E.parse_xml("<a>中文</a>".encode()).text == "中文"


def test_registry_responses_validate_against_rs_xsd() -> None:
    ok = registry_response([])
    assert_valid_response(ok)
    assert ok.get("status") == SUCCESS and len(ok) == 0
    errors = [XdsError("XDSRegistryMetadataError", "DocumentEntry 文档01: missing slot creationTime",
                       location="creationTime"),
              XdsError("XDSExtraMetadataNotSaved", "ignored", severity=SEVERITY_WARNING)]
    failed = registry_response(errors)
    assert_valid_response(failed)
    assert failed.get("status") == FAILURE
    (lst,) = failed
    assert lst.get("highestSeverity").endswith(":Error") and len(lst) == 2
    assert lst[0].get("location") == "creationTime" and lst[1].get("location") is None
    warned = registry_response(errors[1:])
    assert_valid_response(warned)
    assert warned.get("status") == SUCCESS and warned[0].get("highestSeverity") == SEVERITY_WARNING
    partial = registry_response(errors[:1], status=PARTIAL_SUCCESS)
    assert_valid_response(partial)
    assert partial.get("status") == PARTIAL_SUCCESS
    assert etree.QName(error_list(errors)).localname == "RegistryErrorList"
    failure = XdsFailure(errors[0])
    assert failure.errors == [errors[0]] and "XDSRegistryMetadataError" in str(failure)
    with pytest.raises(TypeError):
        XdsError("code", "context", SEVERITY_WARNING)  # type: ignore[misc]  # severity is keyword-only
