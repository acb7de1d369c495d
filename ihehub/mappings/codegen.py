"""Generate one Python function per mapping: the fast path that runs every message.

The closures built by `ihehub.mappings.lang` are the reference semantics (and run when a trace is
asked for).  This module turns the same compiled rules into the source of a single function, so a
message costs straight-line code instead of two calls per rule:

* an HL7 read of the first segment of a name (``PID-11.3``) becomes inline statements; the segment,
  the field's repetition and its split components are computed once per message and shared by
  every rule that reads them (four rules on PID-11 split it once);
* functions whose arguments have code are called directly (``_f3(_v2)``), ``if()``, ``and``,
  ``or`` keep their laziness as Python conditional expressions, anything else calls its closure;
* a key target (``patient.address.city``) is set inline.

The source is compiled with `compile` once, when the mapping is; it references compiled objects only
through its namespace, never by re-parsing the mapping.  A failure is traced back to its rule by the
line number of the generated code (no per-rule bookkeeping at run time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from ihehub.mappings.hl7path import HL7Path
from ihehub.mappings.writers import _child


@dataclasses.dataclass(slots=True)
class RuleCode:
    """What the generator knows about one rule: statements to run first, the value's code (or None)."""

    prelude: list[str]
    value: str | None
    when: str | None


class Gen:
    """Collects namespace objects and hoisted HL7 reads while a mapping's rules are compiled."""

    def __init__(self) -> None:
        self.ns: dict[str, Any] = {}
        self.pending: list[str] = []
        self._names: dict[int, str] = {}
        self._defined: set[str] = set()
        self._parents: dict[tuple[str, ...], str] = {}
        self._n = 0
        self.texts: set[str] = set()

    def ref(self, obj: Any, hint: str = "o") -> str:
        """A namespace name for ``obj`` (the same object gets the same name)."""
        key = id(obj)
        name = self._names.get(key)
        if name is None:
            self._n += 1
            name = f"_{hint}{self._n}"
            self._names[key] = name
            self.ns[name] = obj
        return name

    def text(self, code: str) -> str:
        """Note that ``code`` always gives a str or None (its setter then needs no conversion)."""
        self.texts.add(code)
        return code

    def is_text(self, code: str) -> bool:
        return code in self.texts

    def temp(self) -> str:
        self._n += 1
        return f"_t{self._n}"

    def take(self) -> list[str]:
        out, self.pending = self.pending, []
        return out

    def hl7(self, path: HL7Path) -> str | None:
        """Inline statements reading ``path`` into a temporary; None when the path needs the general reader."""
        sel = path.selectors[0]
        if (len(path.selectors) != 1 or sel.star or sel.cond is not None or sel.index != 1 or path.scoped
                or path.field == 0 or (sel.name == "MSH" and path.field <= 2)):
            return None
        seg = f"_s_{sel.name}"
        if seg not in self._defined:  # the segment and its number of fields (0 when absent)
            self.pending += [f"{seg} = _F.get({sel.name!r})", f"_n{seg} = 0 if {seg} is None else len({seg})"]
            self._defined.add(seg)
        if path.multi:
            return self._repetitions(path, seg)
        fld = f"_f_{sel.name}_{path.field}_{path.rep}"
        if fld not in self._defined:
            self.pending += [
                f"{fld} = None",
                f"if _n{seg} > {path.field}:",
                f"    {fld} = {seg}[{path.field}]",
                f"    if _REP in {fld}:",
                f"        _x = {fld}.split(_REP)",
                f"        {fld} = _x[{path.rep - 1}] if len(_x) > {path.rep - 1} else None",
            ]
            if path.rep > 1:
                self.pending.append(f"    else:\n        {fld} = None")
            self._defined.add(fld)
        leaf = self.ref(path._leaf, "leaf")
        out = self.temp()
        if path.comp == 0 and path.sub:
            return None
        if path.comp == 0:
            self.pending += [
                f"{out} = {fld}",
                f"if {out} is not None and (_COMP in {out} or _SUB in {out} or _ESC in {out} or {out} == '\"\"'):",
                f"    {out} = {leaf}(_D, {out})",
            ]
            return out
        cmp = f"_c_{sel.name}_{path.field}_{path.rep}"
        clean = f"_k_{sel.name}_{path.field}_{path.rep}"
        if cmp not in self._defined:
            self.pending += [
                f"if {fld} is None:",
                f"    {cmp}, {clean}, _n{cmp} = (), 1, 0",
                "else:",
                f"    {cmp} = {fld}.split(_COMP)",
                f"    _n{cmp} = len({cmp})",
                f"    {clean} = (2 if _SUB in {fld} else 1) if _ESC not in {fld} and '\"\"' not in {fld} else 0",
            ]
            self._defined.add(cmp)
        i = path.comp - 1
        if path.sub:
            self.pending += [
                f"{out} = {cmp}[{i}] if _n{cmp} > {i} else None",
                f"if {out} is not None:",
                f"    _x = {out}.split(_SUB)",
                f"    {out} = {leaf}(_D, _x[{path.sub - 1}]) if len(_x) > {path.sub - 1} else None",
            ]
            return out
        self.pending += [
            f"{out} = {cmp}[{i}] if _n{cmp} > {i} else None",
            f"if {clean} != 1 and {out} is not None and ({clean} == 0 or _SUB in {out}):",
            f"    {out} = {leaf}(_D, {out})",
        ]
        return out

    def _repetitions(self, path: HL7Path, seg: str) -> str | None:
        """``PID-3[*].4.2``: a list with one value per repetition (names start with ``_L``, never scalar)."""
        if path.comp == 0:
            return None
        leaf = self.ref(path._leaf, "leaf")
        self._n += 1
        out = f"_L{self._n}"
        c, sub = path.comp - 1, path.sub - 1
        pick = [f"        _y = _x[{c}] if len(_x) > {c} else None"]
        if path.sub:
            pick += ["        if _y is not None:", "            _z = _y.split(_SUB)",
                     f"            _y = _z[{sub}] if len(_z) > {sub} else None",
                     "            if _y is not None and (_ESC in _y or _y == '\"\"'):",
                     f"                _y = {leaf}(_D, _y)"]
        else:
            pick += ["        if _y is not None and (_SUB in _y or _ESC in _y or _y == '\"\"'):",
                     f"            _y = {leaf}(_D, _y)"]
        self.pending += [
            f"{out} = []",
            f"if _n{seg} > {path.field} and {seg}[{path.field}]:",
            f"    for _r in {seg}[{path.field}].split(_REP):",
            "        _x = _r.split(_COMP)",
            *pick,
            f"        {out}.append(_y)",
        ]
        return out

    def parent(self, keys: tuple[str, ...]) -> str:
        """A local holding the dict at ``keys`` of the output, created on first write."""
        name = self._parents.get(keys)
        if name is None:
            self._n += 1
            name = self._parents[keys] = f"_P{self._n}"
        return name

    def ensure(self, keys: tuple[str, ...], cached: Callable[[tuple[str, ...]], bool]) -> list[str]:
        """Statements that fill the local of `parent` (keys) with the output's dict at ``keys``, creating the
        dicts on the way; an existing non-dict there goes through `_parent` (which replaces it or says why
        it cannot).  ``cached(keys)``: the dict above may be held in its local too."""
        name, key, up = self.parent(keys), keys[-1], keys[:-1]
        if not up:
            fill = [f"if out.__class__ is dict and ({name} := out.get({key!r})) is None:",
                    f"    {name} = out[{key!r}] = {{}}",
                    f"elif {name}.__class__ is not dict:",
                    f"    {name} = _parent(out, {keys!r})"]
        elif cached(up):
            base = self.parent(up)
            fill = [*self.ensure(up, cached),
                    f"{name} = {base}.get({key!r})",
                    f"if {name} is None:",
                    f"    {name} = {base}[{key!r}] = {{}}",
                    f"elif {name}.__class__ is not dict:",
                    f"    {name} = _parent(out, {keys!r})"]
        else:
            fill = [f"{name} = _parent(out, {keys!r})"]
        return [f"if {name} is None:", *("    " + f for f in fill)]


