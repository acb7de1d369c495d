"""The generated function (`apply`) against the rule closures (`run`, which traces): same output, same
errors, for the shapes the generator writes inline — parent dicts, ``a.b[*].c`` spreads, the ``hospital:``
expression, values known to be text, time zones — on ordinary, empty, structured and broken messages."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ihehub.mappings import MappingError, load_mapping
from ihehub.mappings.compiled import CompiledMapping

RULES = """
  - patient.id! <- PID-3[1].1
  - patient.ids[*].value <- PID-3[*].1
  - patient.ids[*].system <- PID-3[*].4.1
  - patient.ids[*].kind <- "MR"
  - patient.name.family <- trim(PID-5.1)
  - patient.name.given <- upper(PID-5.2)
  - patient.name.whole <- PID-5
  - patient.sex <- table("sex", PID-8)
  - patient.born <- date(PID-7, "date")
  - patient.hash <- hash(PID-19, salt="s")
  - patient.phone <- mask_phone(PID-13.1)
  - visit.at <- date(PV1-44, "iso")
  - visit.dept <- table("dept", PV1-10)
  - visit.label <- concat(PV1-3.1, "-", PV1-3.2)
  - visit.urgent <- PV1-2 == "E"
  - message.hospital <- $hospital
  - message.sent <- date(MSH-7, "iso")
"""
TABLES = """
tables:
  sex: {values: {M: male, F: female}, unmapped: default, default: unknown}
  dept: {values: {RAD: radiology}, unmapped: pass}
  hosp: {values: {H1: first, H2: second}}
