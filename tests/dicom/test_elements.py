"""`ElementCache`: the index rows and series metadata built through it equal pydicom's own, for pydicom's test
files (every transfer syntax it ships, character sets, private and ambiguous-VR elements) read twice."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pydicom.errors
import pytest

from ihehub.dicom.dicomjson import instance_json
from ihehub.dicom.elements import ElementCache
from ihehub.dicom.index import instance_record
from ihehub.dicom.storage import InstanceStore, StoredInstance, StoreFailure


def stored_files(tmp: Path) -> list[StoredInstance]:
    store = InstanceStore(tmp)
    out = []
    data = Path(pydicom.data.__file__).parent  # the files shipped in the wheel (no download)
    paths = sorted([*data.glob("test_files/*.dcm"), *data.glob("charset_files/*.dcm")])
    for path in paths:
        try:
            if Path(path).read_bytes()[128:132] != b"DICM":
                continue  # no File Meta Information: not what a C-STORE carries
            ds = pydicom.dcmread(path)
            ts = str(ds.file_meta.TransferSyntaxUID)
            raw = Path(path).read_bytes()
            if raw[128:132] != b"DICM":
                continue
            meta_len = int.from_bytes(raw[140:144], "little")
            out.append(store.store(raw[144 + meta_len:], sop_class_uid=str(ds.SOPClassUID),
                                   sop_instance_uid=str(ds.SOPInstanceUID), transfer_syntax=ts, calling_ae="T"))
        except (StoreFailure, AttributeError, KeyError, ValueError, pydicom.errors.InvalidDicomError):
            continue  # files without the UIDs a C-STORE needs
    return out


def rows_and_json(stored: StoredInstance, cache: ElementCache | None) -> tuple[dict[str, dict[str, Any]], str]:
    rec = instance_record(stored, now=1.0, cache=cache)
    rows = {"patient": rec.patient, "study": rec.study, "series": rec.series,
            "instance": {k: v for k, v in rec.instance.items() if k != "indexed_at"}}
    if rec.dataset is None:
        return rows, ""
    try:
        return rows, json.dumps(instance_json(
            rec.dataset, study_uid=stored.study_uid, series_uid=stored.series_uid,
            sop_instance_uid=stored.sop_instance_uid, pixel_vr=rec.pixel_vr, cache=cache), sort_keys=True)
    except ValueError as exc:  # a value pydicom cannot put in JSON: the indexer logs it, both ways alike
        return rows, f"{type(exc).__name__}: {exc}"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's test files are odd on purpose (wrong VR mode...)
def test_cached_rows_and_metadata_equal_pydicoms(tmp_path: Path) -> None:
    files = stored_files(tmp_path)
    assert len(files) > 60
    cache = ElementCache()
    for _ in range(2):  # the second pass is served from the cache
        for stored in files:
            assert rows_and_json(stored, cache) == rows_and_json(stored, None), stored.path
    assert cache.hits > cache.misses > 0


def test_same_bytes_in_other_character_sets_are_not_confused(tmp_path: Path) -> None:
    """GB18030 and ISO_IR 192 read the same name bytes differently; the cache keys the character set."""
    import io

    from pydicom.dataset import Dataset
    from pydicom.filewriter import write_dataset
    from pydicom.uid import generate_uid

    cache = ElementCache()
    names = []
    for charset in ("GB18030", "ISO_IR 192", "GB18030"):
        ds = Dataset()
        ds.SpecificCharacterSet = charset
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
        ds.add_new(0x00100010, "PN", "王^小明".encode("gb18030"))  # raw bytes, as a modality wrote them
        out = io.BytesIO()
        fp = pydicom.filebase.DicomFileLike(out)
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, ds)
        stored = InstanceStore(tmp_path).store(out.getvalue(), sop_class_uid=ds.SOPClassUID,
                                               sop_instance_uid=ds.SOPInstanceUID,
                                               transfer_syntax="1.2.840.10008.1.2", calling_ae="T")
        stored = dataclasses.replace(stored, dataset=out.getvalue())
        names.append(instance_record(stored, cache=cache).patient["name"])
    assert names[0] == names[2] == "王^小明"
    assert names[1] != names[0]  # the GB18030 bytes are not UTF-8: decoded otherwise, not taken from the cache


@pytest.mark.parametrize("tag", [0x00280106, 0x7FE00010])  # US or SS; OB or OW
def test_tags_whose_vr_depends_on_other_attributes_are_not_cached(tag: int) -> None:
    assert ElementCache()._is_cacheable(tag) is False
    assert ElementCache()._is_cacheable(0x00090010) is False  # private
    assert ElementCache()._is_cacheable(0x00100010) is True
