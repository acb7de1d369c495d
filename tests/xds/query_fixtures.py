"""Registry content for the ITI-18 stored query tests: ebRIM objects written straight into the XDS tables.

:class:`RegistryContent` builds the ``rim:ExtrinsicObject`` / ``rim:RegistryPackage`` / ``rim:Association``
XML of ITI TF-3 4.2 and inserts the rows (objects, codes, searchable slots, associations) as the Document
Registry (ITI-42) stores them, so that the queries are tested on their own.  :func:`adhoc` builds a
``query:AdhocQueryRequest``; :func:`ids` and :func:`errors` read the response.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from lxml import etree
from sqlalchemy import Engine, insert

from ihehub.bus import schema
from ihehub.bus.db import make_engine
from ihehub.xds import ebrim
from ihehub.xds import tables as t
from ihehub.xds.query import QUERY_IDS

NS = ebrim.NS
RIM = ebrim.RIM
QUERY = f"{{{NS['query']}}}"
RS = f"{{{NS['rs']}}}"
E = ebrim

LOINC = "2.16.840.1.113883.6.1"
CONF = "2.16.840.1.113883.5.25"
SNOMED = "2.16.840.1.113883.6.96"


def open_registry(url: str) -> Engine:
    """An engine on ``url`` (a database of its own) with every migration applied, the xds tables included."""
    engine = make_engine(url)
    schema.upgrade(engine)
    return engine


@contextlib.contextmanager
def own_pg_database() -> Iterator[str]:
    """A PostgreSQL database for one test module (the session's ``pg_url`` database is shared with tests
    that drop and re-create the xds tables); dropped afterwards."""
    import psycopg

    from tests.conftest import PG_ADMIN_URL

    name = f"ihehub_xq_{secrets.token_hex(4)}"
    admin = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{admin.rsplit('/', 1)[0].split('://', 1)[1]}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_uuid() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


_counter = itertools.count(1)


def new_oid() -> str:
    return f"1.2.156.112604.1.{int(time.time())}.{next(_counter)}"


Code = tuple[str, str]  # (code, codingScheme)


@dataclass
class Doc:
    """A DocumentEntry's queryable metadata (ITI TF-3 Table 4.2.3.2-1)."""

    patient: str
    title: str = "Discharge summary"
    status: str = E.APPROVED
    object_type: str = E.DE_OBJECT_TYPE_STABLE
    class_code: Code = ("11490-0", LOINC)
    type_code: Code = ("18842-5", LOINC)
    format_code: Code = ("urn:ihe:pcc:xds-ms:2007", "1.3.6.1.4.1.19376.1.2.3")
    practice_setting: Code = ("394802001", SNOMED)
    facility_type: Code = ("225732001", SNOMED)
    confidentiality: Sequence[Code] = (("N", CONF),)
    events: Sequence[Code] = ()
    authors: Sequence[str] = ()
    creation_time: str | None = "20240115103000"
    service_start: str | None = None
    service_stop: str | None = None
    reference_ids: Sequence[str] = ()
    mime_type: str = "text/xml"
    entry_uuid: str = field(default_factory=new_uuid)
    unique_id: str = field(default_factory=new_oid)


def _slot(parent: etree._Element, name: str, values: Iterable[str]) -> None:
    slot = etree.SubElement(parent, f"{RIM}Slot", name=name)
    vl = etree.SubElement(slot, f"{RIM}ValueList")
    for v in values:
        etree.SubElement(vl, f"{RIM}Value").text = v


def _name(parent: etree._Element, text: str) -> None:
    name = etree.SubElement(parent, f"{RIM}Name")
    etree.SubElement(name, f"{RIM}LocalizedString", value=text, charset="UTF-8",
                     attrib={"{http://www.w3.org/XML/1998/namespace}lang": "zh-CN"})


def _classification(parent: etree._Element, scheme: str, code: Code | None, *,
                    authors: Sequence[str] = ()) -> None:
    cl = etree.SubElement(parent, f"{RIM}Classification", id=new_uuid(), classificationScheme=scheme,
                          classifiedObject=parent.get("id") or "", nodeRepresentation=code[0] if code else "",
                          objectType=E.OT_CLASSIFICATION)
    if authors:
        _slot(cl, "authorPerson", authors)
    if code:
        _slot(cl, "codingScheme", [code[1]])
        _name(cl, code[0])


def _external_id(parent: etree._Element, scheme: str, value: str, name: str) -> None:
    ext = etree.SubElement(parent, f"{RIM}ExternalIdentifier", id=new_uuid(), registryObject=parent.get("id") or "",
                           identificationScheme=scheme, value=value, objectType=E.OT_EXTERNAL_IDENTIFIER)
    _name(ext, name)


