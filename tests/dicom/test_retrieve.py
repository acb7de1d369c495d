"""C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3) against real peers: DCMTK movescu/getscu as requestors, DCMTK
storescp and Orthanc as Move Destinations.  Instances go out exactly as they were stored (data set bytes
compared), compressed ones in their own transfer syntax; pending responses count the sub-operations; a
C-CANCEL stops the move; an unknown destination is A801."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
)

from ihehub.bus.db import make_engine
from ihehub.dicom import DicomNode, DicomSettings, ImageManager
from ihehub.dicom.retrieve import RetrieveError, locate
from ihehub.dicom.scu import read_stored
from ihehub.dicom.tables import metadata
from tests.dicom.conftest import ManagerFactory
from tests.dicom.dicomkit import LoopThread, dcmtk, make_instance, sample_file, store
from tests.dicom.peers import Orthanc, StoreSCP, dataset_bytes

STUDY = "1.2.826.0.1.3680043.8.498.1001"
SERIES = ("1.2.826.0.1.3680043.8.498.1001.1", "1.2.826.0.1.3680043.8.498.1001.2")
# pydicom's test files in JPEG 2000 and RLE Lossless, with the storescu flag that proposes their syntax
COMPRESSED = {"JPEG2000.dcm": "-xw", "SC_rgb_rle.dcm": "-xr"}
J2K = "JPEG2000.dcm"


def _study(manager: ImageManager, folder: Path) -> list[str]:
    """A study of two series of two Secondary Capture instances, stored with storescu; returns its SOP UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    files, uids = [], []
    for s, series in enumerate(SERIES):
        for n in range(2):
            path = folder / f"{s}-{n}.dcm"
            ds = make_instance(path, study_uid=STUDY, series_uid=series, series_number=s + 1, instance_number=n + 1,
                               patient_id="MOVE1", accession="ACC-MOVE")
            files.append(path)
            uids.append(str(ds.SOPInstanceUID))
    store(manager, *files)
    return uids


