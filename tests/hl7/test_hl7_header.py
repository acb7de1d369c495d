"""parse_header: MSH located and MSH-18 read from the raw bytes, then decoded (HL7 v2.5 §2.15.9)."""

from __future__ import annotations

from pathlib import Path

import hl7
import pytest

from ihehub.hl7 import (
    CHARSETS,
    HL7Error,
    MessageTypeFilter,
    default_codec,
    escape,
    known_message_code,
    parse_header,
    parse_message,
    python_codec,
    unescape,
)

CORPUS = (Path(__file__).parents[2] / "../shared/corpus/ipf/hl7v2").resolve()


def msh(
    msh18: str = "",
    *,
    control_id: str = "MSG001",
    version: str = "2.5",
    msg_type: str = "ADT^A01^ADT_A01",
    facility: str = "HOSP",
) -> str:
    return (
        f"MSH|^~\\&|HIS|{facility}|HUB|CENTRE|20240102030405||{msg_type}|{control_id}|P|{version}"
        f"|||||CHN|{msh18}"
    )


def adt(msh18: str = "", name: str = "DOE^JOHN", **kw: str) -> str:
    return f"{msh(msh18, **kw)}\rEVN|A01|20240102030405\rPID|1||12345^^^HOSP^MR||{name}||19800101|M\r"


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.hl7"))


def test_corpus_is_there() -> None:
    assert len(corpus_files()) >= 30, CORPUS


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_every_corpus_message_has_a_readable_header(path: Path) -> None:
    raw = path.read_bytes()
    try:
        header = parse_header(raw)
    except HL7Error as err:  # the Latin-1 fixture without MSH-18 on an ASCII channel
        assert err.code == "102" and err.header is not None
        header = err.header
    first = raw.split(b"\r")[0].decode("latin-1").split("|")
    assert header.control_id == first[9]
    assert header.message_type == first[8].split("^")[0]
    assert header.version == first[11].split("^")[0]
    assert "\n" not in header.text


def test_fields_of_a_known_message() -> None:
    header = parse_header((CORPUS / "camel-iti-10.hl7").read_bytes())
    assert (header.sending_app, header.sending_facility) == ("ICW_MPI", "ICW")
    assert (header.receiving_app, header.receiving_facility) == ("System1App", "System1Fac")
    assert (header.message_type, header.trigger, header.structure) == ("ADT", "A31", "ADT_A05")
    assert header.message_code == "ADT^A31"
    assert (header.control_id, header.processing_id, header.version) == ("205632", "P", "2.5")
    assert header.datetime == "20071024113127"
    assert (header.field_sep, header.encoding_chars, header.charset, header.charset_field) == (
        "|",
        "^~\\&",
        "ascii",
        "",
    )
    assert header.segments()[1].startswith("EVN|A31")


def test_latin1_fixture_needs_its_charset() -> None:
    raw = (CORPUS / "mllp-iti8-a40-iso-8859-1.hl7").read_bytes()
    with pytest.raises(HL7Error) as info:
        parse_header(raw)
    assert info.value.code == "102" and info.value.location == "MSH^1^18"
    assert "offset 30" in info.value.message and "default charset" in info.value.message
    assert info.value.header is not None
    assert info.value.header.control_id == "_mpi_1dd16f73-c85c-4540-857d-8b922f1732de"
    header = parse_header(raw, default_charset="8859/1")
    assert header.charset == "iso-8859-1"
    assert header.receiving_app == "BLÄH"


def test_gb18030_message_decodes_hanzi() -> None:
    raw = adt("GB 18030-2000", name="张^三").encode("gb18030")
    header = parse_header(raw)
    assert header.charset == "gb18030" and header.charset_field == "GB 18030-2000"
    assert "PID|1||12345^^^HOSP^MR||张^三|" in header.text


def test_utf8_message_decodes_hanzi() -> None:
    raw = adt("UNICODE UTF-8", name="李^四").encode("utf-8")
    header = parse_header(raw)
    assert header.charset == "utf-8"
    assert "||李^四|" in header.text


def test_channel_default_applies_when_msh18_is_empty() -> None:
    raw = adt("", name="王^五").encode("gb18030")
    assert parse_header(raw, default_charset="GB18030").text.count("王^五") == 1
    with pytest.raises(HL7Error) as info:
        parse_header(raw)
    assert info.value.code == "102"


