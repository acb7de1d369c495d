"""The SOAP layer: safe parsing, envelopes, WS-Addressing, faults and MTOM/XOP on the NIST bodies and broken ones."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from lxml import etree

from ihehub.soap import SOAP11_NS, SOAP12_NS, WSA_NS, Limits, OutPart, SoapFault, read_request, reply_action
from ihehub.soap.envelope import build_envelope, fault_envelope, parse_envelope
from ihehub.soap.mtom import Attachment, content_id, mtom_stream
from ihehub.soap.xmlsafe import XmlRefused, parse_xml

PNR = ("Xop", "NoXop", "dicom", "encodedURL")
XDS = "urn:ihe:iti:xds-b:2007"


def nist_request(corpus: Path, name: str) -> tuple[str, bytes]:
    """(Content-Type, body) of a NIST toolkit sample ITI-41 request."""
    plan = (corpus / "nist" / "pnr" / name / "testplan.xml").read_text()
    m = re.search(r"Content-Type:\s*(.+)", plan)
    assert m is not None
    return m.group(1).strip(), (corpus / "nist" / "pnr" / name / "body.txt").read_bytes()


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def read(ctype: str, data: bytes, size: int = 65536, **kw: object) -> object:
    return asyncio.run(read_request(ctype, chunked(data, size), **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", [1, 7, 65536])
@pytest.mark.parametrize("name", PNR)
def test_every_nist_pnr_body_parses(corpus: Path, name: str, chunk: int) -> None:
    ctype, body = nist_request(corpus, name)
    req = read(ctype, body, chunk)
    assert req.mtom and req.action == "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"  # type: ignore[attr-defined]
    assert req.soap_ns == SOAP12_NS  # type: ignore[attr-defined]
    docs = req.payload.findall(f"{{{XDS}}}Document")  # type: ignore[attr-defined]
    assert len(docs) == 1
    att = req.content(docs[0])  # type: ignore[attr-defined]
    data = att.read_bytes()
    assert att.size == len(data) and att.sha1 == hashlib.sha1(data).hexdigest()
    if name in ("Xop", "encodedURL"):
        assert data == (corpus / "nist" / "pnr" / name / "my_document.txt").read_bytes()
    elif name == "NoXop":
        assert data == b"This is my document.\r\n\r\nIt is great!\r\n"
    else:
        assert data[128:132] == b"DICM"


def test_nist_addressing_headers(corpus: Path) -> None:
    ctype, body = nist_request(corpus, "dicom")
    env = read(ctype, body).envelope  # type: ignore[attr-defined]
    assert env.addressing.message_id == "urn:uuid:2d79d030-91c0-4533-b011-92bdaa03c433"
    assert env.addressing.reply_to == "http://www.w3.org/2005/08/addressing/anonymous"
    assert env.addressing.to.endswith("/rep/prb")
    assert reply_action(env.addressing.action) == "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-bResponse"


def test_crlf_body_and_large_attachment_spill_to_disk(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 8192 + b"\r\n--almost-a-boundary\r\n"  # 2 MiB, binary, CR/LF inside
    env = build_envelope(etree.fromstring(
        f'<x:Doc xmlns:x="{XDS}"><xop:Include xmlns:xop="http://www.w3.org/2004/08/xop/include" '
        'href="cid:doc%401"/></x:Doc>'.encode()), action="urn:test")
    ctype, chunks = mtom_stream(env, [OutPart("doc@1", "application/octet-stream", payload)])
    body = b"".join(chunks)
    req = read(ctype, body, 10_000, limits=Limits(memory_threshold=64 * 1024, spool_dir=tmp_path))
    att = req.content(req.payload)  # type: ignore[attr-defined]
    assert att.path is not None and att.path.parent == tmp_path and att.data is None
    assert att.read_bytes() == payload and att.sha1 == hashlib.sha1(payload).hexdigest()
    req.discard()  # type: ignore[attr-defined]
    assert not list(tmp_path.iterdir())


def test_attachment_from_path_streams_in_response(tmp_path: Path) -> None:
    f = tmp_path / "doc.bin"
    f.write_bytes(b"x" * 1000)
    env = build_envelope(etree.fromstring(b'<a xmlns:xop="http://www.w3.org/2004/08/xop/include">'
                                          b'<xop:Include href="cid:a"/></a>'))
    ctype, chunks = mtom_stream(env, [OutPart("a", "text/plain", f),
                                      OutPart("b", "text/plain", Attachment.from_bytes(b"yy"))])
    req = read(ctype, b"".join(chunks))
    assert req.content(req.payload).read_bytes() == b"x" * 1000  # type: ignore[attr-defined]
    assert req.attachments["b"].read_bytes() == b"yy"  # type: ignore[attr-defined]


XXE = (b'<?xml version="1.0"?>\n<!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       b'<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"><e:Body><a>&x;</a></e:Body></e:Envelope>')
LAUGHS = (b'<?xml version="1.0"?><!-- lol --><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + b"".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">'.encode() for i in range(1, 10))
          .replace(b"&lol0;", b"&lol;")
          + b']><e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"><e:Body><a>&lol9;</a></e:Body>'
          b"</e:Envelope>")


@pytest.mark.parametrize("data", [XXE, LAUGHS, XXE.decode().encode("utf-16")], ids=["xxe", "laughs", "utf16"])
def test_dtd_refused(data: bytes) -> None:
    with pytest.raises(XmlRefused, match="DTD"):
        parse_xml(data)
    with pytest.raises(SoapFault) as err:
        read("application/soap+xml", data)
    assert err.value.code == "Sender" and err.value.http_status == 400


def test_size_limit_and_not_well_formed() -> None:
    with pytest.raises(SoapFault, match="limit"):
        read("application/soap+xml", b"<a>" + b"x" * 5000 + b"</a>", limits=Limits(max_xml=1000))
    with pytest.raises(SoapFault, match="well-formed"):
        read("application/soap+xml", b"<a><b></a>")
    with pytest.raises(SoapFault, match="Content-Type"):
        read("application/json", b"{}")


def _envelope(headers: str = "", body: str = "<p:Ping xmlns:p='urn:p'/>", ns: str = SOAP12_NS) -> bytes:
    return (f'<env:Envelope xmlns:env="{ns}" xmlns:wsa="{WSA_NS}"><env:Header>{headers}</env:Header>'
            f"<env:Body>{body}</env:Body></env:Envelope>").encode()


def test_must_understand() -> None:
    hdr = '<x:Sec xmlns:x="urn:sec" env:mustUnderstand="{}"/><wsa:Action env:mustUnderstand="true">urn:a</wsa:Action>'
    for value in ("1", "true"):
        with pytest.raises(SoapFault) as err:
            read("application/soap+xml", _envelope(hdr.format(value)))
        assert err.value.code == "MustUnderstand"
        out = etree.fromstring(fault_envelope(err.value))
        assert out.find(f".//{{{SOAP12_NS}}}NotUnderstood").get("qname") == "nu:Sec"
    req = read("application/soap+xml", _envelope(hdr.format("false")))
    assert req.action == "urn:a"  # type: ignore[attr-defined]
    req = read("application/soap+xml", _envelope(hdr.format("1")), understood=["{urn:sec}Sec"])
    assert req.action == "urn:a"  # type: ignore[attr-defined]


def test_soap11_and_version_checks() -> None:
    req = read("text/xml", _envelope(ns=SOAP11_NS), soap_action='"urn:x"')
    assert req.soap_ns == SOAP11_NS and req.action == "urn:x"  # type: ignore[attr-defined]
    with pytest.raises(SoapFault) as err:
        read("application/soap+xml", _envelope(ns=SOAP11_NS))
    assert err.value.code == "VersionMismatch"
    with pytest.raises(SoapFault):
        parse_envelope(etree.fromstring(b"<Envelope/>"))
    with pytest.raises(SoapFault, match="no Body"):
        read("application/soap+xml", _envelope(body=""))


def test_fault_envelopes() -> None:
    fault = SoapFault("Sender", "no such action", subcode=(WSA_NS, "ActionNotSupported"))
    env = etree.fromstring(fault_envelope(fault, relates_to="urn:uuid:1"))
    parsed = parse_envelope(env)
    assert parsed.addressing.action == "http://www.w3.org/2005/08/addressing/fault"
    assert parsed.addressing.relates_to == "urn:uuid:1"
    value = parsed.body.find(f"{{{SOAP12_NS}}}Code/{{{SOAP12_NS}}}Subcode/{{{SOAP12_NS}}}Value")
    prefix, local = value.text.split(":")
    assert local == "ActionNotSupported" and value.nsmap[prefix] == WSA_NS
    assert parsed.body.findtext(f"{{{SOAP12_NS}}}Reason/{{{SOAP12_NS}}}Text") == "no such action"
    assert SoapFault("Receiver", "x").http_status == 500
    env11 = etree.fromstring(fault_envelope(SoapFault("Sender", "bad"), soap_ns=SOAP11_NS))
    assert env11.findtext(f".//{{{SOAP11_NS}}}Fault/faultcode") == "env:Client"


def _mtom(parts: Iterable[tuple[str, bytes]], boundary: str = "B0UND", root_cid: str = "<root@x>",
          close: bool = True, href: str = "cid:doc%40x") -> bytes:
    env = _envelope(body=f'<d xmlns:xop="http://www.w3.org/2004/08/xop/include"><xop:Include href="{href}"/></d>')
    out = [f"--{boundary}\r\nContent-Type: application/xop+xml; type=\"application/soap+xml\"\r\n"
           f"Content-ID: {root_cid}\r\n\r\n".encode() + env]
    out += [f"\r\n--{boundary}\r\nContent-ID: {cid}\r\n\r\n".encode() + data for cid, data in parts]
    return b"".join(out) + (f"\r\n--{boundary}--\r\n".encode() if close else b"")


CT = 'multipart/related; boundary="B0UND"; type="application/xop+xml"; start="<root@x>"'


def test_mtom_broken_bodies(tmp_path: Path) -> None:
    lim = Limits(memory_threshold=10, spool_dir=tmp_path)
    ok = read(CT, _mtom([("doc@x", b"hello world, spilled")]), 3, limits=lim)
    assert ok.content(ok.payload).read_bytes() == b"hello world, spilled"  # type: ignore[attr-defined]
    ok.discard()  # type: ignore[attr-defined]
    bad = {
        "boundary": (CT.replace("B0UND", "OTHER"), _mtom([("doc@x", b"x")])),
        "no boundary param": ('multipart/related; type="application/xop+xml"', _mtom([("doc@x", b"x")])),
        "closing": (CT, _mtom([("<doc@x>", b"y" * 100)], close=False)),
        "missing cid": (CT, _mtom([("<other@x>", b"x")])),
        "start": (CT.replace("root@x", "nope@x"), _mtom([("doc@x", b"x")])),
        "href": (CT, _mtom([("doc@x", b"x")], href="http://evil/x")),
    }
    for name, (ctype, body) in bad.items():
        with pytest.raises(SoapFault) as err:
            req = read(ctype, body, 5, limits=lim)
            req.content(req.payload)  # type: ignore[attr-defined]
        assert err.value.code == "Sender", name
    assert not list(tmp_path.iterdir())  # spilled parts of failed requests are gone


def test_inline_base64_invalid() -> None:
    req = read("application/soap+xml", _envelope(body=f'<x:Document xmlns:x="{XDS}">@@not base64@@</x:Document>'))
    with pytest.raises(SoapFault, match="base64"):
        req.content(req.payload)  # type: ignore[attr-defined]
    req = read("application/soap+xml", _envelope(
        body=f'<x:Document xmlns:x="{XDS}">{base64.b64encode(b"abc").decode()}</x:Document>'))
    assert req.content(req.payload).read_bytes() == b"abc"  # type: ignore[attr-defined]


def test_content_id_forms() -> None:
    assert content_id("<a@b>") == content_id("cid:a%40b") == content_id(" a@b ") == "a@b"
    assert content_id("cid:fdf-1@urn%3Aihe%3Aiti%3Axds-b%3A2007") == "fdf-1@urn:ihe:iti:xds-b:2007"
