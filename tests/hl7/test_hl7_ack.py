"""build_ack / read_ack: HL7 v2.5 §2.9.2 original-mode ACK, ERR per version (v2.5 §2.15.5, v2.3.1 §2.24.5)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ihehub.hl7 import Header, HL7Error, build_ack, build_nak_without_header, parse_header, read_ack

CORPUS = (Path(__file__).parents[2] / "../shared/corpus/ipf/hl7v2").resolve()
TS = re.compile(rb"\|\d{14}[+-]\d{4}\|")


def masked(ack: bytes) -> bytes:
    """The ACK with MSH-7 (now) replaced by a fixed value."""
    return TS.sub(b"|<NOW>|", ack, count=1)


def header_of(name: str, default_charset: str = "ascii") -> Header:
    return parse_header((CORPUS / name).read_bytes(), default_charset)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.hl7")), ids=lambda p: p.name)
def test_every_corpus_message_gets_an_ack_echoing_msh10(path: Path) -> None:
    try:
        header = parse_header(path.read_bytes())
    except HL7Error as err:
        assert err.header is not None
        header = err.header
    ack = build_ack(header, "AA")
    info = read_ack(ack)
    assert (info.code, info.control_id) == ("AA", header.control_id)
    assert info.header.version == header.version
    assert info.header.message_code == f"ACK^{header.trigger}"


def test_golden_aa_v25() -> None:
    header = header_of("camel-iti-10.hl7")
    ack = build_ack(header, "AA", control_id="ACK1")
    assert masked(ack) == (
        b"MSH|^~\\&|System1App|System1Fac|ICW_MPI|ICW|<NOW>||ACK^A31^ACK|ACK1|P|2.5\r"
        b"MSA|AA|205632\r"
    )


def test_golden_ae_v25_with_err() -> None:
    header = header_of("pixupdatenotification-adt-a31-1.hl7")
    ack = build_ack(header, "AE", text="PID-3 | has ^ no & domain", error_code="204",
                    error_location="PID^1^3", control_id="ACK2", sending_app="HUB", sending_facility="CENTRE")
    assert masked(ack) == (
        b"MSH|^~\\&|HUB|CENTRE|OTHER_ICW|ICW|<NOW>||ACK^A31^ACK|ACK2|P^T|2.5\r"
        b"MSA|AE|207597|PID-3 \\F\\ has \\S\\ no \\T\\ domain\r"
        # ERR-2 location, ERR-3 code^text^HL70357, ERR-4 severity, ERR-7 diagnostic text
        b"ERR||PID^1^3|204^Unknown key identifier^HL70357|E|||PID-3 \\F\\ has \\S\\ no \\T\\ domain\r"
    )


def test_golden_ae_v231_uses_eld_in_err1() -> None:
    header = header_of("pixsource-A01.hl7")
    ack = build_ack(header, "AE", text="unknown MSH-18", error_code="103", error_location="MSH^1^18",
                    control_id="ACK3")
    assert masked(ack) == (
        b"MSH|^~\\&|PIXV3FeedTransformer|PIXV3FeedTransformer|ICW_MPI|ICW|<NOW>||ACK^A01^ACK|ACK3|P^T|2.3.1\r"
        b"MSA|AE|371601|unknown MSH-18\r"
        # ERR-1 ELD: segment^sequence^field^code&text&HL70357 (v2.3.1 has no ERR-2..)
        b"ERR|MSH^1^18^103&Table value not found&HL70357\r"
    )


def test_ar_defaults_to_207_and_v22_has_no_message_structure() -> None:
    raw = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|X1|P|2.2\rEVN|A01\r"
    ack = build_ack(parse_header(raw), "AR", control_id="K")
    lines = masked(ack).split(b"\r")
    assert lines[0] == b"MSH|^~\\&|C|D|A|B|<NOW>||ACK^A01|K|P|2.2"
    assert lines[2] == b"ERR|^^^207&Application internal error&HL70357"


def test_ack_keeps_the_message_charset() -> None:
    raw = (
        "MSH|^~\\&|HIS|医院|HUB|中心|20240101||ADT^A01^ADT_A01|C1|P|2.5|||||CHN|GB 18030-2000\r"
        "PID|1||1^^^H||张^三\r"
    ).encode("gb18030")
    ack = build_ack(parse_header(raw), "AE", text="患者 张三 未找到", error_code="204")
    text = ack.decode("gb18030")
    assert text.split("\r")[0].endswith("|2.5||||||GB 18030-2000")
    assert "|HUB|中心|HIS|医院|" in text
    assert "MSA|AE|C1|患者 张三 未找到" in text
    info = read_ack(ack)
    assert info.header.charset == "gb18030" and info.text == "患者 张三 未找到" and info.error_code == "204"


def test_ack_to_an_ascii_message_replaces_what_ascii_cannot_carry() -> None:
    ack = build_ack(header_of("camel-iti-10.hl7"), "AE", text="名字 bad")
    assert b"MSA|AE|205632|?? bad" in ack


def test_nak_without_header() -> None:
    nak = build_nak_without_header("AE", "no MSH segment", "100")
    assert masked(nak).split(b"\r")[1:] == [
        b"MSA|AE||no MSH segment",
        b"ERR|||100^Segment sequence error^HL70357|E|||no MSH segment",
        b"",
    ]
    assert masked(nak).startswith(b"MSH|^~\\&|||||<NOW>||ACK|")
    info = read_ack(nak)
    assert (info.code, info.control_id, info.error_code) == ("AE", "", "100")


def test_read_ack_of_a_v25_ar_from_the_corpus() -> None:
    info = read_ack((CORPUS / "pixquery-err-2_Response.hl7").read_bytes())
    assert (info.code, info.control_id, info.error_code) == ("AR", "10501108", "204")
    assert info.text.startswith("Unable to resolve requested domains in QPD-4: ^^^NONEXISTING")
    assert not info.accepted


def test_read_ack_of_an_rsp() -> None:
    info = read_ack((CORPUS / "pdq-PDQ_Response.hl7").read_bytes())
    assert info.accepted and info.control_id == "1305506295" and info.error_code is None


def test_read_ack_of_v231_err() -> None:
    ack = build_ack(header_of("pixsource-A01.hl7"), "AE", error_code="103", error_location="MSH^1^18")
    info = read_ack(ack)
    assert (info.error_code, info.text) == ("103", "Table value not found")


def test_read_ack_without_msa() -> None:
    with pytest.raises(HL7Error) as info:
        read_ack((CORPUS / "camel-iti-10.hl7").read_bytes())
    assert info.value.code == "101" and "MSA" in info.value.message


@pytest.mark.parametrize(("code", "severity"), [("XX", "E"), ("AA", "Q")])
def test_build_ack_refuses_bad_codes(code: str, severity: str) -> None:
    with pytest.raises(ValueError):
        build_ack(header_of("camel-iti-10.hl7"), code, severity=severity)


def test_control_ids_are_fresh() -> None:
    header = header_of("camel-iti-10.hl7")
    ids = {read_ack(build_ack(header, "AA")).header.control_id for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 20 for i in ids)
