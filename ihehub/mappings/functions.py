"""The functions mapping expressions can call; each checks its arguments when the mapping is compiled.

Functions that take a text apply to every item when given a list (from a ``[*]`` path) and give
None for None, so ``upper(PID-3[*].1)`` upper-cases each identifier and an absent field stays absent.
See ``docs/mappings.md`` for the table of functions.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from ihehub.mappings import dates, text
from ihehub.mappings.dicomwrite import DELETE
from ihehub.mappings.errors import EvalError
from ihehub.mappings.lang import (
    Builder,
    Call,
    CompileError,
    Ctx,
    Env,
    Getter,
    Node,
    code_of,
    did_you_mean,
    is_empty,
    truthy,
    with_code,
)

Impl = Callable[..., Any]


def _s(value: Any) -> str:
    if value.__class__ is str:
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else str(value)


def _scalar(code: str) -> bool:
    """True for the generated function's HL7 read temporaries, which hold one value (str or None), never a list."""
    return bool(re.fullmatch(r"_t\d+", code))


def _bind(call: Call, params: tuple[str, ...], required: int) -> list[Node | None]:
    """Positional and keyword arguments in ``params`` order; None where not given."""
    if len(call.args) > len(params):
        raise CompileError(f"{call.name}() takes at most {len(params)} argument(s) ({', '.join(params)}), "
                           f"got {len(call.args)}", call.pos + 1)
    bound: list[Node | None] = [*call.args, *([None] * (len(params) - len(call.args)))]
    for key, node in call.kwargs.items():
        if key not in params:
            raise CompileError(f"{call.name}() has no argument {key!r}{did_you_mean(key, list(params))}",
                               node.pos + 1)
        i = params.index(key)
        if bound[i] is not None:
            raise CompileError(f"{call.name}(): {key} given twice", node.pos + 1)
        bound[i] = node
    missing = [p for p, b in zip(params[:required], bound[:required], strict=True) if b is None]
    if missing:
        raise CompileError(f"{call.name}() needs {', '.join(missing)}", call.pos + 1)
    return bound


def _literal(call: Call, node: Node | None, what: str, default: Any = None, types: tuple[type, ...] = (str,)) -> Any:
    if node is None:
        return default
    if not node.is_const or not isinstance(node.const, types):
        raise CompileError(f"{call.name}(): {what} must be a literal", node.pos + 1)
    return node.const


def lifted(impl: Impl, *, unary: bool = False) -> Impl:
    """Apply ``impl`` to each item of a list argument; None passes through."""
    if unary:
        def f1(x: Any) -> Any:
            if x is None:
                return None
            if type(x) is list:
                return [None if v is None else impl(v) for v in x]
            return impl(x)

        return f1

    def f(x: Any, *rest: Any) -> Any:
        if x is None:
            return None
        if isinstance(x, list):
            return [None if v is None else impl(v, *rest) for v in x]
        return impl(x, *rest)

    return f


