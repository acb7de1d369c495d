"""The audit message of DICOM PS3.15 Annex A.5 (the RFC 3881 lineage), as frozen dataclasses, with
serialisation to the DICOM audit schema (``dicom2017c.xsd``) and parsing back.

Field names are the PS3.15 A.5.1 keywords in snake case; the mapping is written next to each
field.  `AuditMessage.to_xml` writes exactly the element order the schema demands
(EventIdentification, ActiveParticipant+, AuditSourceIdentification,
ParticipantObjectIdentification*).  `AuditMessage.from_xml` is lenient about what real senders
send (namespaced elements, the pre-2011 ``code``/``displayName`` attributes of RFC 3881), so that
even an invalid message can be indexed; whether a message is *valid* is `Validator`'s business.

XML is always parsed by `parse_xml`: no network, no entity expansion, and any document type
declaration (DTD) refused, which closes XXE and entity-expansion ("billion laughs") attacks.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import threading
from collections.abc import Iterable, Iterator

from lxml import etree

from ihehub.atna.codes import Code

__all__ = [
    "ActiveParticipant",
    "AuditMessage",
    "AuditSourceIdentification",
    "AuditXMLError",
    "EventIdentification",
    "ObjectDescription",
    "ObjectDetail",
    "ParticipantObjectIdentification",
    "SOPClass",
    "format_datetime",
    "parse_datetime",
    "parse_xml",
]

ACTIONS = ("C", "R", "U", "D", "E")
OUTCOMES = {0: "Success", 4: "Minor failure", 8: "Serious failure", 12: "Major failure"}
MAX_XML_BYTES = 16 * 1024 * 1024
XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>'


class AuditXMLError(ValueError):
    """The bytes are not a usable audit message (not XML, a DTD, not an AuditMessage)."""


# -- the model ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EventIdentification:
    """PS3.15 A.5.1 EventIdentification."""

    event_id: Code  # EventID
    date_time: dt.datetime | None  # EventDateTime (None only when a received message's value is unreadable)
    outcome: int = 0  # EventOutcomeIndicator: 0, 4, 8, 12
    action: str | None = None  # EventActionCode: C R U D E
    type_codes: tuple[Code, ...] = ()  # EventTypeCode*
    outcome_description: str | None = None  # EventOutcomeDescription
    purpose_of_use: tuple[Code, ...] = ()  # PurposeOfUse* (IHE XUA)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ActiveParticipant:
    """PS3.15 A.5.1 ActiveParticipant."""

    user_id: str  # UserID
    requestor: bool  # UserIsRequestor
    alt_user_id: str | None = None  # AlternativeUserID (IHE: the process id)
    user_name: str | None = None  # UserName
    network_id: str | None = None  # NetworkAccessPointID
    network_type: str | None = None  # NetworkAccessPointTypeCode: 1 machine name, 2 IP address, 5 URI
    roles: tuple[Code, ...] = ()  # RoleIDCode*
    media_type: Code | None = None  # MediaIdentifier/MediaType


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AuditSourceIdentification:
    """PS3.15 A.5.1 AuditSourceIdentification."""

    source_id: str  # AuditSourceID
    enterprise_site_id: str | None = None  # AuditEnterpriseSiteID
    type_codes: tuple[Code, ...] = ()  # AuditSourceTypeCode*


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ObjectDetail:
    """ParticipantObjectDetail: a type and a value (base64 on the wire, bytes here)."""

    type: str
    value: bytes


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SOPClass:
    """ParticipantObjectDescription/SOPClass."""

    uid: str | None
    count: int  # NumberOfInstances
    instances: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ObjectDescription:
    """ParticipantObjectDescription (DICOM object description, PS3.15 A.5.2)."""

    mpps: tuple[str, ...] = ()
    accessions: tuple[str, ...] = ()
    sop_classes: tuple[SOPClass, ...] = ()
    studies: tuple[str, ...] = ()  # ParticipantObjectContainsStudy/StudyIDs@UID
    encrypted: bool | None = None
    anonymized: bool | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ParticipantObjectIdentification:
    """PS3.15 A.5.1 ParticipantObjectIdentification."""

    id_type: Code  # ParticipantObjectIDTypeCode
    object_id: str | None = None  # ParticipantObjectID
    type_code: int | None = None  # ParticipantObjectTypeCode: 1 person, 2 system object, 3 organisation, 4 other
    role: int | None = None  # ParticipantObjectTypeCodeRole: 1 patient, 3 report, 20 job, 24 query, ...
    life_cycle: int | None = None  # ParticipantObjectDataLifeCycle
    sensitivity: str | None = None  # ParticipantObjectSensitivity
    name: str | None = None  # ParticipantObjectName
    query: bytes | None = None  # ParticipantObjectQuery (base64 on the wire)
    details: tuple[ObjectDetail, ...] = ()  # ParticipantObjectDetail*
    descriptions: tuple[ObjectDescription, ...] = ()  # ParticipantObjectDescription*


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AuditMessage:
    """PS3.15 A.5.1 AuditMessage."""

    event: EventIdentification
    participants: tuple[ActiveParticipant, ...]
    source: AuditSourceIdentification
    objects: tuple[ParticipantObjectIdentification, ...] = ()

    # -- views used for indexing and search -----------------------------------------------------
    @property
    def event_type(self) -> str | None:
        """The first EventTypeCode's code (the IHE transaction, e.g. ``ITI-9``), if any."""
        return self.event.type_codes[0].code if self.event.type_codes else None

    def patient_ids(self) -> list[str]:
        """ParticipantObjectIDs of the patient objects (type 1, role 1): HL7 CX values."""
        return [o.object_id for o in self.objects if o.type_code == 1 and o.role == 1 and o.object_id]

    def study_uids(self) -> list[str]:
        """Study Instance UIDs: objects with IDTypeCode 110180 and StudyIDs in descriptions."""
        out: list[str] = []
        for o in self.objects:
            if o.id_type.code == "110180" and o.object_id:
                out.append(o.object_id)
            for d in o.descriptions:
                out.extend(d.studies)
        return _unique(out)

    def document_ids(self) -> list[str]:
        """Document unique ids: system objects in the role "report" (type 2, role 3)."""
        return [o.object_id for o in self.objects if o.type_code == 2 and o.role == 3 and o.object_id]

    def user_ids(self) -> list[str]:
        """UserID and UserName of every active participant."""
        out: list[str] = []
        for p in self.participants:
            if p.user_id:
                out.append(p.user_id)
            if p.user_name:
                out.append(p.user_name)
        return _unique(out)

    # -- XML ------------------------------------------------------------------------------------
    def to_element(self) -> etree._Element:
        root = etree.Element("AuditMessage")
        _event_xml(root, self.event)
        for p in self.participants:
            _participant_xml(root, p)
        _source_xml(root, self.source)
        for o in self.objects:
            _object_xml(root, o)
        return root

    def to_xml(self, *, declaration: bool = True, pretty: bool = False) -> bytes:
        """The UTF-8 XML of this message (DICOM PS3.15 A.5.1 element order), on one line unless
        ``pretty`` (syslog over plain TCP may end a message at a line feed, RFC 6587 3.4.2)."""
        body = bytes(etree.tostring(self.to_element(), encoding="UTF-8", xml_declaration=False,
                                    pretty_print=pretty))
        return XML_DECLARATION + body if declaration else body

    @classmethod
    def from_xml(cls, data: bytes | etree._Element) -> AuditMessage:
        """Parse an audit message (bytes go through `parse_xml`).  Raises `AuditXMLError`."""
        root = parse_xml(bytes(data)) if isinstance(data, bytes | bytearray) else data
        return _message_from(root)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


