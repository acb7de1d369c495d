"""The bytes of a received C-STORE data set: a structural check, the few UIDs the store needs, and the
DICOM File Meta Information that turns the data set into a Part 10 file without re-encoding it.

* `scan_dataset` walks the data elements of PS3.5 section 7 (explicit or implicit VR, little or big
  endian, undefined-length sequences and items of 7.5, encapsulated pixel data of A.4) without decoding
  values.  A data set whose elements run past its end, whose VR is not two letters, or whose sequences are
  not delimited raises `MalformedDataset`: the C-STORE answer is then C000 "cannot understand".
* `file_meta` encodes group 0002 (PS3.10 section 7.1) in explicit VR little endian, preceded by the
  128-byte preamble and ``DICM``.

Neither touches pydicom: the store's hot path costs a single pass over the element headers.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable

__all__ = [
    "DEFLATED",
    "EXPLICIT_BIG",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION",
    "IMPLICIT_LITTLE",
    "MalformedDataset",
    "file_meta",
    "inflate",
    "scan_dataset",
    "text_value",
]

IMPLEMENTATION_CLASS_UID = "2.25.148619123219517393946623935340313017648"  # ihehub's, a UUID-derived UID
IMPLEMENTATION_VERSION = "IHEHUB_0_1"  # (0002,0013) SH, at most 16 characters

IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
# PS3.5 Table 7.1-1: VRs with a reserved 2 bytes and a 32-bit length in explicit VR
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
MAX_DEPTH = 32

_U16 = {True: struct.Struct("<H"), False: struct.Struct(">H")}
_U32 = {True: struct.Struct("<I"), False: struct.Struct(">I")}
_TAG = {True: struct.Struct("<HH"), False: struct.Struct(">HH")}


class MalformedDataset(ValueError):
    """The data set is not a well-formed sequence of data elements (PS3.5 section 7)."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at byte {offset}")
        self.offset = offset


def inflate(data: bytes | memoryview) -> bytes:
    """The data set of the Deflated Explicit VR Little Endian transfer syntax (PS3.5 A.5): raw DEFLATE."""
    try:
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        return d.decompress(data) + d.flush()
    except zlib.error as exc:
        raise MalformedDataset(f"deflated data set cannot be inflated ({exc})", 0) from exc


def scan_dataset(data: bytes | memoryview, *, implicit: bool, little: bool,
                 want: Iterable[int] = ()) -> dict[int, bytes]:
    """Check the structure of ``data`` and return the raw values of the top-level tags in ``want``."""
    return _Scanner(memoryview(data), implicit, little, frozenset(want)).run()


def text_value(raw: bytes | None) -> str | None:
    """A UI/CS/AE value without its padding (NUL or space), or ``None`` when absent or empty."""
    if raw is None:
        return None
    value = raw.rstrip(b"\x00 ").lstrip(b" ")
    if not value:
        return None
    return value.decode("ascii", errors="replace")


