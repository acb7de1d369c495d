"""XDS-I.b metadata: the ITI-41 request that publishes a study's KOS manifest (RAD-68), and the parsing of
a RAD-69 Retrieve Imaging Document Set request.

RAD TF-3 4.68.4.1.2 (Provide and Register Imaging Document Set – MTOM/XOP): the manifest is a DocumentEntry
with mimeType ``application/dicom``, formatCode ``1.2.840.10008.5.1.4.1.1.88.59`` (coding scheme
``1.2.840.10008.2.6.1``, DICOM UID registry), uniqueId = the KOS SOP Instance UID, eventCodeList = the
modalities in the study (DCM, ``1.2.840.10008.2.16.4``), serviceStartTime = study date and time, and the
patient's identifier in the affinity domain; the affinity domain's code choices (classCode, typeCode,
practiceSettingCode, ...) come from `ManifestCodes` (sane defaults for a regional imaging platform,
all configurable).

RAD TF-3 4.69.4.1 (Retrieve Imaging Document Set): ``xdsi:RetrieveImagingDocumentSetRequest`` holds
StudyRequest / SeriesRequest / ``xdsb:DocumentRequest`` (RepositoryUniqueId, DocumentUniqueId = SOP
Instance UID, HomeCommunityId) and a ``TransferSyntaxUIDList``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from lxml import etree

from ihehub.xds import ebrim
from ihehub.xds.errors import REGISTRY_METADATA_ERROR, XdsError, XdsFailure

XDSI_NS = "urn:ihe:rad:xdsi-b:2009"
XDSI = f"{{{XDSI_NS}}}"
XDS_NS = ebrim.NS["xds"]
XDS = f"{{{XDS_NS}}}"
RIM = ebrim.RIM
LCM = ebrim.LCM
KOS_FORMAT = ("1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1", "Key Object Selection Document")
DCM_SCHEME = "1.2.840.10008.2.16.4"
DICOM_MIME = "application/dicom"
OT_CLASSIFICATION = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Classification"
OT_EXTERNAL_ID = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:ExternalIdentifier"
OT_ASSOCIATION = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Association"
OT_PACKAGE = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:RegistryPackage"
Code = tuple[str, str, str]  # (code, codingScheme, displayName)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ManifestCodes:
    """The affinity domain's codes for imaging manifests (each ``(code, codingScheme, displayName)``)."""

    class_code: Code = ("18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study")
    type_code: Code = ("18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study")
    confidentiality_code: Code = ("N", "2.16.840.1.113883.5.25", "normal")
    healthcare_facility_type_code: Code = ("22232009", "2.16.840.1.113883.6.96", "Hospital")
    practice_setting_code: Code = ("394914008", "2.16.840.1.113883.6.96", "Radiology")
    content_type_code: Code = ("18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study")
    language_code: str = "zh-CN"

    @classmethod
    def from_mapping(cls, raw: dict[str, object] | None) -> ManifestCodes:
        """From YAML: ``{class_code: [code, scheme, name], ..., language_code: en-US}``; a wrong entry names
        the key."""
        changes: dict[str, Any] = {}
        for key, value in (raw or {}).items():
            if key not in cls.__dataclass_fields__:
                raise ValueError(f"xds imaging codes: unknown key {key!r}; keys are "
                                 f"{', '.join(cls.__dataclass_fields__)}")
            if key == "language_code":
                if not isinstance(value, str) or not value:
                    raise ValueError("xds imaging codes: language_code must be a language tag such as zh-CN")
            elif not (isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(v, str) and v
                                                                                   for v in value)):
                raise ValueError(f"xds imaging codes: {key} must be [code, codingScheme, displayName]")
            else:
                value = tuple(value)
            changes[key] = value
        return cls(**changes)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ManifestDocument:
    """What the ITI-41 request says about one KOS manifest."""

    document_unique_id: str  # the KOS SOP Instance UID (RAD TF-3 4.68.4.1.2.3.2)
    patient_id: str  # CX in the affinity domain: id^^^&oid&ISO
    source_patient_id: str  # CX as the image manager knows it
    source_patient_name: str | None
    source_patient_birth_date: str | None
    source_patient_sex: str | None
    study_date: str | None
    study_time: str | None
    title: str | None
    modalities: Sequence[str]
    accession_number: str | None
    study_uid: str
    content: bytes


def study_reference(study_uid: str) -> str:
    """The referenceIdList value naming a study (CXi with type urn:ihe:iti:xds:2016:studyInstanceUID)."""
    return f"{study_uid}^^^^urn:ihe:iti:xds:2016:studyInstanceUID"


def _slot(parent: etree._Element, name: str, values: Sequence[str]) -> None:
    slot = etree.SubElement(parent, f"{RIM}Slot", name=name)
    vl = etree.SubElement(slot, f"{RIM}ValueList")
    for v in values:
        etree.SubElement(vl, f"{RIM}Value").text = v


