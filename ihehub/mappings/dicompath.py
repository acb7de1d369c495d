"""DICOM input for mappings: read a dataset once, and compile the paths that read it.

A path names a data element by keyword or tag, through sequence items (DICOM PS3.5 section 7.1 data
elements, 7.5 nested data sets)::

    PatientName                                       a keyword of the data dictionary (PS3.6)
    (0010,0020)   0010,0020   00100020                 a tag, three spellings; private tags by number
    ReferencedStudySequence[0].ReferencedSOPInstanceUID   an item of a sequence (counted from 0)
    ReferencedSeriesSequence[*].SeriesInstanceUID        every item: a list
    ImageType[1]   ImageType[*]                        one value of a multi-valued element / all of them

Values are text, as the dataset holds them: a person name is its DICOM string
(``Wang^XiaoDong=王^小東``), numbers keep their written form (``5.000000``), a multi-valued
element is a list, a tag (AT) is ``00100020``, binary data (OB, OW, ...) is Base64 (PS3.18 F.2.7)
and a UN element is decoded as text when it is text.  Text is decoded with the dataset's Specific
Character Set (0008,0005; PS3.5 section 6.1, ISO 2022 escapes, ISO_IR 192, GB18030) by pydicom.
An absent element reads as null, a present but empty one as ``""``.

In a mapping with DICOM input a bare tag such as ``00100020`` or ``0010,0020`` is a path, not a
number: quote such numbers.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import struct
from typing import Any

from pydicom import dcmread
from pydicom.charset import decode_bytes
from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from ihehub.mappings.errors import EvalError
from ihehub.mappings.lang import CompileError, Ctx, Env, Getter, did_you_mean

STAR = -1
_TAG = r"\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)|[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}(?![0-9A-Za-z_])|[0-9A-Fa-f]{8}(?![0-9A-Za-z_])"
_NAME = rf"(?:{_TAG}|[A-Z][A-Za-z0-9]*)"
_STEP = re.compile(rf"({_NAME})(?::([A-Z]{{2}}))?(?:\[(\d+|\*)\])?")
#: One path as the expression tokenizer sees it (no ``:VR``, which only targets have).
PATH_TOKEN = re.compile(rf"{_NAME}(?:\[(?:\d+|\*)\])?(?:\.{_NAME}(?:\[(?:\d+|\*)\])?)*")
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})  # the VRs Specific Character Set applies to
VRS = frozenset({"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV",
                 "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"})


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """One element of a path: its tag, how it was written, an explicit VR (targets) and an index."""

    tag: int
    name: str
    vr: str | None  # explicit (``(0009,1001):LO``) or None
    index: int | None  # None: no [n]; STAR: [*]

    @property
    def dictionary_vr(self) -> str | None:
        """The VR the data dictionary gives (None for private and unknown tags)."""
        try:
            return str(dictionary_VR(self.tag))
        except KeyError:
            return None


def parse_tag(text: str) -> int | None:
    """``(0010,0020)``, ``0010,0020`` or ``00100020`` as an int; None when ``text`` is not a tag."""
    digits = text.strip("()").replace(",", "")
    if len(digits) == 8 and re.fullmatch(r"[0-9A-Fa-f]{8}", digits):
        return int(digits, 16)
    return None


def tag_of(name: str, pos: int = 0) -> int:
    """The tag of a keyword or tag text; `CompileError` with a did-you-mean for an unknown keyword."""
    tag = parse_tag(name)
    if tag is not None:
        return tag
    found = tag_for_keyword(name)
    if found is None:
        raise CompileError(f"unknown DICOM keyword {name!r}{did_you_mean(name, list(keyword_dict))}", pos + 1)
    return int(found)


def tag_text(tag: int) -> str:
    """``(0010,0020) PatientID`` -- how messages name an element."""
    keyword = keyword_for_tag(tag)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" + (f" {keyword}" if keyword else "")


def parse_path(text: str, pos: int = 0, *, target: bool = False) -> list[Step]:
    """Split and check a path; ``target`` allows ``:VR`` and requires the last step to name an element."""
    steps: list[Step] = []
    i = 0
    while True:
        m = _STEP.match(text, i)
        if not m:
            raise CompileError(f"bad DICOM path {text!r} at {text[i:i + 12]!r}: expected a keyword, (gggg,eeee), "
                               "[n] or [*]", pos + i + 1)
        name, vr, index = m.group(1), m.group(2), m.group(3)
        if vr is not None:
            if not target:
                raise CompileError(f"{text!r}: a VR (':{vr}') is given only in output targets", pos + m.start(2))
            if vr not in VRS:
                raise CompileError(f"{text!r}: {vr!r} is not a DICOM VR (PS3.5 table 6.2-1)", pos + m.start(2))
        steps.append(Step(tag_of(name, pos + i), name, vr, None if index is None else
                          STAR if index == "*" else int(index)))
        i = m.end()
        if i == len(text):
            break
        if text[i] != ".":
            raise CompileError(f"bad DICOM path {text!r} at column {i + 1}: steps are joined with '.'", pos + i + 1)
        i += 1
    for step in steps[:-1]:
        vr = step.vr or step.dictionary_vr
        if vr is not None and vr != "SQ":
            raise CompileError(f"{text!r}: {step.name} is not a sequence ({vr}), so nothing is inside it", pos + 1)
        if step.index is None:
            raise CompileError(f"{text!r}: say which item of {step.name}: {step.name}[0] (the first) or "
                               f"{step.name}[*] (every one)", pos + 1)
    last = steps[-1]
    if (last.vr or last.dictionary_vr) == "SQ" and last.index is not None:
        raise CompileError(f"{text!r} names an item of {last.name}; add the element, e.g. "
                           f"{last.name}[{'*' if last.index == STAR else last.index}].SOPInstanceUID", pos + 1)
    if sum(1 for s in steps if s.index == STAR) > 1 and target:
        raise CompileError(f"target {text!r} may spread ([*]) over one sequence only", pos + 1)
    return steps


# -- values ------------------------------------------------------------------------------------

def _one(value: Any, vr: str, ds: Dataset) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        return str(value)  # PersonName, UID, DSfloat's text
    if isinstance(value, bytes | bytearray):
        if vr == "UN":
            return _un_text(bytes(value), ds)
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, BaseTag):
        return f"{int(value):08X}"
    return str(value)


def _un_text(raw: bytes, ds: Dataset) -> str:
    """A UN value (typically a private element of an implicit-VR dataset) as text when it is text."""
    stripped = raw.rstrip(b"\x00 ")
    if stripped and all(b >= 0x20 or b in (0x09, 0x0A, 0x0D, 0x1B) for b in stripped):
        try:
            return decode_bytes(stripped, ds._character_set, set())
        except (UnicodeError, LookupError):
            pass
    return base64.b64encode(raw).decode("ascii")


def element_value(elem: DataElement, ds: Dataset) -> Any:
    """A data element's value as mapping values (see the module docstring)."""
    value = elem.value
    vr = elem.VR
    if vr == "SQ":
        raise EvalError(f"{tag_text(int(elem.tag))} is a sequence: read an element of its items, e.g. "
                        f"{keyword_for_tag(elem.tag) or 'Sequence'}[0].Keyword")
    if isinstance(value, MultiValue | list | tuple):
        return [_one(v, vr, ds) for v in value]
    if value is None:
        return ""
    return _one(value, vr, ds)


