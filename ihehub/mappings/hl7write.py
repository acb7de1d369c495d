"""HL7 v2 output: set fields by path, escape delimiters, encode in the output character set.

HL7 v2.5 chapter 2: section 2.5 (message construction), 2.7.4 (escape sequences: a value holding
``|`` ``^`` ``&`` ``~`` or ``\\`` is written ``\\F\\`` ``\\S\\`` ``\\T\\`` ``\\R\\`` ``\\E\\``),
2.7.6 (``\\.br\\`` for a line break) and 2.15.9.18 (MSH-18 names the character set of the bytes).

Targets use the reading syntax without conditions: ``PID-5.1``, ``PID-3[2].4.1``, ``OBX[2]-5``,
``PID-3[*].1`` and ``OBX[*]-5`` (a list value fills one repetition or one segment per item), and
a bare segment name (``ZPI``) to write a whole segment read from the input.  A list written to a
target without ``[*]`` fills the field's repetitions.  With ``copy: true`` the output starts as the
input message (HL7 to HL7: change only what the rules name; ``remove`` drops segments).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ihehub.hl7.charsets import codec_for_msh18, python_codec
from ihehub.hl7.errors import HL7Error
from ihehub.mappings.errors import EvalError
from ihehub.mappings.hl7path import HL7Doc, PathError, Structured, compile_path
from ihehub.mappings.lang import CompileError
from ihehub.mappings.writers import OutputSpec, Setter, is_blank

# Preferred HL7 table 0211 spelling of each codec, for MSH-18.
_MSH18_NAME = {
    "utf-8": "UNICODE UTF-8", "gb18030": "GB 18030-2000", "gbk": "GB 2312", "ascii": "ASCII", "big5": "BIG-5",
    "iso-8859-1": "8859/1", "euc_kr": "KS X 1001", "shift_jis": "ISO IR14",
}


def msh18_name(charset: str) -> str:
    """The MSH-18 value for an output ``charset`` (HL7 table 0211 name or codec alias)."""
    codec = python_codec(charset, location="output.charset")
    written = charset.strip()
    if any(c.isspace() or c == "/" for c in written) or written.upper() == "ASCII":
        return written  # already an HL7 table 0211 spelling
    return _MSH18_NAME.get(codec, written)


@dataclasses.dataclass(frozen=True, slots=True)
class _Target:
    segment: str
    seg_index: int  # 1-based, 0 = spread
    field: int
    rep: int  # 1-based, 0 = spread
    comp: int
    sub: int


class HL7Output:
    """A message under construction: ``segments[i]`` are escaped field texts (MSH as in `HL7Doc`)."""

    __slots__ = ("delims", "msh18_set", "segments")

    def __init__(self, spec: OutputSpec, source: HL7Doc | None = None) -> None:
        enc = spec.encoding_characters
        self.delims = "|" + enc[:4]
        self.msh18_set = False
        if spec.copy and source is not None:
            src = source.delims
            self.segments = [
                [f if i < 3 and s[0] == "MSH" else _translate(f, src, self.delims) for i, f in enumerate(s)]
                for s in source.segments if s[0] not in spec.remove
            ]
            for s in self.segments:
                if s[0] == "MSH":
                    s[1], s[2] = self.delims[0], enc
        else:
            self.segments = [["MSH", "|", enc]]

    def escape(self, value: Any) -> str:
        if isinstance(value, Structured):
            return _translate(str(value), value.delims, self.delims)
        if isinstance(value, bool):
            text = "Y" if value else "N"
        elif isinstance(value, float) and value.is_integer():
            text = str(int(value))
        else:
            text = str(value)
        sep, comp, rep, esc, sub = tuple(self.delims)
        if not any(c in text for c in (sep, comp, rep, esc, sub, "\r", "\n")):
            return text
        text = text.translate({ord(esc): f"{esc}E{esc}", ord(sep): f"{esc}F{esc}", ord(comp): f"{esc}S{esc}",
                               ord(rep): f"{esc}R{esc}", ord(sub): f"{esc}T{esc}"})
        return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", f"{esc}.br{esc}")

    def repetitions(self, t: _Target) -> int:
        positions = [i for i, s in enumerate(self.segments) if s[0] == t.segment]
        if len(positions) < t.seg_index:
            return 0
        fields = self.segments[positions[t.seg_index - 1]]
        value = fields[t.field] if t.field < len(fields) else ""
        return len(value.split(self.delims[2])) if value else 0

    def count(self, name: str) -> int:
        return sum(1 for s in self.segments if s[0] == name)

    def segment(self, name: str, index: int) -> list[str]:
        positions = [i for i, s in enumerate(self.segments) if s[0] == name]
        while len(positions) < index:
            at = positions[-1] + 1 if positions else len(self.segments)
            self.segments.insert(at, [name])
            positions.append(at)
        return self.segments[positions[index - 1]]

    def put(self, t: _Target, seg_index: int, rep: int, value: Any) -> None:
        fields = self.segment(t.segment, seg_index)
        if t.field == 0:
            text = self.escape(value) if isinstance(value, Structured) else str(value)
            parts = text.split(self.delims[0])
            if parts[0] != t.segment:
                raise EvalError(f"a value written to segment {t.segment} must be a {t.segment} segment", value)
            fields[:] = ["MSH", self.delims[0], *parts[1:]] if t.segment == "MSH" else parts
            return
        if t.segment == "MSH" and t.field == 18:
            self.msh18_set = True
        text = "" if value is None else self.escape(value)
        while len(fields) <= t.field:
            fields.append("")
        _, comp_sep, rep_sep, _, sub_sep = tuple(self.delims)
        if t.comp == 0 and rep == 1 and rep_sep not in fields[t.field]:
            fields[t.field] = text
            return
        reps = fields[t.field].split(rep_sep) if fields[t.field] else [""]
        while len(reps) < rep:
            reps.append("")
        if t.comp == 0:
            reps[rep - 1] = text
        else:
            comps = reps[rep - 1].split(comp_sep)
            while len(comps) < t.comp:
                comps.append("")
            if t.sub == 0:
                comps[t.comp - 1] = text
            else:
                subs = comps[t.comp - 1].split(sub_sep)
                while len(subs) < t.sub:
                    subs.append("")
                subs[t.sub - 1] = text
                comps[t.comp - 1] = sub_sep.join(subs)
            reps[rep - 1] = comp_sep.join(comps)
        fields[t.field] = rep_sep.join(reps)

    def text(self) -> str:
        sep = self.delims[0]
        lines = []
        for s in self.segments:
            lines.append("MSH" + sep + sep.join(s[2:]) if s[0] == "MSH" else sep.join(s))
        return "\r".join(lines) + "\r"

    def field(self, name: str, n: int) -> str:
        for s in self.segments:
            if s[0] == name:
                return s[n] if n < len(s) else ""
        return ""


def _translate(text: str, src: str, dst: str) -> str:
    """Re-delimit raw HL7 text written with delimiters ``src`` (field, comp, rep, esc, sub) into ``dst``."""
    if src == dst:
        return text
    return text.translate({ord(a): b for a, b in zip(src, dst, strict=True) if a != b})


def compile_hl7_target(target: str, spec: OutputSpec) -> Setter:
    try:
        path = compile_path(target)
    except PathError as exc:
        raise CompileError(str(exc), 1) from None
    if len(path.selectors) > 1:
        raise CompileError(f"HL7 target {target!r}: segment groups (/) can be read, not written", 1)
    sel = path.selectors[0]
    if path.field and path.segment == "MSH" and path.field <= 2:
        raise CompileError("MSH-1 and MSH-2 are the delimiters: set output.encoding_characters instead", 1)
    spread_seg = sel.star
    spread_rep = path.multi and not spread_seg
    if spread_seg and path.multi and path.rep == 0 and path.field:
        raise CompileError(f"HL7 target {target!r} may spread ([*]) over segments or repetitions, not both", 1)
    t = _Target(sel.name, 0 if spread_seg else sel.index, path.field, 0 if spread_rep else path.rep or 1,
                path.comp, path.sub)
    copy_mode = spec.copy

    def keep(value: Any) -> bool:
        return not is_blank(value) or copy_mode

    if spread_seg:
        def set_segments(out: Any, value: Any) -> None:
            if not isinstance(value, list):  # one value: every segment of that name (at least one) gets it
                value = [value] * max(out.count(t.segment), 1)
            for i, item in enumerate(value, start=1):
                if keep(item):
                    out.put(t, i, t.rep, item)

        return set_segments

    def set_value(out: Any, value: Any) -> None:
        if isinstance(value, list) and t.field:
            if not value and copy_mode:
                out.put(t, t.seg_index, 1, None)
            for i, item in enumerate(value, start=1):
                if keep(item):
                    out.put(t, t.seg_index, i, item)
            return
        if t.rep == 0:  # one value for PID-3[*].5: every repetition (at least one) gets it
            for i in range(1, max(out.repetitions(t), 1) + 1):
                if keep(value):
                    out.put(t, t.seg_index, i, value)
            return
        if keep(value):
            out.put(t, t.seg_index, t.rep, value)

    return set_value


def finish_hl7(out: HL7Output, spec: OutputSpec) -> bytes:
    msh = out.segment("MSH", 1)
    if spec.version and not out.field("MSH", 12):
        out.put(_Target("MSH", 1, 12, 1, 0, 0), 1, 1, spec.version)
    if spec.charset and not out.msh18_set:
        name = msh18_name(spec.charset)
        if name.upper() != "ASCII" or out.field("MSH", 18):
            out.put(_Target("MSH", 1, 18, 1, 0, 0), 1, 1, name)
    text = out.text()
    msh18 = msh[18] if len(msh) > 18 else ""
    try:
        codec = python_codec(spec.charset) if spec.charset else codec_for_msh18(msh18, out.delims[2])
    except HL7Error as exc:
        raise EvalError(f"MSH-18 {msh18!r}: {exc}", msh18) from None
    if codec is None:
        if text.isascii():
            codec = "ascii"
        else:
            out.put(_Target("MSH", 1, 18, 1, 0, 0), 1, 1, "UNICODE UTF-8")
            text, codec = out.text(), "utf-8"
    if spec.validate:
        _validate(text)
    try:
        return text.encode(codec)
    except UnicodeEncodeError as exc:
        raise EvalError(f"{_locate(out, exc)} holds {exc.object[exc.start:exc.end]!r}, which {codec} cannot encode",
                        exc.object[exc.start:exc.end]) from None


def _locate(out: HL7Output, exc: UnicodeEncodeError) -> str:
    offset = 0
    sep = out.delims[0]
    for s in out.segments:
        line = "MSH" + sep + sep.join(s[2:]) if s[0] == "MSH" else sep.join(s)
        if offset <= exc.start < offset + len(line):
            at = exc.start - offset
            field = line[:at].count(sep) + (1 if s[0] == "MSH" else 0)
            return f"{s[0]}-{field}"
        offset += len(line) + 1
    return "the message"


def _validate(text: str) -> None:
    """Check the message against its HL7 structure with hl7apy (strict validation)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    try:
        message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        message.validate()
    except (HL7apyException, ValueError, KeyError, IndexError) as exc:
        raise EvalError(f"output is not a valid HL7 message: {exc}") from None
