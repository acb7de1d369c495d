"""Broken data sets, a full disk and unknown callers get the proper answer; association and server survive.

The broken data sets are sent by pynetdicom's SCU from Part 10 files whose File Meta Information is valid
but whose data set is not (with ``STORE_SEND_CHUNKED_DATASET`` pynetdicom sends a file's data set bytes
without decoding them) — DCMTK's storescu refuses to read such files.
Status codes: PS3.4 B.2.3 (C-STORE), PS3.8 9.3.4 (A-ASSOCIATE-RJ).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.association import Association
from sqlalchemy import Engine, select

from ihehub.dicom import ImageManager
from ihehub.dicom import tables as t
from ihehub.dicom.transport import keep_responses
from tests.dicom.conftest import ManagerFactory
from tests.dicom.dicomkit import dcmtk, make_instance

SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture
def scu_for(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """pynetdicom SCUs that send a file's data set bytes as they are (its documented chunked-send option)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    opened: list[Association] = []

    def connect(manager: ImageManager, aet: str = "BADSCU") -> Association:
        ae = AE(ae_title=aet)
        ae.add_requested_context(SC, [EXPLICIT])
        ae.add_requested_context(CT, [EXPLICIT])
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", manager.port, ae_title=manager.ae_title)
        assert assoc.is_established
        keep_responses(assoc)  # pynetdicom's pause race: the native path answers fast enough to hit it
        opened.append(assoc)
        return assoc

    yield connect
    for assoc in opened:
        if assoc.is_established:
            assoc.release()


def status(rsp: Dataset) -> int:
    return int(rsp.Status)


def with_body(src: Path, dst: Path, mutate: object) -> Path:
    """Copy ``src`` (a Part 10 file) to ``dst`` with its data set bytes passed through ``mutate``."""
    raw = src.read_bytes()
    meta_len = int(pydicom.dcmread(src, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength)
    head = 132 + 12 + meta_len
    dst.write_bytes(raw[:head] + mutate(raw[head:]))  # type: ignore[operator]
    return dst


def test_corrupt_dataset_c000_and_association_survives(start_manager: ManagerFactory, sqlite_engine: Engine,
                                                       scu_for: object, tmp_path: Path) -> None:
    manager = start_manager(sqlite_engine)
    good = tmp_path / "good.dcm"
    make_instance(good)
    truncated = with_body(good, tmp_path / "trunc.dcm", lambda b: b[:-5])  # pixel data value cut short
    garbage = with_body(good, tmp_path / "garbage.dcm", lambda b: b"\x08\x00\x18\x00zz\xff\xff" + b"\x01" * 40)
    assoc = scu_for(manager)  # type: ignore[operator]
    assert status(assoc.send_c_store(truncated)) == 0xC000
    assert status(assoc.send_c_store(garbage)) == 0xC000
    rsp = assoc.send_c_store(good)  # same association, still fine
    assert status(rsp) == 0x0000
    assert manager.flush(5)
    with sqlite_engine.connect() as conn:
        assert len(list(conn.execute(select(t.instances)))) == 1
    assert not list(manager.root.rglob("*.part"))


def test_missing_or_mismatched_uids_a900(start_manager: ManagerFactory, sqlite_engine: Engine, scu_for: object,
                                         tmp_path: Path) -> None:
    manager = start_manager(sqlite_engine)
    no_sop = tmp_path / "nosop.dcm"
    ds = make_instance(no_sop)
    del ds.SOPInstanceUID  # the File Meta Information still names one, so pynetdicom sends it
    ds.preamble = b"\x00" * 128
    ds.save_as(no_sop, enforce_file_format=False)
    wrong_class = tmp_path / "wrongclass.dcm"
    ds = make_instance(wrong_class)
    ds.SOPClassUID = CT  # data set says CT, request (from the meta) says Secondary Capture
    ds.preamble = b"\x00" * 128
    ds.save_as(wrong_class, enforce_file_format=False)
    no_study = tmp_path / "nostudy.dcm"
    ds = make_instance(no_study)
    del ds.StudyInstanceUID
    ds.preamble = b"\x00" * 128
    ds.save_as(no_study, enforce_file_format=False)
    assoc = scu_for(manager)  # type: ignore[operator]
    for path in (no_sop, wrong_class, no_study):
        rsp = assoc.send_c_store(path)
        assert status(rsp) == 0xA900, path.name
        assert rsp.get("ErrorComment"), path.name
    good = tmp_path / "good.dcm"
    make_instance(good)
    assert status(assoc.send_c_store(good)) == 0x0000


def test_uid_with_path_characters_stays_inside(start_manager: ManagerFactory, sqlite_engine: Engine,
                                               scu_for: object, tmp_path: Path) -> None:
    manager = start_manager(sqlite_engine)
    evil = tmp_path / "evil.dcm"
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        make_instance(evil, study_uid="../../../../tmp/evil", series_uid="/etc")
    assoc = scu_for(manager)  # type: ignore[operator]
    assert status(assoc.send_c_store(evil)) == 0x0000
    assert manager.flush(5)
    (stored,) = manager.root.rglob("*.dcm")
    assert manager.root in stored.parents and ".." not in stored.parts
    with sqlite_engine.connect() as conn:
        assert conn.execute(select(t.studies.c.study_uid)).scalar_one() == "../../../../tmp/evil"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a real ENOSPC from the kernel (needs root, as the CI and dev machines run)."""
    mount = tmp_path / "small"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the disk-full test (run as root): {res.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_a700_then_recovers(start_manager: ManagerFactory, sqlite_engine: Engine, scu_for: object,
                                      small_disk: Path, tmp_path: Path) -> None:
    manager = start_manager(sqlite_engine, data_dir=small_disk)
    big = tmp_path / "big.dcm"
    ds = make_instance(big)
    ds.Rows, ds.Columns = 512, 512
    ds.PixelData = b"\x01" * (512 * 512)
    ds.save_as(big, enforce_file_format=True)
    small = tmp_path / "small.dcm"
    make_instance(small)
    assoc = scu_for(manager)  # type: ignore[operator]
    rsp = assoc.send_c_store(big)
    assert status(rsp) == 0xA700
    assert "disk" in str(rsp.ErrorComment).lower()
    assert not list(small_disk.rglob("*.part"))  # the partial file is gone
    assert status(assoc.send_c_store(small)) == 0x0000  # fits: same association
    assert status(assoc.send_c_echo()) == 0x0000


def test_unknown_callers_rejected(start_manager: ManagerFactory, sqlite_engine: Engine) -> None:
    manager = start_manager(sqlite_engine, require_known_callers=True, nodes=_nodes())

    def echo(aet: str) -> subprocess.CompletedProcess[str]:
        return dcmtk("echoscu", "-aet", aet, "-aec", manager.ae_title, "127.0.0.1", str(manager.port))

    assert echo("MODALITY1").returncode == 0
    refused = echo("STRANGER")
    assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr, refused.stderr
    assert echo("FARPACS").returncode != 0  # known title, wrong host
    assert manager.rejected == 2
    assert echo("MODALITY1").returncode == 0  # the server is fine


def _nodes() -> tuple[object, ...]:
    from ihehub.dicom.settings import parse_nodes

    return parse_nodes({"ct": {"ae_title": "MODALITY1", "host": "127.0.0.1"},
                        "far": {"ae_title": "FARPACS", "host": "192.0.2.10", "port": 104, "tls": True}})
