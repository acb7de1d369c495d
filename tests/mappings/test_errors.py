"""Broken mapping files are reported with file:line; a message that cannot be mapped gives one MappingError
naming the rule, the field and the value -- the same from the generated function and from the closures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ihehub.config.errors import ConfigError
from ihehub.mappings import MappingError, check_mapping, compile_mapping, load_mapping

MSG = "MSH|^~\\&|HIS|H1|HUB|X|20260110||ADT^A01|C1|P|2.5\rPID|1||{id}||Li^Lei||{birth}|M\r"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("input: {kind: hl7}\noutput: {kind: json}\nrulez: []\n", 3, "unknown key 'rulez' (did you mean 'rules'?)"),
        ("input: {kind: hl7}\noutput: {kind: jsn}\nrules: [a <- PID-3]\n", 2, "'jsn' is not one of"),
        ("input: {kind: hl7}\nrules: [a <- PID-3]\n", 1, "missing required key 'output'"),
        ("input: {kind: hl7}\noutput: {kind: json}\nrules:\n  - a = PID-3\n", 4, 'write "target <- expression"'),
        ("input: {kind: hl7}\noutput: {kind: json}\nrules:\n  - {target: a}\n", 4, "missing required key 'value'"),
        ("input: {kind: hl7}\noutput: {kind: json}\nrules: [\n", 4, "YAML syntax error"),
        ("input: {kind: hl7}\noutput: {kind: json}\nrules: []\n", 3, "no rules"),
        ("input: {kind: hl7, charset: GB1803}\noutput: {kind: json}\nrules: [a <- PID-3]\n", 1,
         "unknown character set 'GB1803'"),
        ("input: {kind: json}\noutput: {kind: hl7, copy: true}\nrules: [a <- /x]\n", 2, "copy needs"),
        ("input: {kind: hl7}\noutput: {kind: json}\nrules: [MSH-1 <- PID-3]\n", 3, ""),
        ("input: {kind: hl7}\noutput: {kind: hl7}\nrules: [MSH-1 <- PID-3]\n", 3, "MSH-1 and MSH-2 are the delimiters"),
        ("input: {kind: xml}\noutput: {kind: xml}\nrules: ['/a/@b <- /x:y']\n", 3, "Undefined namespace prefix"),
        ("input: {kind: xml}\noutput: {kind: xml}\nrules: ['/p:a <- /y']\n", 3, "prefix 'p'"),
        ("input: {kind: json}\noutput: {kind: json}\nrules: ['a <- jmes(\"a[\")']\n", 3, "bad JMESPath"),
        ("input: {kind: csv, columns: [A, B]}\noutput: {kind: dict}\nrules: [a <- @C]\n", 3, "unknown column 'C'"),
        ("input: {kind: xml}\noutput: {kind: xml}\nxslt: none.xsl\n", 3, "cannot read 'none.xsl'"),
        ("input: {kind: hl7}\noutput: {kind: json}\nhook: nosuch:fn\nrules: [a <- PID-3]\n", 3, "cannot import"),
        ("input: {kind: hl7}\noutput: {kind: json}\nrules: ['a <- upper(${NOPE_VAR_X})']\n", 3,
         "environment variable NOPE_VAR_X is not set"),
        ("input: {kind: hl7}\noutput: {kind: json}\nrules: [a <- PID-3]\ntests: [{name: t}]\n", 4,
         "exactly one of input"),
    ],
)
def test_broken_files(write: Callable[..., Path], text: str, line: int, fragment: str) -> None:
    path = write("broken.yaml", text)
    mapping, problems = compile_mapping(path, display="mappings/broken.yaml")
    if not fragment:  # MSH-1 is a fine JSON key; the file is valid
        assert mapping is not None
        return
    assert mapping is None
    assert any(p.line == line and fragment in p.message for p in problems), [str(p) for p in problems]
    assert all(str(p).startswith("mappings/broken.yaml") for p in problems)
    with pytest.raises(ConfigError):
        load_mapping(str(path))


def test_bad_xslt_is_reported(write: Callable[..., Path]) -> None:
    write("bad.xsl", "<xsl:stylesheet version='1.0' xmlns:xsl='http://www.w3.org/1999/XSL/Transform'>"
                     "<xsl:template match='/'><xsl:value-of/></xsl:template></xsl:stylesheet>")
    path = write("m.yaml", "input: {kind: xml}\noutput: {kind: xml}\nxslt: bad.xsl\n")
    problems = check_mapping(path)
    assert len(problems) == 1 and problems[0].line == 3 and "not a usable XSLT" in problems[0].message


@pytest.fixture
def adt(write: Callable[..., Path]) -> Path:
    return write("adt.yaml", """
        input: {kind: hl7}
        output: {kind: json}
        rules:
          - id! <- PID-3.1
          - birth <- date(PID-7, "iso")
          - family <- python("tests.mappings.hooks:explode", PID-5.1, "x")
        """)


@pytest.mark.parametrize("traced", [False, True])
def test_missing_required_field(adt: Path, traced: bool) -> None:
    mapping = load_mapping(str(adt))
    with pytest.raises(MappingError) as info:
        (mapping.run if traced else mapping.apply)(MSG.format(id="", birth="19900101"))
    err = info.value
    assert (err.rule, err.target, err.code) == ("id! <- PID-3.1", "id", "101")
    assert err.location.endswith("adt.yaml:4") and "required value is empty" in str(err)


@pytest.mark.parametrize("traced", [False, True])
def test_wrong_date(adt: Path, traced: bool) -> None:
    mapping = load_mapping(str(adt))
    with pytest.raises(MappingError) as info:
        (mapping.run if traced else mapping.apply)(MSG.format(id="1", birth="19901341"))
    err = info.value
    assert (err.target, err.value, err.code) == ("birth", "19901341", "102")
    assert err.location.endswith("adt.yaml:5")
    assert "'19901341' is not a valid date/time (month must be in 1..12)" in str(err)


@pytest.mark.parametrize("traced", [False, True])
def test_a_rule_that_throws(adt: Path, traced: bool) -> None:
    mapping = load_mapping(str(adt))
    with pytest.raises(MappingError) as info:
        (mapping.run if traced else mapping.apply)(MSG.format(id="1", birth="19900101"))
    err = info.value
    assert err.target == "family" and err.location.endswith("adt.yaml:6")
    assert err.reason == "RuntimeError: hook exploded"  # the Python error is named


def test_unreadable_input(adt: Path) -> None:
    mapping = load_mapping(str(adt))
    with pytest.raises(MappingError, match="not a readable HL7 v2 message") as info:
        mapping.apply(b"hello")
    assert info.value.rule == "(reading the input)"
    with pytest.raises(MappingError, match="must be bytes or text"):
        mapping.apply(42)


def test_hook_errors(write: Callable[..., Path]) -> None:
    path = write("m.yaml", """
        input: {kind: hl7}
        output: {kind: json}
        hook: tests.mappings.hooks:explode
        rules: [id <- PID-3.1]
        """)
    with pytest.raises(MappingError, match="hook raised RuntimeError: hook exploded"):
        load_mapping(str(path)).apply(MSG.format(id="1", birth=""))
