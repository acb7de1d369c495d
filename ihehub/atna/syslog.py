"""Syslog for audit messages: RFC 5424 messages, RFC 5425 / RFC 6587 stream framing.

* `parse_syslog` reads an RFC 5424 message (section 6): ``<PRI>VERSION TIMESTAMP HOSTNAME APP-NAME
  PROCID MSGID STRUCTURED-DATA [MSG]``, where MSG may start with a UTF-8 BOM (6.4).  IHE ITI-20 uses
  MSGID ``IHE+RFC-3881`` and a DICOM PS3.15 audit XML as MSG.  It is lenient where real senders are
  sloppy (a BOM before the PRI, any PRI) and strict where a wrong guess would corrupt data.
* `format_syslog` writes one (facility 10 authpriv, severity 5 notice, or 4 warning for a failure).
* `OctetCountingDecoder`: RFC 5425 section 4.3 / RFC 6587 section 3.4.1 ``MSG-LEN SP SYSLOG-MSG``,
  with a frame size cap; a frame that does not start with a count is a framing error, after which
  the decoder resynchronises on the next ``<count> <PRI>`` it finds.
* `StreamDecoder` for plain TCP accepts both octet counting and RFC 6587 section 3.4.2
  non-transparent framing (a message ends at LF, or NUL), deciding per frame by its first byte as
  RFC 6587 section 3.4 suggests.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterator

__all__ = [
    "BOM",
    "IHE_MSGID",
    "FrameError",
    "OctetCountingDecoder",
    "StreamDecoder",
    "SyslogError",
    "SyslogMessage",
    "format_syslog",
    "octet_frame",
    "parse_syslog",
]

BOM = b"\xef\xbb\xbf"
IHE_MSGID = "IHE+RFC-3881"
NIL = "-"
DEFAULT_MAX_FRAME = 1024 * 1024  # RFC 5425 4.3.1: receivers SHOULD accept 8192 octets; audits with queries get big
_MAX_COUNT_DIGITS = 10
_RESYNC = re.compile(rb"[1-9][0-9]{0,9} <[0-9]{1,3}>")
_HEADER = re.compile(
    rb"<(?P<pri>[0-9]{1,3})>(?P<version>[1-9][0-9]{0,2}) "
    rb"(?P<timestamp>\S+) (?P<hostname>\S+) (?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) "
)
_SD_NAME = re.compile(rb"[^= \]\"]{1,32}")


class SyslogError(ValueError):
    """Not an RFC 5424 message; the text says what is wrong and where."""


class FrameError(ValueError):
    """A stream framing error (a wrong octet count, garbage between frames, an oversize frame)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SyslogMessage:
    """An RFC 5424 message.  Header fields are None for NILVALUE ("-")."""

    facility: int
    severity: int
    version: int
    timestamp: str | None
    hostname: str | None
    app_name: str | None
    procid: str | None
    msgid: str | None
    structured_data: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    msg: bytes = b""  # MSG without the BOM
    bom: bool = False  # MSG started with a UTF-8 BOM (RFC 5424 6.4: MSG-UTF8)

    @property
    def pri(self) -> int:
        return self.facility * 8 + self.severity

    @property
    def time(self) -> dt.datetime | None:
        """TIMESTAMP as an aware datetime (RFC 5424 6.2.3 / RFC 3339), None if NIL or unreadable."""
        if not self.timestamp:
            return None
        s = self.timestamp.replace("Z", "+00:00").replace("z", "+00:00")
        try:
            value = dt.datetime.fromisoformat(s)
        except ValueError:
            return None
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _nil(value: bytes) -> str | None:
    text = value.decode("ascii", "replace")
    return None if text == NIL else text


def parse_syslog(data: bytes) -> SyslogMessage:
    """Parse one RFC 5424 message.  Raises `SyslogError`."""
    start = 0
    if data.startswith(BOM):  # not allowed before the PRI, but some senders put one there
        start = len(BOM)
    m = _HEADER.match(data, start)
    if m is None:
        raise SyslogError(_header_problem(data[start:]))
    pri = int(m.group("pri"))
    if pri > 191:
        raise SyslogError(f"PRI {pri} is out of range (0..191)")
    pos = m.end()
    sd, pos = _structured_data(data, pos)
    msg = b""
    if pos < len(data):
        if data[pos:pos + 1] != b" ":
            raise SyslogError(f"expected a space after STRUCTURED-DATA at byte {pos}, found {data[pos:pos + 10]!r}")
        msg = data[pos + 1:]
    bom = msg.startswith(BOM)
    if bom:
        msg = msg[len(BOM):]
    return SyslogMessage(
        facility=pri >> 3, severity=pri & 7, version=int(m.group("version")),
        timestamp=_nil(m.group("timestamp")), hostname=_nil(m.group("hostname")), app_name=_nil(m.group("app")),
        procid=_nil(m.group("procid")), msgid=_nil(m.group("msgid")), structured_data=sd, msg=msg, bom=bom,
    )


