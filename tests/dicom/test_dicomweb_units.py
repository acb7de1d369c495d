"""DICOMweb pieces without a hub: settings, the display pipeline of PS3.3 C.11 with its numbers, sizing,
the render cache, and the HTTP binding's multipart and Accept parsing."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from ihehub.api.routes_dicomweb import parse_accept, parse_multipart
from ihehub.config.model import DicomActorConfig
from ihehub.dicom import SETTINGS_SCHEMA, DicomSettings, InvalidSettings
from ihehub.dicom.render import RenderCache, RenderError, RenderParams, _native_frame, render_frame, to_display
from ihehub.dicom.storage import StoreFailure
from ihehub.dicom.stow import read_part10
from ihehub.dicom.websettings import DicomWebSettings


def test_settings_defaults_agree_and_bad_ones_name_the_key() -> None:
    assert DicomWebSettings.from_mapping(DicomActorConfig().dicomweb) == DicomWebSettings()
    s = DicomSettings.from_mapping({"dicomweb": {"cors_origins": ["https://viewer.example"], "cache_mb": 0}})
    assert s.dicomweb.cors_origins == ("https://viewer.example",) and s.dicomweb.cache_mb == 0
    for bad, key in (({"cache": 1}, "dicomweb.cache"), ({"cors_origins": "x"}, "cors_origins"),
                     ({"cache_mb": -1}, "cache_mb"), ({"prefetch": "yes"}, "prefetch")):
        with pytest.raises(InvalidSettings, match=key):
            DicomSettings.from_mapping({"dicomweb": bad})
    jsonschema.validate({"dicomweb": {"cors_origins": ["*"], "prerender": True}}, SETTINGS_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"dicomweb": {"cors": ["*"]}}, SETTINGS_SCHEMA)


def _mono(values: list[list[int]], **attrs: object) -> tuple[Dataset, np.ndarray]:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds, np.array(values, dtype=np.uint16)


def test_linear_window_follows_ps3_3_c_11_2_1_2_1() -> None:
    # c=50, w=101: x <= -0.5 -> 0, x > 99.5 -> 255, in between ((x - 49.5) / 100 + 0.5) * 255
    ds, arr = _mono([[0, 25, 50, 99, 100]])
    out = to_display(ds, arr, (50.0, 101.0, "LINEAR"))
    assert out.tolist() == [[1, 65, 129, 254, 255]]  # 1.275, 65.0, 128.8, 254.2, 255
    # the modality LUT comes first (HU = 2 * stored - 100) and the data set's window is used when none is given
    ds, arr = _mono([[40, 75]], RescaleSlope=2, RescaleIntercept=-100, WindowCenter=50, WindowWidth=101)
    assert to_display(ds, arr, None).tolist() == [[0, 129]]  # HU -20 and 50 (stored 40 alone would be 103)
    # MONOCHROME1 is inverted; linear-exact and sigmoid of PS3.3 C.11.2.1.3
    ds, arr = _mono([[0, 100]], PhotometricInterpretation="MONOCHROME1")
    assert to_display(ds, arr, (50.0, 100.0, "LINEAR_EXACT")).tolist() == [[255, 0]]
    ds, arr = _mono([[50]])
    assert to_display(ds, arr, (50.0, 100.0, "SIGMOID")).tolist() == [[128]]  # 255 / 2 at the centre
    # no window anywhere: the full range
    ds, arr = _mono([[10, 20, 30]])
    assert to_display(ds, arr, None).tolist() == [[0, 128, 255]]


def test_render_sizes_and_parameters() -> None:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 40, 80, 8, 8, 7
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.PixelData = bytes(range(80)) * 40
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    def size(**kw: str) -> tuple[int, int]:
        return Image.open(io.BytesIO(render_frame(ds, 0, RenderParams.parse(media_type="image/png", **kw)))).size

    assert size() == (80, 40)
    assert size(viewport="40,40") == (40, 20)  # fits, aspect ratio kept
    assert size(viewport=",20") == (40, 20)
    assert size(viewport="20,20,0,0,40,40") == (20, 20)  # a 40x40 source region
    flipped = render_frame(ds, 0, RenderParams.parse(media_type="image/png", viewport="80,40,80,0,-80,40"))
    plain = render_frame(ds, 0, RenderParams.parse(media_type="image/png"))
    mirrored = np.asarray(Image.open(io.BytesIO(flipped)))[:, ::-1]
    assert np.array_equal(mirrored, np.asarray(Image.open(io.BytesIO(plain))))
    for kw in ({"window": "1"}, {"window": "a,b"}, {"viewport": "1"}, {"quality": "x"}, {"quality": "0"}):
        with pytest.raises(RenderError):
            RenderParams.parse(**kw).check()
    with pytest.raises(RenderError, match="does not exist"):
        render_frame(ds, 1, RenderParams())
    with pytest.raises(RenderError, match="function"):
        RenderParams.parse(window="1,2,cubic").check()


def test_render_cache_drops_the_oldest(tmp_path: Path) -> None:
    cache = RenderCache(tmp_path, max_bytes=2500)
    for i in range(3):
        cache.put(f"{i:02d}key", bytes(1000))
        os.utime(tmp_path / f"{i:02d}" / f"{i:02d}key", (time.time() + i, time.time() + i))
    assert cache.get("00key") is None and cache.get("02key") == bytes(1000)
    assert RenderCache(tmp_path, 0).get("02key") is None  # 0 MB: off


def test_multipart_and_accept_parsing() -> None:
    body = b"preamble\r\n--b1\r\nContent-Type: application/dicom\r\n\r\nAAA\r\n--b1\r\n\r\nBB\r\n--b1--\r\n"
    assert parse_multipart(body, "b1", "application/dicom") == [("application/dicom", b"AAA"),
                                                                ("application/dicom", b"BB")]
    for broken in (b"--b1\r\nContent-Type: x\r\n\r\nAAA", b"no boundary at all", b"x--b1\r\n\r\nA\r\n--b1--"):
        with pytest.raises(ValueError):
            parse_multipart(broken, "b1", "application/dicom")
    ranges = parse_accept('image/png;q=0.5, multipart/related; type="application/dicom"; transfer-syntax=*')
    assert ranges[0] == ("multipart/related", {"type": "application/dicom", "transfer-syntax": "*"})
    assert parse_accept(None) == [("*/*", {})]


def test_part10_split() -> None:
    with pytest.raises(StoreFailure) as err:
        read_part10(b"\x00" * 128 + b"DICM" + b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01")
    assert err.value.status == 0xC000 and "Transfer Syntax" in err.value.comment
    with pytest.raises(StoreFailure):
        read_part10(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x40\x00short")


@pytest.mark.parametrize("signed", [0, 1])
def test_native_frames_match_pydicom(signed: int) -> None:
    """The fast path for uncompressed frames gives pydicom's values, high bits masked or sign-extended."""
    ds = Dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 2, 3, 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, signed, "MONOCHROME2"
    ds.NumberOfFrames = 2
    ds.PixelData = np.array([0x0FFF, 0xF800, 0x0001, 0x7ABC, 0x0800, 0x1234] * 2, dtype="<u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for index in (0, 1):
        native = _native_frame(ds, index)
        assert native is not None
        assert np.array_equal(native, ds.pixel_array[index])