def _items(ds: Dataset, step: Step) -> list[Dataset]:
    try:
        elem = ds[step.tag]
    except KeyError:
        return []
    if elem.VR != "SQ":
        raise EvalError(f"{tag_text(step.tag)} is {elem.VR}, not a sequence")
    seq = elem.value
    if step.index == STAR:
        return list(seq)
    assert step.index is not None
    return [seq[step.index]] if step.index < len(seq) else []


def _leaf(ds: Dataset, step: Step) -> Any:
    try:
        elem = ds[step.tag]
    except KeyError:
        return None
    value = element_value(elem, ds)
    if step.index is None:
        return value
    values = value if isinstance(value, list) else [value]
    if step.index == STAR:
        return values
    return values[step.index] if step.index < len(values) else None


def compile_reader(steps: list[Step]) -> Getter:
    """A getter reading ``steps`` from the parsed input (``ctx.doc``, a pydicom `Dataset`)."""
    last = steps[-1]
    if len(steps) == 1:
        tag = last.tag
        if last.index is None:
            def get_top(c: Ctx) -> Any:
                ds = c.doc
                try:
                    elem = ds[tag]
                except KeyError:
                    return None
                return element_value(elem, ds)

            return get_top
        return lambda c: _leaf(c.doc, last)
    inner = steps[:-1]
    many = any(s.index == STAR for s in steps)

    def get_nested(c: Ctx) -> Any:
        level: list[Dataset] = [c.doc]
        for step in inner:
            level = [item for ds in level for item in _items(ds, step)]
        values: list[Any] = []
        for ds in level:
            v = _leaf(ds, last)
            if isinstance(v, list) and last.index == STAR:
                values.extend(v)
            else:
                values.append(v)
        if many:
            return values
        return values[0] if values else None

    return get_nested


