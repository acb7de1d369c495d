"""XDS-I.b Imaging Document Source: publish a study's KOS manifest (RAD-68) and serve its instances (RAD-69).

* **RAD-68** (RAD TF-3 4.68): `ImagingDocumentSource.publish` builds the study's KOS from the DICOM index
  (`ihehub.dicom.kos`), with Retrieve Location UID (0040,E011) = this node's repositoryUniqueId, and
  provides it with ITI-41 to the hub's repository (which registers it with ITI-42).  The patient is named
  in the affinity domain: the EMPI's enterprise identifier of the study's patient when the hub runs an
  EMPI, else the DICOM Patient ID with its issuer mapped to an assigning-authority OID (``issuers``),
  else ``default_domain``.  A study published again (more images arrived) gets a new manifest that
  replaces the previous one (RPLC association, the old one Deprecated), so consumers find one manifest
  listing every instance.
* **RAD-69** (RAD TF-3 4.69): `retrieve` answers ``xdsi:RetrieveImagingDocumentSetRequest`` with the stored
  instances as MTOM parts in the first acceptable transfer syntax: the stored bytes as they came when
  their syntax is listed, or Explicit VR Little Endian re-encoded from an uncompressed stored syntax.
  Unknown repositoryUniqueId → XDSUnknownRepositoryId; an instance unknown or not in the named
  study/series → XDSDocumentUniqueIdError; no acceptable transfer syntax → XDSRepositoryError; partial
  success when some instances are returned.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lxml import etree
from sqlalchemy import Engine, select

from ihehub.dicom import tables as dt_tables
from ihehub.dicom.kos import build_kos, study_manifest
from ihehub.soap.mtom import Attachment, OutPart
from ihehub.xds import ebrim
from ihehub.xds.errors import (
    FAILURE,
    PARTIAL_SUCCESS,
    SUCCESS,
    XdsError,
    XdsFailure,
    error_list,
    registry_response,
)
from ihehub.xds.imaging import (
    DICOM_MIME,
    ManifestCodes,
    ManifestDocument,
    parse_rad69,
    provide_and_register,
    study_reference,
)
from ihehub.xds.repository import document_response

log = logging.getLogger("ihehub.xds.imaging")

RAD_69 = "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
UNKNOWN_REPOSITORY_ID = "XDSUnknownRepositoryId"
DOCUMENT_UNIQUE_ID_ERROR = "XDSDocumentUniqueIdError"
REPOSITORY_ERROR = "XDSRepositoryError"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
UNCOMPRESSED = frozenset({EXPLICIT_LE, IMPLICIT_LE})
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
XDS = f"{{{ebrim.NS['xds']}}}"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ImagingSettings:
    """``actors.xds.imaging`` of ihehub.yaml."""

    source_id: str  # XDSSubmissionSet.sourceId: this Imaging Document Source's OID
    default_domain: str | None = None  # assigning authority OID for DICOM patient ids with no mapped issuer
    issuers: Mapping[str, str] = dataclasses.field(default_factory=dict)  # (0010,0021) -> OID
    codes: ManifestCodes = dataclasses.field(default_factory=ManifestCodes)
    retrieve_ae_title: str | None = None
    wado_url: str | None = None  # base of DICOMweb for Retrieve URL, e.g. https://hub/dicomweb
    institution: str | None = None
    auto_publish: bool = True

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, ae_title: str | None = None) -> ImagingSettings:
        """From ``actors.xds.imaging`` (already schema-checked); ``ae_title``: the image manager's, the default
        Retrieve AE Title."""
        return cls(source_id=str(raw["source_id"]), default_domain=raw.get("default_domain"),
                   issuers=dict(raw.get("issuers") or {}), codes=ManifestCodes.from_mapping(raw.get("codes")),
                   retrieve_ae_title=raw.get("retrieve_ae_title") or ae_title, wado_url=raw.get("wado_url"),
                   institution=raw.get("institution"), auto_publish=bool(raw.get("auto_publish", True)))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Published:
    status: str  # the ITI-41 response status
    errors: tuple[XdsError, ...]
    document_unique_id: str
    patient_id: str
    instances: int
    submission_set_unique_id: str


@dataclasses.dataclass
class ImagingRetrieved:
    response: etree._Element
    parts: list[OutPart]
    status: str
    documents: list[str]


class PublishError(Exception):
    """The study cannot be published (not indexed, no patient in the affinity domain); names why.  Sending
    it again does not help until the data or the settings change (``permanent``)."""

    permanent = True


class ImagingDocumentSource:
    """RAD-68 publisher and RAD-69 responder over the hub's image manager index and XDS repository."""

    def __init__(self, *, engine: Engine, dicom_root: Path, xds: Any, settings: ImagingSettings,
                 services: Mapping[str, Any] | None = None) -> None:
        self.engine = engine
        self.dicom_root = Path(dicom_root)
        self.xds = xds  # ihehub.xds.service.XdsService
        self.settings = settings
        self.services = services if services is not None else {}

    @property
    def empi(self) -> Any:
        """The hub's EMPI when it runs one (started with the PIX/PDQ channels, after this source)."""
        return self.services.get("empi")

    @property
    def repository_unique_id(self) -> str:
        return str(self.xds.repository.repository_unique_id)

    # -- RAD-68 ------------------------------------------------------------------------------------
    def affinity_patient_id(self, patient_id: str, issuer: str) -> str:
        """The study patient's CX in the affinity domain (see the module docstring)."""
        if self.empi is not None and patient_id and issuer:
            from ihehub.empi import EmpiError, Identifier

            try:
                view = self.empi.patient(Identifier(value=patient_id, domain=issuer))
                ent = self.empi.domain(self.empi.config.enterprise_namespace)
                if ent.universal_id:
                    return f"{view.patient}^^^&{ent.universal_id}&ISO"
            except EmpiError as exc:
                log.info("xds-i: %s (issuer %s) not resolved by the EMPI: %s", patient_id, issuer, exc)
        oid = self.settings.issuers.get(issuer) or (issuer if _OID.match(issuer or "") else None) \
            or self.settings.default_domain
        if not patient_id or not oid:
            raise PublishError(f"the study's patient {patient_id or '(no Patient ID)'} (issuer {issuer or 'none'}) "
                               "has no identifier in the affinity domain: map the issuer in actors.xds.imaging."
                               "issuers or set default_domain")
        return f"{patient_id}^^^&{oid}&ISO"

    def publish(self, study_uid: str) -> Published:
        """Build the study's KOS and provide it to the repository (RAD-68 as ITI-41, in process)."""
        manifest = study_manifest(self.engine, study_uid)
        if manifest is None or not manifest.series:
            raise PublishError(f"study {study_uid} is not in the image manager's index (or has no instance)")
        patient = self.affinity_patient_id(manifest.patient_id, manifest.issuer)
        kos, ds = build_kos(manifest, retrieve_location_uid=self.repository_unique_id,
                            retrieve_ae_title=self.settings.retrieve_ae_title, retrieve_url=self.settings.wado_url,
                            institution=self.settings.institution)
        source_cx = manifest.patient_id + (f"^^^{manifest.issuer}" if manifest.issuer else "")
        doc = ManifestDocument(
            document_unique_id=str(ds.SOPInstanceUID), patient_id=patient, source_patient_id=source_cx,
            source_patient_name=manifest.patient_name, source_patient_birth_date=manifest.birth_date,
            source_patient_sex=manifest.sex, study_date=manifest.study_date, study_time=manifest.study_time,
            title=manifest.description, modalities=manifest.modalities,
            accession_number=manifest.accession_number, study_uid=study_uid, content=kos)
        ss_uid = _uid_from(study_uid, str(ds.SOPInstanceUID))
        request = provide_and_register(doc, source_id=self.settings.source_id, submission_set_unique_id=ss_uid,
                                       codes=self.settings.codes, author_institution=self.settings.institution,
                                       replaces=self.current_manifest(study_uid))
        provided = self.xds.repository.provide(request, _inline)
        status = provided.status
        errors = tuple(_errors(provided.response))
        audit = self.services.get("audit")
        if audit is not None:  # RAD TF-3 4.68.4.1.4: the Imaging Document Source exports (110106)
            audit.emit("RAD-68", side="source", source=audit.me(), destination=audit.me(self.repository_unique_id),
                       patients=[patient], submission_set=ss_uid, outcome=0 if status == SUCCESS else 8)
        return Published(status=status, errors=errors, document_unique_id=str(ds.SOPInstanceUID), patient_id=patient,
                         instances=manifest.instance_count, submission_set_unique_id=ss_uid)

    def current_manifest(self, study_uid: str) -> str | None:
        """entryUUID of the study's approved manifest in this repository, if one was published."""
        from ihehub.xds import tables as xt

        o, sl = xt.objects, xt.slots
        with self.engine.connect() as conn:
            row = conn.execute(
                select(o.c.entry_uuid).join(sl, sl.c.object_id == o.c.id)
                .where(sl.c.name == "referenceIdList", sl.c.value == study_reference(study_uid),
                       o.c.kind == "DocumentEntry", o.c.status == ebrim.APPROVED, o.c.mime_type == DICOM_MIME,
                       o.c.repository_unique_id == self.repository_unique_id)
                .order_by(o.c.id.desc()).limit(1)).first()
        return row.entry_uuid if row else None

    # -- RAD-69 ---------------------------------------------------------------------------------
    def handle(self, request: Any) -> Any:
        """The SOAP binding's entry (``POST /xds/imaging``): RAD-69 for action
        urn:ihe:rad:2009:RetrieveImagingDocumentSet, else wsa:ActionNotSupported."""
        from ihehub.soap import SoapFault
        from ihehub.soap.envelope import WSA_NS
        from ihehub.xds.service import Reply

        if request.action != RAD_69:
            raise SoapFault("Sender", f"the imaging endpoint does not support the action {request.action!r} "
                            f"(RAD-69 is {RAD_69})", subcode=(WSA_NS, "ActionNotSupported"))
        got = self.retrieve(request.payload)
        studies = sorted({w.study_uid for w in _requested(request.payload)})
        return Reply("RAD-69", got.response, got.status, parts=got.parts, documents=got.documents,
                     studies=studies)

    def retrieve(self, request: etree._Element) -> ImagingRetrieved:
        response = etree.Element(f"{XDS}RetrieveDocumentSetResponse", nsmap={"xdsb": ebrim.NS["xds"]})
        try:
            wanted = parse_rad69(request)
        except XdsFailure as exc:
            response.append(registry_response(exc.errors))
            return ImagingRetrieved(response=response, parts=[], status=FAILURE, documents=[])
        errors: list[XdsError] = []
        found: list[tuple[str, str, Path | bytes]] = []  # (uid, transfer syntax, bytes source)
        uids = [w.sop_instance_uid for w in wanted.instances]
        with self.engine.connect() as conn:
            i = dt_tables.instances
            rows = {r.sop_instance_uid: r for r in conn.execute(
                select(i.c.sop_instance_uid, i.c.series_uid, i.c.study_uid, i.c.transfer_syntax, i.c.path)
                .where(i.c.sop_instance_uid.in_(uids)))} if uids else {}
        home = getattr(self.xds.repository, "home_community_id", None)
        for w in wanted.instances:
            if w.repository_unique_id != self.repository_unique_id:
                errors.append(XdsError(UNKNOWN_REPOSITORY_ID, f"repositoryUniqueId {w.repository_unique_id!r} is "
                                       f"not this Imaging Document Source ({self.repository_unique_id})",
                                       location=w.repository_unique_id))
                continue
            row = rows.get(w.sop_instance_uid)
            if row is None or row.series_uid != w.series_uid or row.study_uid != w.study_uid:
                where = "is not known" if row is None else f"is not in series {w.series_uid} of study {w.study_uid}"
                errors.append(XdsError(DOCUMENT_UNIQUE_ID_ERROR, f"SOP instance {w.sop_instance_uid} {where}",
                                       location=w.sop_instance_uid))
                continue
            path = self.dicom_root / row.path
            if row.transfer_syntax in wanted.transfer_syntaxes:
                found.append((w.sop_instance_uid, row.transfer_syntax, path))
            elif row.transfer_syntax in UNCOMPRESSED and EXPLICIT_LE in wanted.transfer_syntaxes:
                found.append((w.sop_instance_uid, EXPLICIT_LE, _reencode(path)))
            else:
                errors.append(XdsError(REPOSITORY_ERROR, f"SOP instance {w.sop_instance_uid} is stored in "
                                       f"{row.transfer_syntax}, none of the requested transfer syntaxes "
                                       f"({', '.join(wanted.transfer_syntaxes)}) can be served",
                                       location=w.sop_instance_uid))
        status = SUCCESS if not errors else (PARTIAL_SUCCESS if found else FAILURE)
        rr = registry_response([], status=status)
        if errors:
            rr.append(error_list(errors))
        response.append(rr)
        parts: list[OutPart] = []
        for n, (uid, _ts, source) in enumerate(found):
            cid = f"img{n}.{hashlib.sha1(uid.encode()).hexdigest()[:16]}@ihehub"
            parts.append(OutPart(cid=cid, content_type=DICOM_MIME, source=source))
            document_response(response, home_community_id=home, repository_unique_id=self.repository_unique_id,
                              unique_id=uid, mime_type=DICOM_MIME, cid=cid)
        return ImagingRetrieved(response=response, parts=parts, status=status, documents=[u for u, _, _ in found])


def _requested(payload: etree._Element) -> tuple[Any, ...]:
    try:
        return parse_rad69(payload).instances
    except XdsFailure:
        return ()


def _inline(document: etree._Element) -> Attachment:
    """The bytes of an inline base64 ``xdsb:Document`` (the in-process RAD-68 sends its KOS inline)."""
    return Attachment.from_bytes(base64.b64decode(document.text or ""), content_id=document.get("id") or "",
                                 content_type=DICOM_MIME)


def _errors(response: etree._Element) -> list[XdsError]:
    rs = ebrim.NS["rs"]
    return [XdsError(e.get("errorCode") or "", e.get("codeContext") or "", location=e.get("location") or "")
            for e in response.iter(f"{{{rs}}}RegistryError")]


def _uid_from(*parts: str) -> str:
    """A stable OID-form unique id derived from ``parts`` (2.25 + 128-bit hash, PS3.5 B.2)."""
    digest = hashlib.sha256("|".join(parts).encode()).digest()[:16]
    return "2.25." + str(int.from_bytes(digest, "big"))


def _reencode(path: Path) -> bytes:
    """An uncompressed stored instance re-encoded as Explicit VR Little Endian Part 10 bytes."""
    from io import BytesIO

    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buf.getvalue()
