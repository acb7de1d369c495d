"""Read a mapping file, check it against its JSON Schema and compile it; every problem has its file:line.

The file is YAML (``ihehub/mappings/schemas/mapping.json`` describes it; ``docs/mappings.md`` shows
examples).  ``${NAME}`` is replaced by the environment variable, so a hash salt or a password stays
out of the file.  Compilation collects every problem (schema, unknown paths, functions, tables and
variables, unreadable tables and stylesheets) instead of stopping at the first.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from lxml import etree

from ihehub.config.errors import Problem, sort_key
from ihehub.config.schema import check
from ihehub.config.yamlfile import PathStep, dotted, expand_env, plain, position, read_yaml
from ihehub.hl7.errors import HL7Error
from ihehub.mappings.codegen import Gen, RuleCode, build
from ihehub.mappings.compiled import CompiledMapping, Rule, Xslt
from ihehub.mappings.dicomwrite import compile_dicom_target
from ihehub.mappings.functions import FUNCTIONS
from ihehub.mappings.hl7write import compile_hl7_target, msh18_name
from ihehub.mappings.lang import CompileError, Env, Getter, Node, code_of, compile_expression
from ihehub.mappings.readers import InputSpec, path_compilers, xml_parser
from ihehub.mappings.tables import CodeTable, UnmappedReport, read_table_file
from ihehub.mappings.writers import OutputSpec, Setter, compile_key_target, compile_xml_target

log = logging.getLogger("ihehub.mappings")
_ARROW = re.compile(r"\s*(<-|←)\s*")
_COPY_PAIRS = {("hl7", "hl7"), ("xml", "xml"), ("json", "json"), ("json", "dict"), ("dict", "json"), ("dict", "dict"),
               ("dicom", "dicom")}


def load_schema() -> dict[str, Any]:
    text = resources.files("ihehub.mappings").joinpath("schemas", "mapping.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def load_callable(ref: str) -> Callable[..., Any]:
    """Import ``package.module:function``; `ValueError` says which part is wrong."""
    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"{ref!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {mod_name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{mod_name!r} has no function {attr!r}")
    return fn


class _Loader:
    def __init__(self, path: Path, display: str, report: UnmappedReport | None, environ: Mapping[str, str]) -> None:
        self.path = path
        self.base = path.parent
        self.display = display
        self.report = report or UnmappedReport()
        self.environ = environ
        self.problems: list[Problem] = []
        self.doc: Any = None
        self.lines: list[str] = []
        self.files: dict[str, bytes] = {}

    # -- problems ---------------------------------------------------------------------------

    def at(self, where: tuple[PathStep, ...], message: str, *, at_key: bool = False, column: int | None = None,
           snippet: str | None = None) -> None:
        line, col = position(self.doc, where, at_key=at_key)
        if column is not None and snippet:
            text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
            found = text.find(snippet, max(col - 1, 0))
            col = (found + column) if found >= 0 else col
        self.problems.append(Problem(file=self.display, line=line, column=col, path=dotted(where), message=message))

    def relative(self, name: str) -> Path:
        return (self.base / name).resolve()

    def read_dependency(self, name: str, where: tuple[PathStep, ...]) -> Path | None:
        path = self.relative(name)
        try:
            self.files[str(path)] = path.read_bytes()
        except OSError as exc:
            self.at(where, f"cannot read {name!r}: {exc.strerror or exc}")
            return None
        return path

    # -- the file ---------------------------------------------------------------------------

    def load(self) -> CompiledMapping | None:
        document, problems = read_yaml(self.path, self.display)
        self.problems += problems
        if document is None:
            return None
        self.doc = document
        try:
            raw = self.path.read_bytes()
        except OSError:
            raw = b""
        self.files[str(self.path.resolve())] = raw
        self.lines = raw.decode("utf-8-sig", "replace").splitlines()
        data, missing = expand_env(plain(document), self.environ)
        for where, message in missing:
            self.at(where, message)
        if not isinstance(data, dict):
            self.problems.append(Problem(file=self.display, line=1, message="a mapping file is a YAML mapping "
                                         "with input:, output: and rules:"))
            return None
        schema_problems = check(data, load_schema(), file=self.display, document=document)
        if schema_problems:
            self.problems += schema_problems
            return None
        return self.compile(data)

    def compile(self, data: dict[str, Any]) -> CompiledMapping | None:
        inp = self.input_spec(data["input"])
        out = self.output_spec(data["output"], inp)
        if inp.kind == "dicom" and out.kind == "dicom" and out.copy:  # tag morphing writes the pixel data back
            inp = dataclasses.replace(inp, pixels=True)
        tables = self.tables(data.get("tables") or {})
        env = Env(input_kind=inp.kind, paths=path_compilers(inp.kind), functions=FUNCTIONS, tables=tables,
                  variables=set(), extra={"input": inp, "output": out, "load_callable": self.callable_loader()})
        env.extra["gen"] = gen = Gen()
        hospital_node = self.node(env, data["hospital"], ("hospital",)) if data.get("hospital") else None
        hospital = hospital_node.get if hospital_node is not None else None
        hospital_code = RuleCode(gen.take(), code_of(env, hospital_node), None) if hospital_node is not None else None
        del env.extra["gen"]
        xslt = self.xslt(data, env, inp, out)
        env.extra["gen"] = gen
        rules, codes = self.rules(data.get("rules") or [], env, out)
        del env.extra["gen"]
        hook = None
        if data.get("hook"):
            try:
                hook = load_callable(data["hook"])
            except ValueError as exc:
                self.at(("hook",), f"hook {exc}")
        if not data.get("rules") and not data.get("xslt") and not data.get("hook") and not out.copy:
            self.at(("rules",) if "rules" in data else (), "the mapping has no rules (nor xslt, hook or copy)",
                    at_key=True)
        tests = data.get("tests") or []
        self.check_tests(tests, inp)
        if self.problems:
            return None
        try:
            fast = build(rules, codes, gen, hospital=hospital_code)
        except (SyntaxError, ValueError) as exc:  # a generator bug: keep the closures, say so
            log.error("mapping %s: generated code does not compile (%s); running the rules one by one",
                      self.display, exc)
            fast = None
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(Path(name).name.encode() + b"\0" + self.files[name] + b"\0")
        return CompiledMapping(
            name=str(data.get("name") or self.path.stem), file=self.display, version=digest.hexdigest()[:16],
            input=inp, output=out, rules=rules, tables=tables, report=self.report, hospital=hospital, xslt=xslt,
            hook=hook, dependencies=sorted(self.files), tests=tests,
            test_lines=[position(self.doc, ("tests", i))[0] for i in range(len(tests))], fast=fast,
        )

    def input_spec(self, d: dict[str, Any]) -> InputSpec:
        charset = d.get("charset")
        if charset:
            self.check_charset(charset, ("input", "charset"), hl7=d["kind"] == "hl7")
        return InputSpec(kind=d["kind"], charset=charset, namespaces=d.get("namespaces") or {},
                         delimiter=d.get("delimiter", ","),
                         columns=tuple(d["columns"]) if d.get("columns") else None)

    def output_spec(self, d: dict[str, Any], inp: InputSpec) -> OutputSpec:
        kind = d["kind"]
        charset = d.get("charset")
        if charset:
            self.check_charset(charset, ("output", "charset"), hl7=kind == "hl7")
        enc = d.get("encoding_characters", "^~\\&")
        if len(set(enc + "|")) != 5:
            self.at(("output", "encoding_characters"), f"{enc!r} repeats a delimiter (or uses |)")
        copy = bool(d.get("copy", False))
        if "base" in d:
            if kind != "dicom":
                self.at(("output", "base"), "base applies to DICOM output (copy: true starts other outputs "
                        "from the input)")
            elif d["base"] == "input":
                copy = True
        if "part10" in d and kind != "dicom":
            self.at(("output", "part10"), "part10 applies to DICOM output")
        if copy and (inp.kind, kind) not in _COPY_PAIRS:
            key = "base" if "base" in d else "copy"
            self.at(("output", key), f"{'base: input' if key == 'base' else 'copy'} needs the input and output to be "
                    f"alike; {inp.kind} -> {kind} cannot")
        if d.get("remove") and not (copy and kind == "hl7"):
            self.at(("output", "remove"), "remove applies to HL7 output with copy: true")
        if d.get("validate") and kind != "hl7":
            self.at(("output", "validate"), "validate applies to HL7 output")
        for key in ("version", "encoding_characters"):
            if key in d and kind != "hl7":
                self.at(("output", key), f"{key} applies to HL7 output")
        if d.get("namespaces") and kind != "xml":
            self.at(("output", "namespaces"), "namespaces apply to XML output")
        empty = d.get("empty") or ("null" if kind == "dict" else "omit")
        return OutputSpec(kind=kind, charset=charset, empty=empty, namespaces=d.get("namespaces") or {},
                          indent=bool(d.get("indent", False)), copy=copy, remove=tuple(d.get("remove") or ()),
                          version=d.get("version"), encoding_characters=enc, validate=bool(d.get("validate")),
                          part10=bool(d.get("part10", True)))

    def check_charset(self, name: str, where: tuple[PathStep, ...], *, hl7: bool) -> None:
        try:
            if hl7:
                msh18_name(name)
            else:
                codecs.lookup(name)
        except HL7Error as exc:
            self.at(where, str(exc.args[0] if exc.args else exc).replace(" in MSH-18", ""))
        except LookupError:
            self.at(where, f"unknown character set {name!r}")

    def tables(self, spec: dict[str, Any]) -> dict[str, CodeTable]:
        out: dict[str, CodeTable] = {}
        for name, entry in spec.items():
            where: tuple[PathStep, ...] = ("tables", name)
            if isinstance(entry, str):
                entry = {"file": entry}
            charset = entry.get("charset", "utf-8")
            ignore_case = bool(entry.get("ignore_case", False))
            fallback: dict[str, str] = {}
            if entry.get("file"):
                fallback = self.table_file(entry["file"], (*where, "file") if "file" in entry else where,
                                           charset, ignore_case)
            for code, value in (entry.get("values") or {}).items():
                key = str(code).strip()
                fallback[key.upper() if ignore_case else key] = "" if value is None else str(value)
            hospitals = {h: self.table_file(f, (*where, "hospitals", h), charset, ignore_case)
                         for h, f in (entry.get("hospitals") or {}).items()}
            policy = entry.get("unmapped", "error")
            default = entry.get("default")
            if policy == "default" and "default" not in entry:
                self.at((*where, "unmapped"), "unmapped: default needs a default: value")
            if "default" in entry and policy != "default":
                self.at((*where, "default"), "default: is used only with unmapped: default", at_key=True)
            if not entry.get("file") and not entry.get("values") and not hospitals:
                self.at(where, f"code table {name!r} has no file, values or hospitals", at_key=True)
            out[name] = CodeTable(name=name, fallback=fallback, hospitals=hospitals, policy=policy,
                                  default=None if default is None else str(default), ignore_case=ignore_case,
                                  report=self.report)
        return out

    def table_file(self, name: str, where: tuple[PathStep, ...], charset: str, ignore_case: bool) -> dict[str, str]:
        path = self.read_dependency(name, where)
        if path is None:
            return {}
        table, problems = read_table_file(path, os.path.relpath(path) if path.is_absolute() else name,
                                          charset=charset, ignore_case=ignore_case)
        self.problems += problems
        return table

    def callable_loader(self) -> Callable[[str, int], Callable[..., Any]]:
        def load(ref: str, pos: int) -> Callable[..., Any]:
            try:
                return load_callable(ref)
            except ValueError as exc:
                raise CompileError(f"python(): {exc}", pos + 1) from None

        return load

    def expression(self, env: Env, text: str, where: tuple[PathStep, ...]) -> Getter | None:
        node = self.node(env, text, where)
        return node.get if node is not None else None

    def node(self, env: Env, text: str, where: tuple[PathStep, ...]) -> Node | None:
        try:
            return compile_expression(text, env)
        except CompileError as exc:
            self.at(where, exc.message, column=exc.column, snippet=text)
            return None

    def xslt(self, data: dict[str, Any], env: Env, inp: InputSpec, out: OutputSpec) -> Xslt | None:
        if not data.get("xslt"):
            if data.get("xslt_params"):
                self.at(("xslt_params",), "xslt_params needs xslt:", at_key=True)
            return None
        if inp.kind != "xml" or out.kind != "xml":
            self.at(("xslt",), f"XSLT maps XML to XML, not {inp.kind} -> {out.kind}")
            return None
        path = self.read_dependency(data["xslt"], ("xslt",))
        if path is None:
            return None
        access = etree.XSLTAccessControl(read_file=True, write_file=False, create_dir=False, read_network=False,
                                         write_network=False)
        try:
            transform = etree.XSLT(etree.parse(str(path), xml_parser()), access_control=access)
        except (etree.XMLSyntaxError, etree.XSLTParseError) as exc:
            log = getattr(exc, "error_log", None)
            first = log[0] if log else None
            line = f" line {first.line}" if first is not None and first.line else ""
            self.at(("xslt",), f"{data['xslt']}{line}: not a usable XSLT 1.0 stylesheet: {exc}")
            return None
        params: dict[str, Getter] = {}
        for key, text in (data.get("xslt_params") or {}).items():
            g = self.expression(env, text, ("xslt_params", key))
            if g is not None:
                params[key] = g
        return Xslt(transform=transform, params=params, file=data["xslt"])

    def rules(self, items: list[Any], env: Env, out: OutputSpec) -> tuple[list[Rule], list[RuleCode]]:
        compiled: list[Rule] = []
        codes: list[RuleCode] = []
        gen: Gen = env.extra["gen"]
        for i, item in enumerate(items):
            where: tuple[PathStep, ...] = ("rules", i)
            line = position(self.doc, where)[0]
            if isinstance(item, str):
                target, _, expr = _ARROW.split(item, maxsplit=1)
                target, expr, when, required = target.strip(), expr.strip(), None, False
                text, value_where = item.strip(), where
            else:
                target, expr, when = item["target"].strip(), str(item["value"]).strip(), item.get("when")
                required = bool(item.get("required", False))
                text, value_where = f"{target} <- {expr}", (*where, "value")
            if target.endswith("!"):
                target, required = target[:-1].rstrip(), True
            value_node = self.node(env, expr, value_where) if expr else None
            getter = value_node.get if value_node is not None else None
            if not expr:
                self.at(value_where, "the rule has no expression after <-")
            when_node = self.node(env, when, (*where, "when")) if when else None
            when_get = when_node.get if when_node is not None else None
            prelude = gen.take()
            setter, var = None, None
            if target.startswith("$"):
                var = target[1:]
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var) or var in ("hospital", *env.meta_variables):
                    self.at(where, f"{target!r} is not a variable name you can set")
                    continue
            else:
                setter = self.target(target, out, where if isinstance(item, str) else (*where, "target"))
            if var is not None:
                env.variables.add(var)
            if getter is None or (setter is None and var is None) or (when and when_get is None):
                continue
            compiled.append(Rule(line=line, text=text, target=target, get=getter, set=setter, var=var, when=when_get,
                                 required=required))
            codes.append(RuleCode(prelude, code_of(env, value_node), code_of(env, when_node)))
        return compiled, codes

    def target(self, target: str, out: OutputSpec, where: tuple[PathStep, ...]) -> Setter | None:
        try:
            if out.kind == "hl7":
                return compile_hl7_target(target, out)
            if out.kind == "xml":
                return compile_xml_target(target, out)
            if out.kind == "dicom":
                return compile_dicom_target(target, out)
            return compile_key_target(target, out)
        except CompileError as exc:
            self.at(where, f"target: {exc.message}", column=exc.column, snippet=target)
            return None

    def check_tests(self, tests: list[dict[str, Any]], inp: InputSpec) -> None:
        for i, test in enumerate(tests):
            given = [k for k in ("input", "input_text", "input_data") if k in test]
            if len(given) != 1:
                self.at(("tests", i), "a test needs exactly one of input (a file), input_text or input_data",
                        at_key=True)
            if "input" in test and not self.relative(test["input"]).is_file():
                self.at(("tests", i, "input"), f"test input file {test['input']!r} does not exist")
            if "expect" not in test and "expect_error" not in test:
                self.at(("tests", i), "a test needs expect: (fields) or expect_error: (text)", at_key=True)


def compile_mapping(
    path: str | Path,
    *,
    display: str | None = None,
    report: UnmappedReport | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[CompiledMapping | None, list[Problem]]:
    """Compile the mapping file at ``path``: the mapping, or None and every problem (sorted, with file:line)."""
    p = Path(path)
    loader = _Loader(p, display or str(path), report, os.environ if environ is None else environ)
    mapping = loader.load()
    problems = sorted(loader.problems, key=sort_key)
    return (None if problems else mapping), problems