def _header_problem(data: bytes) -> str:
    head = data[:60]
    if not data.startswith(b"<"):
        return f"not an RFC 5424 message: it must start with <PRI>, found {head!r}"
    if not re.match(rb"<[0-9]{1,3}>", data):
        return f"not an RFC 5424 message: unreadable PRI in {head!r}"
    if not re.match(rb"<[0-9]{1,3}>[1-9]", data):
        return f"not an RFC 5424 message: no VERSION after the PRI (RFC 3164 format?) in {head!r}"
    return f"not an RFC 5424 message: the header needs TIMESTAMP HOSTNAME APP-NAME PROCID MSGID, in {head!r}"


def _structured_data(data: bytes, pos: int) -> tuple[tuple[tuple[str, tuple[tuple[str, str], ...]], ...], int]:
    """RFC 5424 6.3: NILVALUE or one or more ``[SD-ID *(SP PARAM="VALUE")]``; values escape ``" \\ ]``."""
    if data[pos:pos + 1] == b"-":
        return (), pos + 1
    if data[pos:pos + 1] != b"[":
        raise SyslogError(f"STRUCTURED-DATA must be '-' or start with '[' at byte {pos}, found {data[pos:pos + 10]!r}")
    elements = []
    n = len(data)
    while pos < n and data[pos:pos + 1] == b"[":
        m = _SD_NAME.match(data, pos + 1)
        if m is None:
            raise SyslogError(f"bad SD-ID at byte {pos + 1}")
        sd_id = m.group().decode("ascii", "replace")
        pos = m.end()
        params = []
        while pos < n and data[pos:pos + 1] == b" ":
            m = _SD_NAME.match(data, pos + 1)
            if m is None or data[m.end():m.end() + 2] != b'="':
                raise SyslogError(f"bad SD-PARAM in [{sd_id}] at byte {pos + 1}")
            name = m.group().decode("ascii", "replace")
            pos = m.end() + 2
            value = bytearray()
            while True:
                if pos >= n:
                    raise SyslogError(f"unterminated value of {name} in [{sd_id}]")
                ch = data[pos]
                if ch == 0x5C and pos + 1 < n and data[pos + 1] in b'"\\]':  # backslash escape
                    value.append(data[pos + 1])
                    pos += 2
                    continue
                if ch == 0x22:
                    pos += 1
                    break
                value.append(ch)
                pos += 1
            params.append((name, value.decode("utf-8", "replace")))
        if data[pos:pos + 1] != b"]":
            raise SyslogError(f"[{sd_id}] is not closed with ']' at byte {pos}")
        pos += 1
        elements.append((sd_id, tuple(params)))
    return tuple(elements), pos


def _field(value: str | None, limit: int) -> bytes:
    """A header field: PRINTUSASCII (33..126) of at most ``limit`` characters, or NILVALUE."""
    if not value:
        return b"-"
    clean = "".join(ch if 33 <= ord(ch) <= 126 else "_" for ch in value)[:limit]
    return clean.encode("ascii")


def format_syslog(
    msg: bytes,
    *,
    hostname: str | None,
    app_name: str | None = "ihehub",
    procid: str | None = None,
    msgid: str | None = IHE_MSGID,
    severity: int = 5,
    facility: int = 10,
    timestamp: dt.datetime | None = None,
    bom: bool = True,
) -> bytes:
    """An RFC 5424 message carrying ``msg`` (a UTF-8 audit XML: the BOM marks it as MSG-UTF8)."""
    if not 0 <= facility <= 23 or not 0 <= severity <= 7:
        raise ValueError(f"facility must be 0..23 and severity 0..7, not {facility}/{severity}")
    ts = (timestamp or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    stamp = ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond:06d}Z"
    header = b"<%d>1 %s %s %s %s %s - " % (
        facility * 8 + severity, stamp.encode(), _field(hostname, 255), _field(app_name, 48),
        _field(procid, 128), _field(msgid, 32),
    )
    return header + (BOM if bom else b"") + msg


