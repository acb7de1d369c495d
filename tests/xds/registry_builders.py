"""ITI-42 submissions for the registry tests: the NIST ProvideAndRegister bodies and generated ones.

:func:`nist_request` extracts the ``lcm:SubmitObjectsRequest`` of a body in ``corpus/nist/pnr`` and adds
the hash / size / repositoryUniqueId slots a repository adds before ITI-42 (ITI TF-2b 3.41.4.1.3).
:class:`Builder` writes submissions with symbolic ids (``Document01``), Chinese titles and author
names, folders and associations; ``omit`` drops one attribute to provoke an error.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import re
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import Engine, func, select

from ihehub.bus.db import make_engine
from ihehub.xds import ebrim as E
from ihehub.xds import tables
from ihehub.xds.errors import FAILURE
from ihehub.xds.registry import RegistryResult

RIM = E.RIM
LCM = E.LCM
NIST_PNR = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus" / "nist" / "pnr"
SCHEMA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus" / "nist" / "schema"
NIST_BODIES = ("NoXop", "Xop", "dicom", "encodedURL")
REPOSITORY = "1.2.156.112604.9.1"
LOINC = "2.16.840.1.113883.6.1"
CONF = "2.16.840.1.113883.5.25"

_counter = itertools.count(1)
NSMAP = {"rim": E.NS["rim"]}


def new_uuid() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def new_oid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def cx(pid: str = "HZ-0001", oid: str = "1.2.156.112604.1.2.1") -> str:
    """A patient id as XDS wants it (ITI TF-3 4.2.3.1.7 CX: id^^^&OID&ISO)."""
    return f"{pid}^^^&{oid}&ISO"


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def nist_request(name: str, *, hash_: str | None = None, size: int = 0) -> etree._Element:
    """The SubmitObjectsRequest of ``corpus/nist/pnr/<name>/body.txt`` as an ITI-42 request."""
    data = (NIST_PNR / name / "body.txt").read_bytes()
    start = re.search(rb"<(?:\?xml|[\w.-]+:Envelope)", data)
    end = re.search(rb"</[\w.-]+:Envelope>", data)
    assert start is not None and end is not None, name
    envelope = E.parse_xml(data[start.start():end.end()])
    request = envelope.find(".//lcm:SubmitObjectsRequest", E.NS)
    assert request is not None, name
    for eo in request.iter(f"{RIM}ExtrinsicObject"):
        E.set_slot(eo, "hash", [hash_ or sha1(eo.get("id", "").encode())])
        E.set_slot(eo, "size", [str(size)])
        E.set_slot(eo, "repositoryUniqueId", [REPOSITORY])
    return request


def _slot(parent: etree._Element, name: str, values: Iterable[str]) -> None:
    slot = etree.SubElement(parent, f"{RIM}Slot", name=name)
    value_list = etree.SubElement(slot, f"{RIM}ValueList")
    for v in values:
        etree.SubElement(value_list, f"{RIM}Value").text = v


def _name(parent: etree._Element, text: str) -> None:
    etree.SubElement(etree.SubElement(parent, f"{RIM}Name"), f"{RIM}LocalizedString", value=text, charset="UTF-8")


def _code(parent: etree._Element, scheme: str, code: str, coding_scheme: str | None, display: str) -> None:
    """A coded classification without id (the registry assigns one), as NIST sources send them."""
    cl = etree.SubElement(parent, f"{RIM}Classification", classificationScheme=scheme,
                          classifiedObject=parent.get("id") or "", nodeRepresentation=code)
    if coding_scheme is not None:
        _slot(cl, "codingScheme", [coding_scheme])
    _name(cl, display)


def _author(parent: etree._Element, scheme: str, person: str, institution: str) -> None:
    cl = etree.SubElement(parent, f"{RIM}Classification", classificationScheme=scheme,
                          classifiedObject=parent.get("id") or "", nodeRepresentation="")
    _slot(cl, "authorPerson", [person])
    _slot(cl, "authorInstitution", [institution])


def _ext(parent: etree._Element, scheme: str, value: str, name: str) -> None:
    ext = etree.SubElement(parent, f"{RIM}ExternalIdentifier", identificationScheme=scheme, value=value,
                           registryObject=parent.get("id") or "")
    _name(ext, name)


# every coded DocumentEntry attribute and its default (code, codingScheme, display)
DE_CODES: dict[str, tuple[str, str, str, str]] = {
    "classCode": (E.DE_CLASS_CODE, "11490-0", LOINC, "出院小结"),
    "confidentialityCode": (E.DE_CONFIDENTIALITY_CODE, "N", CONF, "正常"),
    "formatCode": (E.DE_FORMAT_CODE, "urn:ihe:pcc:xds-ms:2007", "1.3.6.1.4.1.19376.1.2.3", "XDS-MS"),
    "healthcareFacilityTypeCode": (E.DE_HEALTHCARE_FACILITY_TYPE_CODE, "225732001", "2.16.840.1.113883.6.96", "医院"),
    "practiceSettingCode": (E.DE_PRACTICE_SETTING_CODE, "394802001", "2.16.840.1.113883.6.96", "内科"),
    "typeCode": (E.DE_TYPE_CODE, "18842-5", LOINC, "出院记录"),
}


class Builder:
    """One generated ITI-42 submission; call the object methods, then :meth:`request`."""

    def __init__(self, patient: str | None = None, *, ss_id: str = "SubmissionSet01",
                 ss_unique_id: str | None = None, omit: Sequence[str] = (), title: str = "出院资料") -> None:
        self.patient = patient or cx()
        self.ss_id = ss_id
        self.objects: list[etree._Element] = []
        self.ss = etree.Element(f"{RIM}RegistryPackage", nsmap=NSMAP, id=ss_id)
        if "submissionTime" not in omit:
            _slot(self.ss, "submissionTime", ["20241127103000"])
        _name(self.ss, title)
        _author(self.ss, E.SS_AUTHOR, "^李^明^^^", "杭州市第一人民医院")
        if "contentTypeCode" not in omit:
            _code(self.ss, E.SS_CONTENT_TYPE_CODE, "34133-9", LOINC, "病历摘要")
        ids = {"uniqueId": (E.SS_UNIQUE_ID, ss_unique_id or new_oid()),
               "sourceId": (E.SS_SOURCE_ID, "1.2.156.112604.5"), "patientId": (E.SS_PATIENT_ID, self.patient)}
        for attr, (scheme, value) in ids.items():
            if attr not in omit:
                _ext(self.ss, scheme, value, f"XDSSubmissionSet.{attr}")
        self.objects.append(self.ss)
        self.objects.append(etree.Element(f"{RIM}Classification", nsmap=NSMAP, id="ssClass", classifiedObject=ss_id,
                                          classificationNode=E.SS_CLASSIFICATION_NODE))

    def document(self, doc_id: str = "Document01", *, unique_id: str | None = None, patient: str | None = None,
                 title: str = "出院小结：张三", content: bytes | None = None, omit: Sequence[str] = (),
                 codes: dict[str, tuple[str, str]] | None = None, member: bool = True,
                 on_demand: bool = False) -> str:
        """A DocumentEntry (HasMember from the SubmissionSet unless ``member`` is False); returns its uniqueId."""
        unique_id = unique_id or new_oid()
        content = content if content is not None else f"报告 {doc_id}".encode()
        eo = etree.Element(f"{RIM}ExtrinsicObject", nsmap=NSMAP, id=doc_id, mimeType="text/plain",
                           objectType=E.DE_OBJECT_TYPE_ON_DEMAND if on_demand else E.DE_OBJECT_TYPE_STABLE)
        if "mimeType" in omit:
            del eo.attrib["mimeType"]
        slots = {"creationTime": ["20241127093000"], "languageCode": ["zh-CN"],
                 "sourcePatientId": [cx("门诊-88", "1.2.156.112604.1.2.9")],
                 "hash": [sha1(content)], "size": [str(len(content))], "repositoryUniqueId": [REPOSITORY]}
        if on_demand:
            slots = {k: v for k, v in slots.items() if k not in ("hash", "size")}
        for name, values in slots.items():
            if name not in omit:
                _slot(eo, name, values)
        _name(eo, title)
        _author(eo, E.DE_AUTHOR, "^王^芳^^^", "浙江大学医学院附属第二医院")
        for attr, (scheme, code, coding, display) in DE_CODES.items():
            if attr in omit:
                continue
            if codes and attr in codes:
                code, coding = codes[attr]
            _code(eo, scheme, code, None if f"{attr}.codingScheme" in omit else coding, display)
        if "patientId" not in omit:
            _ext(eo, E.DE_PATIENT_ID, patient or self.patient, "XDSDocumentEntry.patientId")
        if "uniqueId" not in omit:
            _ext(eo, E.DE_UNIQUE_ID, unique_id, "XDSDocumentEntry.uniqueId")
        self.objects.append(eo)
        if member:
            self.association(E.ASSOC_HAS_MEMBER, self.ss_id, doc_id, status="Original")
        return unique_id

    def folder(self, folder_id: str = "Folder01", *, unique_id: str | None = None, patient: str | None = None,
               title: str = "住院病历夹", members: Sequence[str] = ()) -> str:
        """A Folder in the SubmissionSet (classified top-level) with ``members``; returns its uniqueId."""
        unique_id = unique_id or new_oid()
        rp = etree.Element(f"{RIM}RegistryPackage", nsmap=NSMAP, id=folder_id)
        _name(rp, title)
        _code(rp, E.FOLDER_CODE_LIST, "11450-4", LOINC, "问题列表")
        _ext(rp, E.FOLDER_PATIENT_ID, patient or self.patient, "XDSFolder.patientId")
        _ext(rp, E.FOLDER_UNIQUE_ID, unique_id, "XDSFolder.uniqueId")
        self.objects.append(rp)
        class_id = new_uuid() if folder_id.startswith("urn:uuid:") else f"{folder_id}Class"
        self.objects.append(etree.Element(f"{RIM}Classification", nsmap=NSMAP, id=class_id,
                                          classifiedObject=folder_id, classificationNode=E.FOLDER_CLASSIFICATION_NODE))
        self.association(E.ASSOC_HAS_MEMBER, self.ss_id, folder_id)
        for m in members:
            self.member(folder_id, m)
        return unique_id

    def member(self, folder: str, doc: str) -> None:
        """Folder HasMember DocumentEntry, itself a member of the SubmissionSet (ITI TF-3 4.2.1.3)."""
        assoc = self.association(E.ASSOC_HAS_MEMBER, folder, doc)
        self.association(E.ASSOC_HAS_MEMBER, self.ss_id, assoc)

    def association(self, atype: str, source: str, target: str, *, status: str | None = None,
                    assoc_id: str | None = None) -> str:
        assoc_id = assoc_id or f"Assoc{next(_counter)}"
        a = etree.Element(f"{RIM}Association", nsmap=NSMAP, id=assoc_id, associationType=atype, sourceObject=source,
                          targetObject=target)
        if status:
            _slot(a, "SubmissionSetStatus", [status])
        self.objects.append(a)
        return assoc_id

    def request(self) -> etree._Element:
        """The ``lcm:SubmitObjectsRequest`` (a fresh copy each call)."""
        root = etree.Element(f"{LCM}SubmitObjectsRequest", nsmap={"lcm": E.NS["lcm"], "rim": E.NS["rim"]})
        object_list = etree.SubElement(root, f"{RIM}RegistryObjectList")
        for obj in self.objects:
            object_list.append(copy.deepcopy(obj))
        return root


@functools.cache
def rs_schema() -> etree.XMLSchema:
    """rs.xsd (imports rim.xsd beside it), compiled once per test session."""
    return etree.XMLSchema(etree.parse(str(SCHEMA_DIR / "rs.xsd")))


def assert_valid_response(response: etree._Element) -> None:
    schema = rs_schema()
    assert schema.validate(response), schema.error_log


def registry_engine(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Engine:
    """An engine with fresh, empty xds tables: SQLite in ``tmp_path`` or the session's PostgreSQL database."""
    if kind == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path}/registry.sqlite")
    else:
        engine = make_engine(request.getfixturevalue("pg_url"))
    tables.metadata.create_all(engine)
    with engine.begin() as conn:  # the session's PostgreSQL database is shared: empty the tables
        for table in reversed(tables.metadata.sorted_tables):
            conn.execute(table.delete())
    return engine


def counts(engine: Engine) -> dict[str, int]:
    """Rows per xds table."""
    with engine.connect() as conn:
        return {tbl.name: conn.execute(select(func.count()).select_from(tbl)).scalar_one()
                for tbl in tables.metadata.sorted_tables}


def refused(result: RegistryResult, code: str, *fragments: str) -> None:
    """A Failure response with an error ``code`` whose codeContext contains every fragment."""
    assert result.status == FAILURE, result
    response = result.to_xml()
    assert_valid_response(response)
    assert response.get("status") == FAILURE
    errors = response.findall(f"{{{E.NS['rs']}}}RegistryErrorList/{{{E.NS['rs']}}}RegistryError")
    assert errors and all(e.get("severity", "").endswith("Error") for e in errors)
    matching = [e for e in errors if e.get("errorCode") == code]
    assert matching, [(e.get("errorCode"), e.get("codeContext")) for e in errors]
    assert any(all(f in (e.get("codeContext") or "") for f in fragments) for e in matching), \
        [e.get("codeContext") for e in matching]


def nothing_stored(engine: Engine, before: dict[str, int] | None = None) -> None:
    assert counts(engine) == (before or dict.fromkeys(counts(engine), 0))
