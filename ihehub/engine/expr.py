"""Filter expressions for channels and destinations.

A small, safe language (no ``eval``) that integration engineers write in channel YAML::

    MSH-9.1 == "ADT" and MSH-9.2 in ["A01", "A04", "A08"]
    not (PID-3[*].4 contains "HIS2") or header.http.path startswith "/urgent"
    $type =~ "^ORM" and PV1-2 != "O"
    json.modalities contains "CT" and json.study_description =~ "(?i)chest"

Operands: HL7 v2 paths (``SEG-field[rep].component.subcomponent``, ``SEG[2]-3`` for the second
segment of that name, ``[*]`` for every repetition), ``json.<dotted.path>`` (a JSON body: object keys,
list indexes as numbers; a list on the way yields every element), ``header.<name>`` (message headers),
``$channel $type $control_id $content_type $source``, string and number literals and lists.
Operators: ``== != < <= > >= =~ (regex search) in contains startswith endswith and or not ()``.
A path with several values (``[*]``, a JSON list) compares true when any value does; on a JSON list
``contains`` is membership (an element equal to the value), on text it is a substring.  A missing field
is ``""``; a body that is not JSON has no ``json.`` values.

Parsing happens once, at channel load; a syntax error names the column.  A JSON body is decoded once per
message, however many operands and destination filters read it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

from ihehub.bus.message import Message
from ihehub.mappings.hl7path import HL7Doc, PathError, compile_path


class ExpressionError(ValueError):
    pass


_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<num>-?\d+(?:\.\d+)?(?![A-Za-z\-]))
    | (?P<path>[A-Z][A-Z0-9]{2}(?:\[\d+\])?(?:-\d+(?:\[(?:\d+|\*)\])?(?:\.\d+){0,2})?(?![A-Za-z0-9]))
    | (?P<header>header\.[A-Za-z0-9_.\-]+)
    | (?P<json>json(?:\.[A-Za-z0-9_\-]+)*(?![A-Za-z0-9_.\-]))
    | (?P<var>\$[a-z_]+)
    | (?P<op>==|!=|<=|>=|=~|<|>|\(|\)|\[|\]|,)
    | (?P<word>[A-Za-z_]+)
    )""",
    re.VERBOSE,
)
_WORD_OPS = {"and", "or", "not", "in", "contains", "startswith", "endswith", "true", "false"}
_CMP = {"==", "!=", "<", "<=", ">", ">=", "=~", "in", "contains", "startswith", "endswith"}
_VARS = {"$channel", "$type", "$control_id", "$content_type", "$source", "$charset"}


@dataclasses.dataclass(frozen=True, slots=True)
class _Tok:
    kind: str
    value: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            at = len(text) - len(text[pos:].lstrip())
            ch = text[at]
            hint = " (use == to compare)" if ch == "=" else ""
            raise ExpressionError(f"unexpected character {ch!r} at column {at + 1}{hint}")
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "word" and value == "json":
            raise ExpressionError(f"bad JSON path at column {m.start(kind) + 1}: write json.key.key (keys of "
                                  "letters, digits, _ and -; a number indexes a list), e.g. json.modalities")
        if kind == "word" and value not in _WORD_OPS:
            raise ExpressionError(
                f"unknown word {value!r} at column {m.start(kind) + 1} (strings need quotes; "
                f"operators: and or not in contains startswith endswith)"
            )
        out.append(_Tok(kind, value, m.start(kind)))
        pos = m.end()
    return out


Getter = Callable[["_Ctx"], Any]


_NO_JSON = object()
# the last decoded JSON body: (raw bytes object, charset, value).  A channel filter and each destination filter
# see the same message (the same ``raw`` object), so the body is decoded once for all of them.
_json_last: tuple[bytes, str | None, Any] | None = None


def json_body(message: Message) -> Any:
    """The message body as JSON (decoded once per message), or `_NO_JSON` when it is not JSON."""
    global _json_last
    last = _json_last  # one read: another thread may replace it meanwhile
    raw = message.raw
    if last is not None and last[0] is raw and last[1] == message.charset:
        return last[2]
    value: Any = _NO_JSON
    text = message.text().lstrip("\ufeff \t\r\n")
    if text[:1] in ("{", "["):
        try:
            value = json.loads(text)
        except ValueError:
            value = _NO_JSON
    _json_last = (raw, message.charset, value)
    return value