def simple(impl: Impl, params: tuple[str, ...], required: int = 1, *, lift: bool = True,
           literals: dict[str, Callable[[Any], str | None]] | None = None, text: bool = False) -> Builder:
    """A builder for a plain function ``impl(first, *rest)``; ``literals`` lists arguments that must be
    literals, each with a check returning why a value is wrong; ``text``: ``impl`` always returns a plain
    str (so the generated code of a one-value call needs no conversion before it is written)."""
    fn = lifted(impl) if lift else impl
    sig = list(inspect.signature(impl).parameters.values())
    defaults = [None if i >= len(sig) or sig[i].default is inspect.Parameter.empty else sig[i].default
                for i in range(len(params))]

    def build(env: Env, call: Call) -> Getter:
        bound = _bind(call, params, required)
        for name, check in (literals or {}).items():
            node = bound[params.index(name)]
            if node is not None:
                if not node.is_const:
                    raise CompileError(f"{call.name}(): {name} must be a literal", node.pos + 1)
                problem = check(node.const)
                if problem:
                    raise CompileError(f"{call.name}(): {problem}", node.pos + 1)
        first = bound[0]
        rest = bound[1:]
        while rest and rest[-1] is None:
            rest.pop()
        g = first.get if first is not None else (lambda _c: None)
        gen = env.extra.get("gen")
        first_code = code_of(env, first) if first is not None else "None"
        if all(r is None or r.is_const for r in rest):
            consts = [defaults[i] if r is None else r.const for i, r in enumerate(rest, start=1)]
            if not consts:
                one = lifted(impl, unary=True) if lift else impl
                code = f"{gen.ref(one, 'f')}({first_code})" if gen is not None and first_code else None
                if gen is not None and first_code and lift and _scalar(first_code):
                    code = f"(None if {first_code} is None else {gen.ref(impl, 'f')}({first_code}))"
                    code = gen.text(code) if text else code
                return with_code(lambda c: one(g(c)), code)
            code = None
            if gen is not None and first_code:
                code = f"{gen.ref(fn, 'f')}({first_code}, *{gen.ref(tuple(consts), 'k')})"
                if lift and _scalar(first_code):
                    code = (f"(None if {first_code} is None else "
                            f"{gen.ref(impl, 'f')}({first_code}, *{gen.ref(tuple(consts), 'k')}))")
                    code = gen.text(code) if text else code
            return with_code(lambda c: fn(g(c), *consts), code)
        getters = [(lambda _c, d=defaults[i]: d) if r is None else r.get for i, r in enumerate(rest, start=1)]
        return lambda c: fn(g(c), *[h(c) for h in getters])

    return build


# -- control ---------------------------------------------------------------------------------

def _if(env: Env, call: Call) -> Getter:
    cond, then, other = _bind(call, ("condition", "then", "else"), 2)
    assert cond is not None and then is not None
    cg, tg = cond.get, then.get
    og = other.get if other is not None else (lambda _c: None)
    cc, ct, co = code_of(env, cond), code_of(env, then), code_of(env, other) if other is not None else "None"
    code = f"({ct} if _truthy({cc}) else {co})" if cc and ct and co else None
    return with_code(lambda c: tg(c) if truthy(cg(c)) else og(c), code)


def _default(env: Env, call: Call) -> Getter:
    if call.kwargs or len(call.args) < 2:
        raise CompileError("default() takes two or more values: the first that is not empty is used", call.pos + 1)
    getters = [a.get for a in call.args]

    def get(c: Ctx) -> Any:
        value = None
        for g in getters:
            value = g(c)
            if not is_empty(value):
                return value
        return value

    return get


def _case(env: Env, call: Call) -> Getter:
    if call.kwargs or len(call.args) < 3:
        raise CompileError('case(value, "when1", then1, "when2", then2, ..., [otherwise]) needs pairs', call.pos + 1)
    subject = call.args[0].get
    pairs = call.args[1:]
    otherwise = pairs.pop().get if len(pairs) % 2 else (lambda _c: None)
    choices = [(pairs[i], pairs[i + 1].get) for i in range(0, len(pairs), 2)]
    for key, _ in choices:
        if not key.is_const:
            raise CompileError("case(): the values to compare with must be literals", key.pos + 1)
    table = {_s(k.const): g for k, g in choices}

    def get(c: Ctx) -> Any:
        v = subject(c)
        g = table.get(_s(v)) if v is not None and not isinstance(v, list) else None
        return g(c) if g is not None else otherwise(c)

    return get


def _required(env: Env, call: Call) -> Getter:
    value, message = _bind(call, ("value", "message"), 1)
    assert value is not None
    reason = _literal(call, message, "the message") or f"{value.text} is empty"
    g = value.get

    def get(c: Ctx) -> Any:
        v = g(c)
        if is_empty(v):
            raise EvalError(reason, v, code="101")
        return v

    return get


def _fail(env: Env, call: Call) -> Getter:
    (message,) = _bind(call, ("message",), 1)
    assert message is not None
    g = message.get

    def get(c: Ctx) -> Any:
        raise EvalError(_s(g(c)))

    return get


def _exists(env: Env, call: Call) -> Getter:
    (value,) = _bind(call, ("value",), 1)
    assert value is not None
    g = value.get
    return lambda c: not is_empty(g(c))


# -- text ------------------------------------------------------------------------------------

