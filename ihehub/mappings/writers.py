"""Mapping outputs for JSON, dict (an SQL row) and XML: compile each rule's target once, then set values.

Targets:

* JSON and dict: dotted keys, list positions and spreads -- ``patient.name.family``,
  ``patient.ids[0].value``, ``patient.ids[*].value`` (a list value fills one item per element; two
  rules spreading into the same list line up by position).  A dict output with flat keys
  (``patient_id``) is a database row.
* XML: absolute paths with the output's namespace prefixes -- ``/hl7:Patient/hl7:name[2]/@use``,
  ``/Order/Item[*]/Code``.  Missing elements are created; ``[n]`` counts from 1 as XPath does.

An empty value (None or ``""``) is left out (``empty: omit``, the default for JSON and XML), written as
null (``empty: null``, the default for dict, so an SQL row has every column) or kept (``empty: keep``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from lxml import etree

from ihehub.mappings.errors import EvalError
from ihehub.mappings.lang import CompileError

STAR = -1
OUTPUT_KINDS = ("hl7", "xml", "json", "dict", "dicom")

Setter = Callable[[Any, Any], None]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OutputSpec:
    kind: str
    charset: str | None = None
    empty: str = "omit"  # omit | null | keep
    namespaces: Mapping[str, str] = dataclasses.field(default_factory=dict)
    indent: bool = False
    copy: bool = False
    remove: tuple[str, ...] = ()
    version: str | None = None
    encoding_characters: str = "^~\\&"
    validate: bool = False
    part10: bool = True  # dicom: a DICOM file (preamble and File Meta Information), else the bare dataset


def is_blank(value: Any) -> bool:
    return value is None or value == ""


# -- JSON / dict --------------------------------------------------------------------------------

_KEY_STEP = re.compile(r"([^.\[\]]+)((?:\[(?:\d+|\*)\])*)")


def parse_key_path(target: str) -> list[tuple[str, list[int]]]:
    """``a.b[0][*].c`` -> ``[("a", []), ("b", [0, STAR]), ("c", [])]``; `CompileError` when malformed."""
    steps: list[tuple[str, list[int]]] = []
    pos = 0
    while True:
        m = _KEY_STEP.match(target, pos)
        if not m:
            raise CompileError(f"bad target {target!r}: expected keys like patient.name or ids[*].value", pos + 1)
        indexes = [STAR if i == "*" else int(i) for i in re.findall(r"\[(\d+|\*)\]", m.group(2))]
        steps.append((m.group(1).strip(), indexes))
        pos = m.end()
        if pos == len(target):
            break
        if target[pos] != ".":
            raise CompileError(f"bad target {target!r} at column {pos + 1}", pos + 1)
        pos += 1
    if sum(1 for _, ix in steps for i in ix if i == STAR) > 1:
        raise CompileError(f"target {target!r} may spread ([*]) over one list only", 1)
    return steps


def _flatten(steps: list[tuple[str, list[int]]]) -> list[str | int]:
    out: list[str | int] = []
    for key, indexes in steps:
        out.append(key)
        out.extend(indexes)
    return out


def _set(node: Any, path: list[str | int], value: Any) -> None:
    for i, step in enumerate(path[:-1]):
        nxt = path[i + 1]
        blank: Any = [] if isinstance(nxt, int) else {}
        if isinstance(step, int):
            if not isinstance(node, list):
                raise EvalError(f"cannot index {type(node).__name__} with [{step}]")
            while len(node) <= step:
                node.append(None)
            if node[step] is None:
                node[step] = blank
            node = node[step]
        else:
            if not isinstance(node, dict):
                raise EvalError(f"cannot set key {step!r} inside a {type(node).__name__}")
            child = node.get(step)
            if child is None or not isinstance(child, dict | list):
                child = node[step] = blank
            node = child
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list):
            raise EvalError(f"cannot index {type(node).__name__} with [{last}]")
        while len(node) <= last:
            node.append(None)
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise EvalError(f"cannot set key {last!r} inside a {type(node).__name__}")
        node[last] = value


def _plain(value: Any) -> Any:
    if isinstance(value, str) and type(value) is not str:
        return str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def compile_key_target(target: str, spec: OutputSpec) -> Setter:
    path = _flatten(parse_key_path(target))
    omit, null = spec.empty == "omit", spec.empty == "null"
    star = path.index(STAR) if STAR in path else -1

    def convert(value: Any) -> Any:
        if value is None or value == "":
            return None if null else value
        return value if type(value) is str else _plain(value)

    if star < 0 and all(isinstance(k, str) for k in path):
        parents, key = tuple(path[:-1]), path[-1]

        def set_keys(out: Any, value: Any) -> None:
            if value is None or value == "":
                if omit:
                    return
                value = None if null else value
            elif type(value) is not str:
                value = _plain(value)
            node = out
            for k in parents:
                child = node.get(k)
                if type(child) is not dict:
                    if isinstance(child, list):
                        raise EvalError(f"{k!r} holds a list: write {k}[n] or {k}[*] in the target")
                    if not isinstance(child, dict):
                        child = node[k] = {}
                node = child
            node[key] = value

        set_keys.inline = (parents, key, omit, null)  # type: ignore[attr-defined]
        return set_keys

    if star > 0 and all(isinstance(k, str) for i, k in enumerate(path) if i != star):
        spread = _spread_keys(path[:star], path[star + 1 :], omit, convert)  # type: ignore[arg-type]
        spread.keys = tuple(path[:star])  # type: ignore[attr-defined]
        if len(path) == star + 2:  # a.b[*].c: the generated function writes it inline (codegen)
            spread.inline_spread = (tuple(path[: star - 1]), path[star - 1], path[star + 1], omit,  # type: ignore[attr-defined]
                                    convert)
        return spread

    if star < 0:
        def set_deep(out: Any, value: Any) -> None:
            if omit and (value is None or value == ""):
                return
            _set(out, path, convert(value))

        set_deep.keys = tuple(k for k in path[: next(i for i, k in enumerate(path) if isinstance(k, int))])  # type: ignore[attr-defined]
        return set_deep

    def set_spread(out: Any, value: Any) -> None:
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if omit and (item is None or item == ""):
                continue
            concrete = [*path[:star], i, *path[star + 1 :]]
            _set(out, concrete, convert(item))

    return set_spread


def _child(node: Any, key: str, blank: Callable[[], Any]) -> Any:
    if not isinstance(node, dict):
        raise EvalError(f"cannot set key {key!r} inside a {type(node).__name__}")
    child = node.get(key)
    if type(child) is not type(blank()):
        if isinstance(child, dict | list) and not isinstance(child, type(blank())):
            raise EvalError(f"{key!r} holds a {type(child).__name__}, the target wants a {type(blank()).__name__}")
        child = node[key] = blank()
    return child


def _spread_keys(head: list[str], tail: list[str], omit: bool, convert: Callable[[Any], Any]) -> Setter:
    """``a.b[*].c.d``: walk ``head`` to the list, then set ``tail`` inside item i for the i-th value."""
    parents, list_key = head[:-1], head[-1]
    tail_parents, leaf = tail[:-1], (tail[-1] if tail else None)

    def set_spread(out: Any, value: Any) -> None:
        node = out
        for k in parents:
            child = node.get(k) if type(node) is dict else None
            node = child if type(child) is dict else _child(node, k, dict)
        target = node.get(list_key) if type(node) is dict else None
        if type(target) is not list:
            target = _child(node, list_key, list)
        items = value if type(value) is list else [value] * max(len(target), 1)  # one value: every item
        for i, item in enumerate(items):
            if omit and (item is None or item == ""):
                continue
            while len(target) <= i:
                target.append(None)
            if leaf is None:
                target[i] = convert(item)
                continue
            el = target[i]
            if type(el) is not dict:
                el = target[i] = {}
            for k in tail_parents:
                el = _child(el, k, dict)
            el[leaf] = convert(item)

    return set_spread


def new_key_output(spec: OutputSpec, input_doc: Any) -> Any:
    if spec.copy and isinstance(input_doc, dict | list):
        return copy.deepcopy(input_doc)
    return {}


def finish_key_output(spec: OutputSpec, out: Any) -> Any:
    if spec.kind == "dict":
        return out
    try:
        text = json.dumps(out, ensure_ascii=False, indent=2 if spec.indent else None, default=str)
        return text.encode(spec.charset or "utf-8")
    except UnicodeEncodeError as exc:
        raise EvalError(f"output holds {exc.object[exc.start:exc.end]!r}, which {spec.charset} cannot encode") from None


# -- XML --------------------------------------------------------------------------------------

_XML_STEP = re.compile(r"(?:([A-Za-z_][\w.\-]*):)?([A-Za-z_][\w.\-]*)(?:\[(\d+|\*)\])?")
_XML_ATTR = re.compile(r"@(?:([A-Za-z_][\w.\-]*):)?([A-Za-z_][\w.\-]*)")


@dataclasses.dataclass(frozen=True, slots=True)
class XmlTarget:
    root: str  # Clark notation {ns}name
    steps: tuple[tuple[str, int], ...]  # below the root: (tag, index 1-based or STAR)
    attribute: str | None


def parse_xml_target(target: str, namespaces: Mapping[str, str]) -> XmlTarget:
    if not target.startswith("/"):
        raise CompileError(f"XML target {target!r} must be an absolute path like /Patient/Name", 1)
    parts = target[1:].split("/")
    attribute = None
    if parts and parts[-1].startswith("@"):
        m = _XML_ATTR.fullmatch(parts.pop())
        if not m:
            raise CompileError(f"bad attribute in XML target {target!r}", len(target))
        attribute = _clark(m.group(1), m.group(2), namespaces, target)
    elif parts and parts[-1] == "text()":
        parts.pop()
    steps: list[tuple[str, int]] = []
    pos = 1
    for part in parts:
        m = _XML_STEP.fullmatch(part)
        if not m:
            raise CompileError(f"bad step {part!r} in XML target {target!r}", pos + 1)
        index = STAR if m.group(3) == "*" else int(m.group(3) or 1)
        if index == 0:
            raise CompileError(f"positions in XML target {target!r} start at 1", pos + 1)
        steps.append((_clark(m.group(1), m.group(2), namespaces, target), index))
        pos += len(part) + 1
    if not steps:
        raise CompileError(f"XML target {target!r} names no element", 1)
    if sum(1 for _, i in steps if i == STAR) > 1:
        raise CompileError(f"XML target {target!r} may spread ([*]) over one element only", 1)
    root, root_index = steps[0]
    if root_index != 1:
        raise CompileError(f"XML target {target!r}: a document has one root element", 1)
    return XmlTarget(root, tuple(steps[1:]), attribute)


def _clark(prefix: str | None, name: str, namespaces: Mapping[str, str], target: str) -> str:
    if prefix is None:
        return name
    uri = namespaces.get(prefix)
    if uri is None:
        raise CompileError(f"XML target {target!r} uses prefix {prefix!r}, which output.namespaces does not declare", 1)
    return f"{{{uri}}}{name}"


class XmlOutput:
    """The document being built; the root is created by the first value written."""

    __slots__ = ("nsmap", "root")

    def __init__(self, nsmap: Mapping[str, str], root: Any = None) -> None:
        self.nsmap = dict(nsmap)
        self.root = root

    def count(self, t: XmlTarget) -> int:
        """How many elements the spread step of ``t`` has now."""
        if self.root is None or self.root.tag != t.root:
            return 0
        nodes = [self.root]
        for tag, index in t.steps:
            children = [c for n in nodes for c in n if c.tag == tag]
            if index == STAR:
                return len(children)
            nodes = children[index - 1 : index]
        return 0

    def element(self, root_tag: str, steps: tuple[tuple[str, int], ...], star_value: int | None) -> Any:
        if self.root is None:
            self.root = etree.Element(root_tag, nsmap=self.nsmap or None)
        elif self.root.tag != root_tag:
            raise EvalError(f"the document's root is {self.root.tag}, not {root_tag}")
        node = self.root
        for tag, index in steps:
            n = star_value + 1 if index == STAR and star_value is not None else index
            children = [c for c in node if c.tag == tag]
            while len(children) < n:
                child = etree.SubElement(node, tag)
                children.append(child)
            node = children[n - 1]
        return node


def compile_xml_target(target: str, spec: OutputSpec) -> Setter:
    t = parse_xml_target(target, spec.namespaces)
    empty = spec.empty
    spread = any(i == STAR for _, i in t.steps)

    def write(out: XmlOutput, value: Any, star: int | None) -> None:
        if is_blank(value) and empty == "omit":
            return
        text = "" if value is None else (json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list)
                                         else _text(value))
        el = out.element(t.root, t.steps, star)
        try:
            if t.attribute is not None:
                el.set(t.attribute, text)
            else:
                el.text = text
        except ValueError as exc:
            raise EvalError(f"value cannot be written to XML: {exc}", value) from None

    if spread:
        def set_spread(out: Any, value: Any) -> None:
            if not isinstance(value, list):  # one value: every element of that name (at least one) gets it
                value = [value] * max(out.count(t), 1)
            for i, item in enumerate(value):
                write(out, item, i)

        return set_spread

    def set_one(out: Any, value: Any) -> None:
        if isinstance(value, list):
            value = " ".join(_text(v) for v in value if not is_blank(v))
        write(out, value, None)

    return set_one


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def new_xml_output(spec: OutputSpec, input_doc: Any) -> XmlOutput:
    if spec.copy and isinstance(input_doc, etree._Element):
        return XmlOutput(spec.namespaces, copy.deepcopy(input_doc))
    return XmlOutput(spec.namespaces)


def serialize_xml(root: Any, spec: OutputSpec) -> bytes:
    if root is None:
        raise EvalError("no rule wrote anything, so there is no XML document")
    charset = spec.charset or "UTF-8"
    try:
        return etree.tostring(root, xml_declaration=True, encoding=charset, pretty_print=spec.indent)
    except (LookupError, ValueError) as exc:
        raise EvalError(f"cannot write XML in {charset}: {exc}") from None