class _Ctx:
    """Per-message lazy view: splits the HL7 text once, only if a path needs it (and the JSON body likewise)."""

    __slots__ = ("_doc", "_json", "message")

    def __init__(self, message: Message) -> None:
        self.message = message
        self._doc: HL7Doc | None = None
        self._json: Any = None

    def doc(self) -> HL7Doc:
        if self._doc is None:
            self._doc = HL7Doc(self.message.text())
        return self._doc

    def json(self) -> Any:
        if self._json is None:
            self._json = json_body(self.message)
        return self._json


def json_path_getter(path: str) -> Callable[[_Ctx], tuple[str, list[Any]]]:
    """Values at a dotted path of a JSON body (``json.a.b``): ``("__jlist__", values)`` when a list was met on
    the way (any-of, ``contains`` is membership), else ``("__multi__", [value])``; missing: ``[""]``."""
    steps = path.split(".")[1:]

    def get(ctx: _Ctx) -> tuple[str, list[Any]]:
        body = ctx.json()
        if body is _NO_JSON:
            return ("__multi__", [""])
        current: list[Any] = [body]
        listed = False
        for step in steps:
            nxt: list[Any] = []
            for item in current:
                if isinstance(item, list) and not (step.isdigit() and int(step) < len(item)):
                    listed = True
                    item_values = [x.get(step) for x in item if isinstance(x, dict) and step in x]
                    nxt += item_values
                elif isinstance(item, list):
                    nxt.append(item[int(step)])
                elif isinstance(item, dict) and step in item:
                    nxt.append(item[step])
            current = nxt
        out: list[Any] = []
        for v in current:
            if isinstance(v, list):
                listed = True
                out += v
            else:
                out.append("" if v is None else v)
        if listed:
            return ("__jlist__", out)
        return ("__multi__", out or [""])

    return get


def hl7_path_getter(path: str) -> Callable[[_Ctx], list[str]]:
    """Raw values of an HL7 path (escapes kept; a missing field reads ``""``; ``SEG`` alone its name).

    Paths are read by `ihehub.mappings.hl7path`, the same reader mapping files use.
    """
    try:
        compiled = compile_path(path)
    except PathError as exc:
        raise ExpressionError(str(exc)) from None
    whole_segment = compiled.field == 0
    seg = compiled.segment

    def get(ctx: _Ctx) -> list[str]:
        values = compiled.raw(ctx.doc())
        if whole_segment:
            return [seg] if values else [""]
        return [v or "" for v in values] or [""]

    return get


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None) -> _Tok:
        t = self.peek()
        if t is None:
            raise ExpressionError(f"unexpected end of expression{f', expected {value!r}' if value else ''}")
        if value is not None and t.value != value:
            raise ExpressionError(f"expected {value!r} at column {t.pos + 1}, found {t.value!r}")
        self.i += 1
        return t

    def parse(self) -> Callable[[_Ctx], bool]:
        node = self.or_()
        if self.peek() is not None:
            t = self.peek()
            assert t is not None
            raise ExpressionError(f"unexpected {t.value!r} at column {t.pos + 1}")
        return lambda ctx: bool(node(ctx))

    def or_(self) -> Getter:
        left = self.and_()
        while (t := self.peek()) is not None and t.value == "or":
            self.take()
            right = self.and_()
            left = (lambda a, b: lambda c: bool(a(c)) or bool(b(c)))(left, right)
        return left

    def and_(self) -> Getter:
        left = self.not_()
        while (t := self.peek()) is not None and t.value == "and":
            self.take()
            right = self.not_()
            left = (lambda a, b: lambda c: bool(a(c)) and bool(b(c)))(left, right)
        return left

    def not_(self) -> Getter:
        t = self.peek()
        if t is not None and t.value == "not":
            self.take()
            inner = self.not_()
            return lambda c: not inner(c)
        return self.cmp()

    def cmp(self) -> Getter:
        left = self.operand()
        t = self.peek()
        if t is None or t.value not in _CMP:
            return lambda c: _truthy(left(c))
        op = self.take().value
        rt0 = self.peek()
        right = self.operand()
        if rt0 is not None and rt0.kind == "path" and "-" not in rt0.value:
            raise ExpressionError(
                f"{rt0.value} at column {rt0.pos + 1} is a segment name; "
                f"to compare with text, quote it: \"{rt0.value}\""
            )
        if op == "in" and (rt0 is None or rt0.value != "["):
            raise ExpressionError("'in' needs a list on its right, e.g. MSH-9.2 in [\"A01\", \"A04\"]")
        if op == "=~":
            rt = self.toks[self.i - 1]
            if rt.kind != "str":
                raise ExpressionError(f"=~ needs a quoted regular expression at column {rt.pos + 1}")
            try:
                rx = re.compile(_unquote(rt.value))
            except re.error as exc:
                raise ExpressionError(f"bad regular expression at column {rt.pos + 1}: {exc}") from None
            return lambda c: any(rx.search(str(v)) for v in _values(left(c)))
        fn = _OPS.get(op, _OPS["=="])
        return lambda c: _compare(fn, left(c), right(c), op)

    def operand(self) -> Getter:
        t = self.take()
        if t.value == "(":
            inner = self.or_()
            self.take(")")
            return inner
        if t.value == "[":
            items: list[Getter] = []
            while (p := self.peek()) is not None and p.value != "]":
                items.append(self.operand())
                if (p := self.peek()) is not None and p.value == ",":
                    self.take()
            self.take("]")
            return lambda c: ("__list__", [i(c) for i in items])
        if t.kind == "str":
            s = _unquote(t.value)
            return lambda c: s
        if t.kind == "num":
            n = float(t.value)
            return lambda c: n
        if t.value in ("true", "false"):
            b = t.value == "true"
            return lambda c: b
        if t.kind == "path":
            g = hl7_path_getter(t.value)
            return lambda c: ("__multi__", g(c))
        if t.kind == "json":
            return json_path_getter(t.value)
        if t.kind == "header":
            name = t.value[len("header."):]
            return lambda c: c.message.headers.get(name, "")
        if t.kind == "var":
            if t.value not in _VARS:
                raise ExpressionError(f"unknown variable {t.value!r} at column {t.pos + 1}; known: {sorted(_VARS)}")
            attr = {"$type": "message_type"}.get(t.value, t.value[1:])
            return lambda c: getattr(c.message, attr) or ""
        raise ExpressionError(f"unexpected {t.value!r} at column {t.pos + 1}")


