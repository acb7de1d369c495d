"""Verification and Storage SCP against DCMTK echoscu/storescu: files as received, index, series metadata."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import Engine, func, select

from ihehub.dicom import ImageManager, StudyComplete
from ihehub.dicom import tables as t
from ihehub.dicom.dicomjson import METADATA_FILE
from ihehub.dicom.indexwork import ProcessIndexWork
from tests.dicom.conftest import ManagerFactory
from tests.dicom.dicomkit import LoopThread, dcmtk, make_instance, sample_file, store

# pydicom test file -> the storescu option that proposes its transfer syntax (PS3.5 Annex A)
COMPRESSED = {
    "MR_small_RLE.dcm": "-xr",  # RLE Lossless
    "JPEG2000.dcm": "-xw",  # JPEG 2000 (lossy)
    "MR_small_jp2klossless.dcm": "-xv",  # JPEG 2000 Lossless Only
    "MR_small_jpeg_ls_lossless.dcm": "-xt",  # JPEG-LS Lossless
    "SC_rgb_jpeg_dcmtk.dcm": "-xy",  # JPEG Baseline (Process 1)
    "JPGExtended.dcm": "-xx",  # JPEG Extended (Process 2 & 4)
    "image_dfl.dcm": "-xd",  # Deflated Explicit VR Little Endian
}
UNCOMPRESSED = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "rtplan.dcm", "chrX1.dcm",
                "chrX2.dcm", "reportsi.dcm"]


def dataset_bytes(path: str | Path) -> tuple[str, bytes]:
    """Transfer syntax and the data set bytes after the File Meta Information of a Part 10 file."""
    raw = Path(path).read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    length = int(ds.file_meta.FileMetaInformationGroupLength)
    return str(ds.file_meta.TransferSyntaxUID), raw[132 + 12 + length:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port}")


def count(engine: Engine, table: t.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_echo(manager: ImageManager) -> None:
    res = dcmtk("echoscu", "-aet", "TESTSCU", "-aec", manager.ae_title, "127.0.0.1", str(manager.port))
    assert res.returncode == 0, res.stderr


def test_store_then_queryable_within_one_second(manager: ImageManager, engine: Engine) -> None:
    files = [sample_file(n) for n in UNCOMPRESSED]
    store(manager, *files)
    sent = time.monotonic()  # every C-STORE response has arrived
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    found: set[str] = set()
    while time.monotonic() - sent < 1.0 and found != uids:
        with engine.connect() as conn:
            found = set(conn.execute(select(t.instances.c.sop_instance_uid)).scalars())
        time.sleep(0.01)
    assert found == uids, "not queryable within 1 s of the C-STORE responses"
    assert manager.indexer.failed == 0


def test_files_are_the_received_bytes(start_manager: ManagerFactory, sqlite_engine: Engine, tmp_path: Path) -> None:
    """Stored as sent, compressed syntaxes included: the data set bytes equal those DCMTK's storescp keeps in
    bit-preserving mode (+B, told to prefer the same transfer syntax) for the same storescu command."""
    manager, engine = start_manager(sqlite_engine), sqlite_engine
    cases = {"CT_small.dcm": "-xe", "rtplan.dcm": "-xi", "chrX2.dcm": "-xe", "MR_small_bigendian.dcm": "-xb",
             **COMPRESSED}
    for name, flag in cases.items():
        reference = tmp_path / name
        reference.mkdir()
        port = free_port()
        with subprocess.Popen(["storescp", "+B", "+" + flag[1:], "-od", str(reference), str(port)],
                              env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) as scp:
            try:
                wait_listening(port)
                res = dcmtk("storescu", flag, "-aet", "TESTSCU", "127.0.0.1", str(port), sample_file(name))
                assert res.returncode == 0, res.stderr
            finally:
                scp.terminate()
        store(manager, sample_file(name), flags=(flag,))
        assert manager.flush(10)
        uid = str(pydicom.dcmread(sample_file(name), stop_before_pixels=True).SOPInstanceUID)
        with engine.connect() as conn:
            row = conn.execute(select(t.instances).where(t.instances.c.sop_instance_uid == uid)).one()
        ours = manager.root / row.path
        (theirs,) = reference.iterdir()
        assert dataset_bytes(ours) == dataset_bytes(theirs), name
        assert row.transfer_syntax == dataset_bytes(sample_file(name))[0], name
        meta = pydicom.dcmread(ours, stop_before_pixels=True).file_meta
        assert meta.SourceApplicationEntityTitle == "TESTSCU"
        assert meta.MediaStorageSOPInstanceUID == uid


def test_compressed_shared_uid_keeps_last(manager: ImageManager, engine: Engine) -> None:
    """The MR_small variants share a SOP Instance UID: a resend replaces file and row (one of each)."""
    for name in ("MR_small_implicit.dcm", "MR_small_RLE.dcm"):
        store(manager, sample_file(name), flags=(COMPRESSED.get(name, "-x="),))
    assert manager.flush(10)
    source = pydicom.dcmread(sample_file("MR_small_RLE.dcm"))
    with engine.connect() as conn:
        rows = list(conn.execute(select(t.instances)))
    assert len(rows) == 1 and rows[0].transfer_syntax == source.file_meta.TransferSyntaxUID
    assert pydicom.dcmread(manager.root / rows[0].path).PixelData == source.PixelData  # still RLE, as sent
    items = json.loads((manager.root / rows[0].path).parent.joinpath(METADATA_FILE).read_bytes())
    assert len(items) == 1


def test_layout_index_and_series_metadata(start_manager: ManagerFactory, sqlite_engine: Engine,
                                          tmp_path: Path) -> None:
    manager = start_manager(sqlite_engine)
    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.1"
    files = [tmp_path / f"i{n}.dcm" for n in range(5)]
    for n, f in enumerate(files):
        make_instance(f, study_uid=study, series_uid=series, sop_uid=f"{series}.{n + 1}", instance_number=n + 1,
                      patient="Zhang^San", patient_id="ZS1")
    store(manager, *files)
    assert manager.flush(10)
    folder = manager.root / study / series
    assert sorted(p.name for p in folder.glob("*.dcm")) == sorted(f"{series}.{n + 1}.dcm" for n in range(5))
    assert not list(folder.glob(".*part"))
    items = json.loads((folder / METADATA_FILE).read_bytes())
    assert sorted(it["00080018"]["Value"][0] for it in items) == sorted(f"{series}.{n + 1}" for n in range(5))
    first = items[0]
    assert first["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Zhang^San"}]}
    assert first["7FE00010"]["BulkDataURI"] == (f"/dicomweb/studies/{study}/series/{series}/instances/"
                                                f"{first['00080018']['Value'][0]}/frames")
    with sqlite_engine.connect() as conn:
        st = conn.execute(select(t.studies)).one()
        se = conn.execute(select(t.series)).one()
        pt = conn.execute(select(t.patients)).one()
    assert (st.num_series, st.num_instances, st.modalities) == (1, 5, "CT")
    assert se.num_instances == 5 and pt.patient_id == "ZS1" and pt.name == "Zhang^San"


def test_study_complete_after_quiet_period(start_manager: ManagerFactory, sqlite_engine: Engine,
                                           tmp_path: Path) -> None:
    events: list[StudyComplete] = []

    async def on_complete(event: StudyComplete) -> None:  # async: runs on the loop that started the manager
        events.append(event)

    manager = start_manager(sqlite_engine, study_quiet_seconds=0.3, on_study_complete=on_complete)
    study = "1.2.826.0.1.3680043.8.498.2"
    files = [tmp_path / f"q{n}.dcm" for n in range(3)]
    for n, f in enumerate(files):
        make_instance(f, study_uid=study, series_uid=f"{study}.{n % 2}", instance_number=n, accession="ACC9")
    store(manager, *files)
    deadline = time.monotonic() + 5
    while not events and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(events) == 1
    ev = events[0]
    assert (ev.study_uid, ev.num_series, ev.num_instances, ev.received) == (study, 2, 3, 3)
    assert ev.accession_number == "ACC9" and ev.calling_aes == ("TESTSCU",) and ev.patient_id == "P1"
    time.sleep(0.5)
    assert len(events) == 1  # once per burst


def test_study_complete_timer_survives_a_restart(start_manager: ManagerFactory, sqlite_engine: Engine,
                                                 loop_thread: LoopThread, tmp_path: Path) -> None:
    """A study still in its quiet period when the image manager stops is reported complete after the next
    start, with what the first process received (the timers are in dicom_pending_studies)."""
    from sqlalchemy import select

    from ihehub.dicom.tables import pending_studies

    first: list[StudyComplete] = []
    manager = start_manager(sqlite_engine, study_quiet_seconds=30, on_study_complete=first.append,
                            data_dir=tmp_path / "data")
    study = "1.2.826.0.1.3680043.8.498.77"
    files = [tmp_path / f"r{n}.dcm" for n in range(2)]
    for n, f in enumerate(files):
        make_instance(f, study_uid=study, instance_number=n)
    store(manager, *files)
    assert manager.flush(10)
    loop_thread.run(manager.stop())  # before the quiet period ends
    with sqlite_engine.connect() as conn:
        (row,) = conn.execute(select(pending_studies)).all()
    assert (row.study_uid, row.received, row.calling_aes) == (study, 2, "TESTSCU") and not first

    events: list[StudyComplete] = []
    start_manager(sqlite_engine, study_quiet_seconds=0.5, on_study_complete=events.append, data_dir=tmp_path / "data")
    deadline = time.monotonic() + 10
    while not events and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(e.study_uid, e.received, e.calling_aes) for e in events] == [(study, 2, ("TESTSCU",))]
    time.sleep(0.3)
    with sqlite_engine.connect() as conn:
        assert conn.execute(select(pending_studies)).all() == []  # handed over: forgotten


def test_many_instances_one_association(start_manager: ManagerFactory, sqlite_engine: Engine,
                                        tmp_path: Path) -> None:
    manager = start_manager(sqlite_engine)
    files = [tmp_path / f"m{n}.dcm" for n in range(60)]
    for n, f in enumerate(files):
        make_instance(f, patient_id=f"P{n % 3}", study_uid=f"1.2.3.{n % 3}", series_uid=f"1.2.3.{n % 3}.{n % 2}")
    started = time.monotonic()
    store(manager, *files)
    assert time.monotonic() - started < 10  # TCP_NODELAY: no 40 ms stall per instance
    assert manager.flush(10)
    assert count(sqlite_engine, t.instances) == 60
    assert count(sqlite_engine, t.studies) == 3 and count(sqlite_engine, t.patients) == 3


@pytest.mark.parametrize("policy", ["always", "never"])
def test_fsync_policies(start_manager: ManagerFactory, sqlite_engine: Engine, tmp_path: Path, policy: str) -> None:
    manager = start_manager(sqlite_engine, fsync=policy)
    make_instance(tmp_path / "f.dcm")
    store(manager, tmp_path / "f.dcm")
    assert manager.flush(10)
    assert count(sqlite_engine, t.instances) == 1


def test_index_worker_death_falls_back(start_manager: ManagerFactory, sqlite_engine: Engine, tmp_path: Path) -> None:
    """The index worker process is killed: indexing goes on in the hub process, nothing is lost."""
    manager = start_manager(sqlite_engine)
    work = manager.indexer.work
    assert isinstance(work, ProcessIndexWork)
    os.kill(work.pid, signal.SIGKILL)
    files = [tmp_path / f"k{n}.dcm" for n in range(3)]
    for f in files:
        make_instance(f)
    store(manager, *files)
    assert manager.flush(10)
    assert count(sqlite_engine, t.instances) == 3 and manager.indexer.failed == 0


def test_index_in_thread(start_manager: ManagerFactory, sqlite_engine: Engine, tmp_path: Path) -> None:
    manager = start_manager(sqlite_engine, index_process=False)
    assert not isinstance(manager.indexer.work, ProcessIndexWork)
    make_instance(tmp_path / "t.dcm", patient="Li^Lei=李^雷", charset="ISO_IR 192")
    store(manager, tmp_path / "t.dcm")
    assert manager.flush(10)
    with sqlite_engine.connect() as conn:
        assert conn.execute(select(t.patients.c.name)).scalar_one() == "Li^Lei=李^雷"