class _Scanner:
    def __init__(self, buf: memoryview, implicit: bool, little: bool, want: frozenset[int]) -> None:
        self.buf = buf
        self.implicit = implicit
        self.little = little
        self.want = want
        self.found: dict[int, bytes] = {}

    def run(self) -> dict[int, bytes]:
        self._dataset(0, len(self.buf), self.implicit, self.little, depth=0, delimited=False)
        return self.found

    def _dataset(self, pos: int, end: int, implicit: bool, little: bool, *, depth: int, delimited: bool) -> int:
        """Walk elements from ``pos`` to ``end``; with ``delimited`` stop after an item delimiter."""
        if depth > MAX_DEPTH:
            raise MalformedDataset("sequences nested too deeply", pos)
        buf = self.buf
        tag_s, u16, u32 = _TAG[little], _U16[little], _U32[little]
        while pos < end:
            if pos + 8 > end:
                raise MalformedDataset("data element header cut off", pos)
            group, element = tag_s.unpack_from(buf, pos)
            tag = group << 16 | element
            if tag == ITEM_DELIMITER:
                if not delimited:
                    raise MalformedDataset("item delimiter outside an item", pos)
                return pos + 8
            if implicit or group == 0xFFFE:
                vr = b""
                length = u32.unpack_from(buf, pos + 4)[0]
                pos += 8
            else:
                vr = bytes(buf[pos + 4:pos + 6])
                if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                    raise MalformedDataset(f"({group:04X},{element:04X}) has no valid VR", pos)
                if vr in LONG_VRS:
                    if pos + 12 > end:
                        raise MalformedDataset("data element header cut off", pos)
                    length = u32.unpack_from(buf, pos + 8)[0]
                    pos += 12
                else:
                    length = u16.unpack_from(buf, pos + 6)[0]
                    pos += 8
            if length == UNDEFINED:
                if vr == b"UN":  # PS3.5 6.2.2: contents of an undefined-length UN are implicit VR little endian
                    pos = self._sequence(pos, end, True, True, depth=depth + 1)
                elif vr in (b"OB", b"OW") or (tag == PIXEL_DATA and not implicit):
                    pos = self._fragments(pos, end, little)
                elif vr in (b"", b"SQ"):
                    pos = self._sequence(pos, end, implicit, little, depth=depth + 1)
                else:
                    raise MalformedDataset(f"({group:04X},{element:04X}) {vr.decode()} cannot have undefined length",
                                           pos)
                continue
            if pos + length > end:
                raise MalformedDataset(f"({group:04X},{element:04X}) value of {length} bytes runs past the end", pos)
            if depth == 0 and tag in self.want:
                self.found[tag] = bytes(buf[pos:pos + length])
            pos += length
        if delimited:
            raise MalformedDataset("item without its delimiter", pos)
        return pos

    def _sequence(self, pos: int, end: int, implicit: bool, little: bool, *, depth: int) -> int:
        """Items of an undefined-length sequence up to its sequence delimiter (PS3.5 7.5.2)."""
        tag_s, u32 = _TAG[little], _U32[little]
        while True:
            if pos + 8 > end:
                raise MalformedDataset("sequence without its delimiter", pos)
            group, element = tag_s.unpack_from(self.buf, pos)
            tag = group << 16 | element
            length = u32.unpack_from(self.buf, pos + 4)[0]
            if tag == SEQUENCE_DELIMITER:
                return pos + 8
            if tag != ITEM:
                raise MalformedDataset(f"({group:04X},{element:04X}) where a sequence item was expected", pos)
            pos += 8
            if length == UNDEFINED:
                pos = self._dataset(pos, end, implicit, little, depth=depth, delimited=True)
            elif pos + length > end:
                raise MalformedDataset(f"item of {length} bytes runs past the end", pos)
            else:
                pos += length

    def _fragments(self, pos: int, end: int, little: bool) -> int:
        """Encapsulated pixel data (PS3.5 A.4): offset table and fragments, each a defined-length item."""
        tag_s, u32 = _TAG[little], _U32[little]
        while True:
            if pos + 8 > end:
                raise MalformedDataset("encapsulated pixel data without its delimiter", pos)
            group, element = tag_s.unpack_from(self.buf, pos)
            tag = group << 16 | element
            length = u32.unpack_from(self.buf, pos + 4)[0]
            pos += 8
            if tag == SEQUENCE_DELIMITER:
                return pos
            if tag != ITEM or length == UNDEFINED:
                raise MalformedDataset("encapsulated pixel data fragment is not a defined-length item", pos - 8)
            if pos + length > end:
                raise MalformedDataset(f"pixel data fragment of {length} bytes runs past the end", pos)
            pos += length


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", errors="replace")
    return raw + b" " if len(raw) % 2 else raw


def file_meta(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
              source_ae_title: str | None = None) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1) of a received data set."""
    body = b"".join((
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _ui(sop_class_uid)),
        _element(0x0002, 0x0003, b"UI", _ui(sop_instance_uid)),
        _element(0x0002, 0x0010, b"UI", _ui(transfer_syntax)),
        _element(0x0002, 0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
        _element(0x0002, 0x0013, b"SH", _text(IMPLEMENTATION_VERSION)),
        _element(0x0002, 0x0016, b"AE", _text(source_ae_title)) if source_ae_title else b"",
    ))
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + length + body