class Archive:
    """One image manager for the whole module with its peers: storescp ``DEST`` (every syntax), storescp
    ``PLAIN`` (uncompressed only), Orthanc, and ``VIEWER`` (known, without an address)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.engine = make_engine(f"sqlite:///{tmp}/index.sqlite")
        metadata.create_all(self.engine)
        self.dest = StoreSCP(tmp / "dest")
        self.plain = StoreSCP(tmp / "plain", "PLAIN", accept=())
        self.orthanc = Orthanc(tmp / "orthanc")
        nodes = (DicomNode(name="dest", ae_title="DEST", host="127.0.0.1", port=self.dest.port),
                 DicomNode(name="plain", ae_title="PLAIN", host="127.0.0.1", port=self.plain.port),
                 DicomNode(name="orthanc", ae_title="ORTHANC", host="127.0.0.1", port=self.orthanc.port),
                 DicomNode(name="viewer", ae_title="VIEWER"))
        self.loop = LoopThread()
        from ihehub.atna import AuditContext

        self.audits: list[Any] = []  # the DICOM audit trail of this image manager (PS3.15 A.5.3)
        self.manager = ImageManager(DicomSettings(port=0, host="127.0.0.1", nodes=nodes), self.engine, tmp / "data",
                                    audit=AuditContext(source_id="archive", sinks=(self.audits.append,)))
        self.loop.run(self.manager.start())
        self.uids = _study(self.manager, tmp / "in")
        for name, flag in COMPRESSED.items():
            store(self.manager, sample_file(name), flags=(flag,))
        self.ct_study = generate_uid()
        store(self.manager, *_ct_series(tmp / "ct", 100, self.ct_study))
        assert self.manager.flush(30)
        self.compressed = {read_stored(Path(sample_file(n))).sop_instance_uid: n for n in COMPRESSED}
        self.stored = {read_stored(p).sop_instance_uid: p for p in self.manager.root.rglob("*.dcm")}

    def close(self) -> None:
        self.loop.run(self.manager.stop())
        self.loop.close()
        self.engine.dispose()
        for peer in (self.dest, self.plain, self.orthanc):
            peer.stop()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    arc = Archive(tmp_path_factory.mktemp("retrieve"))
    yield arc
    arc.close()


@pytest.fixture
def dest(archive: Archive) -> StoreSCP:
    """storescp DEST, emptied."""
    for peer in (archive.dest, archive.plain):
        for f in peer.files():
            f.unlink()
    return archive.dest


def _movescu(manager: ImageManager, destination: str, *keys: str, model: str = "-S") -> Any:
    return dcmtk("movescu", "-v", model, "-aet", "MOVESCU", "-aec", manager.ae_title, "-aem", destination,
                 *[a for k in keys for a in ("-k", k)], "127.0.0.1", str(manager.port), timeout=60)


def _uids(peer: StoreSCP, n: int) -> set[str]:
    return {read_stored(p).sop_instance_uid for p in peer.wait_files(n)}


def test_move_study_to_storescp_sends_the_stored_bytes(archive: Archive, dest: StoreSCP) -> None:
    res = _movescu(archive.manager, "DEST", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY}")
    assert res.returncode == 0, res.stderr
    got = dest.wait_files(4)
    assert {read_stored(p).sop_instance_uid for p in got} == set(archive.uids)
    for path in got:
        stored = archive.stored[read_stored(path).sop_instance_uid]
        assert dataset_bytes(path) == dataset_bytes(stored)  # not re-encoded
    out = res.stdout + res.stderr
    assert "Received Move Response 3 (Pending)" in out and "Final Move Response (Success)" in out, out
    # audited: DICOM Instances Transferred, action R, this AE the Source, DEST the Destination, the 4 instances
    sent = [m for m in archive.audits if m.event.event_id.code == "110104" and m.event.action == "R"]
    assert sent, archive.audits
    xml = sent[-1].to_xml().decode()
    assert "DEST" in xml and STUDY in xml and all(uid in xml for uid in archive.uids)
    # and the instances stored into it earlier: action C, one audit per association
    assert any(m.event.event_id.code == "110104" and m.event.action == "C" for m in archive.audits)


def test_move_series_image_and_patient_levels(archive: Archive, dest: StoreSCP) -> None:
    manager, uids = archive.manager, archive.uids
    res = _movescu(manager, "DEST", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={STUDY}",
                   f"SeriesInstanceUID={SERIES[1]}")
    assert res.returncode == 0, res.stderr
    assert _uids(dest, 2) == set(uids[2:])
    res = _movescu(manager, "DEST", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={STUDY}",
                   f"SeriesInstanceUID={SERIES[0]}", f"SOPInstanceUID={uids[0]}")
    assert res.returncode == 0, res.stderr
    assert _uids(dest, 3) == {uids[0], *uids[2:]}
    for p in dest.files():
        p.unlink()
    res = _movescu(manager, "DEST", "QueryRetrieveLevel=PATIENT", "PatientID=MOVE1", model="-P")
    assert res.returncode == 0, res.stderr
    assert _uids(dest, 4) == set(uids)


def _move(manager: ImageManager, destination: str, identifier: Dataset, *, cancel_after: int | None = None,
          model: str = StudyRootQueryRetrieveInformationModelMove) -> list[Dataset]:
    """C-MOVE with pynetdicom as the requestor: each response's status elements with the Failed SOP Instance
    UID List of its identifier (a C-CANCEL after ``cancel_after`` responses)."""
    ae = AE(ae_title="PYMOVE")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", manager.port, ae_title=manager.ae_title)
    assert assoc.is_established
    out = []
    try:
        for status, ident in assoc.send_c_move(identifier, destination, model, msg_id=7):
            if ident is not None and "FailedSOPInstanceUIDList" in ident:
                status.FailedSOPInstanceUIDList = ident.FailedSOPInstanceUIDList
            out.append(status)
            if cancel_after is not None and len(out) == cancel_after:
                assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
    finally:
        assoc.release()
    return out


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_unknown_move_destination_is_a801(archive: Archive, dest: StoreSCP) -> None:
    for title in ("NOBODY", "VIEWER"):  # not registered; registered without host and port
        (final,) = _move(archive.manager, title, _identifier("STUDY", StudyInstanceUID=STUDY))
        assert final.Status == 0xA801
        assert final.ErrorComment == "Move destination unknown"
    res = _movescu(archive.manager, "NOBODY", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY}")
    assert "Final Move Response (Refused: MoveDestinationUnknown)" in res.stderr + res.stdout
    assert dest.files() == []


def test_pending_counts_failures_and_bad_identifiers(archive: Archive, dest: StoreSCP) -> None:
    manager = archive.manager
    rsps = _move(manager, "PLAIN", _identifier("SERIES", SeriesInstanceUID=SERIES[0]))
    assert [r.Status for r in rsps] == [0xFF00, 0x0000]
    assert (rsps[0].NumberOfRemainingSuboperations, rsps[0].NumberOfCompletedSuboperations) == (1, 1)
    assert (rsps[-1].NumberOfCompletedSuboperations, rsps[-1].NumberOfFailedSuboperations) == (2, 0)
    j2k = next(uid for uid, name in archive.compressed.items() if name == J2K)
    # PLAIN accepts uncompressed syntaxes only: no context for JPEG 2000, and no decompression by the hub
    (final,) = _move(manager, "PLAIN", _identifier("IMAGE", SOPInstanceUID=j2k))  # relational: no upper keys
    assert final.Status == 0xA702  # all sub-operations failed
    assert final.NumberOfFailedSuboperations == 1 and final.FailedSOPInstanceUIDList == j2k
    rsps = _move(manager, "PLAIN", _identifier("IMAGE", SOPInstanceUID=[j2k, *archive.uids[:2]]))
    assert rsps[-1].Status == 0xB000  # some failed
    assert (rsps[-1].NumberOfCompletedSuboperations, rsps[-1].NumberOfFailedSuboperations) == (2, 1)
    assert rsps[-1].FailedSOPInstanceUIDList == j2k
    (bad,) = _move(manager, "DEST", _identifier("WARD"))
    assert bad.Status == 0xA900
    (empty,) = _move(manager, "DEST", _identifier("STUDY", StudyInstanceUID="1.2.3.4.404"))
    assert empty.Status == 0x0000 and empty.NumberOfCompletedSuboperations == 0
    (no_patient,) = _move(manager, "DEST", _identifier("PATIENT", PatientID="MOVE1"))  # no PATIENT in Study Root
    assert no_patient.Status == 0xA900
    rsps = _move(manager, "DEST", _identifier("PATIENT", PatientID="MOVE1"),
                 model=PatientRootQueryRetrieveInformationModelMove)
    assert rsps[-1].Status == 0x0000 and rsps[-1].NumberOfCompletedSuboperations == 4


def _ct_series(folder: Path, n: int, study_uid: str) -> list[Path]:
    """``n`` 256x256 16-bit CT images (128 KiB of pixels each)."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    pixels = (np.arange(256 * 256, dtype=np.uint16) % 4096).tobytes()
    out = []
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series
        ds.PatientID, ds.PatientName, ds.Modality = "BENCH", "Bench^CT", "CT"
        ds.InstanceNumber, ds.SeriesNumber = i + 1, 1
        ds.Rows = ds.Columns = 256
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = pixels
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"ct{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def test_cancel_stops_the_move_and_throughput(archive: Archive, dest: StoreSCP, capsys: Any) -> None:
    t0 = time.perf_counter()
    rsps = _move(archive.manager, "DEST", _identifier("STUDY", StudyInstanceUID=archive.ct_study))
    elapsed = time.perf_counter() - t0
    assert rsps[-1].Status == 0x0000 and rsps[-1].NumberOfCompletedSuboperations == 100
    assert len(dest.wait_files(100)) == 100
    with capsys.disabled():
        print(f"\nC-MOVE of 100 CT instances (128 KiB) to storescp: {elapsed:.2f} s, {100 / elapsed:.0f} instances/s")
    rsps = _move(archive.manager, "DEST", _identifier("STUDY", StudyInstanceUID=archive.ct_study), cancel_after=3)
    final = rsps[-1]
    assert final.Status == 0xFE00
    assert final.NumberOfRemainingSuboperations > 0
    assert final.NumberOfCompletedSuboperations + final.NumberOfRemainingSuboperations == 100