def key_setter_lines(info: tuple[tuple[str, ...], str, bool, bool], value: str, parent: str | None,
                     ensure: Sequence[str] = (), text: bool = False) -> list[str]:
    """Inline statements for a key target (see `ihehub.mappings.writers.compile_key_target`); ``parent`` is
    the local caching the parent dict (``ensure``: the statements that fill it), None to walk from ``out``
    each time; ``text``: the value is known to be a str or None."""
    parents, key, omit, null = info
    if parent is not None:
        walk = [*ensure, f"{parent}[{key!r}] = {value}"]
    elif parents:
        walk = [f"_parent(out, {parents!r})[{key!r}] = {value}"]
    else:
        walk = [f"out[{key!r}] = {value}"]
    if text:  # nothing to convert: a str or None
        if omit:
            return [f"if {value}:", *("    " + w for w in walk)]
        return ([f"if {value} == '':", f"    {value} = None"] if null else []) + walk
    conv = [f"{value} = _plain({value})"]
    if omit:
        return [f"if {value}.__class__ is str:", f"    if {value}:", *("        " + w for w in walk),
                f"elif {value} is not None:", *("    " + b for b in conv + walk)]
    lines = [f"if {value}.__class__ is not str and {value} is not None:", *("    " + c for c in conv)]
    if null:
        lines = [f"if {value} == '':", f"    {value} = None", *lines]
    return lines + walk


