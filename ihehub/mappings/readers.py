"""Mapping inputs: parse a message of each kind once, and compile the paths that read it.

* ``hl7``  HL7 v2 (decoded with MSH-18, HL7 v2.5 section 2.15.9.18; the channel default otherwise);
  paths as in `ihehub.mappings.hl7path`.
* ``xml``  XPath 1.0 with the mapping's namespace prefixes (lxml; entities are not resolved and no
  network access happens, so an XML input cannot read local files).
* ``json`` JSON pointer (RFC 6901, plus ``*`` for every item of a list) and JMESPath.
* ``csv``  one row (a header row first unless ``columns`` are declared); ``@column``.
* ``dict`` a row from a database or any mapping of names to values; ``@column`` and JSON pointer.
* ``dicom`` a DICOM Part 10 file or a dataset without preamble (pydicom); keywords, tags and sequence
  paths as in `ihehub.mappings.dicompath`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from collections.abc import Mapping
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError
from lxml import etree

from ihehub.hl7.codec import parse_header
from ihehub.hl7.errors import HL7Error
from ihehub.mappings.dicompath import dicom_path, read_dicom
from ihehub.mappings.errors import EvalError
from ihehub.mappings.hl7path import HL7Doc, PathError, compile_path
from ihehub.mappings.lang import (
    CompileError,
    Ctx,
    Env,
    Getter,
    PathCompiler,
    compile_expression,
    did_you_mean,
    truthy,
    with_code,
)

INPUT_KINDS = ("hl7", "xml", "json", "csv", "dict", "dicom")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class InputSpec:
    kind: str
    charset: str | None = None
    namespaces: Mapping[str, str] = dataclasses.field(default_factory=dict)
    delimiter: str = ","
    columns: tuple[str, ...] | None = None
    pixels: bool = False  # dicom: read the pixel data too (when the output starts from the input)


# -- HL7 v2 ----------------------------------------------------------------------------------

def _hl7_path(env: Env, text: str, pos: int) -> Getter:
    def condition(inner: str, segment: str) -> Any:
        env.extra["conditions"] = env.extra.get("conditions", 0) + 1
        try:
            node = compile_expression(inner, env)
        except CompileError as exc:
            raise CompileError(f"in the condition of {text!r}: {exc.message}", pos + 1) from None
        finally:
            env.extra["conditions"] -= 1
        g = node.get
        return lambda doc: truthy(g(doc.owner))

    try:
        path = compile_path(text, condition, scoped=env.extra.get("conditions", 0) > 0)
    except PathError as exc:
        raise CompileError(str(exc), pos + 1) from None
    get = path.getter(from_owner=True)
    gen = env.extra.get("gen")
    return with_code(get, gen.hl7(path) if gen is not None else None)


# -- XML -------------------------------------------------------------------------------------

def xml_parser() -> etree.XMLParser:
    """A parser that never resolves entities nor touches the network (no XXE)."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def xml_value(result: Any) -> Any:
    """An XPath result as a mapping value: text of elements, strings, numbers; one item unwrapped."""
    if isinstance(result, list):
        items = [_xml_item(r) for r in result]
        if not items:
            return None
        return items[0] if len(items) == 1 else items
    return _xml_item(result)


def _xml_item(item: Any) -> Any:
    if isinstance(item, etree._Element):
        return "".join(item.itertext())
    if isinstance(item, bool):
        return item
    if isinstance(item, float):
        return int(item) if item.is_integer() else item
    if isinstance(item, str):
        return str(item)
    return item


def compile_xpath(text: str, namespaces: Mapping[str, str], pos: int = 0) -> etree.XPath:
    try:
        xp = etree.XPath(text, namespaces=dict(namespaces))
        xp(etree.Element("probe"))  # undefined prefixes and functions show up only when evaluated
    except etree.XPathError as exc:
        prefixes = sorted(namespaces)
        hint = f" (declared prefixes: {', '.join(prefixes)})" if prefixes else " (declare prefixes under namespaces:)"
        extra = hint if "prefix" in str(exc).lower() or "namespace" in str(exc).lower() else ""
        raise CompileError(f"bad XPath {text!r}: {exc}{extra}", pos + 1) from None
    return xp


def _xpath(env: Env, text: str, pos: int) -> Getter:
    spec: InputSpec = env.extra["input"]
    xp = compile_xpath(text, spec.namespaces, pos)
    return lambda c: xml_value(xp(c.doc))


# -- JSON, dict, CSV ------------------------------------------------------------------------

def _pointer(env: Env, text: str, pos: int) -> Getter:
    if text == "":
        return lambda c: c.doc
    if not text.startswith("/"):
        raise CompileError(f"JSON pointer {text!r} must start with '/'", pos + 1)
    steps = [s.replace("~1", "/").replace("~0", "~") for s in text[1:].split("/")]
    if any(re.search(r"~(?![01])", s) for s in text[1:].split("/")):
        raise CompileError(f"JSON pointer {text!r}: '~' must be written ~0 (and '/' inside a name ~1)", pos + 1)

    def walk(node: Any, i: int) -> Any:
        while i < len(steps):
            step = steps[i]
            if step == "*":
                if not isinstance(node, list):
                    return []
                out: list[Any] = []
                for item in node:
                    v = walk(item, i + 1)
                    out.extend(v if isinstance(v, list) and "*" in steps[i + 1 :] else [v])
                return out
            if isinstance(node, Mapping):
                node = node.get(step)
            elif isinstance(node, list) and step.isdigit():
                k = int(step)
                node = node[k] if k < len(node) else None
            else:
                return None
            if node is None:
                return None
            i += 1
        return node

    return lambda c: walk(c.doc, 0)