def test_delimiter_trail_byte_before_msh18() -> None:
    # "亅" is 0x81 0x7C in GBK/GB18030: its trail byte is '|', which splits MSH-4 in the raw bytes.
    assert "亅".encode("gb18030")[1:] == b"|"
    raw = adt("GB 18030-2000", facility="亅医院", name="张^三").encode("gb18030")
    header = parse_header(raw)
    assert header.charset == "gb18030"
    assert header.sending_facility == "亅医院"
    assert header.control_id == "MSG001"


def test_utf8_bom_is_skipped_and_line_feeds_normalised() -> None:
    raw = b"\xef\xbb\xbf" + adt("UNICODE UTF-8").replace("\r", "\r\n").encode()
    header = parse_header(raw)
    assert header.control_id == "MSG001"
    assert "\n" not in header.text and header.text.count("\r") == 3
    lf_only = adt().replace("\r", "\n").encode()
    assert parse_header(lf_only).segments()[2].startswith("PID|")


def test_iso2022_as_a_later_repetition() -> None:
    raw = adt("~ISO IR87", name="山田^太郎").encode("iso2022_jp")
    assert b"\x1b$B" in raw
    header = parse_header(raw)
    assert header.charset == "iso2022_jp" and "山田^太郎" in header.text


@pytest.mark.parametrize(
    ("data", "code", "location", "words"),
    [
        (b"", "100", "MSH^1", "nothing"),
        (b"PID|1||x\r", "100", "MSH^1", "no MSH"),
        (b"  MSH|^~\\&|A\r", "100", "MSH^1", "no MSH"),
        (b"FHS|^~\\&\rBHS|^~\\&\r", "100", None, "batches"),
        (b"MSH|^~\r", "100", "MSH^1", "truncated"),
        (b"MSH|^^\\&|A|B\r", "102", "MSH^1^2", "repeat"),
        (b"MSHA^~\\&|A|B\r", "102", "MSH^1^2", "alphanumeric"),
    ],
)
def test_no_usable_msh(data: bytes, code: str, location: str | None, words: str) -> None:
    with pytest.raises(HL7Error) as info:
        parse_header(data)
    assert (info.value.code, info.value.location) == (code, location)
    assert words in info.value.message
    assert info.value.header is None


@pytest.mark.parametrize(
    ("text", "code", "location"),
    [
        (adt(msg_type=""), "101", "MSH^1^9"),
        (adt(control_id=""), "101", "MSH^1^10"),
        (adt(version=""), "101", "MSH^1^12"),
        (adt(version="3.0"), "203", "MSH^1^12"),
        (adt("KLINGON"), "103", "MSH^1^18"),
        (adt("UNICODE UTF-16"), "103", "MSH^1^18"),
    ],
)
def test_header_errors_keep_what_was_read(text: str, code: str, location: str) -> None:
    with pytest.raises(HL7Error) as info:
        parse_header(text.encode())
    err = info.value
    assert (err.code, err.location) == (code, location)
    assert err.header is not None and err.header.sending_app == "HIS"
    if code == "103":
        assert err.header.charset == "ascii" and err.header.charset_field == ""


def test_unknown_charset_suggests_a_name() -> None:
    with pytest.raises(HL7Error) as info:
        parse_header(adt("GB 18030-200O").encode())
    assert "did you mean" in info.value.message
    with pytest.raises(HL7Error) as info:
        parse_header(adt("UNICODE UTF-16").encode())
    assert "MLLP" in info.value.message


def test_invalid_bytes_for_the_named_charset() -> None:
    raw = adt("UNICODE UTF-8").encode() + b"NTE|1||\xff\xfe\r"
    with pytest.raises(HL7Error) as info:
        parse_header(raw)
    assert (info.value.code, info.value.location) == ("102", "MSH^1^18")
    assert "utf-8" in info.value.message and info.value.header is not None
    assert info.value.header.charset == "utf-8"


@pytest.mark.parametrize(
    ("name", "codec"),
    [
        ("ASCII", "ascii"),
        ("", None),
        ("8859/1", "iso-8859-1"),
        ("8859/9", "iso-8859-9"),
        ("8859/15", "iso-8859-15"),
        ("UNICODE UTF-8", "utf-8"),
        ("UTF-8", "utf-8"),
        ("ISO IR192", "utf-8"),
        ("ISO_IR 192", "utf-8"),
        ("GB 18030-2000", "gb18030"),
        ("GB18030", "gb18030"),
        ("GB 2312", "gbk"),
        ("GB2312", "gbk"),
        ("BIG-5", "big5"),
        ("CNS 11643-1992", "big5"),
        ("KS X 1001", "euc_kr"),
        ("ISO IR87", "iso2022_jp"),
        ("ISO IR100", "iso-8859-1"),
    ],
)
def test_charset_names(name: str, codec: str | None) -> None:
    if codec is None:
        with pytest.raises(HL7Error):
            python_codec(name)
    else:
        assert python_codec(name) == codec
        "MSH|^~\\&".encode(codec)  # a real codec


