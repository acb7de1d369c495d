"""Read the HL7 v2 message header (MSH) from raw bytes, fast and charset-aware.

HL7 v2.5 chapter 2: section 2.5 (message construction rules, delimiters), 2.7 (escape sequences),
2.15.9 (MSH segment).  MSH-1 (the field separator) is the byte after ``MSH``; MSH-2 holds the
component, repetition, escape and subcomponent characters (and, from v2.7, the truncation
character).  Every character set HL7 uses over MLLP is ASCII-compatible for these delimiters, so
MSH-18 is read from the raw bytes first, then the whole message is decoded with that codec.

Only MSH is parsed here: ``parse_header`` runs for every received frame.  `parse_message` gives a
full python-hl7 tree for code that needs the other segments.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable

import hl7

from ihehub.hl7.charsets import codec_for_msh18, default_codec
from ihehub.hl7.errors import HL7Error

UTF8_BOM = b"\xef\xbb\xbf"

# HL7 table 0076 "Message type", union of v2.3.1 .. v2.8.2.
_TABLE_0076 = """
    ACK ADR ADT ARD BAR BPS BRP BRT BTS CCF CCI CCM CCQ CCU CQU CRM CSU DBC DBU DEL DEO DER DFT DOC
    DPR DRC DSR EAC EAN EAR EDR EHC EQQ ERP ESR ESU INR INU LSR LSU MCF MDM MFD MFK MFN MFQ MFR NMD NMQ
    NMR OMB OMD OMG OMI OML OMN OMP OMQ OMS OPL OPR OPU ORA ORB ORD ORF ORG ORI ORL ORM ORN ORP ORR ORS
    ORU ORX OSM OSQ OSR OSU OUL PEX PGL PIN PMU PPG PPP PPR PPT PPV PRR PTR QBP QCK QCN QRY QSB QSX QVR
    RAR RAS RCI RCL RDE RDR RDS RDY REF RER RGR RGV ROR RPA RPI RPL RPR RQA RQC RQI RQP RQQ RRA RRD RRE
    RRG RRI RSP RTB SCN SDN SDR SIU SLN SLR SMD SPQ SQM SQR SRM SRR SSR SSU STC STI SUR TBR TCR TCU UDM
    VQQ VXQ VXR VXU VXX"""
MESSAGE_CODES = frozenset(_TABLE_0076.split())

# HL7 table 0104 "Version ID" (v2.0 .. v2.9.1).
_TABLE_0104 = "2.0 2.0D 2.1 2.2 2.3 2.3.1 2.3.2 2.4 2.5 2.5.1 2.6 2.7 2.7.1 2.8 2.8.1 2.8.2 2.9 2.9.1"
VERSIONS = frozenset(_TABLE_0104.split())


def known_message_code(code: str) -> bool:
    """True when ``code`` (MSH-9.1, e.g. ``"ADT"``) is in HL7 table 0076."""
    return code in MESSAGE_CODES


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    """The MSH fields a hub needs, plus the whole message decoded with its charset.

    Field values are kept as sent (escape sequences not resolved, components joined), so an ACK
    can echo them byte for byte.  ``charset`` is the Python codec used; ``charset_field`` the
    MSH-18 value as sent ("" when the channel default applied).  ``text`` has every segment
    terminator normalised to ``\\r``.
    """

    field_sep: str
    encoding_chars: str
    sending_app: str
    sending_facility: str
    receiving_app: str
    receiving_facility: str
    datetime: str
    message_type: str
    trigger: str
    structure: str
    control_id: str
    processing_id: str
    version: str
    charset: str
    charset_field: str
    text: str

    @property
    def component_sep(self) -> str:
        return self.encoding_chars[0]

    @property
    def repetition_sep(self) -> str:
        return self.encoding_chars[1]

    @property
    def escape_char(self) -> str:
        return self.encoding_chars[2]

    @property
    def subcomponent_sep(self) -> str:
        return self.encoding_chars[3]

    @property
    def message_code(self) -> str:
        """``"ADT^A01"`` (MSH-9.1 and MSH-9.2), or just the code when there is no trigger."""
        return f"{self.message_type}^{self.trigger}" if self.trigger else self.message_type

    def segments(self) -> list[str]:
        """The message's segments, empty ones dropped."""
        return [s for s in self.text.split("\r") if s]


def _first_line_end(data: bytes, start: int) -> int:
    cr = data.find(b"\r", start)
    lf = data.find(b"\n", start)
    if cr < 0:
        return len(data) if lf < 0 else lf
    return cr if lf < 0 else min(cr, lf)


def _check_encoding_chars(enc: str, sep: str) -> str | None:
    """Why MSH-2 is unusable, or None (HL7 v2.5 section 2.5.4: four distinct delimiter characters)."""
    if not 4 <= len(enc) <= 5:
        return f"MSH-2 encoding characters {enc!r} must be 4 characters (5 from v2.7), e.g. '^~\\&'"
    chars = enc + sep
    if len(set(chars)) != len(chars):
        return f"MSH-2 encoding characters {enc!r} repeat a delimiter"
    if any(c.isalnum() or not c.isprintable() or ord(c) > 127 for c in chars):
        return f"MSH-1/MSH-2 delimiters {chars!r} must be printable non-alphanumeric ASCII characters"
    return None