def test_move_to_orthanc_keeps_compressed_syntaxes(archive: Archive) -> None:
    manager, orthanc = archive.manager, archive.orthanc
    res = _movescu(manager, "ORTHANC", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY}")
    assert res.returncode == 0, res.stderr
    for uid in archive.compressed:  # each compressed one is in a study of its own: IMAGE level, relational
        res = _movescu(manager, "ORTHANC", "QueryRetrieveLevel=IMAGE", f"SOPInstanceUID={uid}")
        assert res.returncode == 0, res.stderr
    want = {*archive.uids, *archive.compressed}
    assert want <= orthanc.wait_instances(want)
    for uid, name in archive.compressed.items():
        sent = orthanc.file_of(uid)
        assert dataset_bytes(sent) == dataset_bytes(archive.stored[uid])
        assert read_stored(Path(sample_file(name))).transfer_syntax.encode() in sent[:400]


def _getscu(archive: Archive, out: Path, *keys: str, model: str = "-S") -> Any:
    out.mkdir(parents=True, exist_ok=True)
    return dcmtk("getscu", "-v", model, "-aet", "GETSCU", "-aec", archive.manager.ae_title,
                 *[a for k in keys for a in ("-k", k)], "-od", str(out), "127.0.0.1", str(archive.manager.port),
                 timeout=60)


