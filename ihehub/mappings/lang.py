"""The expression language of mapping rules, compiled once into Python closures.

An expression reads the input and computes a value::

    upper(trim(PID-5.1))
    table("sex", PID-8)
    date(PID-7, "iso")
    if(PV1-2 == "I", "inpatient", "outpatient")
    default(PID-3[2].1, PID-3[1].1, "unknown")
    concat(PID-5.1, "^", PID-5.2)
    OBX[OBX-3.1 == "GLU"]-5

Operands: string literals (``"..."`` or ``'...'``, backslash escapes), numbers, ``true false
null``, lists ``[a, b]``, input paths (HL7 v2 paths for HL7 input; ``/a/b`` XPath for XML input or
JSON pointer for JSON/dict/CSV input; ``@column`` or ``@"a column"`` for a key of a row),
variables ``$name`` (set by an earlier rule whose target is ``$name``; ``$hospital`` and, when the
mapping runs on a channel message, ``$channel $control_id $message_type $source``), and function
calls ``name(arg, ..., key=value)``.  Operators: ``== != < <= > >= =~ in and or not ( )``.

Values are strings, numbers, booleans, None (absent) or lists (from ``[*]`` paths); most functions
apply to each item of a list.  Nothing is parsed per message: every path, regular expression,
table name and date format is checked when the mapping is compiled, and a mistake is reported with
its column.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping
from typing import Any

from ihehub.mappings.hl7path import scan_path

Getter = Callable[["Ctx"], Any]
_NO = object()  # "not a constant"


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` when a close match exists, else an empty string (as the connector registry says it)."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class CompileError(ValueError):
    """A mistake in an expression; ``column`` is 1-based within the expression text."""

    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.column = column

    def __str__(self) -> str:
        return f"{self.message} (column {self.column})" if self.column else self.message


class Ctx:
    """What one rule evaluation sees: the parsed input (``doc``), variables and the mapping's helpers."""

    __slots__ = ("doc", "hospital", "meta", "tables", "vars")

    def __init__(self, doc: Any, tables: Any, meta: Mapping[str, str]) -> None:
        self.doc = doc
        self.tables = tables
        self.meta = meta
        self.vars: dict[str, Any] = {}
        self.hospital = ""


@dataclasses.dataclass(slots=True)
class Node:
    """A compiled sub-expression: its getter, its constant value (when it is a literal) and position."""

    get: Getter
    pos: int
    text: str
    const: Any = _NO
    code: str | None = None  # Python source computing the value in the generated mapping function

    @property
    def is_const(self) -> bool:
        return self.const is not _NO


def const(value: Any, pos: int = 0, text: str = "") -> Node:
    code = repr(value) if value is None or type(value) in (str, int, bool) else None
    return Node(lambda _c: value, pos, text or repr(value), value, code)


def code_of(env: Env, node: Node | None) -> str | None:
    """The node's code for the generated function, or None when only its closure can compute it."""
    gen = env.extra.get("gen")
    if gen is None or node is None:
        return None
    if node.code is not None:
        return node.code
    if node.is_const:
        return str(gen.ref(node.const, "k"))
    return None


def with_code(get: Getter, code: str | None) -> Getter:
    """Attach generated-function code to a getter (the parser copies it into the `Node`)."""
    if code is not None:
        get.code = code  # type: ignore[attr-defined]
    return get


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    name: str
    args: list[Node]
    kwargs: dict[str, Node]
    pos: int


Builder = Callable[["Env", Call], Getter]
PathCompiler = Callable[["Env", str, int], Getter]


@dataclasses.dataclass(kw_only=True)
class Env:
    """Compile-time knowledge: the input kind and its path compiler, functions, tables, variables."""

    input_kind: str
    paths: Mapping[str, PathCompiler]  # token kind ("hl7", "slash", "column") -> compiler
    functions: Mapping[str, Builder]
    tables: Mapping[str, Any]
    variables: set[str]
    meta_variables: frozenset[str] = frozenset({"channel", "control_id", "message_type", "source", "message_id"})
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def path(self, kind: str, text: str, pos: int) -> Getter:
        compiler = self.paths.get(kind)
        if compiler is None:
            what = {"hl7": "HL7 v2 paths", "dicom": "DICOM paths", "slash": "paths starting with '/'",
                    "column": "@columns", "xpath": "xpath()", "jmes": "jmes()", "pointer": "ptr()"}.get(kind, kind)
            raise CompileError(f"{what} cannot read {self.input_kind} input ({text!r})", pos + 1)
        return compiler(self, text, pos)