def parse_header(raw: bytes, default_charset: str = "ascii") -> Header:
    """Locate MSH in ``raw``, pick the codec from MSH-18 (or ``default_charset``), decode, split.

    Raises `HL7Error`: 100 when the message does not start with MSH (a UTF-8 byte-order mark is
    skipped), 102 for unusable delimiters or bytes that are not valid in the charset, 103 for an
    unknown MSH-18, 101 when MSH-9, MSH-10 or MSH-12 is empty and 203 for an unknown MSH-12.
    From 101 on (and for 102/103 raised after the delimiters were read) the error carries the
    part of the header that could be read, so the NAK can echo MSH-10.
    """
    data = raw[3:] if raw.startswith(UTF8_BOM) else raw
    if not data.startswith(b"MSH"):
        if data[:3] in (b"FHS", b"BHS"):
            raise HL7Error("HL7 batches (FHS/BHS) are not accepted here; send one message per frame", "100")
        found = data[:12].decode("ascii", "replace") if data else "nothing"
        raise HL7Error(f"no MSH segment at the start of the message (found {found!r})", "100", "MSH^1")
    if len(data) < 8:
        raise HL7Error("MSH segment is truncated", "100", "MSH^1")
    sep_byte = data[3:4]
    sep = sep_byte.decode("latin-1")
    line_end = _first_line_end(data, 4)
    raw_fields = data[:line_end].split(sep_byte)
    enc = raw_fields[1].decode("latin-1") if len(raw_fields) > 1 else ""
    problem = _check_encoding_chars(enc, sep)
    if problem:
        raise HL7Error(problem, "102", "MSH^1^2")
    msh18 = raw_fields[17].decode("ascii", "replace") if len(raw_fields) > 17 else ""
    try:
        codec = _choose_codec(data[:line_end], raw_fields, msh18, sep, enc[1], default_charset)
    except HL7Error as err:
        text = _normalize(data.decode("ascii", "replace"))
        err.header = _header(text, sep, enc, "ascii", keep_charset=False)
        raise
    text = _decode(data, codec, msh18, sep, enc)
    header = _header(text, sep, enc, codec)
    _validate(header)
    return header


def _msh18_of(msh: bytes, codec: str, sep: str) -> str | None:
    try:
        fields = msh.decode(codec).split(sep)
    except UnicodeDecodeError:
        return None
    return fields[17] if len(fields) > 17 else ""


def _choose_codec(
    msh: bytes, raw_fields: list[bytes], msh18: str, sep: str, rep_sep: str, default_charset: str
) -> str:
    """The codec named by MSH-18, read from the raw bytes of the MSH segment ``msh``.

    With non-ASCII bytes in MSH (say a hospital name in MSH-4) and a multi-byte charset, a trail
    byte may equal a delimiter (GBK and Big5 trail bytes include ``|`` and ``^``) and add a split,
    so the real MSH-18 sits at raw index 17 or later: the first candidate whose codec decodes MSH
    to the same MSH-18 is taken.
    """
    if not msh.isascii():
        for field in raw_fields[17:]:
            if not field or not field.isascii():
                continue
            value = field.decode("ascii")
            try:
                codec = codec_for_msh18(value, rep_sep)
            except HL7Error:
                continue
            if codec is not None and _msh18_of(msh, codec, sep) == value:
                return codec
    return codec_for_msh18(msh18, rep_sep) or default_codec(default_charset)


def _normalize(text: str) -> str:
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    return text


def _decode(data: bytes, codec: str, msh18: str, sep: str, enc: str) -> str:
    try:
        return _normalize(data.decode(codec))
    except UnicodeDecodeError as exc:
        label = f"MSH-18 {msh18!r}" if msh18 else "the channel's default charset (MSH-18 is empty)"
        text = _normalize(data.decode(codec, "replace"))
        raise HL7Error(
            f"bytes {exc.object[exc.start : exc.start + 4]!r} at offset {exc.start} are not valid {codec} "
            f"as named by {label}",
            "102",
            "MSH^1^18",
            header=_header(text, sep, enc, codec),
        ) from None


def _header(text: str, sep: str, enc: str, codec: str, *, keep_charset: bool = True) -> Header:
    end = text.find("\r")
    fields = (text if end < 0 else text[:end]).split(sep)
    # fields[n] is MSH-(n+1): MSH-1 is the separator itself.
    fields += [""] * (18 - len(fields))
    comp = enc[0]
    msg_type = fields[8].split(comp)
    msg_type += [""] * (3 - len(msg_type))
    charset_field = fields[17] if keep_charset else ""
    return Header(
        field_sep=sep,
        encoding_chars=enc,
        sending_app=fields[2],
        sending_facility=fields[3],
        receiving_app=fields[4],
        receiving_facility=fields[5],
        datetime=fields[6],
        message_type=msg_type[0].strip(),
        trigger=msg_type[1].strip(),
        structure=msg_type[2].strip(),
        control_id=fields[9],
        processing_id=fields[10],
        version=fields[11].split(comp, 1)[0].strip(),
        charset=codec,
        charset_field=charset_field,
        text=text,
    )