# -- safe parsing --------------------------------------------------------------------------------------


_PARSERS = threading.local()


def _parser() -> etree.XMLParser:
    """This thread's safe parser (an lxml parser is not thread-safe; making one per call costs more
    than the parse of a small message)."""
    parser: etree.XMLParser | None = getattr(_PARSERS, "parser", None)
    if parser is None:
        parser = _PARSERS.parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                                                   dtd_validation=False, huge_tree=False, remove_comments=False)
    return parser


def parse_xml(data: bytes) -> etree._Element:
    """Parse ``data`` as XML without network access, entity expansion or DTDs.

    A leading UTF-8 BOM is allowed (RFC 5424 section 6.4 puts one before the message).
    Raises `AuditXMLError` with the parser's message and line.
    """
    if len(data) > MAX_XML_BYTES:
        raise AuditXMLError(f"XML of {len(data)} bytes is larger than {MAX_XML_BYTES}")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise AuditXMLError("document type declarations (DTD) and entities are not accepted")
    try:
        root = etree.fromstring(bytes(data), _parser())
    except etree.XMLSyntaxError as exc:
        raise AuditXMLError(f"not well-formed XML: {exc}") from None
    except ValueError as exc:  # e.g. an unsupported encoding declaration
        raise AuditXMLError(f"unreadable XML: {exc}") from None
    if root is None:
        raise AuditXMLError("empty document")
    tree = root.getroottree()
    if tree.docinfo.internalDTD is not None or tree.docinfo.doctype:
        raise AuditXMLError("document type declarations (DTD) are not accepted")
    return root