"""


def _mapping(tmp_path: Path, empty: str, hospital: str = "MSH-4.1", kind: str = "dict") -> CompiledMapping:
    text = (f"input: {{kind: hl7}}\noutput: {{kind: {kind}, empty: \"{empty}\"}}\nhospital: {hospital}\n"
            f"{TABLES}rules:{RULES}")
    path = tmp_path / f"m-{empty}-{kind}.yaml"
    path.write_text(text, encoding="utf-8")
    return load_mapping(str(path))


def _msg(pid3: str = "P1^^^H1&1.2&ISO~P2^^^H2&2.3&ISO", pid5: str = " Wang ^xiaoming", pid7: str = "19800102",
         pid8: str = "M", msh4: str = "H1", msh7: str = "20260110083005+0800", pv1_44: str = "202601100900",
         pv1_10: str = "RAD", pid13: str = "13812345678", pv1_2: str = "E") -> str:
    return (f"MSH|^~\\&|HIS|{msh4}|HUB|X|{msh7}||ADT^A01|1|P|2.5\r"
            f"PID|1||{pid3}||{pid5}||{pid7}|{pid8}|||||{pid13}||||||110101199003074518\r"
            f"PV1|1|{pv1_2}|W1^12|||||||{pv1_10}|" + "|" * 33 + f"{pv1_44}\r")


MESSAGES = {
    "plain": _msg(),
    "one id": _msg(pid3="P1^^^H1&1.2&ISO"),
    "empty second id": _msg(pid3="P1^^^H1&1.2&ISO~^^^H2"),
    "escaped and structured": _msg(pid5="Wa\\T\\ng^Li&x^^^^L", pv1_10="RAD^Radiology"),
    "hl7 null": _msg(pid8='""', pid7='""'),
    "no hospital": _msg(msh4=""),
    "zones": _msg(msh7="20260110083005-0530", pv1_44="20260110083005+0000"),
    "unmapped codes": _msg(pid8="X", pv1_10="ZZ"),
    "chinese": _msg(pid5="王^小明", msh4="H2"),
}


def _walk(value: Any) -> Iterator[Any]:
    yield value
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)


@pytest.mark.parametrize("empty", ["omit", "null", "keep"])
@pytest.mark.parametrize("case", sorted(MESSAGES))
def test_generated_function_agrees_with_the_rules(tmp_path: Path, empty: str, case: str) -> None:
    mapping = _mapping(tmp_path, empty)
    assert mapping.generated_source is not None and "_parent(out" in mapping.generated_source
    text = MESSAGES[case]
    fast, slow = mapping.apply(text), mapping.run(text).output
    assert fast == slow
    # what is written is plain data: no `Structured` str subclass leaks into the output
    assert all(type(v) in (dict, list, str, bool, type(None)) for v in _walk(fast)), fast
    assert json.loads(json.dumps(fast)) == fast


def test_inline_writes_give_the_expected_shapes(tmp_path: Path) -> None:
    out = _mapping(tmp_path, "omit").apply(MESSAGES["empty second id"])
    assert isinstance(out, dict)
    assert out["patient"]["ids"] == [{"value": "P1", "system": "H1", "kind": "MR"}, {"system": "H2", "kind": "MR"}]
    assert out["message"] == {"hospital": "H1", "sent": "2026-01-10T08:30:05+08:00"}
    zones = _mapping(tmp_path, "omit").apply(MESSAGES["zones"])
    assert isinstance(zones, dict)
    assert zones["message"]["sent"] == "2026-01-10T08:30:05-05:30"
    assert zones["visit"]["at"] == "2026-01-10T08:30:05+00:00"
    structured = _mapping(tmp_path, "omit").apply(MESSAGES["escaped and structured"])
    assert isinstance(structured, dict)
    assert structured["patient"]["name"]["family"] == "Wa&ng"  # \T\ is the subcomponent separator
    assert structured["visit"]["dept"] == "RAD^Radiology" and type(structured["visit"]["dept"]) is str
    nulls = _mapping(tmp_path, "null").apply(MESSAGES["no hospital"])
    assert isinstance(nulls, dict) and nulls["message"]["hospital"] is None


def test_json_output_takes_the_same_path(tmp_path: Path) -> None:
    mapping = _mapping(tmp_path, "omit", kind="json")
    text = MESSAGES["chinese"]
    expected = json.loads(mapping.run(text).output)  # type: ignore[arg-type]
    assert json.loads(mapping.to_bytes(text)) == expected
    assert json.loads(mapping.apply(text)) == expected  # type: ignore[arg-type]
    assert expected["patient"]["name"]["family"] == "王"


@pytest.mark.parametrize(
    ("message", "rule", "reason"),
    [
        (_msg(pid3="^^^H1"), "patient.id! <- PID-3[1].1", "required value is empty"),
        (_msg(msh7="20260110083005+9900"), 'message.sent <- date(MSH-7, "iso")', "out of range"),
        (_msg(pv1_44="20261310"), 'visit.at <- date(PV1-44, "iso")', "20261310"),
    ],
)
def test_errors_name_the_rule_on_both_paths(tmp_path: Path, message: str, rule: str, reason: str) -> None:
    mapping = _mapping(tmp_path, "omit")
    for run in (mapping.apply, lambda m: mapping.run(m).output):
        with pytest.raises(MappingError) as caught:
            run(message)
        assert caught.value.rule == rule and reason in str(caught.value)


def test_a_failing_hospital_expression_is_named(tmp_path: Path) -> None:
    mapping = _mapping(tmp_path, "omit", hospital='table("hosp", MSH-4.1)')
    out = mapping.apply(MESSAGES["chinese"])
    assert isinstance(out, dict) and out["message"]["hospital"] == "second"
    for run in (mapping.apply, lambda m: mapping.run(m).output):
        with pytest.raises(MappingError) as caught:
            run(_msg(msh4="H9"))
        assert caught.value.rule == "hospital" and "'H9' is not in code table 'hosp'" in str(caught.value)


def test_a_parent_that_a_rule_writes_itself_is_walked_each_time(write: Callable[..., Path]) -> None:
    path = write("m.yaml", """
        input: {kind: hl7}
        output: {kind: dict}
        rules:
          - patient <- PID-5.1
          - patient.name <- PID-5.2
        """)
    mapping = load_mapping(str(path))
    text = _msg()
    # 'patient' first holds a str, then the key target replaces it with a dict (both paths alike)
    assert mapping.apply(text) == mapping.run(text).output == {"patient": {"name": "xiaoming"}}


def test_a_list_where_the_spread_wants_dicts_is_an_error(write: Callable[..., Path]) -> None:
    path = write("m.yaml", """
        input: {kind: hl7}
        output: {kind: dict}
        rules:
          - patient.ids <- PID-3[*].1
          - patient.ids[*].system <- PID-3[*].4.1
        """)
    mapping = load_mapping(str(path))
    text = _msg()
    assert mapping.apply(text) == mapping.run(text).output
    out = mapping.apply(text)
    assert isinstance(out, dict) and out["patient"]["ids"] == [{"system": "H1"}, {"system": "H2"}]
    bad = textwrap.dedent("""
        input: {kind: hl7}
        output: {kind: dict}
        rules:
          - patient <- PID-3[*].1
          - patient.ids[*].system <- PID-3[*].4.1
        """)
    (path.parent / "bad.yaml").write_text(bad, encoding="utf-8")
    broken = load_mapping(str(path.parent / "bad.yaml"))
    for run in (broken.apply, lambda m: broken.run(m).output):
        with pytest.raises(MappingError, match="holds a list"):
            run(text)