def spread_setter_lines(info: tuple[tuple[str, ...], str, str, bool, Any], value: str, gen: Gen, parent: str,
                        ensure: Sequence[str]) -> list[str]:
    """Inline statements for ``a.b[*].c`` (see `ihehub.mappings.writers._spread_keys`): item i of the value
    goes to key ``c`` of the i-th dict of the list ``a.b``; one value (not a list) goes to every item."""
    _parents, list_key, leaf, omit, convert = info
    conv = gen.ref(convert, "cv")
    skip = ["    if _it is None or _it == '':", "        continue"] if omit else []
    return [
        *ensure,
        f"_T = {parent}.get({list_key!r})",
        "if _T is None:",
        f"    _T = {parent}[{list_key!r}] = []",
        "elif _T.__class__ is not list:",
        f"    _T = _child({parent}, {list_key!r}, list)",
        f"for _i, _it in enumerate({value} if {value}.__class__ is list else [{value}] * (len(_T) or 1)):",
        *skip,
        "    if _i >= len(_T):",
        "        _T.extend([None] * (_i + 1 - len(_T)))",
        "    _e = _T[_i]",
        "    if _e.__class__ is not dict:",
        "        _e = _T[_i] = {}",
        f"    _e[{leaf!r}] = _it if _it.__class__ is str and _it else {conv}(_it)",
    ]


def _key_path(setter: Any) -> tuple[str, ...] | None:
    """The keys a setter writes (``("patient", "name")``), for the parent-cache safety check."""
    inline = getattr(setter, "inline", None)
    if inline is not None:
        return (*inline[0], inline[1])
    keys = getattr(setter, "keys", None)
    return tuple(keys) if keys is not None else None


def hospital_text(value: Any) -> str:
    """``c.hospital`` from the ``hospital:`` expression's value (its first item when a list)."""
    if value is None:
        return ""
    return str(value[0] if isinstance(value, list) and value else value)


def _parent(out: Any, keys: tuple[str, ...]) -> Any:
    node = out
    for k in keys:
        child = node.get(k) if type(node) is dict else None
        node = child if type(child) is dict else _child(node, k, dict)
    return node