# -- date and time -------------------------------------------------------------------------------------


def format_datetime(value: dt.datetime) -> str:
    """xs:dateTime in UTC with milliseconds: ``2026-11-27T08:48:00.532Z``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def parse_datetime(text: str | None) -> dt.datetime | None:
    """An xs:dateTime (any fraction length, ``Z`` or an offset; none means UTC) or None."""
    if not text:
        return None
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    if "." in s:  # Python takes at most 6 fraction digits
        head, _, rest = s.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        frac, tail = rest[:digits], rest[digits:]
        s = f"{head}.{(frac + '000000')[:6]}{tail}" if frac else head + tail
    try:
        value = dt.datetime.fromisoformat(s)
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


# -- writing ---------------------------------------------------------------------------------------------


def _set(el: etree._Element, name: str, value: object) -> None:
    if value is not None:
        el.set(name, str(value))


def _code_xml(parent: etree._Element, tag: str, code: Code, *, full: bool = True) -> etree._Element:
    el = etree.SubElement(parent, tag)
    el.set("csd-code", code.code)
    if full or code.system:
        el.set("codeSystemName", code.system)
    if code.display:
        el.set("displayName", code.display)
    if full or code.text:
        el.set("originalText", code.text)
    return el


def _event_xml(root: etree._Element, ev: EventIdentification) -> None:
    el = etree.SubElement(root, "EventIdentification")
    _set(el, "EventActionCode", ev.action)
    el.set("EventDateTime", format_datetime(ev.date_time or dt.datetime.now(dt.UTC)))
    el.set("EventOutcomeIndicator", str(ev.outcome))
    _code_xml(el, "EventID", ev.event_id)
    for c in ev.type_codes:
        _code_xml(el, "EventTypeCode", c)
    if ev.outcome_description is not None:
        etree.SubElement(el, "EventOutcomeDescription").text = ev.outcome_description
    for c in ev.purpose_of_use:
        _code_xml(el, "PurposeOfUse", c)


def _participant_xml(root: etree._Element, p: ActiveParticipant) -> None:
    el = etree.SubElement(root, "ActiveParticipant")
    el.set("UserID", p.user_id)
    _set(el, "AlternativeUserID", p.alt_user_id)
    _set(el, "UserName", p.user_name)
    el.set("UserIsRequestor", "true" if p.requestor else "false")
    _set(el, "NetworkAccessPointID", p.network_id)
    _set(el, "NetworkAccessPointTypeCode", p.network_type)
    for c in p.roles:
        _code_xml(el, "RoleIDCode", c)
    if p.media_type is not None:
        _code_xml(etree.SubElement(el, "MediaIdentifier"), "MediaType", p.media_type)


def _source_xml(root: etree._Element, s: AuditSourceIdentification) -> None:
    el = etree.SubElement(root, "AuditSourceIdentification")
    _set(el, "AuditEnterpriseSiteID", s.enterprise_site_id)
    el.set("AuditSourceID", s.source_id)
    for c in s.type_codes:
        _code_xml(el, "AuditSourceTypeCode", c, full=False)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _object_xml(root: etree._Element, o: ParticipantObjectIdentification) -> None:
    el = etree.SubElement(root, "ParticipantObjectIdentification")
    _set(el, "ParticipantObjectID", o.object_id)
    _set(el, "ParticipantObjectTypeCode", o.type_code)
    _set(el, "ParticipantObjectTypeCodeRole", o.role)
    _set(el, "ParticipantObjectDataLifeCycle", o.life_cycle)
    _set(el, "ParticipantObjectSensitivity", o.sensitivity)
    _code_xml(el, "ParticipantObjectIDTypeCode", o.id_type)
    if o.name is not None:
        etree.SubElement(el, "ParticipantObjectName").text = o.name
    elif o.query is not None:
        etree.SubElement(el, "ParticipantObjectQuery").text = _b64(o.query)
    for d in o.details:
        det = etree.SubElement(el, "ParticipantObjectDetail")
        det.set("type", d.type)
        det.set("value", _b64(d.value))
    for desc in o.descriptions:
        _description_xml(el, desc)


def _description_xml(parent: etree._Element, d: ObjectDescription) -> None:
    el = etree.SubElement(parent, "ParticipantObjectDescription")
    for uid in d.mpps:
        etree.SubElement(el, "MPPS").set("UID", uid)
    for number in d.accessions:
        etree.SubElement(el, "Accession").set("Number", number)
    for sop in d.sop_classes:
        sc = etree.SubElement(el, "SOPClass")
        _set(sc, "UID", sop.uid)
        sc.set("NumberOfInstances", str(sop.count))
        for inst in sop.instances:
            etree.SubElement(sc, "Instance").set("UID", inst)
    if d.studies:
        contains = etree.SubElement(el, "ParticipantObjectContainsStudy")
        for uid in d.studies:
            etree.SubElement(contains, "StudyIDs").set("UID", uid)
    if d.encrypted is not None:
        etree.SubElement(el, "Encrypted").text = "true" if d.encrypted else "false"
    if d.anonymized is not None:
        etree.SubElement(el, "Anonymized").text = "true" if d.anonymized else "false"


# -- reading (lenient) -------------------------------------------------------------------------------


def _local(el: etree._Element) -> str:
    tag = el.tag
    if not isinstance(tag, str):  # comments, processing instructions
        return ""
    return tag.rpartition("}")[2]


def _children(el: etree._Element, name: str) -> Iterator[etree._Element]:
    for child in el:
        if _local(child) == name:
            yield child


def _first(el: etree._Element, name: str) -> etree._Element | None:
    return next(_children(el, name), None)


def _code_from(el: etree._Element) -> Code:
    """A coded value; the RFC 3881 / pre-2011 DICOM spelling ``code``/``displayName`` is read too."""
    code = el.get("csd-code")
    if code is None:
        code = el.get("code", "")
    text = el.get("originalText")
    display = el.get("displayName")
    return Code(code=code, system=el.get("codeSystemName", ""), text=text if text is not None else display or "",
                display=display)


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def _bool(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1")


def _decode_b64(text: str | None) -> bytes:
    if not text:
        return b""
    try:
        return base64.b64decode("".join(text.split()), validate=False)
    except (binascii.Error, ValueError):
        return text.encode("utf-8", "replace")


def _message_from(root: etree._Element) -> AuditMessage:
    if _local(root) != "AuditMessage":
        raise AuditXMLError(f"the root element is <{_local(root) or root.tag}>, not <AuditMessage>")
    ev_el = _first(root, "EventIdentification")
    if ev_el is None:
        raise AuditXMLError("AuditMessage has no EventIdentification")
    id_el = _first(ev_el, "EventID")
    if id_el is None:
        raise AuditXMLError("EventIdentification has no EventID")
    outcome_el = _first(ev_el, "EventOutcomeDescription")
    event = EventIdentification(
        event_id=_code_from(id_el),
        date_time=parse_datetime(ev_el.get("EventDateTime")),
        outcome=_int(ev_el.get("EventOutcomeIndicator")) or 0,
        action=ev_el.get("EventActionCode"),
        type_codes=tuple(_code_from(c) for c in _children(ev_el, "EventTypeCode")),
        outcome_description=outcome_el.text if outcome_el is not None else None,
        purpose_of_use=tuple(_code_from(c) for c in _children(ev_el, "PurposeOfUse")),
    )
    participants = []
    for p in _children(root, "ActiveParticipant"):
        media = _first(p, "MediaIdentifier")
        media_type = _first(media, "MediaType") if media is not None else None
        participants.append(ActiveParticipant(
            user_id=p.get("UserID", ""),
            requestor=_bool(p.get("UserIsRequestor")),
            alt_user_id=p.get("AlternativeUserID"),
            user_name=p.get("UserName"),
            network_id=p.get("NetworkAccessPointID"),
            network_type=p.get("NetworkAccessPointTypeCode"),
            roles=tuple(_code_from(c) for c in _children(p, "RoleIDCode")),
            media_type=_code_from(media_type) if media_type is not None else None,
        ))
    src_el = _first(root, "AuditSourceIdentification")
    source = AuditSourceIdentification(
        source_id=src_el.get("AuditSourceID", "") if src_el is not None else "",
        enterprise_site_id=src_el.get("AuditEnterpriseSiteID") if src_el is not None else None,
        type_codes=tuple(_code_from(c) for c in _children(src_el, "AuditSourceTypeCode"))
        if src_el is not None else (),
    )
    objects = [_object_from(o) for o in _children(root, "ParticipantObjectIdentification")]
    return AuditMessage(event=event, participants=tuple(participants), source=source, objects=tuple(objects))


def _object_from(o: etree._Element) -> ParticipantObjectIdentification:
    id_type = _first(o, "ParticipantObjectIDTypeCode")
    name = _first(o, "ParticipantObjectName")
    query = _first(o, "ParticipantObjectQuery")
    return ParticipantObjectIdentification(
        id_type=_code_from(id_type) if id_type is not None else Code(code=""),
        object_id=o.get("ParticipantObjectID"),
        type_code=_int(o.get("ParticipantObjectTypeCode")),
        role=_int(o.get("ParticipantObjectTypeCodeRole")),
        life_cycle=_int(o.get("ParticipantObjectDataLifeCycle")),
        sensitivity=o.get("ParticipantObjectSensitivity"),
        name=name.text if name is not None else None,
        query=_decode_b64(query.text) if query is not None else None,
        details=tuple(ObjectDetail(type=d.get("type", ""), value=_decode_b64(d.get("value")))
                      for d in _children(o, "ParticipantObjectDetail")),
        descriptions=tuple(_description_from(d) for d in _children(o, "ParticipantObjectDescription")),
    )


def _description_from(d: etree._Element) -> ObjectDescription:
    contains = _first(d, "ParticipantObjectContainsStudy")
    encrypted, anonymized = _first(d, "Encrypted"), _first(d, "Anonymized")
    return ObjectDescription(
        mpps=tuple(e.get("UID", "") for e in _children(d, "MPPS")),
        accessions=tuple(e.get("Number", "") for e in _children(d, "Accession")),
        sop_classes=tuple(
            SOPClass(uid=s.get("UID"), count=_int(s.get("NumberOfInstances")) or 0,
                     instances=tuple(i.get("UID", "") for i in _children(s, "Instance")))
            for s in _children(d, "SOPClass")
        ),
        studies=tuple(s.get("UID", "") for s in _children(contains, "StudyIDs")) if contains is not None else (),
        encrypted=_bool(encrypted.text) if encrypted is not None else None,
        anonymized=_bool(anonymized.text) if anonymized is not None else None,
    )