def _concat(env: Env, call: Call) -> Getter:
    if call.kwargs or not call.args:
        raise CompileError("concat() takes one or more values", call.pos + 1)
    getters = [a.get for a in call.args]
    codes = [code_of(env, a) for a in call.args]
    gen = env.extra.get("gen")
    code = f"{gen.ref(_concat_values, 'f')}({', '.join(codes)})" if gen and all(codes) else None  # type: ignore[arg-type]
    texts = [repr(a.const) if a.is_const and type(a.const) is str else c or "" for a, c in
             zip(call.args, codes, strict=True)]
    if gen and all(_scalar(t) or t[:1] in "'\"" for t in texts):  # HL7 reads and text literals only
        code = "(" + " + ".join(t if not _scalar(t) else f"({t} or '')" for t in texts) + ")"
        code = gen.text(code) if len(texts) > 1 else code

    def get(c: Ctx) -> Any:
        return _concat_values(*[g(c) for g in getters])

    return with_code(get, code)


def _concat_values(*values: Any) -> Any:
    lists = [v for v in values if type(v) is list]
    if not lists:
        return "".join([v if type(v) is str else "" if v is None else _s(v) for v in values])
    n = max(len(v) for v in lists)
    return ["".join("" if x is None else _s(x) for x in
                    ((v[i] if i < len(v) else None) if isinstance(v, list) else v for v in values))
            for i in range(n)]


def _join(items: Any, sep: Any = ",") -> Any:
    if items is None:
        return None
    if not isinstance(items, list):
        return _s(items)
    return _s(sep).join(_s(v) for v in items if not is_empty(v))


def _split(value: str, sep: str, index: Any = None) -> Any:
    parts = _s(value).split(sep)
    if index is None:
        return parts
    i = int(index)
    return parts[i - 1] if 1 <= i <= len(parts) else None


def _replace_build(env: Env, call: Call) -> Getter:
    value, pattern, repl = _bind(call, ("value", "pattern", "replacement"), 3)
    assert value is not None
    rx_text = _literal(call, pattern, "the pattern")
    try:
        rx = re.compile(rx_text)
    except re.error as exc:
        raise CompileError(f"replace(): bad regular expression: {exc}", pattern.pos + 1 if pattern else None) from None
    repl_text = _literal(call, repl, "the replacement")
    try:
        rx.sub(repl_text, "")
    except (re.error, IndexError) as exc:
        raise CompileError(f"replace(): bad replacement: {exc}", repl.pos + 1 if repl else None) from None
    fn = lifted(lambda v: rx.sub(repl_text, _s(v)))
    g = value.get
    return lambda c: fn(g(c))


def _substr(value: Any, start: Any, length: Any = None) -> str:
    s, i = _s(value), max(int(start) - 1, 0)
    return s[i:] if length is None else s[i : i + int(length)]


def _pad(value: Any, width: Any, char: Any = "0") -> str:
    return _s(value).rjust(int(width), _s(char)[:1] or " ")