def test_every_table_entry_is_a_real_ascii_compatible_codec() -> None:
    for name, codec in CHARSETS.items():
        assert "MSH|^~\\&\r".encode(codec) == b"MSH|^~\\&\r", name


def test_default_charset_accepts_codec_names_only_when_ascii_compatible() -> None:
    assert default_codec("gb18030") == "gb18030"
    assert default_codec("latin-1") == "iso-8859-1"
    assert default_codec("cp1252") == "cp1252"
    with pytest.raises(ValueError, match="not ASCII-compatible"):
        default_codec("utf-16")
    with pytest.raises(ValueError, match="unknown"):
        default_codec("no-such-charset")


def test_escape_round_trip() -> None:
    text = "a|b^c~d\\e&f\r\ng"
    escaped = escape(text)
    assert escaped == "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f  g"
    assert unescape(escaped) == "a|b^c~d\\e&f  g"
    assert unescape("\\H\\bold\\N\\") == "\\H\\bold\\N\\"  # formatting escapes are left alone


def test_escape_uses_the_message_delimiters() -> None:
    header = parse_header(b"MSH#$%!@#A#B#C#D#1##ADT$A01#1#P#2.5\r")
    assert header.encoding_chars == "$%!@"
    assert escape("x#y$z!", header) == "x!F!y!S!z!E!"
    assert unescape("x!F!y!S!z!E!", header) == "x#y$z!"


def test_parse_message_gives_a_python_hl7_tree() -> None:
    message = parse_message(parse_header(adt("UNICODE UTF-8", name="张^三").encode()))
    assert isinstance(message, hl7.Message)
    assert str(message.segment("PID")[5]) == "张^三"


def test_known_message_codes() -> None:
    for code in ("ADT", "ORM", "ORU", "OMI", "QBP", "RSP", "ACK", "SIU", "MDM", "MFN", "VXU", "EHC", "QRY"):
        assert known_message_code(code), code
    assert not known_message_code("XYZ") and not known_message_code("adt")


def test_message_type_filter_default_accepts_table_0076() -> None:
    types = MessageTypeFilter()
    types.check(parse_header(adt().encode()))
    with pytest.raises(HL7Error) as info:
        types.check(parse_header(adt(msg_type="XYZ^A01").encode()))
    assert (info.value.code, info.value.location) == ("200", "MSH^1^9^1^1")


def test_message_type_filter_patterns() -> None:
    types = MessageTypeFilter(["ADT^A01", "adt^a04", "ORM", "ZMI"])
    assert types.describe() == "ADT^A01, ADT^A04, ORM, ZMI"
    for ok in ("ADT^A01", "ADT^A04", "ORM^O01", "ZMI^Z01"):
        types.check(parse_header(adt(msg_type=ok).encode()))
    with pytest.raises(HL7Error) as info:
        types.check(parse_header(adt(msg_type="ADT^A08").encode()))
    assert info.value.code == "201" and "ADT^A08" in info.value.message
    with pytest.raises(HL7Error) as info:
        types.check(parse_header(adt(msg_type="ORU^R01").encode()))
    assert info.value.code == "200" and "ORM" in info.value.message
    assert MessageTypeFilter(["ADT", "ADT^A01"]).describe() == "ADT"
    assert MessageTypeFilter(["ADT^A01", "ADT"]).describe() == "ADT"


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("AD", "must look like"),
        ("ADX", "not in HL7 table 0076 .did you mean"),
        ("ADT^A01^X", "must look like"),
    ],
)
def test_message_type_filter_rejects_bad_patterns(pattern: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        MessageTypeFilter([pattern])


def test_public_api_is_complete() -> None:
    import importlib
    import inspect

    import ihehub.hl7 as package

    for module_name in ("ack", "charsets", "codec", "errors"):
        module = importlib.import_module(f"ihehub.hl7.{module_name}")
        for name, value in vars(module).items():
            if (
                name.startswith("_")
                or inspect.ismodule(value)
                or getattr(value, "__module__", module.__name__)
                not in (
                    module.__name__,
                    None,
                )
            ):
                continue
            if name in ("annotations", "TYPE_CHECKING", "log"):
                continue
            assert name in package.__all__, (
                f"ihehub.hl7.{module_name}.{name} is missing from ihehub.hl7.__all__"
            )
    for name in package.__all__:
        assert hasattr(package, name)
