"""RFC 5424 messages and RFC 5425 / RFC 6587 framing, including what broken senders do."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ihehub.atna import (
    FrameError,
    OctetCountingDecoder,
    StreamDecoder,
    SyslogError,
    SyslogMessage,
    format_syslog,
    octet_frame,
    parse_syslog,
)
from ihehub.atna.syslog import BOM, Oversize, iter_frames

# RFC 5424 section 6.5, example 1 and 3
RFC_EXAMPLE_1 = b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - \xef\xbb\xbf'su root' failed"
RFC_EXAMPLE_3 = (b'<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 '
                 b'iut="3" eventSource="Application" eventID="1011"] \xef\xbb\xbfAn application event log entry...')


def test_rfc5424_examples() -> None:
    m = parse_syslog(RFC_EXAMPLE_1)
    assert (m.facility, m.severity, m.version) == (4, 2, 1)
    assert (m.hostname, m.app_name, m.procid, m.msgid) == ("mymachine.example.com", "su", None, "ID47")
    assert m.structured_data == () and m.bom and m.msg == b"'su root' failed"
    assert m.time == dt.datetime(2003, 10, 11, 22, 14, 15, 3000, tzinfo=dt.UTC)
    m = parse_syslog(RFC_EXAMPLE_3)
    assert m.pri == 165
    assert m.structured_data == (("exampleSDID@32473", (("iut", "3"), ("eventSource", "Application"),
                                                        ("eventID", "1011"))),)
    assert m.msg == b"An application event log entry..."


def test_structured_data_escapes_and_several_elements() -> None:
    m = parse_syslog(b'<13>1 - host app 99 MID [a x="q\\"b\\]c\\\\d"][b@1 y=""] body')
    assert m.structured_data == (("a", (("x", 'q"b]c\\d'),)), ("b@1", (("y", ""),)))
    assert m.procid == "99" and m.timestamp is None and m.msg == b"body" and not m.bom


def test_the_wustl_sender_messages(corpus: Path) -> None:
    folder = corpus / "wustl" / "syslog-sender-messages"
    parsed: dict[str, SyslogMessage] = {}
    refused: dict[str, SyslogError] = {}
    for path in sorted(folder.iterdir()):
        try:
            parsed[path.name] = parse_syslog(path.read_bytes())
        except SyslogError as exc:
            refused[path.name] = exc
    assert parsed["BOMtest.txt"].msgid == "IHE+RFC-3881" and parsed["BOMtest.txt"].bom
    assert parsed["msg.txt"].hostname == "vmxds"  # a BOM before the PRI is tolerated
    assert parsed["vitera.txt"].msgid == "IHEA"
    for name in ("BOMtest.txt", "example.txt", "fullmsg.txt", "msg.txt", "msg2.txt", "vitera.txt", "vitera2.txt"):
        assert parsed[name].msg.lstrip().startswith(b"<?xml"), name
    assert sorted(refused) == ["msg.xml", "test.xml"]  # bare XML files, not syslog messages


@pytest.mark.parametrize("data, match", [
    (b"", "must start with <PRI>"),
    (b"hello", "must start with <PRI>"),
    (b"<999>1 - - - - - -", "out of range"),
    (b"<13>Oct 11 22:14:15 host app: rfc3164", "no VERSION"),
    (b"<13>1 - host", "TIMESTAMP HOSTNAME"),
    (b"<13>1 - h a p m [unterminated", "SD-ID|not closed"),
    (b'<13>1 - h a p m [id k="v', "unterminated value"),
    (b"<13>1 - h a p m nosd", "STRUCTURED-DATA"),
    (b"<13>1 - h a p m -x", "expected a space"),
])
def test_bad_messages_get_a_clear_error(data: bytes, match: str) -> None:
    with pytest.raises(SyslogError, match=match):
        parse_syslog(data)


def test_format_round_trip() -> None:
    when = dt.datetime(2026, 11, 27, 8, 0, 1, 250000, tzinfo=dt.UTC)
    raw = format_syslog(b"<AuditMessage/>", hostname="hub 1", procid="42", severity=4, timestamp=when)
    assert raw.startswith(b"<84>1 2026-11-27T08:00:01.250000Z hub_1 ihehub 42 IHE+RFC-3881 - " + BOM)
    m = parse_syslog(raw)
    assert (m.facility, m.severity, m.msg, m.bom) == (10, 4, b"<AuditMessage/>", True)
    with pytest.raises(ValueError, match="severity"):
        format_syslog(b"x", hostname="h", severity=9)


def frames(n: int) -> list[bytes]:
    return [b'<85>1 - host app - IHE+RFC-3881 - <AuditMessage n="%d"/>' % i for i in range(n)]


def test_octet_counting_byte_by_byte() -> None:
    stream = b"".join(octet_frame(f) for f in frames(5))
    dec = OctetCountingDecoder(1000)
    out = []
    for i in range(len(stream)):
        out += dec.feed(stream[i:i + 1])
    assert out == frames(5) and dec.pending == 0 and dec.finish() is None


def test_a_count_too_short_resynchronises_on_the_next_frame() -> None:
    good = frames(3)
    stream = b"20 " + good[0] + b"".join(octet_frame(f) for f in good[1:])
    out = list(iter_frames(stream))
    assert out[0] == good[0][:20]  # what the count said: stored as an (invalid) message
    assert isinstance(out[1], FrameError) and "MSG-LEN" in str(out[1])
    assert out[2:] == good[1:]


def test_a_count_too_long_swallows_into_the_next_frame_then_recovers() -> None:
    good = frames(3)
    stream = b"%d " % (len(good[0]) + 5) + good[0] + b"".join(octet_frame(f) for f in good[1:])
    out = list(iter_frames(stream))
    assert out[0] == good[0] + octet_frame(good[1])[:5]
    assert isinstance(out[1], FrameError)
    assert out[-1] == good[2]


def test_garbage_between_frames_is_skipped_with_one_error() -> None:
    good = frames(2)
    stream = octet_frame(good[0]) + b"\r\n\x00 garbage garbage 12x <<>>" * 50 + octet_frame(good[1])
    dec = OctetCountingDecoder(1000)
    out = dec.feed(stream)
    assert [type(o) for o in out] == [bytes, FrameError, bytes]
    assert dec.garbage > 1000


def test_oversize_frames_are_skipped_without_buffering() -> None:
    good = frames(2)
    big = b"x" * 5000
    stream = octet_frame(good[0]) + octet_frame(big) + octet_frame(good[1])
    dec = OctetCountingDecoder(1000)
    out = []
    for i in range(0, len(stream), 700):
        out += dec.feed(stream[i:i + 700])
        assert dec.pending < 1100
    assert out[0] == good[0] and isinstance(out[1], Oversize) and out[1].size == 5000 and out[2] == good[1]


def test_an_absurd_count_is_a_framing_error() -> None:
    out = OctetCountingDecoder(1000).feed(b"123456789012345 <13>1 - - - - - -")
    assert isinstance(out[0], FrameError)


def test_the_stream_ends_inside_a_frame() -> None:
    dec = OctetCountingDecoder(1000)
    assert dec.feed(b"100 <85>1 - h a - - - partial") == []
    assert dec.expected() == 100
    assert dec.finish() == b"<85>1 - h a - - - partial"


def test_non_transparent_framing_for_plain_tcp() -> None:
    dec = StreamDecoder(1000)
    out = dec.feed(b"<13>1 - h a - - - one\n<13>1 - h a - - - two\r\n" + octet_frame(b"<13>1 - h a - - - three")
                   + b"<13>1 - h a - - - four\x00<13>1 - h a - - - fi")
    assert out == [b"<13>1 - h a - - - one", b"<13>1 - h a - - - two", b"<13>1 - h a - - - three",
                   b"<13>1 - h a - - - four"]
    assert dec.feed(b"ve\n") == [b"<13>1 - h a - - - five"]
    assert dec.feed(b"<13>1 - h a - - - no trailer") == []
    assert dec.finish() == b"<13>1 - h a - - - no trailer"


def test_non_transparent_frame_without_end_over_the_cap() -> None:
    dec = StreamDecoder(100)
    out = dec.feed(b"<13>1 " + b"y" * 300 + b"\n<13>1 - h a - - - ok\n")
    assert isinstance(out[0], Oversize) and out[-1] == b"<13>1 - h a - - - ok"
    out = dec.feed(b"<13>1 " + b"z" * 300)  # no end in sight: skipped up to the next frame start
    assert isinstance(out[0], FrameError)
    assert dec.feed(b"zzz\n<13>1 - h a - - - next\n") == [b"<13>1 - h a - - - next"]
