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


def key_setter_lines(info: tuple[tuple[str, ...], str, bool, bool], value: str, parent: str | None) -> list[str]:
    """Inline statements for a key target (see `ihehub.mappings.writers.compile_key_target`); ``parent`` is
    the local caching the parent dict, None to walk from ``out`` each time."""
    parents, key, omit, null = info
    if parent is not None:
        walk = [f"if {parent} is None:", f"    {parent} = _parent(out, {parents!r})", f"{parent}[{key!r}] = {value}"]
    elif parents:
        walk = [f"_parent(out, {parents!r})[{key!r}] = {value}"]
    else:
        walk = [f"out[{key!r}] = {value}"]
    conv = [f"{value} = _plain({value})"]
    if omit:
        return [f"if {value}.__class__ is str:", f"    if {value}:", *("        " + w for w in walk),
                f"elif {value} is not None:", *("    " + b for b in conv + walk)]
    lines = [f"if {value}.__class__ is not str and {value} is not None:", *("    " + c for c in conv)]
    if null:
        lines = [f"if {value} == '':", f"    {value} = None", *lines]
    return lines + walk


def _key_path(setter: Any) -> tuple[str, ...] | None:
    """The keys a setter writes (``("patient", "name")``), for the parent-cache safety check."""
    inline = getattr(setter, "inline", None)
    if inline is not None:
        return (*inline[0], inline[1])
    keys = getattr(setter, "keys", None)
    return tuple(keys) if keys is not None else None


def _parent(out: Any, keys: tuple[str, ...]) -> Any:
    node = out
    for k in keys:
        child = node.get(k) if type(node) is dict else None
        node = child if type(child) is dict else _child(node, k, dict)
    return node


def build(rules: Sequence[Any], codes: Sequence[RuleCode], gen: Gen, first_line: int = 1,
          ) -> tuple[Callable[[Any, Any], None], dict[int, int]]:
    """Compile the mapping function ``run(c, out)``; also return generated line -> rule index."""
    from ihehub.mappings.compiled import _SKIP
    from ihehub.mappings.errors import EvalError
    from ihehub.mappings.lang import is_empty, truthy
    from ihehub.mappings.writers import _plain

    ns = dict(gen.ns)
    ns.update(_truthy=truthy, _is_empty=is_empty, _EvalError=EvalError, _child=_child, _plain=_plain, _SKIP=_SKIP,
              _parent=_parent)
    lines = [
        "def _mapped(c, out):",
        "    _D = c.doc",
        "    _F = getattr(_D, 'firsts', None)",
        "    if _F is not None:",
        "        _REP, _COMP, _SUB, _ESC = _D.rep, _D.comp, _D.sub, _D.esc",
        "    _vars = c.vars",
    ]
    # A parent dict may be cached in a local unless some rule writes that key (or one above it) itself.
    written = [k for r in rules if r.set is not None and (k := _key_path(r.set)) is not None]
    unsafe = {p for r in rules if (inline := getattr(r.set, "inline", None)) is not None for p in [inline[0]]
              if any(len(w) <= len(p) and p[: len(w)] == w for w in written)}
    owner: dict[int, int] = {}
    for i, (rule, code) in enumerate(zip(rules, codes, strict=True)):
        start = len(lines)
        body: list[str] = list(code.prelude)
        value = code.value or f"{gen.ref(rule.get, 'g')}(c)"
        cond = code.when or (f"{gen.ref(rule.when, 'w')}(c)" if rule.when is not None else None)
        inner = [f"_v = {value}"]
        if rule.required:
            inner += ["if _is_empty(_v):", "    raise _EvalError('required value is empty', _v, code='101')"]
        if rule.set is None:
            inner.append(f"_vars[{rule.var!r}] = _v")
        elif getattr(rule.set, "inline", None) is not None:
            parents = rule.set.inline[0]
            cache = gen.parent(parents) if parents and parents not in unsafe else None
            inner += key_setter_lines(rule.set.inline, "_v", cache)
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
    return fn, owner
