"""FrameDecoder: MLLP release 1 framing <VT> payload <FS><CR>, fed in arbitrary pieces."""

from __future__ import annotations

import pytest

from ihehub.channels.mllp import FrameDecoder, Oversize, frame


def feed_all(decoder: FrameDecoder, data: bytes, step: int) -> list[bytes | Oversize]:
    out: list[bytes | Oversize] = []
    for i in range(0, len(data), step):
        out += decoder.feed(data[i : i + step])
    return out


STREAM = frame(b"MSH|one\r") + frame(b"MSH|two\rPID|1\r") + frame(b"") + frame(b"MSH|" + b"x" * 500)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10_000])
def test_any_split_gives_the_same_frames(step: int) -> None:
    decoder = FrameDecoder(1024)
    assert feed_all(decoder, STREAM, step) == [b"MSH|one\r", b"MSH|two\rPID|1\r", b"", b"MSH|" + b"x" * 500]
    assert decoder.pending == 0 and decoder.garbage == 0


def test_garbage_is_counted_and_blank_lines_are_not() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\r\n" + frame(b"A") + b"\n" + frame(b"B")) == [b"A", b"B"]
    assert decoder.garbage == 0
    assert decoder.feed(b"junk!" + frame(b"C")) == [b"C"]
    assert (decoder.garbage, decoder.garbage_sample) == (5, b"junk!")


def test_partial_frame_is_pending() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x0bMSH|abc") == []
    assert decoder.pending == 7
    assert decoder.feed(b"def\x1c") == [b"MSH|abcdef"]
    assert decoder.pending == 0
    assert decoder.feed(b"\r") == []  # the CR after FS, in its own segment, is not garbage
    assert decoder.garbage == 0


def test_end_block_without_cr_and_restarted_frame() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x0bA\x1c\x0bB\x1c\r") == [b"A", b"B"]
    assert decoder.feed(b"\x0blost half\x0bC\x1c\r") == [b"C"]
    assert decoder.restarted == 1


def test_oversize_is_reported_early_and_not_buffered() -> None:
    decoder = FrameDecoder(1024)
    events = decoder.feed(b"\x0bMSH|^~\\&|" + b"y" * 600)
    assert events == []
    events = decoder.feed(b"y" * 600)
    assert len(events) == 1 and isinstance(events[0], Oversize)
    assert events[0].prefix.startswith(b"MSH|^~\\&|yyy") and events[0].size > 1024
    assert decoder.pending == 0
    for _ in range(100):  # the rest of the huge frame is dropped as it arrives
        assert decoder.feed(b"z" * 10_000) == []
        assert decoder.pending == 0
    assert decoder.garbage == 0
    assert decoder.feed(b"zzz\x1c\r" + frame(b"MSH|next")) == [b"MSH|next"]


def test_oversize_frame_arriving_whole() -> None:
    decoder = FrameDecoder(1024)
    events = decoder.feed(frame(b"MSH|" + b"q" * 2000) + frame(b"MSH|ok"))
    assert isinstance(events[0], Oversize) and events[0].size == 2004
    assert events[1:] == [b"MSH|ok"]


def test_exactly_at_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(1024)
    assert feed_all(decoder, frame(b"m" * 1024), 100) == [b"m" * 1024]
