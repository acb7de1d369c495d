"""Mapping files and code tables: integration engineers fix each hospital's dialect in YAML, not in Python.

A mapping file declares its input and output kinds and rules ``target <- expression``; it is
compiled once (`compile_mapping`, `load_mapping`) into a `CompiledMapping` whose ``version`` is a
content hash.  `MappingSet` reloads changed files after checking them.  See ``docs/mappings.md``.
"""

from ihehub.mappings.compiled import CompiledMapping, MappingResult, Rule, TraceEntry
from ihehub.mappings.errors import MappingError
from ihehub.mappings.hl7path import HL7Doc, HL7Path, Structured, compile_path
from ihehub.mappings.loader import compile_mapping, load_callable
from ihehub.mappings.reload import MappingSet
from ihehub.mappings.tables import CodeTable, UnmappedCode, UnmappedReport
from ihehub.mappings.testing import (
    TestOutcome,
    check_mapping,
    format_trace,
    read_output_field,
    run_mapping_tests,
    test_mapping,
)


def load_mapping(path: str, *, display: str | None = None) -> CompiledMapping:
    """Compile the mapping file at ``path``; raises `ihehub.config.ConfigError` listing every problem."""
    from ihehub.config.errors import ConfigError

    mapping, problems = compile_mapping(path, display=display)
    if mapping is None:
        raise ConfigError(problems)
    return mapping


__all__ = [
    "CodeTable",
    "CompiledMapping",
    "HL7Doc",
    "HL7Path",
    "MappingError",
    "MappingResult",
    "MappingSet",
    "Rule",
    "Structured",
    "TestOutcome",
    "TraceEntry",
    "UnmappedCode",
    "UnmappedReport",
    "check_mapping",
    "compile_mapping",
    "compile_path",
    "format_trace",
    "load_callable",
    "load_mapping",
    "read_output_field",
    "run_mapping_tests",
    "test_mapping",
]