@dataclasses.dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # str num hl7 slash column var word op
    value: Any
    pos: int
    text: str


_NUM = re.compile(r"\d+(?:\.\d+)?(?![A-Za-z0-9_])")
_WORD = re.compile(r"[a-z_][a-z0-9_]*")
_VAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_COLUMN = re.compile(r"@([^\s,()\[\]=!<>\"']+)")
_OPS = ("==", "!=", "<=", ">=", "=~", "<", ">", "(", ")", "[", "]", ",", "=", "-")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
KEYWORDS = {"and", "or", "not", "in", "true", "false", "null"}


def _string(text: str, pos: int) -> tuple[str, int]:
    quote, i, out = text[pos], pos + 1, []
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
            continue
        if ch == quote:
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise CompileError("string is not closed (missing quote)", pos + 1)


def _slash_end(text: str, pos: int) -> int:
    depth, quote, i = 0, "", pos
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            if depth == 0:
                return i
            depth -= 1
        elif depth == 0 and (ch.isspace() or ch == ","):
            return i
        i += 1
    return i


def tokenize(text: str, *, dicom: re.Pattern[str] | None = None) -> list[_Tok]:
    """The tokens of an expression; with ``dicom`` (the DICOM path pattern) upper-case words and tags are
    DICOM paths, not HL7 paths."""
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        start = i
        m = dicom.match(text, i) if dicom is not None and (ch.isupper() or ch.isdigit() or ch == "(") else None
        if m is not None and (m.end() == n or not (text[m.end()].isalnum() or text[m.end()] in "_:")):
            i = m.end()
            toks.append(_Tok("dicom", m.group(), start, m.group()))
        elif ch in "\"'":
            value, i = _string(text, i)
            toks.append(_Tok("str", value, start, text[start:i]))
        elif ch.isdigit():
            m = _NUM.match(text, i)
            if not m:
                raise CompileError(f"bad number {text[i:i + 8]!r}", i + 1)
            i = m.end()
            toks.append(_Tok("num", float(m.group()) if "." in m.group() else int(m.group()), start, m.group()))
        elif ch.isupper():
            end = scan_path(text, i)
            if end == i or (end < n and (text[end].isalnum() or text[end] == "_")):
                word = re.match(r"[A-Za-z0-9_]+", text[i:])
                shown = word.group() if word else ch
                raise CompileError(f"{shown!r} is neither an HL7 path (like PID-5.1) nor a function "
                                   "(functions are lower case); quote text", i + 1)
            i = end
            toks.append(_Tok("hl7", text[start:i], start, text[start:i]))
        elif ch == "/":
            i = _slash_end(text, i)
            toks.append(_Tok("slash", text[start:i], start, text[start:i]))
        elif ch == "@":
            if i + 1 < n and text[i + 1] in "\"'":
                value, i = _string(text, i + 1)
            else:
                m = _COLUMN.match(text, i)
                if not m:
                    raise CompileError("'@' must be followed by a column name", i + 1)
                value, i = m.group(1), m.end()
            toks.append(_Tok("column", value, start, text[start:i]))
        elif ch == "$":
            m = _VAR.match(text, i)
            if not m:
                raise CompileError("'$' must be followed by a variable name", i + 1)
            i = m.end()
            toks.append(_Tok("var", m.group(1), start, m.group()))
        elif _WORD.match(text, i):
            m = _WORD.match(text, i)
            assert m is not None
            i = m.end()
            toks.append(_Tok("word", m.group(), start, m.group()))
        else:
            op = next((o for o in _OPS if text.startswith(o, i)), None)
            if op is None:
                raise CompileError(f"unexpected character {ch!r}", i + 1)
            i += len(op)
            toks.append(_Tok("op", op, start, op))
    return toks


# -- value semantics shared by operators and functions ----------------------------------------

def truthy(value: Any) -> bool:
    if isinstance(value, list):
        return any(truthy(v) for v in value)
    return bool(value)


def is_empty(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, list) and all(is_empty(v) for v in value))


