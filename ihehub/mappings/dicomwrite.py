"""DICOM output for mappings: build a dataset, or change the input's (tag morphing), and write it as Part 10.

Targets are DICOM paths (`ihehub.mappings.dicompath`) naming one element: ``PatientID``,
``(0010,0021)``, ``RequestAttributesSequence[0].ScheduledProcedureStepID`` (missing items are
created), ``ReferencedSeriesSequence[*].SeriesInstanceUID`` (a list fills one item per value).  The
VR comes from the data dictionary (PS3.6); a private or unknown tag names its own:
``(0009,1001):LO``.  A list value writes a multi-valued element (PS3.5 section 6.4).  Each value is
checked against its VR (length, characters; PS3.5 table 6.2-1) and a wrong one fails the rule.

``output.base: input`` starts from the input dataset: only the elements the rules name change, every
other element -- pixel data included -- is written back byte for byte, in the input's transfer
syntax.  ``delete()`` removes an element; null or ``""`` leave it as it is unless ``empty: keep``
(then the element is written empty, as a type 2 attribute).

Specific Character Set (0008,0005; PS3.5 section 6.1): when a rule writes text that is not ASCII and
the dataset has no character set, or one that cannot encode the text, the dataset becomes
``ISO_IR 192`` (UTF-8) and every text element is re-encoded.  The output is a DICOM file (PS3.10
section 7: preamble, ``DICM``, File Meta Information whose Media Storage SOP Class/Instance UIDs follow
the dataset) unless ``part10: false``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
from typing import Any

from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import validate_value

from ihehub.mappings.dicompath import BINARY_VRS, STAR, TEXT_VRS, Step, parse_path, parse_tag, read_dicom, tag_text
from ihehub.mappings.errors import EvalError
from ihehub.mappings.lang import CompileError
from ihehub.mappings.writers import OutputSpec, Setter, is_blank

CHARSET_TAG = 0x00080005
PIXEL_DATA = 0x7FE00010
UTF8 = "ISO_IR 192"
_INTS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOATS = frozenset({"FL", "FD"})


class _Delete:
    """The value of ``delete()``: the target element is removed."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "delete()"


DELETE = _Delete()


class DicomOutput:
    """The dataset being built; with a base, a shallow copy of the input whose sequences are copied on write."""

    __slots__ = ("base", "copied", "ds", "texts")

    def __init__(self, base: Dataset | None = None) -> None:
        self.base = base
        if base is None:
            self.ds = Dataset()
        else:
            ds = copy.copy(base)  # shares base._dict: give the copy its own
            ds._dict = dict(base._dict)
            ds._private_blocks = {}
            self.ds = ds
        self.copied: set[int] = set()
        self.texts: list[str] = []

    def item(self, steps: tuple[Step, ...], indexes: tuple[int, ...], create: bool) -> Dataset | None:
        """The dataset holding the last step's element (created when ``create``), or None."""
        node = self.ds
        for depth, (step, index) in enumerate(zip(steps, indexes, strict=True)):
            if depth == 0 and self.base is not None and step.tag not in self.copied and step.tag in node:
                node[step.tag] = copy.deepcopy(node[step.tag])  # the input's items stay as they were read
                self.copied.add(step.tag)
            if step.tag in node:
                elem = node[step.tag]
                if elem.VR != "SQ":
                    raise EvalError(f"{tag_text(step.tag)} is {elem.VR}, not a sequence")
            elif create:
                elem = DataElement(step.tag, "SQ", Sequence())
                node[step.tag] = elem
                if depth == 0:
                    self.copied.add(step.tag)
            else:
                return None
            items = elem.value
            if index >= len(items):
                if not create:
                    return None
                while len(items) <= index:
                    items.append(Dataset())
            node = items[index]
        return node

    def count(self, steps: tuple[Step, ...], star: int) -> int:
        """How many items the spread sequence (``steps[star]``) has now."""
        parent = self.item(steps[:star], tuple(s.index or 0 for s in steps[:star]), create=False)
        if parent is None or steps[star].tag not in parent:
            return 0
        return len(parent[steps[star].tag].value)

    def set_charset(self, value: Any) -> None:
        """Change (0008,0005) after decoding every text element with the old one, so each is re-encoded."""
        decode_text(self.ds)
        self.ds[CHARSET_TAG] = DataElement(CHARSET_TAG, "CS", value)


