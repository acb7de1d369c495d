"""Code tables: per hospital with a fallback, the three unmapped-code policies, the unmapped report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from ihehub.mappings import MappingError, UnmappedCode, compile_mapping, load_mapping

MSG = "MSH|^~\\&|HIS|{h}|HUB|X|20260110||ADT^A01|C1|P|2.5\rPID|1||1||Li^Lei||19900101|{sex}\rPV1|1|I||||||||{dept}\r"


def msg(h: str = "H1", sex: str = "M", dept: str = "FS") -> str:
    return MSG.format(h=h, sex=sex, dept=dept)


@pytest.fixture
def mapping_file(write: Callable[..., Path]) -> Path:
    write("tables/sex.csv", "code,value\nM,male\nF,female\n")
    write("tables/dept.yaml", "FS: radiology\nCS: ultrasound\n")
    write("tables/h2/dept.csv", "code,value\nFS,imaging\nXR,imaging\n")
    return write("m.yaml", """
        input: {kind: hl7}
        output: {kind: json}
        hospital: MSH-4.1
        tables:
          sex: tables/sex.csv                  # policy: error
          dept:
            file: tables/dept.yaml
            hospitals: {H2: tables/h2/dept.csv}
            unmapped: default
            default: other
          pass_through:
            values: {A: alpha}
            unmapped: pass
            ignore_case: true
        rules:
          - sex <- table("sex", PID-8)
          - dept <- table("dept", PV1-10)
          - code <- table("pass_through", PV1-2)
          - other_hospital <- table("dept", PV1-10, "H2")
        """)


def test_hospital_table_then_fallback(mapping_file: Path) -> None:
    m = load_mapping(str(mapping_file))
    assert json.loads(m.to_bytes(msg("H1", dept="FS")))["dept"] == "radiology"
    assert json.loads(m.to_bytes(msg("H2", dept="FS")))["dept"] == "imaging"  # H2's own table wins
    assert json.loads(m.to_bytes(msg("H2", dept="CS")))["dept"] == "ultrasound"  # falls back
    assert json.loads(m.to_bytes(msg("H1", dept="XR")))["dept"] == "other"  # only H2 knows XR
    assert json.loads(m.to_bytes(msg("H1", dept="XR")))["other_hospital"] == "imaging"  # hospital given


def test_policies(mapping_file: Path) -> None:
    m = load_mapping(str(mapping_file))
    out = json.loads(m.to_bytes(msg(dept="ZZ")))
    assert out["dept"] == "other"  # default
    assert out["code"] == "I"  # pass
    with pytest.raises(MappingError) as info:  # error
        m.apply(msg(sex="X"))
    err = info.value
    assert err.target == "sex" and err.value == "X" and err.code == "103"
    assert err.rule == 'sex <- table("sex", PID-8)' and err.location.endswith("m.yaml:16")
    assert "code 'X' is not in code table 'sex'" in str(err)


def test_unmapped_report(mapping_file: Path) -> None:
    m = load_mapping(str(mapping_file))
    for _ in range(3):
        m.apply(msg("H1", dept="ZZ"))
    m.apply(msg("H2", dept="YY"))
    with pytest.raises(MappingError):
        m.apply(msg(sex="X"))
    report = m.unmapped()
    assert report == [
        UnmappedCode("dept", "H1", "ZZ", 3),
        UnmappedCode("dept", "H2", "YY", 2),  # the rule for the message's hospital and the one naming H2
        UnmappedCode("dept", "H2", "ZZ", 3),
        UnmappedCode("pass_through", "H1", "I", 3),
        UnmappedCode("pass_through", "H2", "I", 1),
        UnmappedCode("sex", "H1", "X", 1),  # the first rule failed, so nothing after it ran
    ]


def test_case_insensitive_table(mapping_file: Path) -> None:
    m = load_mapping(str(mapping_file))
    assert json.loads(m.to_bytes(msg().replace("|1|I|", "|1|a|")))["code"] == "alpha"


def test_broken_tables_point_at_their_lines(write: Callable[..., Path]) -> None:
    write("dup.csv", "code,value\nM,male\nF,female\nM,man\nX\n")
    write("bad.yaml", "A: a\nB: [1, 2]\n")
    path = write("m.yaml", """
        input: {kind: hl7}
        output: {kind: json}
        tables:
          a: dup.csv
          b: bad.yaml
          c: missing.csv
          d: {unmapped: default}
          e: {values: {A: b}, default: x}
        rules:
          - x <- table("a", PID-8)
        """)
    mapping, problems = compile_mapping(path)
    assert mapping is None
    shown = [str(p) for p in problems]
    assert any("dup.csv:4: code 'M' repeated (first on line 2)" in s for s in shown), shown
    assert any("dup.csv:5: row has 1 column(s)" in s for s in shown), shown
    assert any("bad.yaml:2:" in s and "not a list or mapping" in s for s in shown), shown
    assert any(":6:" in s and "cannot read 'missing.csv'" in s for s in shown), shown
    assert any(":7:" in s and "unmapped: default needs a default" in s for s in shown), shown
    assert any(":8:" in s and "default: is used only with unmapped: default" in s for s in shown), shown