def _comparable(a: Any, b: Any) -> tuple[Any, Any]:
    if a is None:
        a = ""
    if b is None:
        b = ""
    numeric_a = isinstance(a, int | float) and not isinstance(a, bool)
    if numeric_a or (isinstance(b, int | float) and not isinstance(b, bool)):
        try:
            return float(a), float(b)
        except (TypeError, ValueError):
            return str(a), str(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return truthy(a), truthy(b)
    return str(a), str(b)


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def compare(op: str, left: Any, right: Any) -> bool:
    fn = _COMPARE[op]
    lefts = left if isinstance(left, list) else [left]
    rights = right if isinstance(right, list) else [right]
    for lv in lefts:
        for rv in rights:
            a, b = _comparable(lv, rv)
            try:
                if fn(a, b):
                    return True
            except TypeError:
                continue
    return op == "!=" and not lefts


def _either(a: Getter, b: Getter) -> Getter:
    return lambda c: truthy(a(c)) or truthy(b(c))


def _both(a: Getter, b: Getter) -> Getter:
    return lambda c: truthy(a(c)) and truthy(b(c))


def _eq_text(v: Any, k: str, equal: bool, op: str) -> bool:
    if type(v) is str:
        return (v == k) is equal
    return compare(op, v, k)


# -- parser ------------------------------------------------------------------------------------

class Parser:
    def __init__(self, text: str, env: Env) -> None:
        self.text = text
        self.env = env
        dicom: re.Pattern[str] | None = None
        if env.input_kind == "dicom":
            from ihehub.mappings.dicompath import PATH_TOKEN  # dicompath imports this module

            dicom = PATH_TOKEN
        self.toks = tokenize(text, dicom=dicom)
        self.i = 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def at(self, value: str) -> bool:
        t = self.peek()
        return t is not None and t.kind in ("op", "word") and t.value == value

    def take(self, value: str | None = None) -> _Tok:
        t = self.peek()
        if t is None:
            raise CompileError("unexpected end of expression" + (f", expected {value!r}" if value else ""),
                               len(self.text) + 1)
        if value is not None and not (t.kind in ("op", "word") and t.value == value):
            raise CompileError(f"expected {value!r}, found {t.text!r}", t.pos + 1)
        self.i += 1
        return t

    def parse(self) -> Node:
        if not self.toks:
            raise CompileError("empty expression", 1)
        node = self.or_()
        t = self.peek()
        if t is not None:
            hint = " (use == to compare)" if t.value == "=" else ""
            raise CompileError(f"unexpected {t.text!r}{hint}", t.pos + 1)
        return node

    def or_(self) -> Node:
        left = self.and_()
        while self.at("or"):
            self.take()
            right = self.and_()
            a, b = left.get, right.get
            ca, cb = code_of(self.env, left), code_of(self.env, right)
            code = f"(_truthy({ca}) or _truthy({cb}))" if ca and cb else None
            left = Node(_either(a, b), left.pos, "or", code=code)
        return left

    def and_(self) -> Node:
        left = self.not_()
        while self.at("and"):
            self.take()
            right = self.not_()
            a, b = left.get, right.get
            ca, cb = code_of(self.env, left), code_of(self.env, right)
            code = f"(_truthy({ca}) and _truthy({cb}))" if ca and cb else None
            left = Node(_both(a, b), left.pos, "and", code=code)
        return left

    def not_(self) -> Node:
        if self.at("not"):
            t = self.take()
            node = self.not_()
            inner, ci = node.get, code_of(self.env, node)
            return Node(lambda c: not truthy(inner(c)), t.pos, "not", code=f"(not _truthy({ci}))" if ci else None)
        return self.cmp()

    def cmp(self) -> Node:
        left = self.operand()
        t = self.peek()
        if t is None or not ((t.kind == "op" and t.value in ("==", "!=", "<", "<=", ">", ">=", "=~"))
                             or (t.kind == "word" and t.value in ("in", "not"))):
            return left
        if t.value == "not":
            nxt = self.toks[self.i + 1] if self.i + 1 < len(self.toks) else None
            if nxt is None or nxt.value != "in":
                return left
            self.take()
        negate = t.value == "not"
        op = self.take().value
        right = self.operand()
        lg, rg = left.get, right.get
        if op == "=~":
            if not (right.is_const and isinstance(right.const, str)):
                raise CompileError("=~ needs a quoted regular expression on its right", right.pos + 1)
            try:
                rx = re.compile(right.const)
            except re.error as exc:
                raise CompileError(f"bad regular expression: {exc}", right.pos + 1) from None

            def match(c: Ctx) -> bool:
                v = lg(c)
                return any(x is not None and rx.search(str(x)) for x in (v if isinstance(v, list) else [v]))

            return Node(match, left.pos, "=~")
        if op == "in":
            def member(c: Ctx) -> bool:
                choices = rg(c)
                return compare("==", lg(c), choices if isinstance(choices, list) else [choices]) != negate

            return Node(member, left.pos, "in")
        if op in ("==", "!=") and right.is_const and type(right.const) is str:
            k, equal = right.const, op == "=="

            def eq_text(c: Ctx) -> bool:
                v = lg(c)
                if type(v) is str:
                    return (v == k) is equal
                return compare(op, v, k)

            gen, cl = self.env.extra.get("gen"), code_of(self.env, left)
            code = None
            if gen is not None and cl:
                code = f"{gen.ref(_eq_text, 'eq')}({cl}, {k!r}, {equal!r}, {op!r})"
                if re.fullmatch(r"_t\d+", cl):  # an HL7 read: a str or None
                    code = f"({cl} {'==' if equal else '!='} {k!r} if {cl} is not None else {(k == '') is equal!r})"
            return Node(eq_text, left.pos, op, code=code)
        return Node(lambda c: compare(op, lg(c), rg(c)), left.pos, op)

    def operand(self) -> Node:
        t = self.take()
        if t.kind == "op":
            if t.value == "(":
                inner = self.or_()
                self.take(")")
                return inner
            if t.value == "[":
                items: list[Node] = []
                while not self.at("]"):
                    items.append(self.or_())
                    if not self.at("]"):
                        self.take(",")
                self.take("]")
                if all(i.is_const for i in items):
                    return const([i.const for i in items], t.pos, "list")
                getters = [i.get for i in items]
                return Node(lambda c: [g(c) for g in getters], t.pos, "list")
            if t.value == "-":
                nxt = self.take()
                if nxt.kind != "num":
                    raise CompileError("'-' must be followed by a number", t.pos + 1)
                return const(-nxt.value, t.pos, "-" + nxt.text)
            raise CompileError(f"unexpected {t.text!r}", t.pos + 1)
        if t.kind in ("str", "num"):
            return const(t.value, t.pos, t.text)
        if t.kind == "word":
            if t.value in ("true", "false", "null"):
                return const({"true": True, "false": False, "null": None}[t.value], t.pos, t.text)
            if self.at("("):
                return self.call(t)
            if t.value in KEYWORDS:
                raise CompileError(f"unexpected {t.value!r}", t.pos + 1)
            raise CompileError(f"unknown word {t.value!r}: quote text, and call functions with ()"
                               f"{did_you_mean(t.value, list(self.env.functions))}", t.pos + 1)
        if t.kind == "var":
            return self.variable(t)
        get = self.env.path(t.kind, t.value, t.pos)
        return Node(get, t.pos, t.text, code=getattr(get, "code", None))

    def variable(self, t: _Tok) -> Node:
        name = t.value
        if name in self.env.variables:
            return Node(lambda c: c.vars.get(name), t.pos, t.text, code=f"_vars.get({name!r})")
        if name == "hospital":
            return Node(lambda c: c.hospital, t.pos, t.text, code="c.hospital")
        if name in self.env.meta_variables:
            return Node(lambda c: c.meta.get(name), t.pos, t.text, code=f"c.meta.get({name!r})")
        known = sorted({*self.env.variables, "hospital", *self.env.meta_variables})
        raise CompileError(f"unknown variable ${name}: no earlier rule sets it"
                           f"{did_you_mean(name, known)}", t.pos + 1)

    def call(self, name_tok: _Tok) -> Node:
        name = name_tok.value
        builder = self.env.functions.get(name)
        if builder is None:
            raise CompileError(f"unknown function {name}(){did_you_mean(name, list(self.env.functions))}",
                               name_tok.pos + 1)
        self.take("(")
        args: list[Node] = []
        kwargs: dict[str, Node] = {}
        while not self.at(")"):
            t = self.peek()
            nxt = self.toks[self.i + 1] if self.i + 1 < len(self.toks) else None
            if t is not None and t.kind == "word" and nxt is not None and nxt.kind == "op" and nxt.value == "=":
                self.i += 2
                if t.value in kwargs:
                    raise CompileError(f"{name}(): {t.value}= given twice", t.pos + 1)
                kwargs[t.value] = self.or_()
            else:
                if kwargs:
                    raise CompileError(f"{name}(): positional argument after a keyword argument",
                                       t.pos + 1 if t else None)
                args.append(self.or_())
            if not self.at(")"):
                self.take(",")
        end = self.take(")")
        get = builder(self.env, Call(name, args, kwargs, name_tok.pos))
        return Node(get, name_tok.pos, self.text[name_tok.pos : end.pos + 1], code=getattr(get, "code", None))


def compile_expression(text: str, env: Env) -> Node:
    """Compile one expression; raises `CompileError` with the column of the mistake."""
    return Parser(text, env).parse()