def _jmes(env: Env, text: str, pos: int) -> Getter:
    try:
        compiled = jmespath.compile(text)
    except JMESPathError as exc:
        raise CompileError(f"bad JMESPath {text!r}: {exc}", pos + 1) from None
    return lambda c: compiled.search(c.doc)


def _column(env: Env, text: str, pos: int) -> Getter:
    spec: InputSpec = env.extra["input"]
    if spec.columns is not None and text not in spec.columns:
        raise CompileError(f"unknown column {text!r}{did_you_mean(text, list(spec.columns))}", pos + 1)

    def get(c: Ctx) -> Any:
        doc = c.doc
        return doc.get(text) if isinstance(doc, Mapping) else None

    return get


def path_compilers(kind: str) -> dict[str, PathCompiler]:
    if kind == "hl7":
        return {"hl7": _hl7_path}
    if kind == "xml":
        return {"slash": _xpath, "xpath": _xpath}
    if kind == "dicom":
        return {"dicom": dicom_path}
    return {"slash": _pointer, "pointer": _pointer, "jmes": _jmes, "column": _column}


# -- parsing inputs -------------------------------------------------------------------------

def _decode(data: bytes, charset: str | None) -> str:
    codec = charset or "utf-8"
    if codec.lower().replace("_", "-") in ("utf-8", "utf8"):
        codec = "utf-8-sig"
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        raise EvalError(f"input is not valid {charset or 'UTF-8'} at byte {exc.start}", data[exc.start : exc.start + 4],
                        code="102") from None
    except LookupError:
        raise EvalError(f"unknown character set {charset!r}") from None


def parse_input(spec: InputSpec, data: Any, ctx: Ctx) -> Any:
    """The document the input's paths read (`HL7Doc`, lxml element, dict or list); `EvalError` if unreadable."""
    if spec.kind == "hl7" and type(data) is str:
        return HL7Doc(data, ctx)
    raw = getattr(data, "raw", None)
    if spec.kind == "dicom":
        return read_dicom(raw if isinstance(raw, bytes) and hasattr(data, "text") else data, pixels=spec.pixels)
    if isinstance(raw, bytes) and hasattr(data, "text"):  # a bus Message
        data = data.text() if spec.kind == "hl7" and getattr(data, "charset", None) else raw
    if spec.kind == "hl7":
        if isinstance(data, bytes):
            try:
                data = parse_header(data, spec.charset or "ascii").text
            except HL7Error as exc:
                raise EvalError(f"input is not a readable HL7 v2 message: {exc}", code=exc.code) from None
            except ValueError as exc:
                raise EvalError(f"input is not a readable HL7 v2 message: {exc}") from None
        if not isinstance(data, str):
            raise EvalError(f"HL7 input must be bytes or text, not {type(data).__name__}")
        return HL7Doc(data, ctx)
    if spec.kind == "xml":
        if isinstance(data, etree._Element):
            return data
        if isinstance(data, str):
            data = re.sub(r"^(<\?xml[^>]*?)\s+encoding=[\"'][^\"']*[\"']", r"\1", data.lstrip("\ufeff")).encode("utf-8")
        if not isinstance(data, bytes):
            raise EvalError(f"XML input must be bytes or text, not {type(data).__name__}")
        try:
            return etree.fromstring(data, xml_parser())
        except etree.XMLSyntaxError as exc:
            raise EvalError(f"input is not well-formed XML: {exc}", code="102") from None
    if spec.kind == "csv":
        rows = read_csv_rows(spec, data)
        if len(rows) != 1:
            raise EvalError(f"CSV input holds {len(rows)} data rows; a mapping reads one row "
                            "(map_rows() maps each)", code="102")
        return rows[0]
    if isinstance(data, Mapping | list) and not isinstance(data, str | bytes):
        return dict(data) if spec.kind == "dict" and isinstance(data, Mapping) else data
    if isinstance(data, bytes):
        data = _decode(data, spec.charset)
    if not isinstance(data, str):
        raise EvalError(f"{spec.kind} input must be JSON text or a mapping, not {type(data).__name__}")
    try:
        value = json.loads(data)
    except json.JSONDecodeError as exc:
        raise EvalError(f"input is not valid JSON: {exc}", code="102") from None
    if spec.kind == "dict" and not isinstance(value, dict):
        raise EvalError("dict input must be a JSON object", code="102")
    return value


def read_csv_rows(spec: InputSpec, data: Any) -> list[dict[str, str]]:
    if isinstance(data, Mapping):
        return [dict(data)]
    if isinstance(data, bytes):
        data = _decode(data, spec.charset)
    if not isinstance(data, str):
        raise EvalError(f"CSV input must be bytes or text, not {type(data).__name__}")
    rows = [r for r in csv.reader(io.StringIO(data), delimiter=spec.delimiter) if any(x.strip() for x in r)]
    if spec.columns is not None:
        header = list(spec.columns)
    elif rows:
        header, rows = [h.strip() for h in rows[0]], rows[1:]
    else:
        raise EvalError("CSV input is empty (no header row)", code="102")
    out = []
    for n, row in enumerate(rows, start=1):
        if len(row) > len(header):
            raise EvalError(f"CSV row {n} has {len(row)} columns, the header {len(header)}", row, code="102")
        out.append({h: (row[i] if i < len(row) else "") for i, h in enumerate(header)})
    return out
