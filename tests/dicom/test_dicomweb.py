"""DICOMweb against a real hub over loopback HTTP: STOW-RS, then QIDO-RS, then WADO-RS (byte-identical),
with the `dicomweb-client` library (PyPI) as the viewer-side client and httpx for byte-level checks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from ihehub.atna import AuditQuery
from ihehub.dicom.render import RenderParams
from ihehub.dicom.web import DicomWeb
from ihehub.dicom.websettings import DicomWebSettings
from tests.api.api_support import wait_for
from tests.dicom.dicomkit import sample_file
from tests.dicom.dicomweb_support import (
    ORIGIN,
    SAMPLES,
    WebHub,
    dataset_bytes,
    parts_of,
    sample_bytes,
    web,
)

__all__ = ["web"]  # the module-scoped hub fixture

CT = pydicom.dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True)
J2K = pydicom.dcmread(sample_file("MR_small_jp2klossless.dcm"), stop_before_pixels=True)
RLE = pydicom.dcmread(sample_file("SC_rgb_rle.dcm"), stop_before_pixels=True)
CN = pydicom.dcmread(sample_file("chrX1.dcm"), stop_before_pixels=True)


def _path(ds: pydicom.Dataset, tail: str = "") -> str:
    return (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}{tail}")


@pytest.fixture(scope="module")
def stored(web: WebHub) -> WebHub:
    """The sample files STOWed as they are (one request), answered 200 with every instance referenced."""
    r = web.stow([sample_bytes(name) for name in SAMPLES])
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    refs = r.json()["00081199"]["Value"]
    assert len(refs) == len(SAMPLES)
    assert all(ref["00081190"]["Value"][0].startswith(f"{web.base}/dicomweb/studies/") for ref in refs)
    return web


def test_stow_qido_wado_round_trip_is_byte_identical(stored: WebHub) -> None:
    client = stored.client()
    studies = client.search_for_studies()
    uids = {s["0020000D"]["Value"][0] for s in studies}
    assert CT.StudyInstanceUID in uids and CN.StudyInstanceUID in uids
    series = client.search_for_series(study_instance_uid=CT.StudyInstanceUID)
    assert [s["0020000E"]["Value"][0] for s in series] == [CT.SeriesInstanceUID]
    assert series[0]["00080060"]["Value"] == ["CT"]
    instances = client.search_for_instances(study_instance_uid=CT.StudyInstanceUID,
                                            series_instance_uid=CT.SeriesInstanceUID)
    assert instances[0]["00080018"]["Value"] == [CT.SOPInstanceUID]
    # WADO-RS as stored: the data set bytes are exactly those sent (the hub writes its own file meta)
    for name in SAMPLES:
        ds = pydicom.dcmread(sample_file(name), stop_before_pixels=True)
        r = stored.get(_path(ds), headers={"Accept": 'multipart/related; type="application/dicom"; '
                                                    "transfer-syntax=*"})
        assert r.status_code == 200, r.text
        [(ctype, body)] = parts_of(r)
        assert ctype == "application/dicom"
        assert dataset_bytes(body) == dataset_bytes(sample_bytes(name)), name
    # the client reads the same instance
    got = client.retrieve_instance(CT.StudyInstanceUID, CT.SeriesInstanceUID, CT.SOPInstanceUID,
                                   media_types=(("application/dicom", "*"),))
    assert got.SOPInstanceUID == CT.SOPInstanceUID and got.PatientName == CT.PatientName
    # series and study retrieval stream every instance
    study = client.retrieve_study(J2K.StudyInstanceUID, media_types=(("application/dicom", "*"),))
    assert {d.SOPInstanceUID for d in study} >= {J2K.SOPInstanceUID}


def test_qido_matching(stored: WebHub) -> None:
    def search(path: str = "/dicomweb/studies", **params: str) -> list[dict[str, object]]:
        r = stored.get(path, params=params)
        assert r.status_code == 200, r.text
        return list(r.json())

    def uids(items: list[dict[str, object]], tag: str = "0020000D") -> set[str]:
        return {it[tag]["Value"][0] for it in items}  # type: ignore[index]

    assert CT.StudyInstanceUID in uids(search(PatientID=CT.PatientID))
    assert uids(search(PatientName="王*")) == {CN.StudyInstanceUID, pydicom.dcmread(
        sample_file("chrX2.dcm"), stop_before_pixels=True).StudyInstanceUID}
    hit = search(PatientName="王*")[0]
    assert hit["00080005"] == {"vr": "CS", "Value": ["ISO_IR 192"]}
    assert hit["00100010"]["Value"][0]["Ideographic"].startswith("王")  # type: ignore[index]
    assert CT.StudyInstanceUID in uids(search(StudyDate=f"{CT.StudyDate[:4]}0101-{CT.StudyDate[:4]}1231"))
    assert CT.StudyInstanceUID not in uids(search(StudyDate="19000101-19001231"))
    pair = f"{CT.StudyInstanceUID},{CN.StudyInstanceUID}"
    assert uids(search(StudyInstanceUID=pair)) == {CT.StudyInstanceUID, CN.StudyInstanceUID}
    assert uids(search(**{"0020000D": CT.StudyInstanceUID})) == {CT.StudyInstanceUID}  # tag as the key
    assert uids(search("/dicomweb/series", Modality="C?")) == {CT.StudyInstanceUID}
    instances = search("/dicomweb/instances", SOPInstanceUID=RLE.SOPInstanceUID)
    assert uids(instances, "00080018") == {RLE.SOPInstanceUID}
    assert instances[0]["00280010"]["Value"] == [RLE.Rows]  # Rows as a JSON number
    assert instances[0]["00081190"]["Value"][0].endswith(_path(RLE))  # type: ignore[index]
    # includefield, limit/offset with the Warning of PS3.18 8.3.4.4
    full = search(includefield="all", PatientID=CT.PatientID)[0]
    assert "00100030" in full and "00080050" in full
    page = stored.get("/dicomweb/studies", params={"limit": "1"})
    assert len(page.json()) == 1 and "additional results" in page.headers["warning"]
    second = stored.get("/dicomweb/studies", params={"limit": "1", "offset": "1"}).json()
    assert second[0]["0020000D"] != page.json()[0]["0020000D"]
    fuzzy = stored.get("/dicomweb/studies", params={"fuzzymatching": "true", "PatientID": CT.PatientID})
    assert fuzzy.status_code == 200 and "fuzzymatching" in fuzzy.headers["warning"]
    assert "not supported" in stored.get("/dicomweb/studies", params={"PatientComments": "x"}).headers["warning"]
    bad = stored.get("/dicomweb/studies", params={"SOPInstanceUID": CT.SOPInstanceUID})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_parameter"
    assert stored.get("/dicomweb/studies", params={"limit": "-1"}).status_code == 400


def test_metadata_bulkdata_and_frames(stored: WebHub) -> None:
    client = stored.client()
    meta = client.retrieve_series_metadata(CT.StudyInstanceUID, CT.SeriesInstanceUID)
    assert [m["00080018"]["Value"][0] for m in meta] == [CT.SOPInstanceUID]
    frames_uri = meta[0]["7FE00010"]["BulkDataURI"]
    assert frames_uri.startswith("http://127.0.0.1") and frames_uri.endswith(_path(CT, "/frames"))  # absolute
    # (dicomweb-client sends Host without the port; URIs follow the Host header, as httpx shows)
    direct = stored.get(_path(CT, "/metadata")).json()
    assert direct[0]["7FE00010"]["BulkDataURI"] == f"{stored.base}{_path(CT, '/frames')}"
    one = client.retrieve_instance_metadata(RLE.StudyInstanceUID, RLE.SeriesInstanceUID, RLE.SOPInstanceUID)
    assert one["00280004"]["Value"] == ["RGB"]
    study_meta = stored.get(f"/dicomweb/studies/{CN.StudyInstanceUID}/metadata")
    assert study_meta.headers["content-type"] == "application/dicom+json"
    assert "王" in study_meta.json()[0]["00100010"]["Value"][0]["Ideographic"]
    # uncompressed frames are the pixel data as stored
    full = pydicom.dcmread(sample_file("CT_small.dcm"))
    [frame] = client.retrieve_instance_frames(CT.StudyInstanceUID, CT.SeriesInstanceUID, CT.SOPInstanceUID, [1])
    assert frame == full.PixelData
    # JPEG 2000 frames: as stored when asked for image/jp2, decoded for application/octet-stream
    j2k = pydicom.dcmread(sample_file("MR_small_jp2klossless.dcm"))
    r = stored.get(_path(J2K, "/frames/1"), headers={"Accept": 'multipart/related; type="image/jp2"'})
    [(ctype, data)] = parts_of(r)
    assert ctype == "image/jp2" and data in j2k.PixelData
    [raw] = client.retrieve_instance_frames(J2K.StudyInstanceUID, J2K.SeriesInstanceUID, J2K.SOPInstanceUID, [1],
                                            media_types=("application/octet-stream",))
    assert np.array_equal(np.frombuffer(raw, dtype=j2k.pixel_array.dtype).reshape(64, 64), j2k.pixel_array)
    assert stored.get(_path(CT, "/frames/2")).status_code == 404
    assert stored.get(_path(CT, "/frames/x")).status_code == 400
    # bulk data of a binary element other than pixel data
    r = stored.get(_path(CT, "/bulkdata/7FE00010"))
    [(ctype, data)] = parts_of(r)
    assert ctype == "application/octet-stream" and data == full.PixelData


def test_transcoding_to_explicit_little_endian_or_406(stored: WebHub) -> None:
    explicit = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
    r = stored.get(_path(J2K), headers={"Accept": explicit})
    [(ctype, body)] = parts_of(r)
    assert ctype == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(body))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" and ds.SOPInstanceUID == J2K.SOPInstanceUID
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(sample_file("MR_small_jp2klossless.dcm")).pixel_array)
    r = stored.get(_path(CT), headers={"Accept": 'multipart/related; type="application/dicom"; '
                                                 "transfer-syntax=1.2.840.10008.1.2.4.50"})
    assert r.status_code == 406 and r.json()["error"] == "not_acceptable"
    r = stored.get(_path(CT), headers={"Accept": 'multipart/related; type="application/dicom"; '
                                                 "transfer-syntax=1.2.840.10008.1.2.4.50, "
                                                 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200 and dataset_bytes(parts_of(r)[0][1]) == dataset_bytes(sample_bytes("CT_small.dcm"))
    assert stored.get(_path(CT), headers={"Accept": "application/json"}).status_code == 406


def test_rendered_images(stored: WebHub) -> None:
    client = stored.client()
    jpeg = client.retrieve_instance_rendered(CT.StudyInstanceUID, CT.SeriesInstanceUID, CT.SOPInstanceUID,
                                             media_types=("image/jpeg",), params={"viewport": "64,64"})
    img = Image.open(io.BytesIO(jpeg))
    assert img.format == "JPEG" and img.size == (64, 64)
    png = stored.get(_path(CT, "/frames/1/rendered"), headers={"Accept": "image/png"},
                     params={"window": "40,400,linear", "viewport": "100,50"})
    img = Image.open(io.BytesIO(png.content))
    assert png.headers["content-type"] == "image/png" and img.size == (50, 50)  # fit, aspect ratio kept
    # the window changes the picture: a narrow window saturates more pixels than a wide one
    narrow = np.asarray(Image.open(io.BytesIO(stored.get(_path(CT, "/rendered"), headers={"Accept": "image/png"},
                                                         params={"window": "0,10"}).content)))
    wide = np.asarray(Image.open(io.BytesIO(stored.get(_path(CT, "/rendered"), headers={"Accept": "image/png"},
                                                       params={"window": "1000,4000"}).content)))
    assert (np.isin(narrow, (0, 255))).mean() > (np.isin(wide, (0, 255))).mean()
    # compressed colour (RLE) and JPEG 2000 render too; the second request comes from the disk cache
    for ds in (RLE, J2K):
        first = stored.get(_path(ds, "/rendered"))
        assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
        assert stored.get(_path(ds, "/rendered")).content == first.content
    rgb = Image.open(io.BytesIO(stored.get(_path(RLE, "/rendered")).content))
    assert rgb.mode == "RGB" and rgb.size == (100, 100)
    bad = stored.get(_path(CT, "/rendered"), params={"window": "40"})
    assert bad.status_code == 400 and "window" in bad.json()["detail"]
    assert stored.get(_path(CT, "/rendered"), params={"quality": "500"}).status_code == 400
    assert stored.get(_path(CT, "/rendered"), headers={"Accept": "application/pdf"}).status_code == 406
    assert stored.get(_path(CT, "/frames/2/rendered")).json()["error"] == "not_found"


def test_wado_uri(stored: WebHub) -> None:
    q = {"requestType": "WADO", "studyUID": CT.StudyInstanceUID, "seriesUID": CT.SeriesInstanceUID,
         "objectUID": CT.SOPInstanceUID}
    r = stored.get("/wado", params={**q, "contentType": "application/dicom"})
    assert r.headers["content-type"] == "application/dicom"
    assert dataset_bytes(r.content) == dataset_bytes(sample_bytes("CT_small.dcm"))
    r = stored.get("/wado", params={**q, "rows": "32", "columns": "32", "windowCenter": "40", "windowWidth": "400"})
    assert r.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(r.content)).size == (32, 32)
    assert stored.get("/wado", params={**q, "requestType": "XYZ"}).status_code == 400
    assert stored.get("/wado", params={"requestType": "WADO", "studyUID": "1.2"}).status_code == 400
    assert stored.get("/wado", params={**q, "windowCenter": "40"}).status_code == 400
    missing = stored.get("/wado", params={**q, "objectUID": "1.2.3.4"})
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_stow_with_dicomweb_client_and_study_path(web: WebHub) -> None:
    ds = pydicom.dcmread(sample_file("MR_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    result = web.client("operator").store_instances([ds], study_instance_uid=ds.StudyInstanceUID)
    assert result.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    found = web.client().search_for_instances(study_instance_uid=ds.StudyInstanceUID)
    assert [f["00080018"]["Value"][0] for f in found] == [ds.SOPInstanceUID]
    web.client().retrieve_study(ds.StudyInstanceUID)
    # both transfers are audited: DICOM Instances Transferred (PS3.15 A.5.3.4), Create in, Read out
    store = web.hub.audit_store
    assert store is not None, "the hub runs its Audit Record Repository"

    def actions() -> set[str]:
        return {r.action for r in store.search(AuditQuery(event_id="110104", entity=ds.StudyInstanceUID)).records}

    wait_for(lambda: actions() == {"C", "R"}, 10, "the STOW-RS and WADO-RS audits")


def test_bad_input_gets_clear_answers(web: WebHub) -> None:
    ct = sample_bytes("CT_small.dcm")
    # not DICOM: 409, Failed SOP Sequence with 0xC000
    r = web.stow([b"this is not a DICOM file"])
    assert r.status_code == 409
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    # one good, one bad: 202
    r = web.stow([ct, b"garbage" * 40])
    assert r.status_code == 202 and len(r.json()["00081199"]["Value"]) == 1
    # a study other than the path's: 0xA900
    r = web.stow([ct], path="/dicomweb/studies/1.2.3.999")
    assert r.status_code == 409 and r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert r.json()["00081198"]["Value"][0]["00081155"]["Value"] == [CT.SOPInstanceUID]
    # a truncated data set: cannot understand
    r = web.stow([ct[:-100] + b"\x10\x00\x10\x00PN\xff\x00"])
    assert r.status_code == 409 and r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    # request-level problems
    r = web.stow([ct], content_type='multipart/related; type="application/dicom"')
    assert r.status_code == 400 and "boundary" in r.json()["detail"]
    r = web.stow([ct], content_type="application/dicom")
    assert r.status_code == 415
    r = web.stow([ct], content_type='multipart/related; type="application/dicom+json"; boundary=x')
    assert r.status_code == 415
    r = web.stow([ct], content_type='multipart/related; type="application/dicom"; boundary=other')
    assert r.status_code == 400 and "boundary" in r.json()["detail"]
    # unknown UIDs: 404 JSON
    for path in ("/dicomweb/studies/1.2.3", "/dicomweb/studies/1.2.3/metadata",
                 "/dicomweb/studies/1.2.3/series/4.5/instances/6.7/rendered"):
        r = web.get(path)
        assert r.status_code == 404 and r.json()["error"] == "not_found", path


def test_auth_and_cors(web: WebHub) -> None:
    base = web.base
    assert web.http.get(f"{base}/dicomweb/studies").status_code == 401
    assert web.http.get(f"{base}/dicomweb/studies", headers=web.auth("auditor")).status_code == 403
    r = web.stow([sample_bytes("CT_small.dcm")], role="readonly")
    assert r.status_code == 403
    pre = web.http.options(f"{base}/dicomweb/studies", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    r = web.get("/dicomweb/studies", headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in web.get("/dicomweb/studies", headers={"Origin": "https://evil.example"}
                                                         ).headers
    assert "access-control-allow-origin" not in web.get("/healthz", headers={"Origin": ORIGIN}).headers
    paths = web.http.get(f"{base}/openapi.json").json()["paths"]
    assert "/dicomweb/studies/{study}/series/{series}/instances/{instance}/rendered" in paths and "/wado" in paths


def test_prefetch_renders_the_rest_of_the_series_and_prerender_a_study(stored: WebHub, tmp_path: Path) -> None:
    study, series_uid = generate_uid(), generate_uid()
    files = []
    for number in range(1, 4):  # a three-slice CT series
        ds = pydicom.dcmread(sample_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series_uid, generate_uid()
        ds.InstanceNumber = number
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        files.append(out.getvalue())
    assert stored.stow(files).status_code == 200
    assert isinstance(stored.hub.services["dicomweb"], DicomWeb)  # the hub can ask it to pre-render a study
    params = RenderParams()
    web = DicomWeb(stored.hub.dicom, DicomWebSettings(), cache_dir=tmp_path / "a")
    series = web.locate(study, series_uid)
    web.rendered(series[0], 1, params)
    keys = [web.cache.key(loc.path, 1, params) for loc in series]
    wait_for(lambda: all(web.cache.get(k) is not None for k in keys), 20, "the prefetched frames")
    pre = DicomWeb(stored.hub.dicom, DicomWebSettings(prerender=True), cache_dir=tmp_path / "b")
    assert pre.prerender_study(CT.StudyInstanceUID) == 1
    ct = pre.locate_instance(CT.StudyInstanceUID, CT.SeriesInstanceUID, CT.SOPInstanceUID)
    key = pre.cache.key(ct.path, 1, RenderParams(quality=pre.settings.default_quality))
    wait_for(lambda: pre.cache.get(key) is not None, 20, "the pre-rendered frame")
    assert pre.rendered(ct, 1, RenderParams()) == pre.cache.get(key)
    web.close()
    pre.close()
