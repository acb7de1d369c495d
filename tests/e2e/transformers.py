"""Transformer callables used by the pipeline tests (channels name them as ``module:function``)."""

from __future__ import annotations

from ihehub.bus.message import Message


def upper_names(message: Message) -> bytes:
    """Upper-case PID-5 (a stand-in for a real mapping)."""
    out = []
    for seg in message.text().split("\r"):
        if seg.startswith("PID|"):
            f = seg.split("|")
            if len(f) > 5:
                f[5] = f[5].upper()
            seg = "|".join(f)
        out.append(seg)
    return "\r".join(out).encode(message.charset or "utf-8")


def drop_tests(message: Message) -> Message | None:
    """Drop messages with processing id T (test traffic)."""
    return None if "|T|" in message.text().split("\r", 1)[0] else message


def explode(message: Message) -> bytes:
    raise ValueError("mapping table for ward 'W9' is missing")
