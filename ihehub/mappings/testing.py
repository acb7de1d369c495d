"""Entry points for people and the CLI: try a mapping on one input, check a file, run its ``tests:`` block.

A mapping file may carry its own tests (tests written as config)::

    tests:
      - name: admission with a local sex code
        input: samples/a01-gb18030.hl7        # a file next to the mapping; or input_text: / input_data:
        expect:
          patient.sex: female                 # output fields, read with the output's own paths
          patient.name.family: 张
      - name: unknown department code is refused
        input_text: "MSH|^~\\&|HIS|H1|...\\rPV1|1|I|XX\\r"
        expect_error: not in code table       # part of the MappingError text

Fields of an HL7 output are read with HL7 paths (``PID-5.1``), of XML output with XPath and the
output's namespaces, of JSON and dict outputs with dotted keys (``patient.ids[0].value``), of DICOM
output with DICOM paths (``PatientID``, ``(0010,0021)``, ``RequestAttributesSequence[0].AccessionNumber``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lxml import etree

from ihehub.config.errors import Problem
from ihehub.hl7.charsets import codec_for_msh18
from ihehub.hl7.errors import HL7Error
from ihehub.mappings.compiled import CompiledMapping, TraceEntry
from ihehub.mappings.dicompath import compile_reader, parse_path, read_dicom
from ihehub.mappings.errors import MappingError
from ihehub.mappings.functions import FUNCTIONS
from ihehub.mappings.hl7path import HL7Doc, PathError
from ihehub.mappings.lang import CompileError, Ctx, Env
from ihehub.mappings.loader import compile_mapping
from ihehub.mappings.readers import InputSpec, compile_xpath, path_compilers, xml_parser, xml_value
from ihehub.mappings.writers import STAR, parse_key_path


@dataclasses.dataclass(frozen=True, slots=True)
class TestOutcome:
    """One test of a ``tests:`` block: passed, or the reasons it failed."""

    __test__ = False  # not a pytest class

    name: str
    line: int
    passed: bool
    failures: tuple[str, ...] = ()


def test_mapping(path: str | Path, input_bytes: bytes) -> tuple[bytes | dict[str, Any], tuple[TraceEntry, ...]]:
    """Map ``input_bytes`` with the mapping at ``path``: ``(output, trace)``.

    Raises `ihehub.config.ConfigError` when the file has problems and `MappingError` when the input
    cannot be mapped.  (``ihehub map test MAPPING INPUT``.)
    """
    from ihehub.config.errors import ConfigError

    mapping, problems = compile_mapping(path)
    if mapping is None:
        raise ConfigError(problems)
    result = mapping.run(input_bytes)
    return result.output, result.trace


test_mapping.__test__ = False  # type: ignore[attr-defined]


def check_mapping(path: str | Path, *, run_tests: bool = True) -> list[Problem]:
    """Every problem of the mapping file: schema, unknown paths, functions, tables, variables, files, and
    (``run_tests``) each failing test of its ``tests:`` block, all with file:line.  (``ihehub map check``.)"""
    mapping, problems = compile_mapping(path)
    if mapping is None or not run_tests:
        return problems
    return [
        Problem(file=mapping.file, line=o.line, path=f"tests[{i}]", message=f"test {o.name!r} failed: {f}")
        for i, o in enumerate(run_mapping_tests(mapping, Path(path).parent))
        for f in o.failures
    ]


def run_mapping_tests(mapping: CompiledMapping, base: Path) -> list[TestOutcome]:
    """Run the mapping's ``tests:`` block; ``base`` is the folder test input files are relative to."""
    outcomes = []
    for i, test in enumerate(mapping.tests):
        line = mapping.test_lines[i] if i < len(mapping.test_lines) else 0
        name = str(test.get("name") or f"test {i + 1}")
        failures = _run_one(mapping, test, base)
        outcomes.append(TestOutcome(name, line, not failures, tuple(failures)))
    return outcomes