def _values(path: Path) -> dict[Any, Any]:
    return {elem.tag: elem.value for elem in dcmread(path)}


def test_getscu_retrieves_on_the_same_association(archive: Archive, tmp_path: Path) -> None:
    out = tmp_path / "got"
    res = _getscu(archive, out, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={STUDY}",
                  f"SeriesInstanceUID={SERIES[0]}")
    assert res.returncode == 0, res.stderr
    got = sorted(out.iterdir())
    assert {read_stored(p).sop_instance_uid for p in got} == set(archive.uids[:2])
    for p in got:  # the hub accepted getscu's storage contexts in implicit VR: converted, values kept
        assert read_stored(p).transfer_syntax == ImplicitVRLittleEndian
        assert _values(p) == _values(archive.stored[read_stored(p).sop_instance_uid])
    res = _getscu(archive, out, "QueryRetrieveLevel=STUDY", "PatientID=MOVE1", f"StudyInstanceUID={STUDY}",
                  model="-P")
    assert res.returncode == 0, res.stderr
    assert {read_stored(p).sop_instance_uid for p in out.iterdir()} == set(archive.uids)


def test_get_of_a_compressed_instance_the_requestor_cannot_take_fails_that_sub_operation(
        archive: Archive, tmp_path: Path) -> None:
    j2k = next(uid for uid, name in archive.compressed.items() if name == J2K)
    # getscu proposes uncompressed syntaxes only by default: no context for JPEG 2000, so the one
    # sub-operation fails (A702) rather than being decompressed
    res = _getscu(archive, tmp_path / "got", "QueryRetrieveLevel=IMAGE", f"SOPInstanceUID={j2k}")
    text = res.stdout + res.stderr
    assert "Received C-GET Response (Refused: OutOfResourcesSubOperations)" in text, text  # A702
    assert re.search(r"Number of Failed Suboperations\s*: 1", text), text
    assert list((tmp_path / "got").iterdir()) == []


def test_locate_on_both_databases(start_manager: ManagerFactory, engine: Any, tmp_path: Path) -> None:
    """The instances of a C-MOVE/C-GET identifier, by level, on SQLite and PostgreSQL."""
    manager = start_manager(engine)
    uids = _study(manager, tmp_path / "in")
    assert manager.flush(20)

    def found(level: str, model: str = "study", **keys: str) -> set[str]:
        return {read_stored(p).sop_instance_uid for p in locate(engine, manager.root, _identifier(level, **keys),
                                                                 model=model)}

    assert found("STUDY", StudyInstanceUID=STUDY) == set(uids)
    assert found("SERIES", SeriesInstanceUID=SERIES[1]) == set(uids[2:])
    assert found("IMAGE", SOPInstanceUID=f"{uids[0]}\\{uids[3]}") == {uids[0], uids[3]}
    assert found("PATIENT", "patient", PatientID="MOVE1") == set(uids)
    assert found("STUDY", AccessionNumber="ACC-MOV*") == set(uids)  # any C-FIND key narrows a retrieve too
    with pytest.raises(RetrieveError) as err:
        locate(engine, manager.root, _identifier("STUDY"), model="study", limit=3)
    assert err.value.status == 0xA701
