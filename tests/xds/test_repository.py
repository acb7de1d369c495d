"""ITI-41 / ITI-43 at the service level (no HTTP): the NIST bodies on a real registry (SQLite), the
repository's IHE errors, clean-up when the registry refuses, partial success, large documents by rename."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from lxml import etree

from ihehub.bus import schema as bus_schema
from ihehub.bus.db import make_engine
from ihehub.soap import Limits, OutPart, build_envelope, mtom_stream, read_request
from ihehub.soap.transport import SoapRequest
from ihehub.xds.errors import FAILURE, PARTIAL_SUCCESS, SUCCESS
from ihehub.xds.service import DEFAULT_REPOSITORY_UNIQUE_ID, Reply, XdsService

from .repository_support import (
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

REPO = DEFAULT_REPOSITORY_UNIQUE_ID


@pytest.fixture
def service(tmp_path: Path) -> XdsService:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    bus_schema.upgrade(engine)
    return XdsService(engine, tmp_path / "data")


def soap(ctype: str, body: bytes, svc: XdsService, threshold: int = 1024 * 1024) -> SoapRequest:
    return asyncio.run(read_request(ctype, chunked(body), limits=Limits(memory_threshold=threshold,
                                                                         spool_dir=svc.spool_dir)))


def call(svc: XdsService, endpoint: str, ctype: str, body: bytes, threshold: int = 1024 * 1024) -> Reply:
    req = soap(ctype, body, svc, threshold)
    try:
        return svc.handle(endpoint, req)
    finally:
        req.discard()


def errors(reply: Reply) -> list[str]:
    return [e.get("errorCode") for e in reply.payload.iter(f"{{{RS}}}RegistryError")]


def retrieve(svc: XdsService, *docs: tuple[str, str]) -> tuple[Reply, SoapRequest]:
    """ITI-43, and its MTOM response read back through the SOAP layer."""
    reply = call(svc, "repository", "application/soap+xml", retrieve_request(*docs))
    ctype, chunks = mtom_stream(build_envelope(reply.payload), reply.parts)
    return reply, asyncio.run(read_request(ctype, chunked(b"".join(chunks))))


def stored_files(svc: XdsService) -> list[Path]:
    return [p for p in svc.store.docs.rglob("*") if p.is_file()]


@pytest.mark.parametrize("name", PNR)
def test_nist_provide_and_retrieve_byte_identical(corpus: Path, service: XdsService, name: str) -> None:
    ctype, body = nist_request(corpus, name)
    reply = call(service, "repository", ctype, body)
    assert (reply.status, errors(reply)) == (SUCCESS, [])
    assert_valid(corpus, "rs.xsd", reply.payload)
    uid, data = nist_document(corpus, name, body)
    row = service.registry.document(uid)
    assert row is not None and row.hash == hashlib.sha1(data).hexdigest() and row.size == len(data)
    assert row.repository_unique_id == REPO
    got, back = retrieve(service, (REPO, uid))
    assert got.status == SUCCESS and got.documents == [uid]
    resp = back.payload.find(f"{{{XDS}}}DocumentResponse")
    assert resp is not None and back.content(resp.find(f"{{{XDS}}}Document")).read_bytes() == data
    assert resp.findtext(f"{{{XDS}}}mimeType") == row.mime_type
    assert_valid(corpus, "XDS.b_DocumentRepository.xsd", inline_xop(back.payload, back.attachments))
    assert not list(service.spool_dir.iterdir())


def test_missing_document_and_missing_metadata(corpus: Path, service: XdsService) -> None:
    ctype, body = nist_request(corpus, "NoXop")
    start = body.index(b"<xdsb:Document")
    end = body.index(b"</xdsb:Document>") + len(b"</xdsb:Document>")
    reply = call(service, "repository", ctype, body[:start] + body[end:])
    assert reply.status == FAILURE and errors(reply) == ["XDSMissingDocument"]
    extra = body[start:end].replace(b'id="Document01"', b'id="Document02"')
    reply = call(service, "repository", ctype, body[:end] + extra + body[end:])
    assert reply.status == FAILURE and errors(reply) == ["XDSMissingDocumentMetadata"]
    assert not stored_files(service)


def _with_slot(body: bytes, name: str, value: str) -> bytes:
    slot = f'<rim:Slot name="{name}"><rim:ValueList><rim:Value>{value}</rim:Value></rim:ValueList></rim:Slot>'
    marker = b'mimeType="text/plain">'
    return body.replace(marker, marker + slot.encode(), 1)


def test_hash_size_repository_mismatch(corpus: Path, service: XdsService) -> None:
    ctype, body = nist_request(corpus, "Xop")
    _, data = nist_document(corpus, "Xop", body)
    for name, value in (("hash", "0" * 40), ("size", "7"), ("repositoryUniqueId", "1.2.3.4")):
        reply = call(service, "repository", ctype, _with_slot(body, name, value))
        assert reply.status == FAILURE and errors(reply) == ["XDSRepositoryMetadataError"], name
    assert not stored_files(service)
    good = _with_slot(_with_slot(body, "hash", hashlib.sha1(data).hexdigest().upper()), "size", str(len(data)))
    assert call(service, "repository", ctype, good).status == SUCCESS


def test_registry_refusal_removes_the_bytes(corpus: Path, tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    bus_schema.upgrade(engine)
    svc = XdsService(engine, tmp_path / "data", patient_known=lambda cx: False)
    ctype, body = nist_request(corpus, "Xop")
    reply = call(svc, "repository", ctype, body)
    assert reply.status == FAILURE and "XDSUnknownPatientId" in errors(reply)
    assert not stored_files(svc) and not list(svc.spool_dir.iterdir())
    uid, _ = nist_document(corpus, "Xop", body)
    got, _ = retrieve(svc, (REPO, uid))
    assert got.status == FAILURE and errors(got) == ["XDSDocumentUniqueIdError"]


def test_retrieve_partial_success_and_errors(corpus: Path, service: XdsService) -> None:
    ctype, body = nist_request(corpus, "dicom")
    assert call(service, "repository", ctype, body).status == SUCCESS
    uid, data = nist_document(corpus, "dicom", body)
    got, back = retrieve(service, (REPO, uid), (REPO, "1.2.3.999"), ("1.9.9", uid))
    assert got.status == PARTIAL_SUCCESS
    assert errors(got) == ["XDSDocumentUniqueIdError", "XDSUnknownRepositoryId"]
    assert_valid(corpus, "XDS.b_DocumentRepository.xsd", inline_xop(back.payload, back.attachments))
    [resp] = back.payload.findall(f"{{{XDS}}}DocumentResponse")
    assert resp.findtext(f"{{{XDS}}}mimeType") == "application/dicom"
    assert back.content(resp.find(f"{{{XDS}}}Document")).read_bytes() == data
    got, _ = retrieve(service, ("1.9.9", uid))
    assert got.status == FAILURE and errors(got) == ["XDSUnknownRepositoryId"]


def test_large_document_is_moved_not_copied(corpus: Path, service: XdsService) -> None:
    ctype, body = nist_request(corpus, "Xop")
    uid, _ = nist_document(corpus, "Xop", body)
    big = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32)  # 3 MiB
    env_start = body.index(b"<?xml")
    env_end = body.index(b"</soapenv:Envelope>") + len(b"</soapenv:Envelope>")
    envelope = body[env_start:env_end].replace(b"1.b5b57d7287e4fa4b528a8f050c41f8ad829c20332f23b48d@apache.org",
                                               b"big%40doc")
    ctype, chunks = mtom_stream(envelope, [OutPart("big@doc", "text/plain", big)])
    req = soap(ctype, b"".join(chunks), service, threshold=256 * 1024)
    spilled = req.attachments["big@doc"].path
    assert spilled is not None and spilled.parent == service.spool_dir
    inode = spilled.stat().st_ino
    reply = service.handle("repository", req)
    req.discard()
    assert reply.status == SUCCESS, errors(reply)
    doc = service.store.get(uid)
    assert doc is not None and doc.path.stat().st_ino == inode and doc.size == len(big)
    assert not list(service.spool_dir.iterdir())


def test_unknown_action_faults(service: XdsService) -> None:
    from ihehub.soap import SoapFault

    req = soap("application/soap+xml", retrieve_request((REPO, "1")), service)
    with pytest.raises(SoapFault) as err:
        service.handle("registry", req)
    assert err.value.subcode is not None and err.value.subcode[1] == "ActionNotSupported"
    assert etree.QName(req.payload).localname == "RetrieveDocumentSetRequest"
