"""The imaging manifest of a study: a Key Object Selection (KOS) document built from the index.

IHE RAD TF-3 4.68.4.1.2.3 (XDS-I.b manifest) and DICOM PS3.3 A.35.4 (Key Object Selection Document IOD),
template TID 2010 "Key Object Selection": one KOS per study that references every SOP instance of the study
in the Current Requested Procedure Evidence Sequence (0040,A375), each series with its Retrieve Location
UID (0040,E011) = the repositoryUniqueId of the Imaging Document Source that serves RAD-69 and, when
given, a Retrieve AE Title / Retrieve URL for DICOM and WADO access; the content tree is a CONTAINER with
the document title (113030, DCM, "Manifest") holding one IMAGE (or COMPOSITE) item per instance.

`study_manifest` reads what the manifest needs from the index tables (no file is opened); `build_kos`
returns the KOS as a DICOM Part 10 file (Explicit VR Little Endian, UTF-8 character set ISO_IR 192).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from io import BytesIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import Engine, select

from ihehub.dicom import tables as t

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
MANIFEST_TITLE = ("113030", "DCM", "Manifest")
# SOP classes whose instances are IMAGE content items (PS3.3 C.17.3.2.1); everything else is COMPOSITE
_IMAGE_PREFIXES = ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.3",
                   "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.7",
                   "1.2.840.10008.5.1.4.1.1.12", "1.2.840.10008.5.1.4.1.1.13", "1.2.840.10008.5.1.4.1.1.20",
                   "1.2.840.10008.5.1.4.1.1.77", "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130",
                   "1.2.840.10008.5.1.4.1.1.481.1")
_NON_IMAGE = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.104.",
              "1.2.840.10008.5.1.4.1.1.9.", "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.481.2",
              "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.481.5")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SeriesRef:
    series_uid: str
    modality: str | None
    instances: tuple[tuple[str, str], ...]  # (SOP Class UID, SOP Instance UID)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StudyManifest:
    """What a manifest of a study says: patient, study attributes and every instance by series."""

    study_uid: str
    patient_id: str
    issuer: str
    patient_name: str | None
    birth_date: str | None
    sex: str | None
    accession_number: str | None
    study_date: str | None
    study_time: str | None
    study_id: str | None
    description: str | None
    referring_physician: str | None
    modalities: tuple[str, ...]
    series: tuple[SeriesRef, ...]

    @property
    def instance_count(self) -> int:
        return sum(len(s.instances) for s in self.series)


def study_manifest(engine: Engine, study_uid: str) -> StudyManifest | None:
    """The manifest contents of ``study_uid`` from the index (KOS instances of the study are not referenced:
    a manifest does not list manifests); None when the study is not in the index."""
    with engine.connect() as conn:
        st = conn.execute(select(t.studies).where(t.studies.c.study_uid == study_uid)).first()
        if st is None:
            return None
        pat = conn.execute(select(t.patients).where(t.patients.c.id == st.patient_pk)).first()
        series_rows = conn.execute(select(t.series).where(t.series.c.study_uid == study_uid)
                                   .order_by(t.series.c.series_number, t.series.c.series_uid)).all()
        inst_rows = conn.execute(
            select(t.instances.c.series_uid, t.instances.c.sop_class_uid, t.instances.c.sop_instance_uid)
            .where(t.instances.c.study_uid == study_uid, t.instances.c.sop_class_uid != KOS_SOP_CLASS)
            .order_by(t.instances.c.series_uid, t.instances.c.instance_number, t.instances.c.sop_instance_uid)).all()
    by_series: dict[str, list[tuple[str, str]]] = {}
    for row in inst_rows:
        by_series.setdefault(row.series_uid, []).append((row.sop_class_uid, row.sop_instance_uid))
    series = tuple(SeriesRef(series_uid=s.series_uid, modality=s.modality, instances=tuple(by_series[s.series_uid]))
                   for s in series_rows if by_series.get(s.series_uid))
    modalities = tuple(sorted({s.modality for s in series if s.modality}))
    return StudyManifest(
        study_uid=study_uid, patient_id=pat.patient_id if pat else "", issuer=pat.issuer if pat else "",
        patient_name=pat.name if pat else None, birth_date=pat.birth_date if pat else None,
        sex=pat.sex if pat else None, accession_number=st.accession_number, study_date=st.study_date,
        study_time=st.study_time, study_id=st.study_id, description=st.description,
        referring_physician=st.referring_physician, modalities=modalities, series=series)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _value_type(sop_class: str) -> str:
    if sop_class.startswith(_NON_IMAGE):
        return "COMPOSITE"
    return "IMAGE" if sop_class.startswith(_IMAGE_PREFIXES) else "COMPOSITE"


def build_kos(manifest: StudyManifest, *, retrieve_location_uid: str, retrieve_ae_title: str | None = None,
              retrieve_url: str | None = None, sop_instance_uid: str | None = None, series_uid: str | None = None,
              institution: str | None = None, now: dt.datetime | None = None) -> tuple[bytes, Dataset]:
    """(Part 10 bytes, dataset) of the KOS manifest of ``manifest`` (RAD TF-3 4.68.4.1.2.3)."""
    if not manifest.series:
        raise ValueError(f"study {manifest.study_uid} has no instance to reference")
    now = now or dt.datetime.now(dt.UTC)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = KOS_SOP_CLASS
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    # Patient and General Study modules: the study's own values (the manifest belongs to the study)
    ds.PatientName = manifest.patient_name or ""
    ds.PatientID = manifest.patient_id
    if manifest.issuer:
        ds.IssuerOfPatientID = manifest.issuer
    ds.PatientBirthDate = manifest.birth_date or ""
    ds.PatientSex = manifest.sex or ""
    ds.StudyInstanceUID = manifest.study_uid
    ds.StudyDate = manifest.study_date or ""
    ds.StudyTime = manifest.study_time or ""
    ds.AccessionNumber = manifest.accession_number or ""
    ds.ReferringPhysicianName = manifest.referring_physician or ""
    ds.StudyID = manifest.study_id or ""
    if manifest.description:
        ds.StudyDescription = manifest.description
    # Key Object Document Series / Equipment
    ds.Modality = "KO"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = 9999
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    ds.Manufacturer = "ihehub"
    if institution:
        ds.InstitutionName = institution
    # Key Object Document module
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    evidence = Dataset()
    evidence.StudyInstanceUID = manifest.study_uid
    evidence.ReferencedSeriesSequence = DicomSequence()
    content = DicomSequence()
    for s in manifest.series:
        ser = Dataset()
        ser.SeriesInstanceUID = s.series_uid
        ser.RetrieveLocationUID = retrieve_location_uid
        if retrieve_ae_title:
            ser.RetrieveAETitle = retrieve_ae_title
        if retrieve_url:
            ser.RetrieveURL = f"{retrieve_url.rstrip('/')}/studies/{manifest.study_uid}/series/{s.series_uid}"
        ser.ReferencedSOPSequence = DicomSequence()
        for sop_class, sop_instance in s.instances:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_instance
            ser.ReferencedSOPSequence.append(ref)
            item = Dataset()
            item.RelationshipType = "CONTAINS"
            item.ValueType = _value_type(sop_class)
            item_ref = Dataset()
            item_ref.ReferencedSOPClassUID, item_ref.ReferencedSOPInstanceUID = sop_class, sop_instance
            item.ReferencedSOPSequence = DicomSequence([item_ref])
            content.append(item)
        evidence.ReferencedSeriesSequence.append(ser)
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([evidence])
    # SR Document Content: CONTAINER "Manifest" (TID 2010)
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code(*MANIFEST_TITLE)])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = DicomSequence([template])
    ds.ContentSequence = content

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(KOS_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), ds
