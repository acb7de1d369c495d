"""Build and read HL7 v2 general acknowledgments (ACK) in original acknowledgment mode.

HL7 v2.5 chapter 2: section 2.9.2 (original mode acknowledgment), 2.14.1 (ACK message),
2.15.8 (MSA segment), 2.15.5 (ERR segment).  The ERR layout depends on the version of the message
being acknowledged:

* v2.5 and later: ERR-1 (ELD) is kept for backward compatibility only and left empty;
  ERR-2 error location (ERL: segment^sequence^field^repetition^component^subcomponent),
  ERR-3 HL7 error code (CWE: code^text^HL70357), ERR-4 severity (table 0516: E, W, I),
  ERR-7 diagnostic information (TX).
* v2.1 .. v2.4: ERR has a single field, ERR-1 "Error code and location" of data type ELD
  (HL7 v2.3.1 section 2.24.5.1 and 2.8.14; v2.4 section 2.16.5.1 and 2.9.14):
  ``<segment ID>^<sequence>^<field position>^<code identifying error (CE)>``, the CE written
  with subcomponents ``code&text&HL70357``.  The free text goes in MSA-3, which those versions
  define (MSA-3 "Text message", deprecated from v2.4 but still read by many receivers, so it is
  filled for every version).

The ACK echoes the delimiters, version (MSH-12), processing id (MSH-11) and character set (MSH-18)
of the message it answers and is encoded with the same codec.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

from ihehub.hl7.codec import Header, escape, parse_header, unescape
from ihehub.hl7.errors import HL7Error, describe_error

ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})  # HL7 table 0008
SEVERITIES = frozenset({"E", "W", "I", "F"})  # HL7 table 0516


def new_control_id() -> str:
    """A fresh MSH-10 of 20 characters (the ST length limit up to v2.6)."""
    return uuid.uuid4().hex[:20]


def hl7_timestamp(when: dt.datetime | None = None) -> str:
    """MSH-7 as ``YYYYMMDDHHMMSS+ZZZZ`` in local time."""
    return (when or dt.datetime.now().astimezone()).strftime("%Y%m%d%H%M%S%z")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split("."):
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _err_segment(
    header: Header, error_code: str, location: str | None, text: str | None, severity: str
) -> str:
    sep, comp, sub = header.field_sep, header.component_sep, header.subcomponent_sep
    loc = (location or "").split("^")
    desc = describe_error(error_code)
    if _version_tuple(header.version) < (2, 5):
        eld = [*loc, "", "", ""][:3]
        ce = sub.join([error_code, desc, "HL70357"])
        return "ERR" + sep + comp.join([*eld, ce])
    fields = [
        "ERR",
        "",
        comp.join(loc) if location else "",
        comp.join([error_code, desc, "HL70357"]),
        severity,
        "",
        "",
        escape(text, header) if text else "",
    ]
    while fields[-1] == "":
        fields.pop()
    return sep.join(fields)


def build_ack(
    header: Header,
    code: str,
    *,
    text: str | None = None,
    error_code: str | None = None,
    error_location: str | None = None,
    severity: str = "E",
    sending_app: str | None = None,
    sending_facility: str | None = None,
    control_id: str | None = None,
) -> bytes:
    """An ACK for the message whose header is ``header``, encoded with the message's codec.

    ``code`` is MSA-1 (table 0008).  For AE/AR/CE/CR an ERR segment is added, with
    ``error_code`` from table 0357 (207 when not given) located at ``error_location``
    (``"MSH^1^9"``); ERR is also added to an AA when ``error_code`` is given (a warning).
    ``sending_app``/``sending_facility`` default to the message's receiving application and
    facility (MSH-5/MSH-6), so the ACK goes back the way the message came.
    """
    if code not in ACK_CODES:
        raise ValueError(f"acknowledgment code {code!r} is not one of {sorted(ACK_CODES)}")
    if severity not in SEVERITIES:
        raise ValueError(f"error severity {severity!r} is not one of {sorted(SEVERITIES)}")
    sep, comp = header.field_sep, header.component_sep
    if code[1] != "A" and error_code is None:
        error_code = "207"
    msg_type = "ACK"
    if header.trigger:
        # MSH-9.3 (message structure) exists from v2.3.1 on.
        with_structure = _version_tuple(header.version) >= (2, 3, 1)
        msg_type = comp.join(["ACK", header.trigger, "ACK"] if with_structure else ["ACK", header.trigger])
    msh = [
        "MSH",
        header.encoding_chars,
        header.receiving_app if sending_app is None else sending_app,
        header.receiving_facility if sending_facility is None else sending_facility,
        header.sending_app,
        header.sending_facility,
        hl7_timestamp(),
        "",
        msg_type,
        control_id or new_control_id(),
        header.processing_id or "P",
        header.version or "2.5",
    ]
    if header.charset_field:
        msh += ["", "", "", "", "", header.charset_field]
    msa = ["MSA", code, header.control_id]
    if text:
        msa.append(escape(text, header))
    segments = [sep.join(msh), sep.join(msa)]
    if error_code is not None:
        segments.append(_err_segment(header, error_code, error_location, text, severity))
    return ("\r".join(segments) + "\r").encode(header.charset, "replace")


_BARE = Header(
    field_sep="|",
    encoding_chars="^~\\&",
    sending_app="",
    sending_facility="",
    receiving_app="",
    receiving_facility="",
    datetime="",
    message_type="",
    trigger="",
    structure="",
    control_id="",
    processing_id="P",
    version="2.5",
    charset="ascii",
    charset_field="",
    text="",
)


def build_nak_without_header(
    code: str, text: str, error_code: str, *, error_location: str | None = None
) -> bytes:
    """A NAK for input so broken that no MSH could be read: MSA-2 is empty, v2.5 ERR layout, ASCII."""
    return build_ack(_BARE, code, text=text, error_code=error_code, error_location=error_location)


@dataclasses.dataclass(frozen=True, slots=True)
class AckInfo:
    """What an acknowledgment says: MSA-1, MSA-2, and the error text and code when present."""

    code: str
    control_id: str
    text: str
    error_code: str | None
    header: Header

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")


def read_ack(raw: bytes, default_charset: str = "ascii") -> AckInfo:
    """Parse an ACK (or any response with MSA, e.g. RSP^K22).  Raises `HL7Error` when unreadable.

    The error text is MSA-3, else ERR-8/ERR-7, else the text of the ERR-3 (v2.5) or ERR-1 (v2.4
    and earlier) error code.
    """
    header = parse_header(raw, default_charset)
    sep, comp, sub = header.field_sep, header.component_sep, header.subcomponent_sep
    msa: list[str] | None = None
    err: list[str] | None = None
    for seg in header.segments():
        if msa is None and seg.startswith("MSA" + sep):
            msa = seg.split(sep)
        elif err is None and seg.startswith("ERR" + sep):
            err = seg.split(sep)
    if msa is None or len(msa) < 2 or msa[1].strip() not in ACK_CODES:
        raise HL7Error("the response has no MSA segment with an acknowledgment code", "101", "MSA^1^1",
                       header=header)
    msa += [""] * (4 - len(msa))
    text = unescape(msa[3], header)
    error_code: str | None = None
    if err is not None:
        err += [""] * (9 - len(err))
        if err[3]:
            parts = [*err[3].split(comp), ""]
            error_code, err_text = parts[0] or None, parts[1]
        else:
            eld = [*err[1].split(header.repetition_sep)[0].split(comp), "", "", "", ""][3]
            ce = [*eld.split(sub), ""]
            error_code, err_text = ce[0] or None, ce[1]
        text = text or unescape(err[8] or err[7], header) or unescape(err_text, header)
    return AckInfo(
        code=msa[1].strip(), control_id=msa[2], text=text, error_code=error_code, header=header
    )
