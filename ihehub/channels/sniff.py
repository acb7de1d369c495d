"""Cheap looks at a body that the byte-oriented connectors (http, file) share.

Nothing here validates a message: it reads the media type of a ``Content-Type`` header
(RFC 9110 §8.3), labels HL7 v2 messages from MSH-9 (message type), MSH-10 (message control id)
and MSH-18 (character set) with :func:`ihehub.hl7.parse_header` (HL7 v2.5 §2.15.9), and
guesses a media type and a file extension.  A source labels messages and never refuses them here:
whether an HL7 message is acceptable is the channel's decision.
"""

from __future__ import annotations

import codecs
import dataclasses

from ihehub.hl7 import Header, HL7Error, parse_header

HL7_V2 = "application/hl7-v2"
OCTET_STREAM = "application/octet-stream"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HL7Header:
    """What a source needs from MSH: ``message_type`` is MSH-9.1^MSH-9.2 (e.g. ``ADT^A01``)."""

    control_id: str | None
    message_type: str | None
    charset: str | None  # Python codec: from MSH-18, else the default given, else None


def parse_content_type(value: str | None) -> tuple[str | None, dict[str, str]]:
    """``text/plain; charset="GB18030"`` → (``text/plain``, {``charset``: ``GB18030``}).

    The media type is lower-cased; parameter names are lower-cased, values kept (RFC 9110 §8.3.1).
    """
    if not value or not value.strip():
        return None, {}
    media, *params = value.split(";")
    found: dict[str, str] = {}
    for param in params:
        key, sep, val = param.partition("=")
        if sep:
            found[key.strip().lower()] = val.strip().strip('"')
    media = media.strip().lower()
    return (media or None), found


def codec_name(charset: str) -> str | None:
    """The Python codec name for an IANA charset label (``GB18030`` → ``gb18030``), None when unknown."""
    try:
        return codecs.lookup(charset.strip()).name
    except LookupError:
        return None


def looks_like_hl7(raw: bytes, content_type: str | None = None) -> bool:
    """True for ``application/hl7-v2`` bodies and for bodies that start with an MSH segment."""
    if content_type == HL7_V2:
        return True
    head = raw[:16].removeprefix(b"\xef\xbb\xbf").lstrip(b"\x0b\r\n \t")
    sep = head[3:4]
    return head.startswith(b"MSH") and len(sep) == 1 and not sep.isalnum() and sep not in b"\r\n \t"


def hl7_header(raw: bytes, default_charset: str | None = None) -> HL7Header | None:
    """MSH-9, MSH-10 and MSH-18 of an HL7 v2 message, or None when no MSH segment can be read.

    A header with problems (unknown MSH-12, bytes invalid in the charset, ...) is still labelled
    from the part :func:`~ihehub.hl7.parse_header` could read.  ``charset`` is the MSH-18
    codec when MSH-18 is set, else ``default_charset``.
    """
    header: Header | None
    try:
        header = parse_header(raw.lstrip(b"\x0b\r\n \t"), default_charset or "ascii")
    except HL7Error as err:
        header = err.header
    except ValueError:  # default_charset cannot carry HL7 (not ASCII-compatible): label without it
        return hl7_header(raw) if default_charset else None
    if header is None:
        return None
    return HL7Header(
        control_id=header.control_id.strip() or None,
        message_type=header.message_code or None,
        charset=header.charset if header.charset_field.strip() else default_charset,
    )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Labels:
    """How a source labels a body: media type, charset, control id and message type."""

    content_type: str
    charset: str | None
    control_id: str | None
    message_type: str | None


def label(
    raw: bytes,
    *,
    content_type: str | None = None,
    charset: str | None = None,
    name: str = "",
    control_id: str | None = None,
    message_type: str | None = None,
) -> Labels:
    """The given labels, the media type guessed when not given; an HL7 v2 body's MSH-10, MSH-9 and
    MSH-18 (see `hl7_header`) win over what the transport said."""
    media = content_type or guess_content_type(raw, name)
    if looks_like_hl7(raw, media):
        header = hl7_header(raw, charset)
        if header is not None:
            return Labels(content_type=media, charset=header.charset,
                          control_id=header.control_id or control_id,
                          message_type=header.message_type or message_type)
    return Labels(content_type=media, charset=charset, control_id=control_id, message_type=message_type)


def guess_content_type(raw: bytes, name: str = "") -> str:
    """A media type from the body's first bytes, then from the file name's extension."""
    head = raw.lstrip()[:64]
    lower = name.lower()
    if looks_like_hl7(raw) or lower.endswith((".hl7", ".er7")):
        return HL7_V2
    if (len(raw) >= 132 and raw[128:132] == b"DICM") or lower.endswith(".dcm"):
        return "application/dicom"
    if head.startswith(b"<") or lower.endswith(".xml"):
        return "application/xml"
    if head[:1] in (b"{", b"[") or lower.endswith(".json"):
        return "application/json"
    return OCTET_STREAM


def extension_for(content_type: str | None) -> str:
    """File extension for a media type: ``hl7``, ``xml``, ``json``, ``dcm`` or ``bin``."""
    media, _ = parse_content_type(content_type)
    if media is None:
        return "bin"
    if "hl7" in media:
        return "hl7"
    if media.endswith(("/xml", "+xml")):
        return "xml"
    if media.endswith(("/json", "+json")):
        return "json"
    if media == "application/dicom":
        return "dcm"
    return "bin"