def build(rules: Sequence[Any], codes: Sequence[RuleCode], gen: Gen, first_line: int = 1,
          hospital: RuleCode | None = None) -> tuple[Callable[[Any, Any], None], dict[int, int]]:
    """Compile the mapping function ``run(c, out)``; also return generated line -> rule index (-1: the
    ``hospital:`` expression).  With ``hospital`` (its code), the function sets ``c.hospital`` first and
    has ``sets_hospital`` true."""
    from ihehub.mappings.compiled import _SKIP
    from ihehub.mappings.errors import EvalError
    from ihehub.mappings.lang import is_empty, truthy
    from ihehub.mappings.writers import _plain

    ns = dict(gen.ns)
    ns.update(_truthy=truthy, _is_empty=is_empty, _EvalError=EvalError, _child=_child, _plain=_plain, _SKIP=_SKIP,
              _parent=_parent, _hospital=hospital_text)
    lines = [
        "def _mapped(c, out):",
        "    _D = c.doc",
        "    _F = getattr(_D, 'firsts', None)",
        "    if _F is not None:",
        "        _REP, _COMP, _SUB, _ESC = _D.rep, _D.comp, _D.sub, _D.esc",
        "    _vars = c.vars",
    ]
    owner: dict[int, int] = {}
    sets_hospital = hospital is not None and hospital.value is not None
    if hospital is not None:  # its reads may be shared with the rules: always emitted
        start = len(lines)
        lines += ["    " + x for line in hospital.prelude for x in line.split("\n")]
        if sets_hospital:
            lines += [f"    _h = {hospital.value}",
                      "    c.hospital = '' if _h is None else _h if _h.__class__ is str else _hospital(_h)"]
        for n in range(start, len(lines)):
            owner[n + first_line] = -1
    # A parent dict may be cached in a local unless some rule writes that key (or one above it) itself.
    written = [k for r in rules if r.set is not None and (k := _key_path(r.set)) is not None]

    def cached(p: tuple[str, ...]) -> bool:
        return bool(p) and not any(len(w) <= len(p) and p[: len(w)] == w for w in written)

    for i, (rule, code) in enumerate(zip(rules, codes, strict=True)):
        start = len(lines)
        body: list[str] = list(code.prelude)
        value = code.value or f"{gen.ref(rule.get, 'g')}(c)"
        cond = code.when or (f"{gen.ref(rule.when, 'w')}(c)" if rule.when is not None else None)
        inner = [f"_v = {value}"]
        if rule.required:
            inner += ["if _v is None or _v == '' or (isinstance(_v, list) and _is_empty(_v)):",
                      "    raise _EvalError('required value is empty', _v, code='101')"]
        if rule.set is None:
            inner.append(f"_vars[{rule.var!r}] = _v")
        elif getattr(rule.set, "inline", None) is not None:
            parents = rule.set.inline[0]
            cache, ensure = (gen.parent(parents), gen.ensure(parents, cached)) if cached(parents) else (None, [])
            inner += key_setter_lines(rule.set.inline, "_v", cache, ensure, gen.is_text(value))
        elif (spread := getattr(rule.set, "inline_spread", None)) is not None and cached(spread[0]):
            inner += spread_setter_lines(spread, "_v", gen, gen.parent(spread[0]), gen.ensure(spread[0], cached))
        else:
            inner.append(f"{gen.ref(rule.set, 'p')}(out, _v)")
        if cond is not None:
            body += [f"if _truthy({cond}):", *("    " + x for x in inner)]
        else:
            body += inner
        lines += ["    " + x for line in body for x in line.split("\n")]
        for n in range(start, len(lines)):
            owner[n + first_line] = i
    lines[1:1] = [f"    {name} = None" for name in gen._parents.values()]
    owner = {line + len(gen._parents): i for line, i in owner.items()}
    ns.update(gen.ns)
    source = "\n".join(lines) + "\n"
    code_obj = compile(source, "<mapping>", "exec")
    exec(code_obj, ns)  # the generated source only names objects in ns
    fn = ns["_mapped"]
    fn.source = source
    fn.sets_hospital = sets_hospital
    return fn, owner