def octet_frame(message: bytes) -> bytes:
    """RFC 5425 section 4.3: ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d %s" % (len(message), message)


@dataclasses.dataclass(frozen=True, slots=True)
class Oversize:
    """A frame over the size cap, skipped: its announced size and its first bytes."""

    size: int
    prefix: bytes


Item = bytes | Oversize | FrameError


class OctetCountingDecoder:
    """Incremental RFC 5425 octet-counting decoder.

    `feed` returns what completed: frames (bytes), `Oversize` for frames over ``max_frame`` (their
    bytes are skipped without being buffered) and `FrameError` for input that is not a frame (the
    decoder then skips to the next ``<count> <PRI>`` it can find: resynchronisation).
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, allow_lf: bool = False) -> None:
        self.max_frame = max_frame
        self.allow_lf = allow_lf  # also take RFC 6587 non-transparent frames (plain TCP)
        self._buf = bytearray()
        self._need: int | None = None  # bytes of the current frame body still expected
        self._skip = 0  # bytes of an oversize frame still to discard
        self._searching = False  # after a framing error: looking for the next frame start
        self.garbage = 0  # bytes discarded while resynchronising

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame (what is lost if the stream ends now)."""
        return len(self._buf)

    def expected(self) -> int | None:
        """The announced size of the unfinished frame, if a count was read."""
        return self._need

    def feed(self, data: bytes) -> list[Item]:
        out: list[Item] = []
        if self._skip:
            take = min(self._skip, len(data))
            self._skip -= take
            data = data[take:]
        self._buf += data
        buf = self._buf
        while buf and not self._skip:
            if self._searching:
                cut = self._sync_point()
                if cut < 0:  # keep a tail that may be the start of the next frame
                    drop = max(len(buf) - 16, 0)
                    del buf[:drop]
                    self.garbage += drop
                    break
                del buf[:cut]
                self.garbage += cut
                self._searching = False
                continue
            if self._need is not None:
                if len(buf) < self._need:
                    break
                out.append(bytes(buf[:self._need]))
                del buf[:self._need]
                self._need = None
                continue
            item = self._header()
            if item is None:
                break
            if not isinstance(item, bool):
                out.append(item)
        return out

    def finish(self) -> bytes | None:
        """At end of stream: the bytes of an unfinished frame (None if there are none)."""
        rest = b"" if self._searching else bytes(self._buf)
        self._buf.clear()
        self._need = None
        self._searching = False
        if self.allow_lf and rest.startswith(b"<"):
            rest = rest.rstrip(b"\r\n\x00")
        return rest or None

    def _header(self) -> Item | bool | None:
        """Read a frame start.  None: need more bytes; True: consumed without output; else an item."""
        buf = self._buf
        first = buf[0]
        if 0x31 <= first <= 0x39:  # '1'..'9': MSG-LEN
            sp = buf.find(b" ", 0, _MAX_COUNT_DIGITS + 1)
            if sp < 0:
                if len(buf) <= _MAX_COUNT_DIGITS and buf.isdigit():
                    return None
                return self._resync("a frame must start with MSG-LEN and a space")
            digits = bytes(buf[:sp])
            if not digits.isdigit():
                return self._resync("a frame must start with MSG-LEN and a space")
            size = int(digits)
            del buf[:sp + 1]
            if size > self.max_frame:
                take = min(size, len(buf))
                prefix = bytes(buf[:min(take, 256)])
                del buf[:take]
                self._skip = size - take
                return Oversize(size, prefix)
            self._need = size
            return True
        if self.allow_lf and first == 0x3C:  # '<': non-transparent frame up to LF (RFC 6587 3.4.2)
            end = _trailer(buf)
            if end < 0:
                if len(buf) > self.max_frame:
                    return self._resync(f"a non-transparent frame longer than {self.max_frame} bytes")
                return None
            if end > self.max_frame:
                prefix = bytes(buf[:256])
                del buf[:end + 1]
                return Oversize(end, prefix)
            frame = bytes(buf[:end]).rstrip(b"\r")
            del buf[:end + 1]
            return frame if frame else True
        if self.allow_lf and first in (0x0A, 0x0D, 0x00):
            del buf[:1]
            return True
        return self._resync("expected MSG-LEN (octet counting, RFC 5425 4.3)"
                            + (" or '<' (RFC 6587 non-transparent)" if self.allow_lf else ""))

    def _resync(self, why: str) -> FrameError:
        """Enter resynchronisation: drop bytes up to the next plausible frame start."""
        sample = bytes(self._buf[:40])
        del self._buf[:1]
        self.garbage += 1
        self._searching = True
        return FrameError(f"{why}; found {sample!r}: skipping to the next frame")

    def _sync_point(self) -> int:
        buf = self._buf
        m = _RESYNC.search(buf)
        cut = m.start() if m else -1
        if self.allow_lf:
            lf = buf.find(b"\n<")
            if lf >= 0 and (cut < 0 or lf + 1 < cut):
                cut = lf + 1
        return cut


def _trailer(buf: bytearray) -> int:
    lf, nul = buf.find(b"\n"), buf.find(b"\x00")
    if lf < 0:
        return nul
    if nul < 0:
        return lf
    return min(lf, nul)


class StreamDecoder(OctetCountingDecoder):
    """Plain TCP (RFC 6587): octet counting or non-transparent framing, decided per frame."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        super().__init__(max_frame, allow_lf=True)


def iter_frames(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> Iterator[Item]:
    """Decode a whole octet-counted byte string (files, tests)."""
    dec = OctetCountingDecoder(max_frame)
    yield from dec.feed(data)
    rest = dec.finish()
    if rest:
        yield FrameError(f"the stream ended inside a frame ({len(rest)} bytes)")