def _name(parent: etree._Element, text: str, tag: str = "Name") -> None:
    etree.SubElement(etree.SubElement(parent, f"{RIM}{tag}"), f"{RIM}LocalizedString", value=text)


def _classification(parent: etree._Element, scheme: str, obj: str, cid: str, code: Code) -> None:
    cl = etree.SubElement(parent, f"{RIM}Classification", classificationScheme=scheme, classifiedObject=obj,
                          id=cid, nodeRepresentation=code[0], objectType=OT_CLASSIFICATION)
    _slot(cl, "codingScheme", [code[1]])
    _name(cl, code[2])


def _external_id(parent: etree._Element, scheme: str, obj: str, eid: str, value: str, name: str) -> None:
    ei = etree.SubElement(parent, f"{RIM}ExternalIdentifier", identificationScheme=scheme, value=value, id=eid,
                          registryObject=obj, objectType=OT_EXTERNAL_ID)
    _name(ei, name)


def _dtm(date: str | None, time: str | None) -> str | None:
    """DICOM DA + TM → HL7 DTM (seconds precision, fraction dropped)."""
    if not date or not date.isdigit():
        return None
    digits = "".join(ch for ch in (time or "").split(".")[0] if ch.isdigit())
    return (date + digits)[:14]


def provide_and_register(doc: ManifestDocument, *, source_id: str, submission_set_unique_id: str,
                         codes: ManifestCodes | None = None, author_institution: str | None = None,
                         replaces: str | None = None, now: dt.datetime | None = None) -> etree._Element:
    """The ``xdsb:ProvideAndRegisterDocumentSetRequest`` of RAD-68 for ``doc``, its KOS inline (base64);
    ``replaces`` is the entryUUID of the study's previous manifest (an RPLC association, ITI TF-3 4.2.2)."""
    codes = codes or ManifestCodes()
    now = now or dt.datetime.now(dt.UTC)
    root = etree.Element(f"{XDS}ProvideAndRegisterDocumentSetRequest",
                         nsmap={"xdsb": XDS_NS, "lcm": ebrim.NS["lcm"], "rim": ebrim.NS["rim"]})
    sor = etree.SubElement(root, f"{LCM}SubmitObjectsRequest")
    objects = etree.SubElement(sor, f"{RIM}RegistryObjectList")
    de_id, ss_id = "Document01", "SubmissionSet01"

    de = etree.SubElement(objects, f"{RIM}ExtrinsicObject", id=de_id, mimeType=DICOM_MIME,
                          objectType=ebrim.DE_OBJECT_TYPE_STABLE)
    _slot(de, "creationTime", [now.strftime("%Y%m%d%H%M%S")])
    _slot(de, "languageCode", [codes.language_code])
    start = _dtm(doc.study_date, doc.study_time)
    if start:
        _slot(de, "serviceStartTime", [start])
    _slot(de, "sourcePatientId", [doc.source_patient_id])
    info = [f"PID-3|{doc.source_patient_id}"]
    if doc.source_patient_name:
        info.append(f"PID-5|{doc.source_patient_name}")
    if doc.source_patient_birth_date:
        info.append(f"PID-7|{doc.source_patient_birth_date}")
    if doc.source_patient_sex:
        info.append(f"PID-8|{doc.source_patient_sex}")
    _slot(de, "sourcePatientInfo", info)
    if doc.accession_number:
        _slot(de, "urn:ihe:iti:xds:2013:referenceIdList", [f"{doc.accession_number}^^^^urn:ihe:iti:xds:2013:accession",
                                                           study_reference(doc.study_uid)])
    else:
        _slot(de, "urn:ihe:iti:xds:2013:referenceIdList", [study_reference(doc.study_uid)])
    _name(de, doc.title or "Imaging study manifest")
    n = 0

    def cid() -> str:
        nonlocal n
        n += 1
        return f"cl{n:02d}"

    if author_institution:
        au = etree.SubElement(de, f"{RIM}Classification", classificationScheme=ebrim.DE_AUTHOR, classifiedObject=de_id,
                              id=cid(), nodeRepresentation="", objectType=OT_CLASSIFICATION)
        _slot(au, "authorInstitution", [author_institution])
    _classification(de, ebrim.DE_CLASS_CODE, de_id, cid(), codes.class_code)
    _classification(de, ebrim.DE_CONFIDENTIALITY_CODE, de_id, cid(), codes.confidentiality_code)
    for modality in doc.modalities:
        _classification(de, ebrim.DE_EVENT_CODE, de_id, cid(), (modality, DCM_SCHEME, modality))
    _classification(de, ebrim.DE_FORMAT_CODE, de_id, cid(), KOS_FORMAT)
    _classification(de, ebrim.DE_HEALTHCARE_FACILITY_TYPE_CODE, de_id, cid(), codes.healthcare_facility_type_code)
    _classification(de, ebrim.DE_PRACTICE_SETTING_CODE, de_id, cid(), codes.practice_setting_code)
    _classification(de, ebrim.DE_TYPE_CODE, de_id, cid(), codes.type_code)
    _external_id(de, ebrim.DE_PATIENT_ID, de_id, "ei01", doc.patient_id, "XDSDocumentEntry.patientId")
    _external_id(de, ebrim.DE_UNIQUE_ID, de_id, "ei02", doc.document_unique_id, "XDSDocumentEntry.uniqueId")

    ss = etree.SubElement(objects, f"{RIM}RegistryPackage", id=ss_id, objectType=OT_PACKAGE)
    _slot(ss, "submissionTime", [now.strftime("%Y%m%d%H%M%S")])
    _name(ss, f"Imaging study {doc.study_uid}")
    if author_institution:
        au = etree.SubElement(ss, f"{RIM}Classification", classificationScheme=ebrim.SS_AUTHOR, classifiedObject=ss_id,
                              id=cid(), nodeRepresentation="", objectType=OT_CLASSIFICATION)
        _slot(au, "authorInstitution", [author_institution])
    _classification(ss, ebrim.SS_CONTENT_TYPE_CODE, ss_id, cid(), codes.content_type_code)
    _external_id(ss, ebrim.SS_UNIQUE_ID, ss_id, "ei03", submission_set_unique_id, "XDSSubmissionSet.uniqueId")
    _external_id(ss, ebrim.SS_SOURCE_ID, ss_id, "ei04", source_id, "XDSSubmissionSet.sourceId")
    _external_id(ss, ebrim.SS_PATIENT_ID, ss_id, "ei05", doc.patient_id, "XDSSubmissionSet.patientId")
    etree.SubElement(objects, f"{RIM}Classification", classificationNode=ebrim.SS_CLASSIFICATION_NODE,
                     classifiedObject=ss_id, id=cid(), objectType=OT_CLASSIFICATION)
    assoc = etree.SubElement(objects, f"{RIM}Association", associationType=ebrim.ASSOC_HAS_MEMBER,
                             sourceObject=ss_id, targetObject=de_id, id="as01", objectType=OT_ASSOCIATION)
    _slot(assoc, "SubmissionSetStatus", ["Original"])
    if replaces:
        etree.SubElement(objects, f"{RIM}Association", associationType=ebrim.ASSOC_RPLC, sourceObject=de_id,
                         targetObject=replaces, id="as02", objectType=OT_ASSOCIATION)
    document = etree.SubElement(root, f"{XDS}Document", id=de_id)
    document.text = base64.b64encode(doc.content).decode("ascii")
    return root


