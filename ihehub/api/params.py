"""Shared request parsing and response encoding of the message browser.

Times in: ISO 8601 (ISO 8601-1:2019 §5.4 date and time of day, with ``Z`` or an offset; a time
without an offset is UTC) or UNIX epoch seconds.  Times out: ISO 8601 UTC with a ``Z``.
"""

from __future__ import annotations

import base64
import codecs
import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ihehub.api.errors import ApiError
from ihehub.bus.store import DELIVERY_STATES, MESSAGE_STATUSES, MessageQuery
from ihehub.channels.registry import did_you_mean

MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
STATUSES: tuple[str, ...] = tuple(dict.fromkeys((*MESSAGE_STATUSES, *DELIVERY_STATES)))
TIME_FORMATS = (
    "ISO 8601 (2024-05-01T08:30:00Z, 2024-05-01T16:30:00+08:00, 2024-05-01; no offset means UTC) "
    "or epoch seconds (1714552200)"
)


def parse_time(name: str, value: str | float | None) -> float | None:
    """Epoch seconds of a ``since``/``until`` value; 400 naming the accepted formats when it is neither."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ApiError(400, "bad_time", f"{name}: {value!r} is not a time; use {TIME_FORMATS}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                parsed = dt.datetime.fromisoformat(text)
            except ValueError:
                problem = f"{name}: {value!r} is not a time; use {TIME_FORMATS}"
                raise ApiError(400, "bad_time", problem) from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.UTC)
            seconds = parsed.timestamp()
    if not math.isfinite(seconds) or not -62135596800.0 <= seconds <= 253402300799.0:  # years 1..9999
        raise ApiError(400, "bad_time", f"{name}: {value!r} is out of range; use {TIME_FORMATS}")
    return seconds


def iso(seconds: float | None) -> str | None:
    """``2024-05-01T08:30:00.123Z`` for epoch seconds (None stays None)."""
    if seconds is None:
        return None
    stamp = dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def check_status(status: str | None) -> str | None:
    if status is None or status == "":
        return None
    if status not in STATUSES:
        raise ApiError(
            400, "bad_status",
            f"status {status!r} is unknown{did_you_mean(status, STATUSES)}; use one of {', '.join(STATUSES)}",
        )
    return status


def check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, "bad_limit", f"limit must be between 1 and {MAX_LIMIT}, not {limit}")
    if offset < 0:
        raise ApiError(400, "bad_offset", f"offset must be 0 or more, not {offset}")


def build_query(
    *,
    channel: str | None = None,
    status: str | None = None,
    destination: str | None = None,
    since: str | float | None = None,
    until: str | float | None = None,
    control_id: str | None = None,
    message_type: str | None = None,
    text: str | None = None,
    limit: int = DEFAULT_LIMIT,
    offset: int = 0,
) -> MessageQuery:
    """A store query from request fields; empty strings mean "not given"."""
    check_page(limit, offset)
    start, end = parse_time("since", since), parse_time("until", until)
    if start is not None and end is not None and end <= start:
        raise ApiError(400, "bad_time", f"until ({iso(end)}) must be after since ({iso(start)})")
    return MessageQuery(
        channel=channel or None,
        status=check_status(status),
        destination=destination or None,
        since=start,
        until=end,
        control_id=control_id or None,
        message_type=message_type or None,
        text=text or None,
        limit=limit,
        offset=offset,
    )


def is_empty(query: MessageQuery) -> bool:
    """True when the query has no condition at all (it would match every message)."""
    return not any((query.channel, query.status, query.destination, query.control_id, query.message_type,
                    query.text)) and query.since is None and query.until is None


def check_destinations(
    given: Sequence[str] | None, known: Sequence[str], where: str
) -> list[str] | None:
    """The ``destinations`` of a resend request, each one checked against ``known``."""
    if not given:
        return None
    for name in given:
        if name not in known:
            choices = ", ".join(known) or "none"
            raise ApiError(
                400, "unknown_destination",
                f"{where} has no destination {name!r}{did_you_mean(name, known)}; it has: {choices}",
            )
    return list(dict.fromkeys(given))


def text_fields(data: bytes | None, charsets: Sequence[str | None], key: str) -> dict[str, Any]:
    """``{key: text}`` decoded with the first charset that fits; plus ``{key}_base64`` when none does.

    When no charset decodes the bytes strictly, the text is UTF-8 with U+FFFD replacements so that
    a reader still sees most of it, and the exact bytes are in the base64 field.
    """
    if data is None:
        return {key: None}
    for charset in (*charsets, "utf-8"):
        codec = _codec(charset)
        if codec is None:
            continue
        try:
            return {key: data.decode(codec)}
        except UnicodeDecodeError:
            continue
    exact = base64.b64encode(data).decode("ascii")
    return {key: data.decode("utf-8", errors="replace"), f"{key}_base64": exact}


def _codec(charset: str | None) -> str | None:
    if not charset:
        return None
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return None


def headers_of(raw: str | None) -> Mapping[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