def dicom_path(env: Env, text: str, pos: int) -> Getter:
    """The path compiler of DICOM input (see `ihehub.mappings.lang.Env.paths`)."""
    return compile_reader(parse_path(text, pos))


# -- parsing the input -------------------------------------------------------------------------

def looks_like_dicom(data: bytes) -> bool:
    """A Part 10 file (``DICM`` at byte 128, or at 0 without preamble) or a dataset that starts with an
    even group 0002-0020 data element (little endian), as a dataset without preamble does."""
    if data[128:132] == b"DICM" or data[:4] == b"DICM":
        return True
    if len(data) < 8:
        return False
    group = int.from_bytes(data[:2], "little")
    return group % 2 == 0 and 0x0002 <= group <= 0x0020


def read_dicom(data: Any, *, pixels: bool = True) -> Dataset:
    """The dataset in ``data`` (bytes of a Part 10 file or of a bare dataset, or a `Dataset`);
    `EvalError` (code 102) when it is not DICOM.  ``pixels=False`` stops before the pixel data."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if isinstance(data, str):
        raise EvalError("DICOM input must be bytes (a DICOM file), not text", data[:16])
    if not isinstance(data, bytes):
        raise EvalError(f"DICOM input must be bytes (a DICOM file), not {type(data).__name__}")
    if not looks_like_dicom(data):
        raise EvalError("input is not DICOM: no 'DICM' at byte 128 (PS3.10 section 7.1) and it does not start with "
                        "a data element of group 0002-0020", data[:16], code="102")
    if data[:4] == b"DICM":
        data = bytes(128) + data
    try:
        ds = dcmread(io.BytesIO(data), force=True, stop_before_pixels=not pixels)
    except (InvalidDicomError, EOFError, ValueError, struct.error, OverflowError, KeyError, NotImplementedError,
            TypeError, UserWarning) as exc:  # pydicom's warnings are exceptions where warnings are errors
        raise EvalError(f"input is not a readable DICOM dataset: {exc}", data[:16], code="102") from None
    if len(ds) == 0:
        raise EvalError("input is not a readable DICOM dataset: it holds no data elements", data[:16], code="102")
    last_tag = max(ds.keys())
    last = ds.get_item(last_tag)  # pydicom stops quietly at the end of the bytes: a cut-off file shows here
    length, value = getattr(last, "length", None), getattr(last, "value", None)
    if isinstance(length, int) and length != 0xFFFFFFFF and isinstance(value, bytes) and len(value) < length:
        raise EvalError(f"input is a truncated DICOM dataset: {tag_text(int(last_tag))} should hold {length} bytes, "
                        f"{len(value)} arrived", code="102")
    return ds
