"""The XDS.b endpoints of a running in-process hub over real HTTP: the NIST ITI-41 bodies, then ITI-18 and
ITI-43 (byte-identical), on SQLite and PostgreSQL; responses validated against the ebXML/IHE schemas; SOAP
faults for bad input; the served WSDLs drive a zeep ITI-18 client; every transaction is audited."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree

from ihehub.channels.registry import Registry
from ihehub.config import init_home, load_home
from ihehub.hub import Hub
from ihehub.soap import SOAP12_NS, WSA_NS, read_request
from ihehub.soap.transport import SoapRequest
from ihehub.xds.errors import SUCCESS
from ihehub.xds.query import QUERY_IDS
from ihehub.xds.service import DEFAULT_REPOSITORY_UNIQUE_ID
from tests.api.api_support import LoopThread
from tests.conftest import loopback_config

from .query_fixtures import adhoc, q, ql
from .repository_support import (
    ITI41,
    PNR,
    RS,
    XDS,
    assert_valid,
    chunked,
    inline_xop,
    nist_document,
    nist_request,
    retrieve_request,
)

RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
ITI18 = "urn:ihe:iti:2007:RegistryStoredQuery"
APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"


@contextlib.contextmanager
def xds_hub(root: Path, database: str | None = None) -> Iterator[tuple[Hub, str]]:
    """A started hub (no channels) with actors.xds on defaults; (hub, base URL)."""
    home = root / "home"
    (home / "channels").mkdir(parents=True)
    init_home(home)
    cfg: Any = loopback_config(load_home(home, environ={"IHEHUB_HTTP_PORT": "0"}),
                               **({"database": database} if database else {}))
    hub = Hub(cfg, [], registry=Registry())
    loop = LoopThread()
    try:
        loop.run(hub.start(), timeout=60)
        yield hub, f"http://127.0.0.1:{hub.http_port}"
    finally:
        try:
            loop.run(hub.stop(), timeout=60)
        finally:
            loop.close()


def parse(response: httpx.Response) -> SoapRequest:
    """A SOAP response (MTOM or plain) read back through the SOAP layer."""
    return asyncio.run(read_request(response.headers["content-type"], chunked(response.content)))


def envelope(action: str, payload: etree._Element) -> bytes:
    from ihehub.soap import build_envelope

    return build_envelope(payload, action=action, to="http://hub/xds")


def find_documents(client: httpx.Client, base: str, patient: str) -> SoapRequest:
    body = envelope(ITI18, adhoc("FindDocuments", {"$XDSDocumentEntryPatientId": q(patient),
                                                   "$XDSDocumentEntryStatus": ql(APPROVED)}))
    r = client.post(f"{base}/xds/registry", content=body, headers={"content-type": "application/soap+xml"})
    assert r.status_code == 200, r.text
    return parse(r)


def nist_flow(corpus: Path, base: str) -> None:
    """ITI-41 of every NIST body, ITI-18 FindDocuments per patient, one ITI-43 for all documents."""
    expected: dict[str, bytes] = {}
    with httpx.Client(timeout=30) as client:
        for name in PNR:
            ctype, body = nist_request(corpus, name)
            r = client.post(f"{base}/xds/repository", content=body, headers={"content-type": ctype})
            assert r.status_code == 200, r.text
            reply = parse(r)
            assert reply.action == f"{ITI41}Response"
            assert reply.envelope.addressing.relates_to is not None
            assert reply.payload.get("status") == SUCCESS, etree.tostring(reply.payload)
            assert_valid(corpus, "rs.xsd", reply.payload)
            uid, data = nist_document(corpus, name, body)
            expected[uid] = data
        found = set()
        for patient in ("SR7^^^&1.2.260&ISO", "IDS-AD027-a^^^&1.3.6.1.4.1.21367.2005.13.20.1000&ISO"):
            reply = find_documents(client, base, patient)
            assert reply.action == f"{ITI18}Response"
            assert reply.payload.get("status") == SUCCESS, etree.tostring(reply.payload)
            assert_valid(corpus, "query.xsd", reply.payload)
            for eo in reply.payload.iter(f"{{{RIM}}}ExtrinsicObject"):
                uid = next(x.get("value") for x in eo.iter(f"{{{RIM}}}ExternalIdentifier")
                           if x.get("identificationScheme") == "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab")
                found.add(uid)
                repo = [v.text for s in eo.iter(f"{{{RIM}}}Slot") if s.get("name") == "repositoryUniqueId"
                        for v in s.iter(f"{{{RIM}}}Value")]
                assert repo == [DEFAULT_REPOSITORY_UNIQUE_ID]
        assert found == set(expected)
        body = retrieve_request(*((DEFAULT_REPOSITORY_UNIQUE_ID, uid) for uid in expected))
        r = client.post(f"{base}/xds/repository", content=body, headers={"content-type": "application/soap+xml"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/related")
        reply = parse(r)
        assert reply.payload.find(f"{{{RS}}}RegistryResponse").get("status") == SUCCESS
        got = {d.findtext(f"{{{XDS}}}DocumentUniqueId"): reply.content(d.find(f"{{{XDS}}}Document")).read_bytes()
               for d in reply.payload.iter(f"{{{XDS}}}DocumentResponse")}
        assert got == expected
        assert_valid(corpus, "XDS.b_DocumentRepository.xsd", inline_xop(reply.payload, reply.attachments))


def test_nist_flow_sqlite_faults_wsdl_zeep_audit(corpus: Path, tmp_path: Path) -> None:
    with xds_hub(tmp_path) as (hub, base):
        audits: list[Any] = []
        assert hub.services.get("audit") is not None  # loopback hubs run the Audit Record Repository
        hub.services["audit"] = hub.services["audit"].with_sinks(audits.append)
        nist_flow(corpus, base)
        keys = [m.event.type_codes[0].code for m in audits]
        assert keys.count("ITI-41") == 4 and keys.count("ITI-18") == 2 and keys.count("ITI-43") == 1
        assert {m.event.action for m in audits if m.event.type_codes[0].code == "ITI-43"} == {"R"}
        assert {m.event.action for m in audits if m.event.type_codes[0].code == "ITI-41"} == {"C"}
        _faults(corpus, base)
        _zeep_iti18(base)


def test_nist_flow_postgresql(corpus: Path, tmp_path: Path, pg_database: tuple[str, str]) -> None:
    with xds_hub(tmp_path, pg_database[1]) as (_, base):
        nist_flow(corpus, base)


def _fault_of(r: httpx.Response) -> tuple[str, str | None]:
    env = etree.fromstring(r.content)
    code = env.findtext(f".//{{{SOAP12_NS}}}Code/{{{SOAP12_NS}}}Value")
    sub = env.find(f".//{{{SOAP12_NS}}}Subcode/{{{SOAP12_NS}}}Value")
    return code or "", (etree.QName(sub.nsmap[sub.text.split(":")[0]], sub.text.split(":")[1]).text
                        if sub is not None else None)


def _faults(corpus: Path, base: str) -> None:
    soap = {"content-type": "application/soap+xml"}
    with httpx.Client(timeout=30) as client:
        r = client.post(f"{base}/xds/registry", content=retrieve_request(("1", "2")), headers=soap)
        assert r.status_code == 400 and _fault_of(r) == ("env:Sender", f"{{{WSA_NS}}}ActionNotSupported")
        xxe = (b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
               b'<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"><e:Body>&x;</e:Body></e:Envelope>')
        r = client.post(f"{base}/xds/repository", content=xxe, headers=soap)
        assert r.status_code == 400 and _fault_of(r)[0] == "env:Sender"
        assert b"root:" not in r.content  # nothing of /etc/passwd is echoed
        must = retrieve_request(("1", "2")).replace(b"<s:Header>", b'<s:Header><x:Sec xmlns:x="urn:x" '
                                                    b's:mustUnderstand="true"/>')
        r = client.post(f"{base}/xds/repository", content=must, headers=soap)
        assert r.status_code == 500 and _fault_of(r)[0] == "env:MustUnderstand"
        ctype, body = nist_request(corpus, "Xop")
        r = client.post(f"{base}/xds/repository", content=body, headers={"content-type": ctype.replace("MIMEB", "X")})
        assert r.status_code == 400 and b"boundary" in r.content
        missing = body.replace(b"cid:1.b5b57d", b"cid:9.b5b57d")
        r = client.post(f"{base}/xds/repository", content=missing, headers={"content-type": ctype})
        assert r.status_code == 400 and b"missing MIME part" in r.content
        soap11 = envelope(ITI18, adhoc("FindDocuments", {"$XDSDocumentEntryPatientId": q("SR7^^^&1.2.260&ISO"),
                                                         "$XDSDocumentEntryStatus": ql(APPROVED)}))
        soap11 = soap11.replace(SOAP12_NS.encode(), b"http://schemas.xmlsoap.org/soap/envelope/")
        r = client.post(f"{base}/xds/registry", content=soap11,
                        headers={"content-type": "text/xml; charset=utf-8", "SOAPAction": f'"{ITI18}"'})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/xml")
        reply = parse(r)
        assert reply.soap_ns == "http://schemas.xmlsoap.org/soap/envelope/" and reply.payload.get("status") == SUCCESS
        assert len(reply.payload.findall(f".//{{{RIM}}}ExtrinsicObject")) == 3
        r = client.post(f"{base}/xds/other", content=b"<x/>", headers=soap)
        assert r.status_code == 404
        for name in ("registry", "repository"):
            r = client.get(f"{base}/xds/{name}?wsdl")
            assert r.status_code == 200 and f"{base}/xds/{name}".encode() in r.content
        assert client.get(f"{base}/xds/registry").status_code == 404


def _zeep_iti18(base: str) -> None:
    import zeep
    from zeep.wsa import WsAddressingPlugin

    client = zeep.Client(f"{base}/xds/registry?wsdl", plugins=[WsAddressingPlugin()])
    result = client.service["DocumentRegistry_RegistryStoredQuery"](
        ResponseOption={"returnType": "ObjectRef", "returnComposedObjects": True},
        AdhocQuery={"id": QUERY_IDS["FindDocuments"], "Slot": [
            {"name": "$XDSDocumentEntryPatientId", "ValueList": {"Value": [q("SR7^^^&1.2.260&ISO")]}},
            {"name": "$XDSDocumentEntryStatus", "ValueList": {"Value": [ql(APPROVED)]}}]})
    assert result.status == SUCCESS
    [object_list] = result._value_1  # rim:RegistryObjectList (open content: raw lxml elements inside)
    refs = [el for el in object_list._value_1 if el.tag == f"{{{RIM}}}ObjectRef"]
    assert len(refs) == 3 and all(r.get("id", "").startswith("urn:uuid:") for r in refs)


@pytest.mark.parametrize("name", ["repository"])
def test_wsdl_is_zeep_loadable_offline(name: str, tmp_path: Path) -> None:
    """The repository WSDL (MTOM operations zeep cannot send) still loads: its operations are listed."""
    from importlib import resources

    import zeep

    text = resources.files("ihehub.xds").joinpath("wsdl", f"{name}.wsdl").read_text()
    path = tmp_path / f"{name}.wsdl"
    path.write_text(text.replace("{{LOCATION}}", "http://127.0.0.1:1/xds/repository"))
    ops = zeep.Client(str(path)).service._binding._operations
    assert set(ops) == {"DocumentRepository_ProvideAndRegisterDocumentSet-b", "DocumentRepository_RetrieveDocumentSet"}


def test_repository_with_an_external_registry(corpus: Path, tmp_path: Path) -> None:
    """actors.xds.registry_url: the repository registers (ITI-42 over SOAP) with another hub's registry."""
    from ihehub.bus import schema
    from ihehub.bus.db import make_engine
    from ihehub.soap import Limits
    from ihehub.xds.service import XdsService

    def provide(svc: XdsService, name: str) -> tuple[str, list[str], str]:
        ctype, body = nist_request(corpus, name)
        req = asyncio.run(read_request(ctype, chunked(body), limits=Limits(spool_dir=svc.spool_dir)))
        try:
            reply = svc.handle("repository", req)
        finally:
            req.discard()
        codes = [e.get("errorCode") or "" for e in reply.payload.iter(f"{{{RS}}}RegistryError")]
        context = " ".join(e.get("codeContext") or "" for e in reply.payload.iter(f"{{{RS}}}RegistryError"))
        return reply.status, codes, context

    engine = make_engine(f"sqlite:///{tmp_path / 'repo.db'}")
    schema.upgrade(engine)
    with xds_hub(tmp_path / "a") as (hub, base):
        svc = XdsService(engine, tmp_path / "repo", repository_unique_id="1.2.3.77",
                         registry_url=f"{base}/xds/registry")
        assert provide(svc, "Xop")[:2] == (SUCCESS, [])
        uid, data = nist_document(corpus, "Xop", nist_request(corpus, "Xop")[1])
        row = hub.services["xds"].registry.document(uid)
        assert row is not None and row.repository_unique_id == "1.2.3.77" and row.size == len(data)
        assert svc.registry.document(uid) is None and svc.store.get(uid) is not None
        wrong = XdsService(engine, tmp_path / "wrong", registry_url=f"{base}/xds/repository")
        status, codes, context = provide(wrong, "NoXop")
        assert (status, codes) == ("urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure",
                                   ["XDSRegistryNotAvailable"]) and "ActionNotSupported" not in context
        assert "does not support the action" in context
        assert not [p for p in wrong.store.docs.rglob("*") if p.is_file()]
    down = XdsService(engine, tmp_path / "down", registry_url=base + "/xds/registry")  # the hub has stopped
    assert provide(down, "encodedURL")[1] == ["XDSRegistryNotAvailable"]
    assert not [p for p in down.store.docs.rglob("*") if p.is_file()]