def decode_text(ds: Dataset) -> None:
    """Turn the raw text elements of ``ds`` and its items into decoded values (with their current charset)."""
    for tag in list(ds.keys()):
        if tag == PIXEL_DATA:
            continue
        raw = ds.get_item(tag)
        vr = getattr(raw, "VR", None)
        if vr is not None and vr not in TEXT_VRS and vr not in ("SQ", "UN"):
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                decode_text(item)


def encodable(text: str, ds: Dataset) -> bool:
    """Whether the dataset's Specific Character Set can encode ``text``: each character by one of its
    character sets (code extensions switch between them, PS3.5 section 6.1.2.5); a character set Python
    has no codec for counts as unable."""
    codecs = list(ds._character_set)
    return all(any(_encodes(ch, c) for c in codecs) for ch in set(text))


def _encodes(ch: str, codec: str) -> bool:
    try:
        ch.encode(codec)
    except (UnicodeError, LookupError):
        return False
    return True


# -- targets -------------------------------------------------------------------------------------

def _text_value(value: Any) -> str:
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else str(value)


def convert(value: Any, vr: str) -> Any:
    """One mapping value as the Python value pydicom writes for ``vr``; `EvalError` (102) when it does not fit."""
    try:
        if vr in _INTS:
            if isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            return int(value) if isinstance(value, int | float) else int(str(value).strip())
        if vr in _FLOATS:
            return float(value)
        if vr == "AT":
            tag = parse_tag(str(value))
            if tag is None:
                raise ValueError(f"{value!r} is not a tag like (0010,0020)")
            return tag
        if vr in BINARY_VRS or vr == "UN":
            if isinstance(value, bytes | bytearray):
                return bytes(value)
            return base64.b64decode(str(value), validate=True)
        text = _text_value(value)
        validate_value(vr, text, pydicom_config.RAISE)
        return text
    except (ValueError, TypeError, binascii.Error) as exc:
        raise EvalError(f"{value!r} is not a valid {vr} value: {exc}", value, code="102") from None


def compile_dicom_target(target: str, spec: OutputSpec) -> Setter:
    steps = tuple(parse_path(target, target=True))
    last = steps[-1]
    if last.index is not None:
        raise CompileError(f"target {target!r}: name the element without [n]; a list value writes a multi-valued "
                           "element", len(target))
    known = last.vr or last.dictionary_vr
    need_vr = (f"{tag_text(last.tag)} is a private or unknown tag, so say its VR, e.g. {last.name}:LO"
               if known is None else "")
    if need_vr and not spec.copy:
        raise CompileError(f"target {target!r}: {need_vr}", 1)
    if known is not None and " or " in known:  # an ambiguous VR of the dictionary (US or SS, OB or OW): the first
        known = known.split(" or ")[0]
    inner = steps[:-1]
    star = next((i for i, s in enumerate(inner) if s.index == STAR), -1)
    keep = spec.empty != "omit"
    tag = last.tag

    def put(out: DicomOutput, value: Any, indexes: tuple[int, ...]) -> None:
        if value is DELETE:
            node = out.item(inner, indexes, create=False)
            if node is not None and tag in node:
                del node[tag]
            return
        vr = known
        if vr is None:  # a private element of the input keeps its VR
            there = out.item(inner, indexes, create=False)
            if there is None or tag not in there:
                raise EvalError(need_vr, value)
            vr = there[tag].VR
        if is_blank(value) or (isinstance(value, list) and all(is_blank(v) for v in value)):
            if not keep:
                return
            elem_value: Any = Sequence() if vr == "SQ" else None
        elif vr == "SQ":
            raise EvalError(f"{tag_text(tag)} is a sequence: write its items' elements, e.g. {last.name}[0].Keyword",
                            value)
        elif isinstance(value, list):
            elem_value = [convert(v, vr) for v in value if not is_blank(v)]
        else:
            elem_value = convert(value, vr)
        if vr in TEXT_VRS and elem_value:
            out.texts += [v for v in (elem_value if isinstance(elem_value, list) else [elem_value]) if not v.isascii()]
        node = out.item(inner, indexes, create=True)
        assert node is not None
        if tag == CHARSET_TAG and node is out.ds:
            out.set_charset(elem_value)
            return
        node[tag] = DataElement(tag, vr, elem_value)

    if star < 0:
        fixed = tuple(s.index or 0 for s in inner)
        return lambda out, value: put(out, value, fixed)

    def put_spread(out: DicomOutput, value: Any) -> None:
        if not isinstance(value, list):  # one value: every item there is (at least one) gets it
            value = [value] * max(out.count(inner, star), 1)
        for i, item in enumerate(value):
            put(out, item, tuple(i if n == star else (s.index or 0) for n, s in enumerate(inner)))

    return put_spread


