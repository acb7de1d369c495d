"""The ``tests:`` block of a mapping file and the entry points behind ``ihehub map test|check``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ihehub.config.errors import ConfigError
from ihehub.mappings import check_mapping, format_trace, load_mapping, run_mapping_tests, test_mapping

from .conftest import DATA


@pytest.mark.parametrize("name", ["adt-patient.yaml", "adt-to-pacs.yaml", "order-xslt.yaml", "order-rules.yaml",
                                  "report-to-oru.yaml", "lab-row.yaml"])
def test_shipped_examples_check_clean(name: str) -> None:
    assert check_mapping(DATA / name) == []


def test_tests_block_passes() -> None:
    mapping = load_mapping(str(DATA / "adt-patient.yaml"))
    outcomes = run_mapping_tests(mapping, DATA)
    assert [(o.name, o.passed) for o in outcomes] == [
        ("GB18030 admission from H1", True),
        ("H2 has its own department codes", True),
        ("a local sex code that no table knows is refused", True),
    ]


def test_failing_tests_are_problems_at_their_lines(write: Callable[..., Path]) -> None:
    write("in.hl7", "MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5\rPID|1||5||X^Y||2000|M\r")
    path = write("m.yaml", """
        input: {kind: hl7}
        output: {kind: hl7}
        rules:
          - PID-3.1 <- PID-3.1
          - PID-5.1 <- lower(PID-5.1)
        tests:
          - name: ok
            input: in.hl7
            expect: {PID-3.1: "5", PID-5.1: x}
          - name: wrong value
            input: in.hl7
            expect: {PID-5.1: X}
          - name: expected an error
            input: in.hl7
            expect_error: boom
          - name: unreadable field
            input: in.hl7
            expect: {"PID-": x}
        """)
    problems = check_mapping(path)
    assert [(p.line, p.message) for p in problems] == [
        (10, "test 'wrong value' failed: PID-5.1: expected 'X', got 'x'"),
        (13, "test 'expected an error' failed: expected an error containing 'boom', but the mapping succeeded"),
        (16, "test 'unreadable field' failed: PID-: cannot read: bad HL7 path 'PID-' at column 4 "
             "(expected e.g. PID-3[1].1, OBX[2]-5, OBX[OBX-3.1 == \"GLU\"]-5) (column 1)"),
    ]


def test_test_mapping_returns_output_and_trace() -> None:
    output, trace = test_mapping(DATA / "adt-patient.yaml", (DATA / "adt-a01-gb18030.hl7").read_bytes())
    assert isinstance(output, bytes) and b'"id": "100234"' in output
    text = format_trace(trace)
    assert '  21  patient.name.family <- "单"    # patient.name.family <- trim(PID-5.1)' in text
    assert "patient.sex <- \"female\"" in text
    with pytest.raises(ConfigError):
        test_mapping(DATA / "nope.yaml", b"")
