"""The hub with its built-in actors on loopback ports: the Audit Record Repository (ATNA) and the DICOM
image manager, started and stopped by the hub, reachable over the wire, searchable over the API and CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from ihehub.api import create_token
from ihehub.atna import AuditContext, Endpoint, send_udp, syslog_message
from ihehub.channels.registry import Registry
from ihehub.cli import main
from ihehub.config import AtnaConfig, DicomActorConfig, init_home, load_channels, load_home
from ihehub.hub import Hub
from ihehub.tls import client_ssl_context, ensure_tls
from tests.api.api_support import LoopThread, wait_for
from tests.conftest import CORPUS, free_port, loopback_config


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Hub:  # type: ignore[misc]
    home = tmp_path / "home"
    init_home(home)
    monkeypatch.setenv("IHEHUB_HOME", str(home))
    cfg = load_home(home)
    ensure_tls(cfg)
    mllps = free_port()
    (home / "channels" / "secure.yaml").write_text(
        f"source:\n  url: mllps://127.0.0.1:{mllps}\n  options: {{tls: {{require_client_cert: true}}}}\n",
        encoding="utf-8")
    atna = AtnaConfig(schema=CORPUS / "ipf/audit/dicom2017c.xsd", schematron=CORPUS / "wustl/atna-schematron",
                      tcp_port=0)
    cfg = loopback_config(cfg, atna=atna)
    cfg = dataclasses.replace(cfg, actors=dataclasses.replace(  # type: ignore[arg-type]
        cfg.actors, dicom=DicomActorConfig(enabled=True, port=0, ae_title="IHEHUB",  # type: ignore[attr-defined]
                                           tls_port=0)))
    registry = Registry()
    h = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)  # type: ignore[arg-type]
    loop = LoopThread()
    loop.run(h.start(), timeout=60)
    h.test_loop = loop  # type: ignore[attr-defined]
    h.test_mllps = mllps  # type: ignore[attr-defined]
    yield h
    loop.run(h.stop(), timeout=60)
    loop.close()


def test_audit_repository_and_image_manager_run_in_the_hub(hub: Hub) -> None:
    store = hub.audit_store
    # APP-START of this node is in the repository, valid against the schema
    from ihehub.atna import AuditQuery

    wait_for(lambda: store.search(AuditQuery(event_id="110100")).records, 10, "APP-START audit")

    # an ITI-9 audit from another node over UDP (RFC 5426) is received, validated and searchable
    other = AuditContext(source_id="his-1")
    msg = other.transaction("ITI-9", source=Endpoint(user_id="HIS|H1", host="10.0.0.5"),
                            destination=other.me("IHEHUB|HUB"), patients=["12345^^^&1.2.3&ISO"],
                            query=b"QBP^Q23", message_id="Q1")
    asyncio.run(send_udp("127.0.0.1", hub.audit_repo.udp_port, [syslog_message(msg)]))
    recs = wait_for(lambda: store.search(AuditQuery(patient="12345")).records, 10, "the ITI-9 audit")
    assert recs[0].event_type == "ITI-9" and recs[0].valid, recs[0].errors

    # a refused TLS client is audited as a security alert (DCM 110113)
    ctx = client_ssl_context(hub.cfg.tls.ca)
    with pytest.raises((OSError, asyncio.IncompleteReadError)):
        async def attempt() -> None:
            r, w = await asyncio.open_connection("127.0.0.1", hub.test_mllps, ssl=ctx)  # type: ignore[attr-defined]
            w.write(b"\x0bMSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5\r\x1c\r")
            await w.drain()
            await r.readexactly(10)
        asyncio.run(attempt())
    wait_for(lambda: store.search(AuditQuery(event_id="110113")).records, 10, "the security alert")

    # the API (auditor) searches, and the search itself is audited (110101)
    token = create_token(hub.store, role="auditor", name="auditor-1")
    base = f"http://127.0.0.1:{hub.http_port}"
    r = httpx.get(f"{base}/api/audit", params={"patient": "12345"}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["items"][0]["event_type"] == "ITI-9"
    csv = httpx.get(f"{base}/api/audit", params={"format": "csv"}, headers={"Authorization": f"Bearer {token}"})
    assert csv.status_code == 200 and csv.text.startswith("seq,") and "ITI-9" in csv.text
    one = httpx.get(f"{base}/api/audit/{recs[0].seq}", headers={"Authorization": f"Bearer {token}"}).json()
    assert "<AuditMessage" in one["xml"]
    assert httpx.get(f"{base}/api/audit/verify", headers={"Authorization": f"Bearer {token}"}).json()["ok"]
    ro = create_token(hub.store, role="readonly", name="ro")
    assert httpx.get(f"{base}/api/audit", headers={"Authorization": f"Bearer {ro}"}).status_code == 403
    wait_for(lambda: store.search(AuditQuery(event_id="110101")).records, 10, "audit-log-used")

    # the CLI reads the same repository
    out = CliRunner().invoke(main, ["audit", "search", "--patient", "12345"]).output
    assert "ITI-9" in out
    assert "chain intact" in CliRunner().invoke(main, ["audit", "verify"]).output

    # DICOM: echo and store with DCMTK, then the instance is in the index
    if shutil.which("echoscu") is None:
        pytest.fail("DCMTK is missing: `make peers` installs it (apt-get install dcmtk)")
    port = hub.dicom.port
    assert subprocess.run(["echoscu", "-aec", "IHEHUB", "127.0.0.1", str(port)], timeout=30).returncode == 0
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm")
    res = subprocess.run(["storescu", "-aec", "IHEHUB", "127.0.0.1", str(port), str(ct)], timeout=30,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    t0 = time.monotonic()
    assert hub.dicom.flush(10)
    assert time.monotonic() - t0 < 10
    assert any(Path(hub.cfg.data_dir, "dicom").rglob("*.dcm"))

    # the DICOM audit trail: the association's instances (110104, action C, the sender as Source, the study
    # and patient) and a C-FIND (110112 with the identifier), both valid against the schema
    import pydicom

    ds = pydicom.dcmread(ct)
    rec = wait_for(lambda: store.search(AuditQuery(event_id="110104", entity=str(ds.StudyInstanceUID))).records,
                   10, "the DICOM Instances Transferred audit")[0]
    assert rec.valid and rec.action == "C", rec.errors
    assert store.search(AuditQuery(event_id="110104", patient=str(ds.PatientID))).records
    res = subprocess.run(["findscu", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={ds.PatientID}",
                          "-k", "StudyInstanceUID", "-aec", "IHEHUB", "127.0.0.1", str(port)], timeout=30,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    query = wait_for(lambda: store.search(AuditQuery(event_id="110112", user="STORESCU")).records or
                     store.search(AuditQuery(event_id="110112")).records, 10, "the C-FIND audit")[0]
    assert query.valid, query.errors


def test_dicom_over_tls_needs_a_client_certificate_of_the_ca(hub: Hub, tmp_path: Path) -> None:
    """PS3.15 B.1: DCMTK echoscu over TLS with a certificate of the node's CA is answered; without one, the
    handshake is refused and the plain port still works."""
    from ihehub.tls import issue_client_cert

    cert, key = issue_client_cert(hub.cfg, "modality1", tmp_path)
    port = hub.dicom.tls_port
    assert port
    ok = subprocess.run(["echoscu", "+tls", str(key), str(cert), "+cf", str(hub.cfg.tls.ca), "-aec", "IHEHUB",
                         "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(["echoscu", "+tla", "-ic", "-aec", "IHEHUB", "127.0.0.1", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    plain = subprocess.run(["echoscu", "-aec", "IHEHUB", "127.0.0.1", str(hub.dicom.port)],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr

