"""Helpers of the DICOM tests: the loop thread the manager runs on, the DCMTK peers, sample data sets.

The peers are Debian's DCMTK command-line tools (``make peers`` installs them); a missing tool fails the
test with that command.  Datasets are pydicom's bundled test files or made here with pydicom.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ihehub.dicom import ImageManager

PEERS = ("echoscu", "storescu", "findscu", "storescp")
INSTALL = "make peers  (apt-get install dcmtk)"


def sample_file(name: str) -> str:
    """A file bundled with pydicom (test_files or charset_files)."""
    path = get_testdata_file(name)
    if path is None:
        found = get_charset_files(name)
        path = found[0] if found else None
    if path is None:
        pytest.fail(f"pydicom has no bundled test file {name}")
    return str(path)


def dcmtk(*args: str, timeout: float = 30.0, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    tool = args[0]
    if shutil.which(tool) is None:
        pytest.fail(f"DCMTK {tool} is not installed; run: {INSTALL}")
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})


class LoopThread:
    """An asyncio loop in a thread: the hub's loop, as far as the manager can tell."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def make_instance(path: Path, *, patient: str = "Doe^John", patient_id: str = "P1", study_uid: str | None = None,
                  series_uid: str | None = None, sop_uid: str | None = None, study_date: str = "20240115",
                  modality: str = "CT", charset: str | None = None, accession: str = "A1",
                  series_number: int = 1, instance_number: int = 1, description: str = "Study",
                  sop_class: str = "1.2.840.10008.5.1.4.1.1.7") -> Dataset:
    """A small valid instance (Secondary Capture by default) written to ``path``; returns its dataset."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = accession
    ds.StudyDescription = description
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.Rows = 4
    ds.Columns = 4
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(16))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return ds


def store(manager: ImageManager, *files: str | Path, flags: tuple[str, ...] = (), aet: str = "TESTSCU") -> None:
    res = dcmtk("storescu", *flags, "-aet", aet, "-aec", manager.ae_title, "127.0.0.1", str(manager.port),
                *[str(f) for f in files])
    assert res.returncode == 0, res.stderr


def findscu(manager: ImageManager, query: Dataset, workdir: Path, *, model: str = "-S", aet: str = "TESTSCU",
            verbose: bool = False) -> tuple[subprocess.CompletedProcess[str], list[Dataset]]:
    """Send ``query`` (written as a file, so its bytes keep their character set) with DCMTK findscu;
    return the process and the response identifiers findscu extracted."""
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("rsp*.dcm"):
        old.unlink()
    qfile = workdir / "query.dcm"
    query.save_as(qfile, implicit_vr=False, little_endian=True)
    verbosity = ["-v"] if verbose else []
    res = dcmtk("findscu", *verbosity, model, "-X", "-od", str(workdir), "-aet", aet, "-aec", manager.ae_title,
                "127.0.0.1", str(manager.port), str(qfile))
    return res, [pydicom.dcmread(p) for p in sorted(workdir.glob("rsp*.dcm"))]


def query(level: str, charset: str | None = None, **keys: Any) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds
