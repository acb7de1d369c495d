"""Reading HL7 v2 by path (HL7 v2.5 chapter 2: 2.5 message construction, 2.7 escape sequences)."""

from __future__ import annotations

import pytest

from ihehub.mappings.hl7path import HL7Doc, PathError, Structured, compile_path

MSG = (
    "MSH|^~\\&|HIS|H1|HUB|X|20260110||ORU^R01|C1|P|2.5\r"
    "PID|1||111^^^H1&1.2.3&ISO~222^^^H2||Wang^Wu^^^Dr.~WANG^WU||19800101|\"\"|||A\\S\\B^^Town\r"
    "OBR|1||A1|CT\r"
    "OBX|1|NM|GLU||5.6\r"
    "OBX|2|NM|HB||140\r"
    "OBR|2||A2|MR\r"
    "OBX|1|TX|IMP||normal\r"
)


def read(path: str, text: str = MSG) -> object:
    return compile_path(path).value(HL7Doc(text))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("MSH-9.1", "ORU"),
        ("MSH-1", "|"),
        ("MSH-2", "^~\\&"),
        ("MSH-10", "C1"),
        ("PID-3.1", "111"),  # first repetition by default
        ("PID-3[2].1", "222"),
        ("PID-3[*].1", ["111", "222"]),
        ("PID-3.4.2", "1.2.3"),  # subcomponent
        ("PID-3[*].4.1", ["H1", "H2"]),
        ("PID-5[2].1", "WANG"),
        ("PID-5.5", "Dr."),
        ("PID-8", None),  # "" is the HL7 null
        ("PID-11.1", "A^B"),  # \S\ resolved
        ("PID-99", None),
        ("PID-5.9", None),
        ("ZZZ-1", None),
        ("OBX-5", "5.6"),
        ("OBX[2]-5", "140"),
        ("OBX[*]-3", ["GLU", "HB", "IMP"]),
        ('OBX[OBX-3 == "HB"]-5', "140"),
        ('OBX[OBX-3.1 == "IMP"]-2', "TX"),
        ('OBX[OBX-3 == "NONE"]-5', None),
        ("OBR[2]/OBX[*]-5", ["normal"]),
        ("OBR[1]/OBX[*]-5", ["5.6", "140"]),
        ("OBR[*]/OBX[1]-3", ["GLU", "IMP"]),
        ("OBR[2]/OBX[2]-5", None),
    ],
)
def test_read(path: str, expected: object) -> None:
    # conditions need the mapping language; compile them through a tiny evaluator here
    from ihehub.mappings.functions import FUNCTIONS
    from ihehub.mappings.lang import Ctx, Env
    from ihehub.mappings.readers import InputSpec, parse_input, path_compilers

    env = Env(input_kind="hl7", paths=path_compilers("hl7"), functions=FUNCTIONS, tables={}, variables=set(),
              extra={"input": InputSpec(kind="hl7")})
    getter = env.path("hl7", path, 0)
    ctx = Ctx(None, {}, {})
    ctx.doc = parse_input(InputSpec(kind="hl7"), MSG, ctx)
    assert getter(ctx) == expected


def test_whole_field_with_components_is_structured() -> None:
    value = read("PID-5")
    assert isinstance(value, Structured) and value == "Wang^Wu^^^Dr." and value.delims == "|^~\\&"
    seg = read("OBR[2]")
    assert isinstance(seg, Structured) and seg == "OBR|2||A2|MR"


def test_custom_delimiters_and_crlf() -> None:
    text = MSG.replace("|", "#").replace("^", "$").replace("\r", "\r\n")
    assert read("PID-5.2", text) == "Wu"
    assert read("PID-3[2].1", text) == "222"


def test_other_escapes() -> None:
    text = "MSH|^~\\&|A\rNTE|1||line\\.br\\two\\X41\\ \\E\\\\H\\bold\\N\\\r"
    assert read("NTE-3", text) == "line\ntwoA \\bold"


@pytest.mark.parametrize("bad", ["pid-3", "PID-", "PID-0", "PID-3[0]", "PID-3.0", "PID[0]-3", "PID-3.1.2.3",
                                 "OBX[OBX-3 == 1", "PID-3x"])
def test_bad_paths(bad: str) -> None:
    with pytest.raises(PathError):
        compile_path(bad)


def test_conditions_need_a_compiler() -> None:
    with pytest.raises(PathError, match="not allowed"):
        compile_path('OBX[OBX-3 == "A"]-5')


def test_filter_expressions_use_the_same_reader() -> None:
    from ihehub.bus.message import Message
    from ihehub.engine.expr import Filter

    f = Filter.compile('PID-3[*].4 contains "H2" and OBX[2]-5 == "140" and PV1-2 == ""')
    assert f is not None and f(Message(channel="c", raw=MSG.encode())) is True