def _unquote(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s[1:-1])


def _values(v: Any) -> list[Any]:
    if isinstance(v, tuple) and v and v[0] in ("__multi__", "__jlist__"):
        return list(v[1])
    return [v]


def _truthy(v: Any) -> bool:
    return any(bool(x) for x in _values(v))


def _num(a: Any, b: Any) -> tuple[Any, Any]:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a), float(b)
        except (TypeError, ValueError):
            return str(a), str(b)
    return a, b


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: _num(a, b)[0] == _num(a, b)[1],
    "!=": lambda a, b: _num(a, b)[0] != _num(a, b)[1],
    "<": lambda a, b: _num(a, b)[0] < _num(a, b)[1],
    "<=": lambda a, b: _num(a, b)[0] <= _num(a, b)[1],
    ">": lambda a, b: _num(a, b)[0] > _num(a, b)[1],
    ">=": lambda a, b: _num(a, b)[0] >= _num(a, b)[1],
    "contains": lambda a, b: str(b) in str(a),
    "startswith": lambda a, b: str(a).startswith(str(b)),
    "endswith": lambda a, b: str(a).endswith(str(b)),
}


def _compare(fn: Callable[[Any, Any], bool], left: Any, right: Any, op: str) -> bool:
    lefts = _values(left)
    if op == "in":
        if not (isinstance(right, tuple) and right and right[0] == "__list__"):
            raise ExpressionError("'in' needs a list on its right, e.g. MSH-9.2 in [\"A01\", \"A04\"]")
        choices = [x for r in right[1] for x in _values(r)]
        return any(any(_OPS["=="](lv, c) for c in choices) for lv in lefts)
    rights = _values(right)
    if op == "contains" and isinstance(left, tuple) and left and left[0] == "__jlist__":
        fn = _OPS["=="]  # a JSON list contains an element equal to the value
    try:
        return any(fn(lv, rv) for lv in lefts for rv in rights)
    except TypeError:
        return False


@dataclasses.dataclass(frozen=True, slots=True)
class Filter:
    """A compiled filter; ``Filter.compile('MSH-9.1 == "ADT"')(message) -> bool``."""

    source: str
    _fn: Callable[[_Ctx], bool]

    @classmethod
    def compile(cls, expressions: str | list[str] | None) -> Filter | None:
        if not expressions:
            return None
        exprs = [expressions] if isinstance(expressions, str) else list(expressions)
        fns = []
        for e in exprs:
            try:
                fns.append(_Parser(e).parse())
            except ExpressionError as exc:
                raise ExpressionError(f"in filter {e!r}: {exc}") from None
        return cls(" and ".join(f"({e})" for e in exprs), lambda c: all(f(c) for f in fns))

    def __call__(self, message: Message) -> bool:
        return self._fn(_Ctx(message))
