"""Dates and times for mappings: HL7 v2 DTM/TS with precision and time zone, ISO 8601, strftime formats.

HL7 v2.5 chapter 2A, section 2A.22 (DTM: ``YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]``) and
2A.77 (TS: a DTM plus a degree of precision).  A value keeps the precision it was sent with, so
``198001`` becomes ``1980-01`` in ISO 8601 and ``198001`` again in HL7, never an invented day.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Callable
from typing import Any

_HL7 = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?)?)?)?([+-]\d{4})?"
)
_ISO = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:[T ](\d{2})(?::(\d{2})(?::(\d{2})(?:[.,](\d{1,6}))?)?)?)?)?)?"
    r"(Z|[+-]\d{2}:?\d{2})?"
)
_ZONE = re.compile(r"(?:UTC|Z)|([+-])(\d{2}):?(\d{2})")

# precision: number of HL7 digits (4 year, 6 month, 8 day, 10 hour, 12 minute, 14 second)
_PRECISION_OF_DIRECTIVE = (("%S", 14), ("%M", 12), ("%H", 10), ("%I", 10), ("%d", 8), ("%j", 8), ("%m", 6),
                           ("%b", 6), ("%B", 6))
OUTPUT_WORDS = ("hl7", "iso", "date", "time", "epoch")
_TIMESPEC = {10: "hours", 12: "minutes", 14: "seconds"}


class DateError(ValueError):
    """A text that is not a date; ``value`` is the text (set by `converter`)."""

    value: str | None = None


class Stamp:
    """A point in time as precise as it was given: ``precision`` counts HL7 digits (4..14)."""

    __slots__ = ("fraction", "precision", "value", "zoned")

    def __init__(self, value: dt.datetime, precision: int, fraction: int = 0, zoned: bool = False) -> None:
        self.value = value
        self.precision = precision
        self.fraction = fraction  # digits after the seconds
        self.zoned = zoned

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stamp) and (self.value, self.precision, self.fraction, self.zoned) == (
            other.value, other.precision, other.fraction, other.zoned)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Stamp({self.iso()!r})"

    def hl7(self) -> str:
        v = self.value
        text = f"{v.year:04d}{v.month:02d}{v.day:02d}{v.hour:02d}{v.minute:02d}{v.second:02d}"[: self.precision]
        if self.fraction:
            text += "." + f"{v.microsecond:06d}"[: self.fraction]
        if self.zoned:
            text += _offset(v, colon=False)
        return text

    def iso(self) -> str:
        v, p = self.value, self.precision
        if p == 8:
            return f"{v.year:04d}-{v.month:02d}-{v.day:02d}"
        if p >= 10 and not self.fraction:
            return v.isoformat(timespec=_TIMESPEC[p])  # with the offset when zoned
        text = f"{v.year:04d}"
        if p >= 6:
            text += f"-{v.month:02d}"
        if p >= 8:
            text += f"-{v.day:02d}"
        if p >= 10:
            text += f"T{v.hour:02d}"
        if p >= 12:
            text += f":{v.minute:02d}"
        if p >= 14:
            text += f":{v.second:02d}"
            if self.fraction:
                text += "." + f"{v.microsecond:06d}"[: self.fraction]
        if self.zoned and p >= 10:
            text += _offset(v, colon=True)
        return text

    def format(self, out: str) -> str | int:
        if out == "hl7":
            return self.hl7()
        if out == "iso":
            return self.iso()
        if out == "date":
            return self.value.date().isoformat()
        if out == "time":
            return self.value.time().isoformat(timespec="seconds")
        if out == "epoch":
            return int(self.value.timestamp())
        return self.value.strftime(out)

    def in_zone(self, zone: dt.tzinfo) -> Stamp:
        """Convert a zoned value to ``zone``; a value without zone is taken to be in ``zone``."""
        if self.zoned:
            if self.precision < 10:
                return self
            return Stamp(self.value.astimezone(zone), self.precision, self.fraction, True)
        return Stamp(self.value.replace(tzinfo=zone), self.precision, self.fraction, self.precision >= 10)


def _offset(value: dt.datetime, *, colon: bool) -> str:
    off = value.utcoffset() or dt.timedelta(0)
    minutes = int(off.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    hh, mm = divmod(abs(minutes), 60)
    return f"{sign}{hh:02d}:{mm:02d}" if colon else f"{sign}{hh:02d}{mm:02d}"


@functools.lru_cache(maxsize=128)
def _zone(text: str) -> dt.tzinfo:
    return parse_zone(text)


_ZONE_SUFFIX: dict[str, str] = {}  # "+0800" -> "+08:00" (valid zones only, so at most a few thousand)


def _zone_suffix(text: str) -> str:
    """The ISO 8601 offset of an HL7 zone (``+0800`` -> ``+08:00``), what `datetime.isoformat` writes for it;
    `DateError` when it is not a zone."""
    suffix = dt.datetime(2000, 1, 1, tzinfo=_zone(text)).isoformat()[19:]
    _ZONE_SUFFIX[text] = suffix
    return suffix


def parse_zone(text: str) -> dt.tzinfo:
    """``"+08:00"``, ``"+0800"``, ``"Z"`` or ``"UTC"`` -> a fixed-offset zone."""
    m = _ZONE.fullmatch(text.strip())
    if not m:
        raise DateError(f"time zone {text!r} must look like +08:00, +0800, Z or UTC")
    if not m.group(1):
        return dt.UTC
    minutes = int(m.group(2)) * 60 + int(m.group(3))
    if minutes > 14 * 60 or int(m.group(3)) >= 60:
        raise DateError(f"time zone {text!r} is out of range")
    return dt.timezone(dt.timedelta(minutes=minutes if m.group(1) == "+" else -minutes))


def _build(groups: tuple[str | None, ...], zone: str | None, source: str) -> Stamp:
    year, month, day, hour, minute, second, frac = groups
    parts = [year, month, day, hour, minute, second]
    precision = 4 + 2 * sum(1 for p in parts[1:] if p is not None)
    micro = int((frac or "0").ljust(6, "0")[:6])
    try:
        tz = parse_zone(zone) if zone else None
        value = dt.datetime(int(year or 0), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                            int(second or 0), micro, tzinfo=tz)
    except (ValueError, DateError) as exc:
        raise DateError(f"{source!r} is not a valid date/time ({exc})") from None
    return Stamp(value, precision, len(frac or ""), tz is not None)


def parse(text: str, formats: tuple[str, ...] = ()) -> Stamp:
    """Read HL7 DTM, ISO 8601 or one of ``formats`` (strftime directives); `DateError` when none fits."""
    s = text.strip()
    for fmt in formats:
        try:
            value = dt.datetime.strptime(s, fmt)
        except ValueError:
            continue
        precision = next((p for d, p in _PRECISION_OF_DIRECTIVE if d in fmt), 4)
        return Stamp(value, precision, 6 if "%f" in fmt else 0, value.tzinfo is not None)
    if formats:
        raise DateError(f"{text!r} matches none of the formats {', '.join(formats)}")
    n = len(s)
    body = s[:14] if n > 14 and s[14] in "+-" else s
    if body.isdigit() and len(body) in (8, 12, 14) and body.isascii():  # the common HL7 shapes, without regex
        zone = s[len(body):]
        try:
            tz = _zone(zone) if zone else None
            value = dt.datetime(int(body[0:4]), int(body[4:6]), int(body[6:8]), int(body[8:10] or 0),
                                int(body[10:12] or 0), int(body[12:14] or 0), tzinfo=tz)
        except (ValueError, DateError) as exc:
            raise DateError(f"{text!r} is not a valid date/time ({exc})") from None
        return Stamp(value, len(body), 0, tz is not None)
    m = _HL7.fullmatch(s)
    if m:
        return _build(m.groups()[:7], m.group(8), text)
    m = _ISO.fullmatch(s)
    if m:
        return _build(m.groups()[:7], m.group(8), text)
    raise DateError(f"{text!r} is not a date (expected HL7 YYYYMMDD[HHMM[SS]][+ZZZZ] or ISO 8601)")


def converter(out: str, formats: tuple[str, ...] = (), zone: dt.tzinfo | None = None) -> Callable[[str], Any]:
    """``text -> formatted`` for one date rule: blank text gives None; the common HL7 shapes (YYYYMMDD,
    YYYYMMDDHHMM, YYYYMMDDHHMMSS[+ZZZZ]) are done without building a `Stamp`; anything else, and every error
    message, goes through `parse`.  A `DateError` carries the text in ``value``."""

    def general(text: str) -> Any:
        stripped = text.strip()
        if not stripped:
            return None
        try:
            stamp = parse(stripped, formats)
        except DateError as exc:
            exc.value = text
            raise
        if zone is not None:
            stamp = stamp.in_zone(zone)
        return stamp.format(out)

    if formats or zone is not None or out not in ("iso", "date", "hl7"):
        return general
    as_hl7, as_date = out == "hl7", out == "date"

    def fast(text: str) -> Any:
        n = len(text)
        try:
            if n == 8 and text.isdigit() and text.isascii():
                d = dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
                return text if as_hl7 else d.isoformat()
            if (n == 14 or (n == 19 and text[14] in "+-")) and text[:14].isdigit() and text.isascii():
                suffix = "" if n == 14 else (_ZONE_SUFFIX.get(text[14:]) or _zone_suffix(text[14:]))
                v = dt.datetime(int(text[:4]), int(text[4:6]), int(text[6:8]), int(text[8:10]), int(text[10:12]),
                                int(text[12:14]))
                return text if as_hl7 else v.date().isoformat() if as_date else v.isoformat() + suffix
            if n == 12 and text.isdigit() and text.isascii():
                v = dt.datetime(int(text[:4]), int(text[4:6]), int(text[6:8]), int(text[8:10]), int(text[10:12]))
                return text if as_hl7 else v.date().isoformat() if as_date else v.isoformat(timespec="minutes")
        except (ValueError, DateError):
            pass  # general() words the error
        return general(text)

    return fast


def now(zone: dt.tzinfo | None = None) -> Stamp:
    value = dt.datetime.now(zone) if zone is not None else dt.datetime.now().astimezone()
    return Stamp(value.replace(microsecond=0), 14, 0, True)


def check_output_format(out: str) -> str | None:
    """Why ``out`` cannot format a date, or None."""
    if out in OUTPUT_WORDS:
        return None
    if "%" not in out:
        return f"date format {out!r} is neither one of {', '.join(OUTPUT_WORDS)} nor a strftime pattern"
    try:
        dt.datetime(2000, 1, 2, 3, 4, 5).strftime(out)
    except ValueError as exc:
        return f"date format {out!r}: {exc}"
    return None
