"""Helpers of the repository and endpoint tests: the NIST ITI-41 bodies, ITI-43 requests, schema validation."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path

from lxml import etree

from ihehub.soap.mtom import XOP_INCLUDE, Attachment

PNR = ("Xop", "NoXop", "dicom", "encodedURL")
XDS = "urn:ihe:iti:xds-b:2007"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
ITI41 = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
ITI43 = "urn:ihe:iti:2007:RetrieveDocumentSet"


def nist_request(corpus: Path, name: str) -> tuple[str, bytes]:
    """(Content-Type, body) of a NIST toolkit sample ITI-41 request (corpus/nist/pnr/<name>)."""
    plan = (corpus / "nist" / "pnr" / name / "testplan.xml").read_text()
    m = re.search(r"Content-Type:\s*(.+)", plan)
    assert m is not None
    return m.group(1).strip(), (corpus / "nist" / "pnr" / name / "body.txt").read_bytes()


def nist_document(corpus: Path, name: str, body: bytes) -> tuple[str, bytes]:
    """(uniqueId, bytes) of the one document in a NIST body, read independently of the code under test."""
    uid = re.search(rb'value="([^"]+)"[^>]*?2e82c1f6-a085-4c72-9da3-8640a32e42ab"', body, re.S) or \
        re.search(rb'2e82c1f6-a085-4c72-9da3-8640a32e42ab"[^>]*?value="([^"]+)"', body, re.S)
    assert uid is not None
    if name in ("Xop", "encodedURL"):
        data = (corpus / "nist" / "pnr" / name / "my_document.txt").read_bytes()
    else:
        m = re.search(rb"<(?:\w+:)?Document id=\"[^\"]+\"\s*>([^<]+)</", body)
        assert m is not None
        data = base64.b64decode(m.group(1))
    return uid.group(1).decode(), data


def retrieve_request(*docs: tuple[str, str]) -> bytes:
    """An ITI-43 SOAP 1.2 envelope asking for (repositoryUniqueId, documentUniqueId) pairs."""
    reqs = "".join(f"<x:DocumentRequest><x:RepositoryUniqueId>{r}</x:RepositoryUniqueId>"
                   f"<x:DocumentUniqueId>{d}</x:DocumentUniqueId></x:DocumentRequest>" for r, d in docs)
    return (f'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
            f'xmlns:a="http://www.w3.org/2005/08/addressing"><s:Header><a:Action s:mustUnderstand="1">{ITI43}'
            f"</a:Action><a:MessageID>urn:uuid:5e1f0000-0000-4000-8000-000000000043</a:MessageID></s:Header>"
            f'<s:Body><x:RetrieveDocumentSetRequest xmlns:x="{XDS}">{reqs}</x:RetrieveDocumentSetRequest>'
            "</s:Body></s:Envelope>").encode()


async def chunked(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@cache
def schema(corpus: Path, name: str) -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(corpus / "nist" / "schema" / name)))


def inline_xop(payload: etree._Element, attachments: dict[str, Attachment]) -> etree._Element:
    """A copy of ``payload`` with each xop:Include replaced by the base64 of its part (MTOM: validate
    the SOAP body after inlining)."""
    out = etree.fromstring(etree.tostring(payload))
    for inc in list(out.iter(XOP_INCLUDE)):
        parent = inc.getparent()
        assert parent is not None
        cid = inc.get("href", "")[4:]
        parent.remove(inc)
        parent.text = base64.b64encode(attachments[cid].read_bytes()).decode()
    return out


def assert_valid(corpus: Path, xsd: str, element: etree._Element) -> None:
    s = schema(corpus, xsd)
    assert s.validate(element), str(s.error_log)