def _number(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    s = _s(value).strip()
    if s == "":
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        raise EvalError(f"{s!r} is not a number", value, code="102") from None


# -- lists -----------------------------------------------------------------------------------

def _item(items: Any, n: Any) -> Any:
    if not isinstance(items, list):
        return items if int(n) == 1 else None
    i = int(n)
    return items[i - 1] if 1 <= i <= len(items) else None


def _count(items: Any) -> int:
    if items is None:
        return 0
    return len(items) if isinstance(items, list) else 1


def _first(items: Any) -> Any:
    return next((v for v in items if not is_empty(v)), None) if isinstance(items, list) else items


def _last(items: Any) -> Any:
    return next((v for v in reversed(items) if not is_empty(v)), None) if isinstance(items, list) else items


# -- dates, tables, ids ----------------------------------------------------------------------

def _date(env: Env, call: Call) -> Getter:
    value, out_n, in_n, tz_n = _bind(call, ("value", "out", "in", "tz"), 1)
    assert value is not None
    out = _literal(call, out_n, "out", "iso")
    problem = dates.check_output_format(out)
    if problem:
        raise CompileError(f"date(): {problem}", out_n.pos + 1 if out_n else None)
    formats = _literal(call, in_n, "in", (), (str, list))
    formats = (formats,) if isinstance(formats, str) else tuple(_s(f) for f in formats)
    zone = _zone(call, tz_n)
    conv = dates.converter(out, formats, zone)

    def convert(v: Any) -> Any:
        return conv(v if type(v) is str else _s(v))

    g = value.get

    def apply(v: Any) -> Any:
        if v is None:
            return None
        if type(v) is list:
            return [None if x is None else convert(x) for x in v]
        return convert(v)

    gen, cv = env.extra.get("gen"), code_of(env, value)
    code = f"{gen.ref(apply, 'f')}({cv})" if gen is not None and cv else None
    if gen is not None and cv and _scalar(cv):  # an HL7 read: a str or None
        code = f"(None if {cv} is None else {gen.ref(conv, 'f')}({cv}))"
        code = gen.text(code) if out != "hl7" else code
    return with_code(lambda c: apply(g(c)), code)


def _zone(call: Call, node: Node | None) -> Any:
    tz = _literal(call, node, "tz")
    if tz is None:
        return None
    try:
        return dates.parse_zone(tz)
    except dates.DateError as exc:
        raise CompileError(f"{call.name}(): {exc}", node.pos + 1 if node else None) from None


def _now(env: Env, call: Call) -> Getter:
    out_n, tz_n = _bind(call, ("out", "tz"), 0)
    out = _literal(call, out_n, "out", "hl7")
    problem = dates.check_output_format(out)
    if problem:
        raise CompileError(f"now(): {problem}", out_n.pos + 1 if out_n else None)
    zone = _zone(call, tz_n)
    return lambda c: dates.now(zone).format(out)


def _table(env: Env, call: Call) -> Getter:
    name_n, code_n, hosp_n = _bind(call, ("name", "code", "hospital"), 2)
    assert code_n is not None
    name = _literal(call, name_n, "the table name")
    table = env.tables.get(name)
    if table is None:
        known = sorted(env.tables)
        hint = did_you_mean(name, known) or (f"; declared tables: {', '.join(known)}" if known
                                             else "; declare it under tables:")
        raise CompileError(f"unknown code table {name!r}{hint}", name_n.pos + 1 if name_n else None)
    env.extra.setdefault("tables_used", set()).add(name)
    lookup = table.compiled_lookup()
    g = code_n.get
    if hosp_n is None:
        def apply(v: Any, hospital: str) -> Any:
            if type(v) is list:
                return [lookup(x, hospital) for x in v]
            return lookup(v, hospital)

        gen, cv = env.extra.get("gen"), code_of(env, code_n)
        code = f"{gen.ref(apply, 'f')}({cv}, c.hospital)" if gen is not None and cv else None
        if gen is not None and cv and _scalar(cv):
            code = f"{gen.ref(lookup, 'f')}({cv}, c.hospital)"
            code = gen.text(code) if table.policy != "pass" else code  # values and default are str
        return with_code(lambda c: apply(g(c), c.hospital), code)
    h = hosp_n.get

    def get_for(c: Ctx) -> Any:
        v, hosp = g(c), _s(h(c) or "")
        return [lookup(x, hosp) for x in v] if isinstance(v, list) else lookup(v, hosp)

    return get_for


def _uuid(env: Env, call: Call) -> Getter:
    (seed,) = _bind(call, ("seed",), 0)
    if seed is None:
        return lambda c: text.make_uuid()
    g = seed.get
    return lambda c: None if is_empty(v := g(c)) else text.make_uuid(_s(v) if not isinstance(v, list) else
                                                                        "\x1f".join(_s(x) for x in v))


def _python(env: Env, call: Call) -> Getter:
    if call.kwargs or not call.args:
        raise CompileError('python("package.module:function", args...) names a function', call.pos + 1)
    ref = _literal(call, call.args[0], "the function reference")
    fn = env.extra["load_callable"](ref, call.args[0].pos)
    getters = [a.get for a in call.args[1:]]
    return lambda c: fn(*[g(c) for g in getters])


def _delete(env: Env, call: Call) -> Getter:
    """``delete()``: the DICOM output's target element is removed (tag morphing)."""
    _bind(call, (), 0)
    out = env.extra.get("output")
    if out is not None and out.kind != "dicom":
        raise CompileError(f"delete() removes an element of a DICOM output, not of {out.kind} output", call.pos + 1)
    return lambda c: DELETE


def _path_function(kind: str) -> Builder:
    def build(env: Env, call: Call) -> Getter:
        (node,) = _bind(call, ("path",), 1)
        path = _literal(call, node, "the path")
        assert node is not None
        return env.path(kind, path, node.pos)

    return build


def _check_alg(v: Any) -> str | None:
    return text.check_algorithm(v)


def _check_sep(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "the separator must be a non-empty literal"


def _hash(value: Any, alg: Any = "sha256", salt: Any = "") -> str:
    return text.digest(_s(value), alg if alg.__class__ is str else _s(alg), salt if salt.__class__ is str else _s(salt))


def _base64(value: Any, charset: str) -> str:
    """RFC 4648 base64 of a text's bytes in ``charset`` (bytes as they are): an inline document of an ITI-41
    request (``xs:base64Binary``), an HTTP basic credential..."""
    import base64

    try:
        data = value if isinstance(value, bytes) else _s(value).encode(charset)
    except LookupError:
        raise EvalError(f"base64: unknown charset {charset!r}") from None
    return base64.b64encode(data).decode("ascii")


FUNCTIONS: dict[str, Builder] = {
    # control
    "if": _if,
    "default": _default,
    "coalesce": _default,
    "case": _case,
    "required": _required,
    "fail": _fail,
    "exists": _exists,
    # text
    "upper": simple(lambda v: (v if type(v) is str else _s(v)).upper(), ("value",), text=True),
    "lower": simple(lambda v: (v if type(v) is str else _s(v)).lower(), ("value",), text=True),
    "trim": simple(lambda v: (v if type(v) is str else _s(v)).strip(), ("value",), text=True),
    "concat": _concat,
    "join": simple(_join, ("values", "sep"), lift=False),
    "split": simple(_split, ("value", "sep", "index"), 2, literals={"sep": _check_sep}),
    "replace": _replace_build,
    "substr": simple(_substr, ("value", "start", "length"), 2),
    "pad": simple(_pad, ("value", "width", "char"), 2),
    "len": simple(lambda v: len(_s(v)), ("value",)),
    "number": simple(_number, ("value",)),
    "string": simple(_s, ("value",)),
    # lists
    "item": simple(_item, ("values", "n"), 2, lift=False),
    "first": simple(_first, ("values",), lift=False),
    "last": simple(_last, ("values",), lift=False),
    "count": simple(_count, ("values",), lift=False),
    "seq": simple(lambda v: [str(i) for i in range(1, _count(v) + 1)], ("values",), lift=False),
    # dates
    "date": _date,
    "now": _now,
    # code tables
    "table": _table,
    "lookup": _table,
    # Chinese names
    "pinyin": simple(lambda v, sep="": text.pinyin(_s(v), _s(sep)), ("value", "sep"), text=True),
    "name_pinyin": simple(lambda v, sep=" ": text.name_pinyin(_s(v), _s(sep)), ("value", "sep"), text=True),
    "surname_pinyin": simple(lambda v: text.surname_pinyin(_s(v)), ("value",), text=True),
    "initials": simple(lambda v: text.initials(_s(v)), ("value",), text=True),
    # privacy
    "mask": simple(lambda v, a, b, ch="*": text.mask(_s(v), int(a), int(b), _s(ch)),
                   ("value", "keep_start", "keep_end", "char"), 3, text=True),
    "mask_name": simple(lambda v: text.mask_name(_s(v)), ("value",), text=True),
    "mask_id": simple(lambda v, a=4, b=4: text.mask_id(_s(v), int(a), int(b)), ("value", "keep_start", "keep_end"),
                      text=True),
    "mask_phone": simple(lambda v: text.mask_phone(_s(v)), ("value",), text=True),
    "hash": simple(_hash, ("value", "alg", "salt"), literals={"alg": _check_alg}, text=True),
    "base64": simple(lambda v, charset="utf-8": _base64(v, _s(charset)), ("value", "charset")),
    "uuid": _uuid,
    # escape hatch
    "python": _python,
    "delete": _delete,
    # explicit input paths
    "hl7": _path_function("hl7"),
    "xpath": _path_function("xpath"),
    "jmes": _path_function("jmes"),
    "ptr": _path_function("pointer"),
    "col": _path_function("column"),
    "dicom": _path_function("dicom"),
}
