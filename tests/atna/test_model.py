"""The audit message model: every public sample parses, validates against the DICOM schema and survives a
round trip; lenient reading of older spellings; the XML parser refuses DTDs and entities (XXE)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ihehub.atna import AuditMessage, AuditXMLError, Validator, parse_xml
from ihehub.atna.model import format_datetime, parse_datetime


def samples(corpus: Path) -> list[Path]:
    found = sorted((corpus / "ipf" / "audit").glob("*.xml"))
    assert len(found) >= 18, f"expected the IPF audit samples in {corpus}"
    return found


def test_every_ipf_sample_parses_and_is_schema_valid(corpus: Path, xsd: Path) -> None:
    schema_only = Validator(xsd)
    for path in samples(corpus):
        data = path.read_bytes()
        result = schema_only.validate(data)
        assert result.valid, f"{path.name}: {result.errors}"
        msg = AuditMessage.from_xml(data)
        assert msg.event.event_id.code.startswith("110"), path.name
        assert msg.participants, path.name
        assert msg.source.source_id, path.name


def test_round_trip_keeps_everything(corpus: Path, xsd: Path) -> None:
    schema_only = Validator(xsd)
    for path in samples(corpus):
        msg = AuditMessage.from_xml(path.read_bytes())
        xml = msg.to_xml()
        assert schema_only.validate(xml).valid, path.name
        assert AuditMessage.from_xml(xml) == msg, path.name


def test_fields_of_a_pix_query(corpus: Path) -> None:
    msg = AuditMessage.from_xml((corpus / "ipf/audit/pixquery.xml").read_bytes())
    assert msg.event.event_id.code == "110112"
    assert msg.event.action == "E"
    assert msg.event_type == "ITI-9"
    assert msg.event.date_time == dt.datetime(2020, 3, 19, 12, 34, 6, 367000, tzinfo=dt.UTC)
    assert msg.patient_ids() == [
        "27^^^MPI&2.16.840.1.113883.3.37.4.1.1.2.1.1&ISO^PI",
        "78106^^^PKLN&2.16.840.1.113883.3.37.4.1.1.2.511.1&ISO",
    ]
    query = next(o for o in msg.objects if o.role == 24)
    assert query.query is not None and query.query.startswith(b"MSH|^~\\&|MESA_PIX_CLIENT")
    assert query.details[0].type == "MSH-10" and query.details[0].value == b"10501108"
    assert msg.user_ids() == ["MESA_DEPARTMENT|MESA_PIX_CLIENT", "XYZ_HOSPITAL|MESA_XREF"]


def test_rfc3881_spelling_and_namespaces_are_read(corpus: Path) -> None:
    raw = (corpus / "wustl/syslog-sender-messages/msg2.txt").read_bytes()
    xml = raw[raw.index(b"<?xml"):]
    msg = AuditMessage.from_xml(xml)  # default namespace of another vendor, code= / displayName=
    assert msg.event.event_id.code == "110100"
    assert msg.event.event_id.text == "Application Activity"
    assert msg.event_type == "110120"
    assert [p.user_id for p in msg.participants] == ["System Services", "AcuoRepository.exe"]
    assert msg.source.source_id == "XDS Service"


@pytest.mark.parametrize("doc", [
    b'<?xml version="1.0"?><!DOCTYPE AuditMessage [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    b"<AuditMessage>&xxe;</AuditMessage>",
    b'<!DOCTYPE a [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><a>&b;</a>',
    b'<?xml version="1.0"?><!DOCTYPE AuditMessage SYSTEM "http://example.invalid/x.dtd"><AuditMessage/>',
    b'<?xml version="1.0" encoding="UTF-16"?>',
])
def test_dtds_and_entities_are_refused(doc: bytes) -> None:
    with pytest.raises(AuditXMLError):
        parse_xml(doc)


def test_a_dtd_hidden_in_utf16_is_refused_too() -> None:
    doc = '<!DOCTYPE x [<!ENTITY e "boom">]><AuditMessage>&e;</AuditMessage>'.encode("utf-16")
    with pytest.raises(AuditXMLError, match=r"DTD|not well-formed"):
        parse_xml(doc)


@pytest.mark.parametrize("doc, why", [
    (b"", "empty|not well-formed"),
    (b"not xml at all", "not well-formed"),
    (b"<AuditMessage><EventIdentification>", "not well-formed"),
    (b"<Other/>", "not <AuditMessage>"),
    (b"<AuditMessage/>", "no EventIdentification"),
    (b"<AuditMessage><EventIdentification/></AuditMessage>", "no EventID"),
])
def test_unusable_documents_get_a_clear_error(doc: bytes, why: str) -> None:
    with pytest.raises(AuditXMLError, match=why):
        AuditMessage.from_xml(doc)


def test_bom_before_the_xml_is_fine() -> None:
    root = parse_xml(b"\xef\xbb\xbf<?xml version='1.0' encoding='UTF-8'?><AuditMessage/>")
    assert root.tag == "AuditMessage"


@pytest.mark.parametrize("text, expected", [
    ("2020-03-19T12:24:34.434Z", dt.datetime(2020, 3, 19, 12, 24, 34, 434000, tzinfo=dt.UTC)),
    ("2011-11-09T16:19:26.5666236-06:00",
     dt.datetime(2011, 11, 9, 16, 19, 26, 566623, tzinfo=dt.timezone(dt.timedelta(hours=-6)))),
    ("2010-12-17T15:12:04", dt.datetime(2010, 12, 17, 15, 12, 4, tzinfo=dt.UTC)),
    ("${timeStamp}", None),
    ("", None),
])
def test_event_date_time(text: str, expected: dt.datetime | None) -> None:
    assert parse_datetime(text) == expected


def test_format_datetime_is_utc_with_milliseconds() -> None:
    value = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    assert format_datetime(value) == "2026-01-01T19:04:05.678Z"
