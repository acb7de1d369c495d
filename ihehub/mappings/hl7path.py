"""Read HL7 v2 messages by path: ``PID-3[*].1``, ``PID-5[1].1``, ``OBX[2]-5``, ``OBX[OBX-3.1 == "GLU"]-5``.

HL7 v2.5 chapter 2: section 2.5 (message construction: segments, fields, repetitions, components,
subcomponents and their delimiters from MSH-1/MSH-2), 2.7 (escape sequences \\F\\ \\S\\ \\T\\ \\R\\ \\E\\)
and 2.5.3 (a field holding ``""`` is the HL7 null: "delete the value").

Path grammar (positions are 1-based, as in the standard)::

    path     := selector ("/" selector)* ("-" FIELD ("[" REP | "*" "]")? ("." COMP ("." SUB)?)?)?
    selector := SEG ("[" INDEX | "*" | condition "]")?

* ``PID-5.1`` the first component of the first repetition of PID-5 in the first PID.
* ``PID-3[*].1`` a list: the first component of every repetition of PID-3.
* ``OBX[2]-5`` the second OBX; ``OBX[*]-5`` every OBX; ``OBX[OBX-3.1 == "GLU"]-5`` the first OBX
  whose condition holds (the condition reads the candidate segment).
* ``OBR[2]/OBX[*]-5`` a segment group: the OBX segments after the second OBR, up to the next OBR.
* ``PID`` alone: the whole segment, as raw text.

A value read at the field or component level that still holds lower-level delimiters is returned as
`Structured` (the raw text and the delimiters it was written with), so an HL7 output writes it back
as structure rather than escaping it; every other value has its escape sequences resolved.

Parsing a message (`HL7Doc`) splits segments and fields once; a compiled path (`compile_path`) then
costs a few list lookups.  ``ihehub.engine.expr`` (channel filters) reads HL7 through this module too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

DEFAULT_DELIMS = "|^~\\&"  # field, component, repetition, escape, subcomponent


class PathError(ValueError):
    """A path that cannot be compiled; the message names the column."""


class Structured(str):
    """Raw HL7 text holding lower-level delimiters (a whole segment, field, repetition list or component).

    ``delims`` are the five delimiters (field, component, repetition, escape, subcomponent) of the
    message it came from, so a writer using other delimiters can translate it.
    """

    delims: str

    def __new__(cls, text: str, delims: str) -> Structured:
        obj = super().__new__(cls, text)
        obj.delims = delims
        return obj


class HL7Doc:
    """One HL7 v2 message split into segments and fields (once, on construction).

    ``segments[i]`` is the list of fields of the i-th segment; for MSH, ``fields[1]`` is MSH-1 (the
    field separator) and ``fields[2]`` MSH-2, so ``fields[n]`` is always field n.  ``index`` maps a
    segment name to its positions.  ``owner`` is whatever evaluates conditions on this message
    (the mapping context); ``scope`` holds the candidate segment while a condition runs.
    """

    __slots__ = ("_index", "comp", "delims", "esc", "firsts", "owner", "rep", "scope", "segments", "sep", "sub",
                 "text")

    def __init__(self, text: str, owner: Any = None) -> None:
        if "\n" in text:
            text = text.replace("\r\n", "\r").replace("\n", "\r")
        self.text = text
        sep, enc = "|", "^~\\&"
        if text.startswith("MSH") and len(text) > 3:
            sep = text[3]
            end = text.find(sep, 4)
            candidate = text[4:end] if end > 0 else ""
            if len(candidate) >= 4:
                enc = candidate
        self.sep, self.comp, self.rep, self.esc, self.sub = sep, enc[0], enc[1], enc[2], enc[3]
        self.delims = sep + enc[:4]
        segments = [line.split(sep) for line in text.split("\r") if len(line) >= 3]
        for fields in segments:
            if fields[0] == "MSH":
                fields.insert(1, sep)
        self.segments = segments
        self.firsts = {fields[0]: fields for fields in reversed(segments)}
        self._index: dict[str, list[int]] | None = None
        self.owner = owner
        self.scope: dict[str, list[str]] | None = None

    @property
    def index(self) -> dict[str, list[int]]:
        """Segment name -> positions in `segments` (built on first use)."""
        if self._index is None:
            index: dict[str, list[int]] = {}
            for i, fields in enumerate(self.segments):
                index.setdefault(fields[0], []).append(i)
            self._index = index
        return self._index

    def first(self, name: str) -> list[str] | None:
        return self.firsts.get(name)

    def segment_text(self, fields: list[str]) -> str:
        if fields[0] == "MSH":
            return "MSH" + self.sep + self.sep.join(fields[2:])
        return self.sep.join(fields)

    def unescape(self, value: str) -> str | None:
        """Resolve escape sequences (HL7 v2.5 section 2.7.4); ``""`` (the HL7 null) becomes None."""
        if value == '""':
            return None
        esc = self.esc
        if esc not in value:
            return value
        table = {"F": self.sep, "S": self.comp, "R": self.rep, "E": esc, "T": self.sub}
        out: list[str] = []
        i, n = 0, len(value)
        while i < n:
            ch = value[i]
            if ch == esc:
                end = value.find(esc, i + 1)
                if end > i:
                    code = value[i + 1 : end]
                    if code in table:
                        out.append(table[code])
                    elif code == ".br":
                        out.append("\n")
                    elif code[:1] == "X" and re.fullmatch(r"X(?:[0-9A-Fa-f]{2})+", code):
                        out.append(bytes.fromhex(code[1:]).decode("latin-1"))
                    else:  # formatting (\H\ \N\ .sp ...) and charset escapes: dropped
                        pass
                    i = end + 1
                    continue
            out.append(ch)
            i += 1
        return "".join(out)


Condition = Callable[[HL7Doc], bool]
CompileCondition = Callable[[str, str], Condition]

_SEG = re.compile(r"[A-Z][A-Z0-9]{2}")
_FIELD = re.compile(r"-(\d+)(?:\[(\d+|\*)\])?(?:\.(\d+)(?:\.(\d+))?)?")


class _Selector:
    __slots__ = ("cond", "index", "name", "star")

    def __init__(self, name: str, index: int, star: bool, cond: Condition | None) -> None:
        self.name, self.index, self.star, self.cond = name, index, star, cond


def scan_path(text: str, pos: int) -> int:
    """End of the HL7 path starting at ``text[pos]`` (brackets and quotes inside conditions balanced)."""
    i, n = pos, len(text)
    while True:
        if not _SEG.match(text, i):
            return i
        i += 3
        if i < n and text[i] == "[":
            try:
                i = _matching_bracket(text, i) + 1
            except PathError:  # unclosed: the path runs to the end; compiling it names the error
                i = n
        if i < n and text[i] == "/" and _SEG.match(text, i + 1):
            i += 1
            continue
        m = _FIELD.match(text, i)
        return m.end() if m else i


class HL7Path:
    """A compiled HL7 v2 path; see the module docstring for the grammar."""

    __slots__ = ("comp", "field", "multi", "rep", "scoped", "selectors", "sub", "text")

    def __init__(self, text: str, compile_condition: CompileCondition | None = None, *, scoped: bool = False) -> None:
        self.text = text
        self.scoped = scoped  # read inside a segment condition: the candidate segment stands in for the first
        end = scan_path(text, 0)
        if end != len(text) or end == 0:
            raise PathError(f"bad HL7 path {text!r}" + (f" at column {end + 1}" if end else "")
                            + " (expected e.g. PID-3[1].1, OBX[2]-5, OBX[OBX-3.1 == \"GLU\"]-5)")
        selectors: list[_Selector] = []
        i = 0
        while True:
            name = text[i : i + 3]
            i += 3
            index, star, cond = 1, False, None
            if i < len(text) and text[i] == "[":
                close = _matching_bracket(text, i)
                inner = text[i + 1 : close].strip()
                if inner == "*":
                    star = True
                elif inner.isdigit():
                    index = int(inner)
                    if index < 1:
                        raise PathError(f"segment index in {text!r} starts at 1")
                else:
                    if compile_condition is None:
                        raise PathError(f"conditions like {text[i:close + 1]!r} are not allowed here")
                    cond = compile_condition(inner, name)
                i = close + 1
            selectors.append(_Selector(name, index, star, cond))
            if i < len(text) and text[i] == "/":
                i += 1
                continue
            break
        self.selectors = tuple(selectors)
        self.field = self.rep = self.comp = self.sub = 0
        rep_star = False
        if i < len(text):
            m = _FIELD.fullmatch(text, i)
            if m is None:
                raise PathError(f"bad field part in HL7 path {text!r}")
            self.field = int(m.group(1))
            rep_star = m.group(2) == "*"
            self.rep = 0 if rep_star else int(m.group(2) or 1)
            self.comp = int(m.group(3) or 0)
            self.sub = int(m.group(4) or 0)
            if self.field < 1 or self.rep < 0 or (m.group(2) and not rep_star and self.rep < 1) \
                    or (m.group(3) and self.comp < 1) or (m.group(4) and self.sub < 1):
                raise PathError(f"positions in HL7 path {text!r} start at 1")
        self.multi = rep_star or any(s.star for s in selectors)

    @property
    def segment(self) -> str:
        return self.selectors[-1].name

    # -- navigation ---------------------------------------------------------------------------

    def _segments(self, doc: HL7Doc) -> list[list[str]]:
        ranges: list[tuple[int, int]] = [(0, len(doc.segments))]
        last = len(self.selectors) - 1
        chosen: list[int] = []
        for depth, sel in enumerate(self.selectors):
            chosen = []
            positions = doc.index.get(sel.name, ())
            for lo, hi in ranges:
                inside = [p for p in positions if lo <= p < hi]
                if sel.cond is not None:
                    picked = [p for p in inside if _holds(sel, doc, doc.segments[p])][:1]
                elif sel.star:
                    picked = inside
                else:
                    picked = inside[sel.index - 1 : sel.index]
                chosen += picked
            if depth < last:
                ranges = []
                for p in chosen:
                    hi = next((q for q in positions if q > p), len(doc.segments))
                    ranges.append((p + 1, hi))
        return [doc.segments[p] for p in chosen]

    def raw(self, doc: HL7Doc) -> list[str | None]:
        """One raw (still escaped) string per selected segment/repetition; None where absent."""
        segs = self._segments(doc) if len(self.selectors) > 1 or self.selectors[0].star \
            or self.selectors[0].cond is not None else self._single(doc)
        out: list[str | None] = []
        f = self.field
        for fields in segs:
            if f == 0:
                out.append(doc.segment_text(fields))
                continue
            if f >= len(fields):
                out.append(None)
                continue
            value = fields[f]
            if fields[0] == "MSH" and f <= 2:
                out.append(value)
                continue
            if self.rep == 0:
                reps = value.split(doc.rep) if value else []
            else:
                all_reps = value.split(doc.rep) if doc.rep in value else [value]
                reps = all_reps[self.rep - 1 : self.rep] or [None]  # type: ignore[list-item]
            for r in reps:
                if r is None or not self.comp:
                    out.append(r)
                    continue
                comps = r.split(doc.comp)
                c = comps[self.comp - 1] if self.comp <= len(comps) else None
                if c is not None and self.sub:
                    subs = c.split(doc.sub)
                    c = subs[self.sub - 1] if self.sub <= len(subs) else None
                out.append(c)
        return out

    def _single(self, doc: HL7Doc) -> list[list[str]]:
        sel = self.selectors[0]
        scope = doc.scope
        if self.scoped and scope is not None and sel.index == 1 and sel.name in scope:
            return [scope[sel.name]]
        if sel.index == 1:
            fields = doc.firsts.get(sel.name)
            return [] if fields is None else [fields]
        positions = doc.index.get(sel.name)
        if not positions or sel.index > len(positions):
            return []
        return [doc.segments[positions[sel.index - 1]]]

    def value(self, doc: HL7Doc) -> Any:
        """The mapped value: a str (escapes resolved), `Structured`, None (absent or HL7 null), or a list."""
        raws = self.raw(doc)
        if self.multi:
            return [self._leaf(doc, r) for r in raws]
        return self._leaf(doc, raws[0]) if raws else None

    def _leaf(self, doc: HL7Doc, raw: str | None) -> Any:
        if raw is None or raw == "":
            return None if raw is None else ""
        if self.field == 0:
            return Structured(raw, doc.delims)
        lower_delimiters = doc.sub in raw or (self.comp == 0 and doc.comp in raw)
        if self.sub == 0 and lower_delimiters and not (self.selectors[-1].name == "MSH" and self.field <= 2):
            return Structured(raw, doc.delims)
        return doc.unescape(raw)

    def getter(self, *, from_owner: bool = False) -> Callable[[Any], Any]:
        """A fast reader for this path; with ``from_owner`` it takes the object whose ``.doc`` is the `HL7Doc`
        (the mapping context), saving a call per read.  One-segment reads of a component or a field are
        specialised; everything else goes through `value`."""
        sel = self.selectors[0]
        simple = (len(self.selectors) == 1 and not self.multi and sel.cond is None and self.field > 0
                  and self.sub == 0 and not (sel.name == "MSH" and self.field <= 2))
        if not simple:
            value = self.value
            return (lambda c: value(c.doc)) if from_owner else value
        name, seg_i, f, rep_i, comp_i = sel.name, sel.index - 1, self.field, self.rep - 1, self.comp - 1
        check_scope = sel.index == 1 and self.scoped
        first = sel.index == 1 and not self.scoped
        leaf = self._leaf

        def get(arg: Any) -> Any:
            doc = arg.doc if from_owner else arg
            if first:
                fields = doc.firsts.get(name)
                if fields is None:
                    return None
            else:
                scope = doc.scope
                if check_scope and scope is not None and name in scope:
                    fields = scope[name]
                else:
                    positions = doc.index.get(name)
                    if positions is None or seg_i >= len(positions):
                        return None
                    fields = doc.segments[positions[seg_i]]
            if f >= len(fields):
                return None
            value = fields[f]
            if doc.rep in value:
                reps = value.split(doc.rep)
                if rep_i >= len(reps):
                    return None
                value = reps[rep_i]
            elif rep_i:
                return None
            if comp_i >= 0:
                comps = value.split(doc.comp)
                if comp_i >= len(comps):
                    return None
                value = comps[comp_i]
                if doc.sub in value or doc.esc in value or value == '""':
                    return leaf(doc, value)
                return value
            if doc.comp in value or doc.sub in value or doc.esc in value or value == '""':
                return leaf(doc, value)
            return value

        return get


def _holds(sel: _Selector, doc: HL7Doc, fields: list[str]) -> bool:
    assert sel.cond is not None
    saved = doc.scope
    doc.scope = {**(saved or {}), sel.name: fields}
    try:
        return sel.cond(doc)
    finally:
        doc.scope = saved


def _matching_bracket(text: str, start: int) -> int:
    depth, quote, i = 0, "", start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise PathError(f"unclosed '[' in HL7 path {text!r}")


def compile_path(text: str, compile_condition: CompileCondition | None = None, *, scoped: bool = False) -> HL7Path:
    """Compile ``text``; raises `PathError` naming what is wrong.  ``scoped``: the path is read inside a
    segment condition, where the candidate segment replaces the first segment of its name."""
    return HL7Path(text.strip(), compile_condition, scoped=scoped)