# -- the output ----------------------------------------------------------------------------------

def new_dicom_output(spec: OutputSpec, input_doc: Any) -> DicomOutput:
    return DicomOutput(input_doc if spec.copy and isinstance(input_doc, Dataset) else None)


def _transfer_syntax(base: Dataset | None) -> str:
    meta = getattr(base, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return str(meta.TransferSyntaxUID)
    implicit, little = base.original_encoding if base is not None else (False, True)
    if implicit:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)


def file_meta(out: DicomOutput) -> FileMetaDataset:
    """The File Meta Information (PS3.10 section 7.1) for the output: the input's, with the Media Storage
    SOP Class and Instance UIDs of the dataset as it is now."""
    ds = out.ds
    uids = [ds.get(k) for k in ("SOPClassUID", "SOPInstanceUID")]
    missing = [k for k, v in zip(("SOPClassUID", "SOPInstanceUID"), uids, strict=True) if not v]
    if missing:
        raise EvalError(f"a DICOM file needs {' and '.join(missing)} (PS3.10 section 7.1): write "
                        f"{'them' if len(missing) > 1 else 'it'}, or set output.part10: false")
    meta = FileMetaDataset()
    base_meta = getattr(out.base, "file_meta", None)
    if base_meta is not None:
        for tag in base_meta.keys():  # noqa: SIM118 -- iterating a Dataset converts its elements
            if tag not in (0x00020000, 0x00020013):  # group length: recomputed; version name: the writer's
                meta[tag] = base_meta.get_item(tag)
    for tag, value in ((0x00020002, uids[0]), (0x00020003, uids[1]), (0x00020010, _transfer_syntax(out.base)),
                       (0x00020012, PYDICOM_IMPLEMENTATION_UID)):  # the writer of this file (PS3.7 D.3.3.2)
        meta[tag] = DataElement(tag, "UI", value)
    return meta


def finish_dicom(out: DicomOutput, spec: OutputSpec) -> bytes:
    """The output's bytes: a Part 10 file (``part10``, the default) or the bare dataset."""
    ds = out.ds
    if out.texts and (not ds.get("SpecificCharacterSet") or not all(encodable(t, ds) for t in out.texts)):
        out.set_charset(UTF8)
    buf = io.BytesIO()
    if spec.part10:
        ds.file_meta = file_meta(out)
        writer_args: dict[str, Any] = {"enforce_file_format": True}
    else:
        ts = _transfer_syntax(out.base)
        ds.file_meta = FileMetaDataset()
        ds.preamble = None
        writer_args = {"implicit_vr": ts == ImplicitVRLittleEndian, "little_endian": ts != ExplicitVRBigEndian}
    if len(ds) == 0:
        raise EvalError("no rule wrote anything, so there is no DICOM dataset")
    try:
        ds.save_as(buf, **writer_args)
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise EvalError(f"cannot write the DICOM dataset: {exc}") from None
    return buf.getvalue()


def dump_dicom(data: bytes) -> str:
    """A DICOM output as text (``ihehub map test``): file meta and elements, binary values summarised."""
    return str(read_dicom(data))