# -- RAD-69 -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class InstanceRequest:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    repository_unique_id: str
    home_community_id: str | None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ImagingRetrieve:
    instances: tuple[InstanceRequest, ...]
    transfer_syntaxes: tuple[str, ...]


def parse_rad69(request: etree._Element) -> ImagingRetrieve:
    """``xdsi:RetrieveImagingDocumentSetRequest`` → `ImagingRetrieve`; `XdsFailure` when it is not one or
    names nothing (RAD TF-3 4.69.4.1.2)."""
    if request.tag != f"{XDSI}RetrieveImagingDocumentSetRequest":
        raise XdsFailure(XdsError(REGISTRY_METADATA_ERROR,
                                  f"expected xdsi:RetrieveImagingDocumentSetRequest, got {request.tag}"))
    out: list[InstanceRequest] = []
    for study in request.iterchildren(f"{XDSI}StudyRequest"):
        study_uid = (study.get("studyInstanceUID") or "").strip()
        for series in study.iterchildren(f"{XDSI}SeriesRequest"):
            series_uid = (series.get("seriesInstanceUID") or "").strip()
            for doc in series.iterchildren(f"{XDS}DocumentRequest"):
                out.append(InstanceRequest(
                    study_uid=study_uid, series_uid=series_uid,
                    sop_instance_uid=(doc.findtext(f"{XDS}DocumentUniqueId") or "").strip(),
                    repository_unique_id=(doc.findtext(f"{XDS}RepositoryUniqueId") or "").strip(),
                    home_community_id=(doc.findtext(f"{XDS}HomeCommunityId") or "").strip() or None))
    tsl = request.find(f"{XDSI}TransferSyntaxUIDList")
    syntaxes = tuple((ts.text or "").strip() for ts in tsl.iterchildren(f"{XDSI}TransferSyntaxUID")) \
        if tsl is not None else ()
    if not out:
        raise XdsFailure(XdsError(REGISTRY_METADATA_ERROR, "the request names no DocumentRequest inside "
                                                           "StudyRequest/SeriesRequest"))
    if not [s for s in syntaxes if s]:
        raise XdsFailure(XdsError(REGISTRY_METADATA_ERROR, "TransferSyntaxUIDList is missing or empty "
                                                           "(RAD TF-3 4.69.4.1.2)"))
    return ImagingRetrieve(instances=tuple(out), transfer_syntaxes=tuple(s for s in syntaxes if s))