def _validate(header: Header) -> None:
    if not header.message_type:
        raise HL7Error("MSH-9 message type is empty", "101", "MSH^1^9", header=header)
    if not header.control_id.strip():
        raise HL7Error("MSH-10 message control id is empty", "101", "MSH^1^10", header=header)
    if not header.version:
        raise HL7Error("MSH-12 version id is empty", "101", "MSH^1^12", header=header)
    if header.version not in VERSIONS:
        raise HL7Error(
            f"MSH-12 version {header.version!r} is not an HL7 v2 version (2.1 .. 2.9.1)",
            "203",
            "MSH^1^12",
            header=header,
        )


def escape(text: str, header: Header | None = None) -> str:
    """Escape delimiters in ``text`` (HL7 v2.5 section 2.7.4: \\F\\ \\S\\ \\R\\ \\E\\ \\T\\).

    Line breaks become spaces: the fields we fill (MSA-3, ERR-7) are ST/TX without formatting.
    """
    sep, enc = (header.field_sep, header.encoding_chars) if header else ("|", "^~\\&")
    esc = enc[2]
    table = {
        ord(esc): f"{esc}E{esc}",
        ord(sep): f"{esc}F{esc}",
        ord(enc[0]): f"{esc}S{esc}",
        ord(enc[1]): f"{esc}R{esc}",
        ord(enc[3]): f"{esc}T{esc}",
        ord("\r"): " ",
        ord("\n"): " ",
    }
    if len(enc) > 4:
        table[ord(enc[4])] = f"{esc}P{esc}"
    return text.translate(table)


_UNESCAPE = re.compile(r"\\(F|S|R|E|T|P)\\")


def unescape(text: str, header: Header | None = None) -> str:
    """Resolve the delimiter escape sequences that `escape` writes; other sequences are kept."""
    sep, enc = (header.field_sep, header.encoding_chars) if header else ("|", "^~\\&")
    esc = enc[2]
    if esc not in text:
        return text
    values = {"F": sep, "S": enc[0], "R": enc[1], "E": esc, "T": enc[3], "P": enc[4] if len(enc) > 4 else "#"}
    pattern = _UNESCAPE if esc == "\\" else re.compile(re.escape(esc) + r"(F|S|R|E|T|P)" + re.escape(esc))
    return pattern.sub(lambda m: values[m.group(1)], text)


def parse_message(header: Header) -> hl7.Message:
    """The whole message as a python-hl7 tree (segments, fields, components)."""
    return hl7.parse(header.text)


_PATTERN = re.compile(r"^([A-Z0-9]{3})(?:\^([A-Z0-9]{3}|\*))?$")


class MessageTypeFilter:
    """Which MSH-9 values a channel accepts.

    Patterns are ``"ADT"`` (any trigger) or ``"ADT^A01"``.  With no patterns, any message code of
    HL7 table 0076 is accepted.  Local codes (starting with ``Z``) are accepted only when listed.
    `check` raises `HL7Error` 200 (unsupported message type, HL7 table 0357) or 201 (unsupported
    event code) located at MSH-9.
    """

    def __init__(self, patterns: Iterable[str] | None = None) -> None:
        self._any_known = True
        self._codes: dict[str, set[str] | None] = {}
        for p in patterns or ():
            m = _PATTERN.match(p.strip().upper())
            if not m:
                raise ValueError(f"message type pattern {p!r} must look like 'ADT' or 'ADT^A01'")
            code, trigger = m.group(1), m.group(2)
            if not (known_message_code(code) or code.startswith("Z")):
                close = difflib.get_close_matches(code, sorted(MESSAGE_CODES), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"message type {code!r} is not in HL7 table 0076{hint}")
            self._any_known = False
            if trigger is None or trigger == "*":
                self._codes[code] = None
            else:
                triggers = self._codes.get(code, set())
                if triggers is not None:  # None already means "any trigger"
                    triggers.add(trigger)
                    self._codes[code] = triggers

    def check(self, header: Header) -> None:
        code = header.message_type.upper()
        if self._any_known:
            if not known_message_code(code):
                raise HL7Error(
                    f"message type {code!r} (MSH-9.1) is not an HL7 message type", "200", "MSH^1^9^1^1",
                    header=header,
                )
            return
        if code not in self._codes:
            raise HL7Error(
                f"message type {code!r} is not accepted on this channel (accepted: {self.describe()})",
                "200",
                "MSH^1^9^1^1",
                header=header,
            )
        triggers = self._codes[code]
        if triggers is not None and header.trigger.upper() not in triggers:
            raise HL7Error(
                f"event {header.message_code!r} is not accepted on this channel "
                f"(accepted: {self.describe()})",
                "201",
                "MSH^1^9^1^2",
                header=header,
            )

    def describe(self) -> str:
        if self._any_known:
            return "any HL7 table 0076 message type"
        parts = []
        for code, triggers in sorted(self._codes.items()):
            parts += [code] if triggers is None else [f"{code}^{t}" for t in sorted(triggers)]
        return ", ".join(parts)
