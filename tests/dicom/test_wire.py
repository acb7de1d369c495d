"""The structural check of received data sets (PS3.5 section 7) and the File Meta Information (PS3.10 7.1)."""

from __future__ import annotations

import io
import struct

import pydicom
import pytest

from ihehub.dicom import transport, wire
from tests.dicom.dicomkit import sample_file

WELL_FORMED = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
               "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "image_dfl.dcm", "rtplan.dcm", "reportsi.dcm",
               "nested_priv_SQ.dcm", "priv_SQ.dcm", "UN_sequence.dcm", "chrX2.dcm", "waveform_ecg.dcm",
               "SC_rgb_rle_2frame.dcm", "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm"]


def body(name: str) -> tuple[str, bytes]:
    path = sample_file(name)
    raw = open(path, "rb").read()  # noqa: SIM115 (one read)
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return str(meta.TransferSyntaxUID), raw[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def scan(ts: str, data: bytes) -> dict[int, bytes]:
    plain = wire.inflate(data) if ts == wire.DEFLATED else data
    return wire.scan_dataset(plain, implicit=ts == wire.IMPLICIT_LITTLE, little=ts != wire.EXPLICIT_BIG,
                             want=[0x00080018, 0x0020000D])


@pytest.mark.parametrize("name", WELL_FORMED)
def test_well_formed_files_pass(name: str) -> None:
    ts, data = body(name)
    found = scan(ts, data)
    ds = pydicom.dcmread(sample_file(name), stop_before_pixels=True)
    assert wire.text_value(found.get(0x00080018)) == ds.get("SOPInstanceUID")


@pytest.mark.parametrize("cut", [1, 5, 100])
def test_truncated_is_malformed(cut: int) -> None:
    ts, data = body("CT_small.dcm")
    with pytest.raises(wire.MalformedDataset, match=r"runs past the end|cut off"):
        scan(ts, data[:-cut])


def test_bad_vr_and_missing_delimiters() -> None:
    with pytest.raises(wire.MalformedDataset, match="no valid VR"):
        wire.scan_dataset(b"\x08\x00\x18\x00\x01\x02\x04\x00abcd", implicit=False, little=True)
    # (0008,1140) SQ of undefined length with one undefined-length item that is never closed
    seq = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000,
                                                                                      0xFFFFFFFF)
    with pytest.raises(wire.MalformedDataset):
        wire.scan_dataset(seq, implicit=False, little=True)
    with pytest.raises(wire.MalformedDataset, match="inflated"):
        wire.inflate(b"\xff\xff\xff\xff not deflate")


def test_file_meta_reads_back() -> None:
    ts, data = body("CT_small.dcm")
    meta = wire.file_meta(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.4.5",
                          transfer_syntax=ts, source_ae_title="CT1")
    ds = pydicom.dcmread(io.BytesIO(meta + data))
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert ds.file_meta.SourceApplicationEntityTitle == "CT1"
    assert ds.file_meta.ImplementationClassUID == wire.IMPLEMENTATION_CLASS_UID
    assert ds.PatientName == "CompressedSamples^CT1"
    assert len(meta) % 2 == 0


def test_store_response_command_set() -> None:
    """The C-STORE-RSP command set of the fast path (PS3.7 9.3.1.2), read back by pydicom."""
    from pydicom.filereader import read_dataset

    raw = transport.store_response(message_id=7, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3",
                                   status=0xA900, error_comment="No SOP Instance UID (0008,0018)")
    ds = read_dataset(io.BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.CommandDataSetType, ds.Status) == (0x8001, 7, 0x0101,
                                                                                                 0xA900)
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID) == ("1.2.840.10008.5.1.4.1.1.2", "1.2.3")
    assert ds.ErrorComment == "No SOP Instance UID (0008,0018)"
    assert len(raw) % 2 == 0


def test_split_pdata() -> None:
    """P-DATA-TF (PS3.8 9.3.5): two PDV items, then the same with a lying length."""
    items = struct.pack(">IB", 4, 1) + b"\x03ab" + struct.pack(">IB", 3, 3) + b"\x02z"
    pdu = struct.pack(">BBI", 4, 0, len(items)) + items
    assert [(cid, bytes(v)) for cid, v in transport.split_pdata(pdu)] == [(1, b"\x03ab"), (3, b"\x02z")]
    with pytest.raises(ValueError):
        transport.split_pdata(pdu[:-1])
    with pytest.raises(ValueError):
        transport.split_pdata(struct.pack(">BBI", 4, 0, 6) + struct.pack(">IB", 99, 1) + b"x")