def _text(element: etree._Element) -> str:
    return etree.tostring(element, encoding="unicode")


class RegistryContent:
    """Writes registry objects into the XDS tables of ``engine`` (one transaction per object)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _object(self, row: Mapping[str, object], codes: Sequence[tuple[str, Code]],
                slots: Sequence[tuple[str, str]]) -> None:
        with self.engine.begin() as conn:
            stmt = insert(t.objects).values(registered_at=time.time(), version=1, **row).returning(t.objects.c.id)
            oid = conn.execute(stmt).scalar_one()
            if codes:
                conn.execute(insert(t.codes), [{"object_id": oid, "scheme": s, "code": c[0], "coding_scheme": c[1]}
                                               for s, c in codes])
            if slots:
                conn.execute(insert(t.slots), [{"object_id": oid, "name": n, "value": v} for n, v in slots])

    def document(self, doc: Doc) -> Doc:
        eo = etree.Element(f"{RIM}ExtrinsicObject", nsmap={"rim": NS["rim"]}, id=doc.entry_uuid,
                           mimeType=doc.mime_type, objectType=doc.object_type, status=doc.status)
        times = {"creationTime": doc.creation_time, "serviceStartTime": doc.service_start,
                 "serviceStopTime": doc.service_stop}
        for name, value in times.items():
            if value:
                _slot(eo, name, [value])
        _slot(eo, "languageCode", ["zh-CN"])
        _slot(eo, "sourcePatientId", [doc.patient])
        if doc.reference_ids:
            _slot(eo, "urn:ihe:iti:xds:2013:referenceIdList", doc.reference_ids)
        _name(eo, doc.title)
        if doc.authors:
            _classification(eo, E.DE_AUTHOR, None, authors=doc.authors)
        codes: list[tuple[str, Code]] = [
            (E.DE_CLASS_CODE, doc.class_code), (E.DE_TYPE_CODE, doc.type_code), (E.DE_FORMAT_CODE, doc.format_code),
            (E.DE_PRACTICE_SETTING_CODE, doc.practice_setting),
            (E.DE_HEALTHCARE_FACILITY_TYPE_CODE, doc.facility_type),
            *((E.DE_CONFIDENTIALITY_CODE, c) for c in doc.confidentiality),
            *((E.DE_EVENT_CODE, c) for c in doc.events)]
        for scheme, code in codes:
            _classification(eo, scheme, code)
        _external_id(eo, E.DE_PATIENT_ID, doc.patient, "XDSDocumentEntry.patientId")
        _external_id(eo, E.DE_UNIQUE_ID, doc.unique_id, "XDSDocumentEntry.uniqueId")
        slots = [("authorPerson", a) for a in doc.authors] + [("referenceIdList", r) for r in doc.reference_ids]
        self._object({"entry_uuid": doc.entry_uuid, "kind": "DocumentEntry", "lid": doc.entry_uuid,
                      "unique_id": doc.unique_id, "patient_id": doc.patient, "status": doc.status,
                      "object_type": doc.object_type, "creation_time": doc.creation_time,
                      "service_start_time": doc.service_start, "service_stop_time": doc.service_stop,
                      "mime_type": doc.mime_type, "hash": "da39a3ee5e6b4b0d3255bfef95601890afd80709", "size": 0,
                      "repository_unique_id": "1.2.156.112604.9.1", "xml": _text(eo)}, codes, slots)
        return doc

    def submission_set(self, patient: str, *, submission_time: str = "20240115110000",
                       source_id: str = "1.2.156.112604.5", content_type: Code = ("34133-9", LOINC),
                       authors: Sequence[str] = (), status: str = E.APPROVED, nested: bool = False,
                       title: str = "提交集") -> str:
        """A SubmissionSet; ``nested``: its SubmissionSet classification inside (else registered top-level)."""
        entry_uuid, unique_id = new_uuid(), new_oid()
        rp = etree.Element(f"{RIM}RegistryPackage", nsmap={"rim": NS["rim"]}, id=entry_uuid,
                           objectType=E.OT_REGISTRY_PACKAGE, status=status)
        _slot(rp, "submissionTime", [submission_time])
        _name(rp, title)
        if authors:
            _classification(rp, E.SS_AUTHOR, None, authors=authors)
        _classification(rp, E.SS_CONTENT_TYPE_CODE, content_type)
        if nested:
            etree.SubElement(rp, f"{RIM}Classification", id=new_uuid(), classifiedObject=entry_uuid,
                             classificationNode=E.SS_CLASSIFICATION_NODE, objectType=E.OT_CLASSIFICATION)
        _external_id(rp, E.SS_UNIQUE_ID, unique_id, "XDSSubmissionSet.uniqueId")
        _external_id(rp, E.SS_SOURCE_ID, source_id, "XDSSubmissionSet.sourceId")
        _external_id(rp, E.SS_PATIENT_ID, patient, "XDSSubmissionSet.patientId")
        self._object({"entry_uuid": entry_uuid, "kind": "SubmissionSet", "unique_id": unique_id,
                      "patient_id": patient, "status": status, "submission_time": submission_time,
                      "source_id": source_id, "xml": _text(rp)}, [(E.SS_CONTENT_TYPE_CODE, content_type)],
                     [("authorPerson", a) for a in authors])
        return entry_uuid

    def folder(self, patient: str, *, codes: Sequence[Code] = (), last_update: str = "20240116080000",
               status: str = E.APPROVED, title: str = "住院病历夹") -> str:
        entry_uuid, unique_id = new_uuid(), new_oid()
        rp = etree.Element(f"{RIM}RegistryPackage", nsmap={"rim": NS["rim"]}, id=entry_uuid,
                           objectType=E.OT_REGISTRY_PACKAGE, status=status)
        _slot(rp, "lastUpdateTime", [last_update])
        _name(rp, title)
        for code in codes:
            _classification(rp, E.FOLDER_CODE_LIST, code)
        _external_id(rp, E.FOLDER_UNIQUE_ID, unique_id, "XDSFolder.uniqueId")
        _external_id(rp, E.FOLDER_PATIENT_ID, patient, "XDSFolder.patientId")
        self._object({"entry_uuid": entry_uuid, "kind": "Folder", "unique_id": unique_id, "patient_id": patient,
                      "status": status, "last_update_time": last_update, "xml": _text(rp)},
                     [(E.FOLDER_CODE_LIST, c) for c in codes], [])
        return entry_uuid

    def associate(self, kind: str, source: str, target: str, *, member_status: str | None = None) -> str:
        """An Association (``member_status``: SubmissionSetStatus slot of SubmissionSet HasMember links)."""
        entry_uuid = new_uuid()
        a = etree.Element(f"{RIM}Association", nsmap={"rim": NS["rim"]}, id=entry_uuid, associationType=kind,
                          sourceObject=source, targetObject=target, objectType=E.OT_ASSOCIATION, status=E.APPROVED)
        if member_status:
            _slot(a, "SubmissionSetStatus", [member_status])
        with self.engine.begin() as conn:
            conn.execute(insert(t.associations).values(
                entry_uuid=entry_uuid, type=kind, source_uuid=source, target_uuid=target, status=E.APPROVED,
                xml=_text(a), registered_at=time.time()))
        return entry_uuid


# ------------------------------------------------------------------ requests and responses

Slots = Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str | Sequence[str]]]


def adhoc(query: str, params: Slots, *, return_type: str = "LeafClass", home: str | None = None) -> etree._Element:
    """A ``query:AdhocQueryRequest`` for stored query ``query`` (a name of QUERY_IDS or an id).

    ``params``: parameter -> Value text (or a list: several Value elements of one Slot); as a sequence of
    pairs, a name may repeat (several Slots: AND/OR semantics)."""
    root = etree.Element(f"{QUERY}AdhocQueryRequest", nsmap={"query": NS["query"], "rim": NS["rim"]})
    etree.SubElement(root, f"{QUERY}ResponseOption", returnComposedObjects="true", returnType=return_type)
    aq = etree.SubElement(root, f"{RIM}AdhocQuery", id=QUERY_IDS.get(query, query))
    if home:
        aq.set("home", home)
    items = params.items() if isinstance(params, Mapping) else params
    for name, values in items:
        _slot(aq, name, [values] if isinstance(values, str) else values)
    return root


def q(value: str) -> str:
    """A quoted single value."""
    return "'" + value.replace("'", "''") + "'"


def ql(*values: str) -> str:
    """A parenthesised list of quoted values."""
    return "(" + ",".join(q(v) for v in values) + ")"


def ids(response: etree._Element) -> list[str]:
    """The ids of the objects in the response's RegistryObjectList, in order."""
    return [e.get("id") or "" for e in response.iterfind(f"{RIM}RegistryObjectList/*")]


def by_tag(response: etree._Element) -> dict[str, set[str]]:
    """The ids of the response's objects per local element name (ExtrinsicObject, ObjectRef, ...)."""
    out: dict[str, set[str]] = {}
    for e in response.iterfind(f"{RIM}RegistryObjectList/*"):
        out.setdefault(etree.QName(e).localname, set()).add(e.get("id") or "")
    return out


def errors(response: etree._Element) -> list[tuple[str, str]]:
    """(errorCode, location) of each RegistryError of the response."""
    return [(e.get("errorCode") or "", e.get("location") or "")
            for e in response.iterfind(f"{RS}RegistryErrorList/{RS}RegistryError")]
