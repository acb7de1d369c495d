"""XDS-I.b in the running hub: DCMTK storescu sends a study, the image manager reports it complete, the bus
publishes its KOS (RAD-68, queue dicom-studies/xds-i), ITI-18 finds it over SOAP, RAD-69 over SOAP returns the
instances byte-identical (MTOM), and `ihehub xds publish` / the API publish again (replacing the manifest)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pydicom
from click.testing import CliRunner
from lxml import etree
from pydicom.uid import generate_uid

from ihehub.api import create_token
from ihehub.atna import AuditQuery
from ihehub.bus.store import MessageQuery
from ihehub.channels.registry import Registry
from ihehub.cli import main
from ihehub.config import DicomActorConfig, init_home, load_home
from ihehub.hub import Hub
from ihehub.soap import build_envelope
from ihehub.xds import ebrim
from ihehub.xds.imaging import XDSI_NS
from tests.api.api_support import LoopThread, wait_for
from tests.conftest import loopback_config
from tests.dicom.dicomkit import make_instance
from tests.xds.query_fixtures import adhoc, q, ql
from tests.xds.test_endpoints import parse

REPO = "1.3.6.1.4.1.21367.2017.2.3.4242.1"
RIM = ebrim.NS["rim"]
XDS_NS = ebrim.NS["xds"]
IMAGING = {"enabled": True, "source_id": "1.2.156.777.1", "default_domain": "1.2.156.99", "institution": "区人民医院"}


def _study(tmp: Path, port: int) -> dict[str, Any]:
    study, series = generate_uid(), generate_uid()
    files, sops = [], []
    for n in range(2):
        f = tmp / f"x{n}.dcm"
        ds = make_instance(f, patient="李^娜", patient_id="P77", study_uid=study, series_uid=series, modality="DX",
                           charset="ISO_IR 192", instance_number=n + 1)
        files.append(f)
        sops.append(str(ds.SOPInstanceUID))
    res = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "IHEHUB", "127.0.0.1", str(port),
                          *map(str, files)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return {"study": study, "series": series, "sops": sops, "files": files}


def _rad69(study: str, series: str, sops: list[str]) -> bytes:
    docs = "".join(f"<xdsb:DocumentRequest><xdsb:RepositoryUniqueId>{REPO}</xdsb:RepositoryUniqueId>"
                   f"<xdsb:DocumentUniqueId>{s}</xdsb:DocumentUniqueId></xdsb:DocumentRequest>" for s in sops)
    payload = etree.fromstring(
        f'<xdsi:RetrieveImagingDocumentSetRequest xmlns:xdsi="{XDSI_NS}" xmlns:xdsb="{XDS_NS}">'
        f'<xdsi:StudyRequest studyInstanceUID="{study}"><xdsi:SeriesRequest seriesInstanceUID="{series}">{docs}'
        "</xdsi:SeriesRequest></xdsi:StudyRequest><xdsi:TransferSyntaxUIDList>"
        "<xdsi:TransferSyntaxUID>1.2.840.10008.1.2.1</xdsi:TransferSyntaxUID></xdsi:TransferSyntaxUIDList>"
        "</xdsi:RetrieveImagingDocumentSetRequest>".encode())
    return build_envelope(payload, action="urn:ihe:rad:2009:RetrieveImagingDocumentSet", to="http://hub/xds/imaging")


def _manifests(client: httpx.Client, base: str, patient: str) -> list[etree._Element]:
    body = build_envelope(adhoc("FindDocuments", {"$XDSDocumentEntryPatientId": q(patient),
                                                  "$XDSDocumentEntryStatus": ql(ebrim.APPROVED, ebrim.DEPRECATED)}),
                          action="urn:ihe:iti:2007:RegistryStoredQuery", to="http://hub/xds/registry")
    r = client.post(f"{base}/xds/registry", content=body, headers={"content-type": "application/soap+xml"})
    assert r.status_code == 200, r.text
    return list(parse(r).payload.iter(f"{{{RIM}}}ExtrinsicObject"))


def test_study_complete_is_published_found_and_retrieved(tmp_path: Path, monkeypatch: Any) -> None:
    home = tmp_path / "home"
    init_home(home)
    monkeypatch.setenv("IHEHUB_HOME", str(home))
    cfg: Any = loopback_config(load_home(home))
    cfg = dataclasses.replace(cfg, actors=dataclasses.replace(
        cfg.actors, dicom=DicomActorConfig(enabled=True, port=0, study_quiet_seconds=1.0),
        xds=dataclasses.replace(cfg.actors.xds, imaging=IMAGING)))
    hub = Hub(cfg, [], registry=Registry())
    loop = LoopThread()
    loop.run(hub.start(), timeout=60)
    try:
        base = f"http://127.0.0.1:{hub.http_port}"
        st = _study(tmp_path, hub.dicom.port)
        patient = "P77^^^&1.2.156.99&ISO"

        # study complete -> one bus message on dicom-studies with its xds-i delivery, sent
        def published() -> list[Any]:
            rows = hub.store.search(MessageQuery(channel="dicom-studies"))
            return [d for r in rows for d in hub.store.deliveries_of(r["id"]) if d["state"] == "sent"]
        (delivery,) = wait_for(published, 30, "the RAD-68 publication")
        assert delivery["destination"] == "xds-i"

        # the complete study is rendered ahead for viewers (dicomweb.prerender, on by default): the first
        # rendered frame a viewer asks for comes from the cache
        web = hub.services["dicomweb"]
        assert web.settings.prerender
        wait_for(lambda: len([f for f in web.cache.root.rglob("*") if f.is_file()]) >= 2, 30, "pre-rendered frames")
        hits = web.cache.hits
        reader = create_token(hub.store, role="readonly", name="viewer")
        r = httpx.get(f"{base}/dicomweb/studies/{st['study']}/series/{st['series']}/instances/{st['sops'][0]}"
                      "/rendered", headers={"Authorization": f"Bearer {reader}", "Accept": "image/jpeg"}, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
        assert web.cache.hits == hits + 1

        with httpx.Client(timeout=30) as client:
            (entry,) = _manifests(client, base, patient)
            assert entry.get("mimeType") == "application/dicom"
            uid = ebrim.external_id(entry, ebrim.DE_UNIQUE_ID)

            # ITI-43 of the manifest from the repository: the KOS referencing both instances
            req = (f'<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{XDS_NS}"><xdsb:DocumentRequest>'
                   f"<xdsb:RepositoryUniqueId>{REPO}</xdsb:RepositoryUniqueId><xdsb:DocumentUniqueId>{uid}"
                   "</xdsb:DocumentUniqueId></xdsb:DocumentRequest></xdsb:RetrieveDocumentSetRequest>")
            r = client.post(f"{base}/xds/repository", headers={"content-type": "application/soap+xml"},
                            content=build_envelope(etree.fromstring(req.encode()),
                                                   action="urn:ihe:iti:2007:RetrieveDocumentSet", to="x"))
            got = parse(r)
            (att,) = got.attachments.values()
            import io

            kos = pydicom.dcmread(io.BytesIO(att.read_bytes()))
            refs = {ref.ReferencedSOPInstanceUID for s in kos.CurrentRequestedProcedureEvidenceSequence[0]
                    .ReferencedSeriesSequence for ref in s.ReferencedSOPSequence}
            assert refs == set(st["sops"]) and kos.InstitutionName == "区人民医院"

            # RAD-69 over SOAP/MTOM: the instances as stored, byte for byte
            r = client.post(f"{base}/xds/imaging", content=_rad69(st["study"], st["series"], st["sops"]),
                            headers={"content-type": "application/soap+xml"})
            assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/related")
            got = parse(r)
            assert got.payload.find(f"{{{ebrim.NS['rs']}}}RegistryResponse").get("status") == ebrim.SUCCESS
            received = sorted(a.read_bytes() for a in got.attachments.values())
            stored = []
            for sop in st["sops"]:
                path = next((hub.cfg.data_dir / "dicom").rglob(f"*{sop}*"))
                stored.append(path.read_bytes())
            assert received == sorted(stored)
            # the imaging WSDL; an unknown action is refused
            assert b"RetrieveImagingDocumentSet" in client.get(f"{base}/xds/imaging?wsdl").content
            bad = build_envelope(etree.fromstring(b"<x/>"), action="urn:nope", to="x")
            r = client.post(f"{base}/xds/imaging", content=bad, headers={"content-type": "application/soap+xml"})
            assert r.status_code == 400 and b"ActionNotSupported" in r.content

            # the API publishes again (operator): a new manifest replaces the first
            token = create_token(hub.store, role="operator", name="radiographer")
            r = client.post(f"{base}/api/xds/imaging/publish", json={"study_uid": st["study"]},
                            headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200 and r.json()["instances"] == 2, r.text
            assert client.post(f"{base}/api/xds/imaging/publish", json={"study_uid": "1.2.3"},
                               headers={"Authorization": f"Bearer {token}"}).status_code == 409
            statuses = sorted(e.get("status") for e in _manifests(client, base, patient))
            assert statuses == sorted([ebrim.APPROVED, ebrim.DEPRECATED])

        # the publications are audited (RAD-68) and the retrieve too (RAD-69)
        store = hub.audit_store
        wait_for(lambda: store.search(AuditQuery(event_type="RAD-68")).records, 10, "RAD-68 audit")
        wait_for(lambda: store.search(AuditQuery(event_type="RAD-69")).records, 10, "RAD-69 audit")
    finally:
        loop.run(hub.stop(), timeout=60)
        loop.close()

    # the CLI works on the same home with the hub stopped
    text = (home / "ihehub.yaml").read_text(encoding="utf-8")
    for key, value in (("enabled", "false"), ("source_id", "null"), ("default_domain", "null")):
        line = f"      {key}: {value}"
        assert line in text
        text = text.replace(line, f"      {key}: {IMAGING[key] if key != 'enabled' else 'true'}", 1)
    (home / "ihehub.yaml").write_text(text, encoding="utf-8")
    r = CliRunner().invoke(main, ["xds", "publish", "--study", st["study"], "--json"])
    assert r.exit_code == 0, r.output
    (out,) = json.loads(r.stdout)
    assert out["status"] == "Success" and out["patient_id"] == patient
    r = CliRunner().invoke(main, ["xds", "publish", "--study", "9.9.9"])
    assert r.exit_code == 1 and "not in the image manager" in r.output
