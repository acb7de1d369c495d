"""XDS-I.b Imaging Document Source: RAD-68 publishes a study's KOS (found by ITI-18, retrieved by ITI-43, replaced
when the study grows) and RAD-69 returns the instances, with the RAD-69 error rules."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from lxml import etree
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from ihehub.actors.xds_imaging import ImagingDocumentSource, ImagingSettings
from ihehub.bus import schema
from ihehub.bus.db import make_engine
from ihehub.dicom import DicomSettings, ImageManager
from ihehub.xds import ebrim
from ihehub.xds.imaging import XDSI_NS
from ihehub.xds.service import XdsService
from tests.api.api_support import LoopThread
from tests.conftest import CORPUS
from tests.dicom.dicomkit import make_instance
from tests.xds.query_fixtures import adhoc, q, ql

REPO = "1.3.6.1.4.1.21367.2017.2.3.4242.1"
XDS_NS = ebrim.NS["xds"]
RIM = ebrim.NS["rim"]


@pytest.fixture(scope="module")
def repository_schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(CORPUS / "nist" / "schema" / "XDS.b_DocumentRepository.xsd")))


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[ImagingDocumentSource, ImageManager, Path]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    schema.upgrade(engine)
    loop = LoopThread()
    manager = ImageManager(DicomSettings(port=0, host="127.0.0.1"), engine, tmp_path / "data")
    loop.run(manager.start())
    svc = XdsService(engine, tmp_path / "data", repository_unique_id=REPO)
    src = ImagingDocumentSource(engine=engine, dicom_root=tmp_path / "data" / "dicom", xds=svc,
                                settings=ImagingSettings(source_id="1.2.156.777.1", default_domain="1.2.156.99",
                                                         retrieve_ae_title="IHEHUB", institution="区人民医院"))
    try:
        yield src, manager, tmp_path
    finally:
        loop.run(manager.stop())
        loop.close()
        engine.dispose()


def _store(manager: ImageManager, *files: Path) -> None:
    res = subprocess.run(["storescu", "-aet", "TESTSCU", "-aec", manager.ae_title, "127.0.0.1", str(manager.port),
                          *map(str, files)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert manager.flush(20)


def _study(tmp: Path, manager: ImageManager) -> dict[str, Any]:
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    files = []
    for n, (series, modality) in enumerate([(s1, "CT"), (s1, "CT"), (s2, "MR")]):
        f = tmp / f"i{n}.dcm"
        ds = make_instance(f, patient="张^三", patient_id="P100", study_uid=study, series_uid=series,
                           modality=modality, charset="ISO_IR 192", instance_number=n + 1, description="胸部CT")
        files.append((f, ds))
    # the third instance in Implicit VR Little Endian: RAD-69 re-encodes it when only Explicit is accepted
    f, ds = files[2]
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(f, enforce_file_format=True, implicit_vr=True, little_endian=True)
    _store(manager, *(f for f, _ in files))
    return {"study": study, "series": (s1, s1, s2), "sops": [str(d.SOPInstanceUID) for _, d in files],
            "files": [f for f, _ in files]}


def _find_documents(svc: XdsService, patient: str) -> etree._Element:
    return svc.queries.run(adhoc("FindDocuments", {"$XDSDocumentEntryPatientId": q(patient),
                                                   "$XDSDocumentEntryStatus": ql(ebrim.APPROVED, ebrim.DEPRECATED)}))


def _rad69(study: str, items: list[tuple[str, str, str]], syntaxes: list[str]) -> etree._Element:
    series_xml = "".join(
        f'<xdsi:SeriesRequest seriesInstanceUID="{series}"><xdsb:DocumentRequest>'
        f"<xdsb:RepositoryUniqueId>{repo}</xdsb:RepositoryUniqueId><xdsb:DocumentUniqueId>{sop}</xdsb:DocumentUniqueId>"
        "</xdsb:DocumentRequest></xdsi:SeriesRequest>" for series, sop, repo in items)
    ts = "".join(f"<xdsi:TransferSyntaxUID>{s}</xdsi:TransferSyntaxUID>" for s in syntaxes)
    return etree.fromstring(
        f'<xdsi:RetrieveImagingDocumentSetRequest xmlns:xdsi="{XDSI_NS}" xmlns:xdsb="{XDS_NS}">'
        f'<xdsi:StudyRequest studyInstanceUID="{study}">{series_xml}</xdsi:StudyRequest>'
        f"<xdsi:TransferSyntaxUIDList>{ts}</xdsi:TransferSyntaxUIDList>"
        "</xdsi:RetrieveImagingDocumentSetRequest>".encode())


def test_rad68_publishes_a_kos_that_iti18_finds_and_iti43_returns(
        source: tuple[ImagingDocumentSource, ImageManager, Path], repository_schema: etree.XMLSchema) -> None:
    src, manager, tmp = source
    st = _study(tmp, manager)
    pub = src.publish(st["study"])
    assert pub.status == ebrim.SUCCESS, pub.errors
    assert pub.patient_id == "P100^^^&1.2.156.99&ISO" and pub.instances == 3

    # the ITI-41 request the source built is schema-valid (checked separately from the in-process call)
    from ihehub.dicom.kos import build_kos, study_manifest
    from ihehub.xds.imaging import ManifestDocument, provide_and_register

    m = study_manifest(src.engine, st["study"])
    assert m is not None
    kos, ds = build_kos(m, retrieve_location_uid=REPO)
    doc = ManifestDocument(document_unique_id=str(ds.SOPInstanceUID), patient_id=pub.patient_id,
                           source_patient_id="P100", source_patient_name="张^三", source_patient_birth_date=None,
                           source_patient_sex="M", study_date=m.study_date, study_time=m.study_time,
                           title=m.description, modalities=m.modalities, accession_number=m.accession_number,
                           study_uid=st["study"], content=kos)
    request = provide_and_register(doc, source_id="1.2.3", submission_set_unique_id="1.2.3.4", replaces=None)
    assert repository_schema.validate(request), repository_schema.error_log

    # ITI-18 finds the manifest: KOS format code, DICOM mime type, the modalities as event codes
    resp = _find_documents(src.xds, pub.patient_id)
    (entry,) = resp.iter(f"{{{RIM}}}ExtrinsicObject")
    assert entry.get("mimeType") == "application/dicom"
    codes = {(c.get("classificationScheme"), c.get("nodeRepresentation"))
             for c in entry.iter(f"{{{RIM}}}Classification")}
    assert (ebrim.DE_FORMAT_CODE, "1.2.840.10008.5.1.4.1.1.88.59") in codes
    assert {(ebrim.DE_EVENT_CODE, "CT"), (ebrim.DE_EVENT_CODE, "MR")} <= codes

    # ITI-43 returns the KOS: it references every instance with Retrieve Location UID = the repository
    stored = src.xds.store.get(pub.document_unique_id)
    assert stored is not None
    kos_ds = pydicom.dcmread(io.BytesIO(stored.path.read_bytes()))
    assert kos_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59" and kos_ds.Modality == "KO"
    assert kos_ds.PatientName == "张^三"
    (evidence,) = kos_ds.CurrentRequestedProcedureEvidenceSequence
    refs = {r.ReferencedSOPInstanceUID for s in evidence.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert refs == set(st["sops"])
    assert {s.RetrieveLocationUID for s in evidence.ReferencedSeriesSequence} == {REPO}
    assert [i.ValueType for i in kos_ds.ContentSequence] == ["IMAGE"] * 3

    # more images arrive: publishing again replaces the manifest (RPLC), the first is Deprecated
    extra = tmp / "extra.dcm"
    make_instance(extra, patient="张^三", patient_id="P100", study_uid=st["study"], series_uid=st["series"][0],
                  modality="CT", charset="ISO_IR 192", instance_number=9)
    _store(manager, extra)
    again = src.publish(st["study"])
    assert again.status == ebrim.SUCCESS and again.instances == 4, again.errors
    statuses = {e.get("status") for e in _find_documents(src.xds, pub.patient_id).iter(f"{{{RIM}}}ExtrinsicObject")}
    assert statuses == {ebrim.APPROVED, ebrim.DEPRECATED}


def test_rad69_returns_instances_with_the_error_rules(source: tuple[ImagingDocumentSource, ImageManager, Path]
                                                      ) -> None:
    src, manager, tmp = source
    st = _study(tmp, manager)
    s, sops = st["series"], st["sops"]
    explicit, implicit, jpeg = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"
    got = src.retrieve(_rad69(st["study"], [(s[0], sops[0], REPO), (s[2], sops[2], REPO),
                                            (s[0], "1.2.3.999", REPO),  # unknown instance
                                            (s[2], sops[1], REPO),  # instance of another series
                                            (s[0], sops[1], "9.9.9")],  # another repository
                              [explicit]))
    assert got.status == ebrim.PARTIAL_SUCCESS and got.documents == [sops[0], sops[2]]
    codes = [e.get("errorCode") for e in got.response.iter(f"{{{ebrim.NS['rs']}}}RegistryError")]
    assert codes == ["XDSDocumentUniqueIdError", "XDSDocumentUniqueIdError", "XDSUnknownRepositoryId"]
    # the explicit-VR instance comes as stored, byte for byte; the implicit-VR one re-encoded as asked
    first = got.parts[0].source
    assert isinstance(first, Path) and first.read_bytes() == (src.dicom_root / _relpath(src, sops[0])).read_bytes()
    third = got.parts[1].source
    assert isinstance(third, bytes)
    ds = pydicom.dcmread(io.BytesIO(third))
    assert ds.file_meta.TransferSyntaxUID == explicit and ds.SOPInstanceUID == sops[2]
    # asked in its own syntax, the implicit-VR instance is returned as stored
    got = src.retrieve(_rad69(st["study"], [(s[2], sops[2], REPO)], [implicit]))
    assert got.status == ebrim.SUCCESS and isinstance(got.parts[0].source, Path)
    # no acceptable transfer syntax: XDSRepositoryError
    got = src.retrieve(_rad69(st["study"], [(s[0], sops[0], REPO)], [jpeg]))
    assert got.status == ebrim.FAILURE
    assert [e.get("errorCode") for e in got.response.iter(f"{{{ebrim.NS['rs']}}}RegistryError")] == [
        "XDSRepositoryError"]
    # not a RAD-69 request, or one without transfer syntaxes: a failure response, never an exception
    for bad in (etree.fromstring(b"<x/>"), _rad69(st["study"], [(s[0], sops[0], REPO)], [])):
        got = src.retrieve(bad)
        assert got.status == ebrim.FAILURE and not got.parts


def test_publish_refuses_unknown_studies_and_unresolved_patients(
        source: tuple[ImagingDocumentSource, ImageManager, Path]) -> None:
    from ihehub.actors.xds_imaging import PublishError

    src, manager, tmp = source
    with pytest.raises(PublishError, match="not in the image manager"):
        src.publish("1.2.3.4.5.6")
    st = _study(tmp, manager)
    strict = ImagingDocumentSource(engine=src.engine, dicom_root=src.dicom_root, xds=src.xds,
                                   settings=ImagingSettings(source_id="1.2.3"))
    with pytest.raises(PublishError, match="affinity domain"):
        strict.publish(st["study"])


def _relpath(src: ImagingDocumentSource, sop: str) -> str:
    from sqlalchemy import select

    from ihehub.dicom import tables as t

    with src.engine.connect() as conn:
        return str(conn.execute(select(t.instances.c.path).where(t.instances.c.sop_instance_uid == sop)).scalar_one())