def _run_one(mapping: CompiledMapping, test: Mapping[str, Any], base: Path) -> list[str]:
    if "input" in test:
        try:
            data: Any = (base / test["input"]).read_bytes()
        except OSError as exc:
            return [f"cannot read {test['input']!r}: {exc.strerror or exc}"]
    elif "input_text" in test:
        data = test["input_text"]
        if mapping.input.kind == "hl7":
            data = data.replace("\r\n", "\r").replace("\n", "\r")
    else:
        data = test.get("input_data")
    try:
        output = mapping.apply(data, meta=test.get("meta"))
    except MappingError as exc:
        expected = test.get("expect_error")
        if expected is None:
            return [f"mapping failed: {exc}"]
        return [] if expected in str(exc) else [f"error {str(exc)!r} does not contain {expected!r}"]
    if "expect_error" in test:
        return [f"expected an error containing {test['expect_error']!r}, but the mapping succeeded"]
    failures = []
    for field, expected in (test.get("expect") or {}).items():
        try:
            actual = read_output_field(mapping, output, str(field))
        except (CompileError, PathError, ValueError) as exc:
            failures.append(f"{field}: cannot read: {exc}")
            continue
        if not _same(actual, expected):
            failures.append(f"{field}: expected {expected!r}, got {actual!r}")
    return failures


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(
            _same(a, e) for a, e in zip(actual, expected, strict=True))
    if isinstance(expected, dict):
        return actual == expected
    if expected is None:
        return actual is None or actual == ""
    if actual is None:
        return False
    if isinstance(expected, bool) or isinstance(actual, bool):
        return actual == expected
    return str(actual) == str(expected) or (isinstance(expected, int | float) and _num(actual) == expected)


def _num(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_output_field(mapping: CompiledMapping, output: bytes | dict[str, Any], field: str) -> Any:
    """Read one field of a mapping output with the output kind's own paths."""
    kind = mapping.output.kind
    if kind == "hl7":
        assert isinstance(output, bytes)
        ctx = Ctx(None, {}, {})
        ctx.doc = HL7Doc(decode_hl7(output), ctx)
        env = Env(input_kind="hl7", paths=path_compilers("hl7"), functions=FUNCTIONS, tables={}, variables=set(),
                  extra={"input": InputSpec(kind="hl7")})
        value = env.path("hl7", field, 0)(ctx)
        return [str(v) if isinstance(v, str) else v for v in value] if isinstance(value, list) else \
            str(value) if isinstance(value, str) else value
    if kind == "dicom":
        assert isinstance(output, bytes)
        return compile_reader(parse_path(field))(Ctx(read_dicom(output), {}, {}))
    if kind == "xml":
        assert isinstance(output, bytes)
        root = etree.fromstring(output, xml_parser())
        return xml_value(compile_xpath(field, mapping.output.namespaces)(root))
    data: Any = output if isinstance(output, dict) else json.loads(output)
    for key, indexes in parse_key_path(field):
        data = data.get(key) if isinstance(data, dict) else None
        for i in indexes:
            if i == STAR or not isinstance(data, list):
                raise ValueError(f"{field!r}: read list items by position, e.g. ids[0]")
            data = data[i] if i < len(data) else None
    return data


def decode_hl7(raw: bytes) -> str:
    """HL7 bytes as text, decoded with the codec MSH-18 names (UTF-8 when it is empty or unknown)."""
    first = raw.split(b"\r", 1)[0].decode("latin-1")
    fields = first.split(first[3]) if len(first) > 3 else []
    codec = "utf-8"
    if len(fields) > 17 and fields[17]:
        try:
            codec = codec_for_msh18(fields[17], fields[1][1:2] or "~") or "utf-8"
        except HL7Error:
            codec = "utf-8"
    return raw.decode(codec, "replace")


def format_trace(trace: tuple[TraceEntry, ...] | list[TraceEntry]) -> str:
    """The trace as lines ``line  target <- value   (rule)`` for ``ihehub map test``."""
    lines = []
    for e in trace:
        where = f"{e.line:>4}" if e.line else "    "
        if e.skipped:
            lines.append(f"{where}  {e.target}  (skipped: when is false)")
        else:
            shown = json.dumps(e.value, ensure_ascii=False, default=str)
            lines.append(f"{where}  {e.target} <- {shown}    # {e.rule}")
    return "\n".join(lines)
