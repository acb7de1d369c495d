"""Channel filter expressions."""

from __future__ import annotations

import pytest

from ihehub.bus.message import Message
from ihehub.engine.expr import ExpressionError, Filter

ADT = (
    "MSH|^~\\&|HIS|H1|IHEHUB|HUB|20261127||ADT^A01^ADT_A01|C1|P|2.5\r"
    "PID|1||111^^^H1~222^^^HIS2&1.2.3&ISO||Wang^Wu||19800101|M\r"
    "PV1|1|I\rOBX|1|ST|A||first\rOBX|2|ST|B||second\r"
)


def m(text: str = ADT, **kw: object) -> Message:
    return Message(channel="adt", raw=text.encode(), message_type="ADT^A01", headers={"http.path": "/urgent/x"},
                   **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('MSH-9.1 == "ADT"', True),
        ('MSH-9.1 == "ORM"', False),
        ('MSH-9.2 in ["A01", "A04"]', True),
        ('MSH-9.2 in ["A08"]', False),
        ('MSH-9.3 == "ADT_A01"', True),
        ("MSH-1 == '|'", True),
        ('PID-3[*].4 contains "HIS2"', True),
        ('PID-3.1 == "111"', True),
        ('PID-3[2].1 == "222"', True),
        ('PID-3[2].4.2 == "1.2.3"', True),
        ('PID-5.1 =~ "^W.ng$"', True),
        ('PID-99 == ""', True),
        ('ZZZ-1 == ""', True),
        ("PV1-2 != 'O' and PID-8 == 'M'", True),
        ('not (PV1-2 == "I")', False),
        ('PV1-2 == "O" or PID-8 == "M"', True),
        ('OBX[2]-5 == "second"', True),
        ("PID-7 >= 19000101 and PID-7 < 20000101", True),
        ('header.http.path startswith "/urgent"', True),
        ('$type == "ADT^A01" and $channel == "adt"', True),
        ("PV1", True),
        ("ZZZ-1", False),
    ],
)
def test_expressions(expr: str, expected: bool) -> None:
    f = Filter.compile(expr)
    assert f is not None
    assert f(m()) is expected


def test_list_of_expressions_must_all_hold() -> None:
    f = Filter.compile(['MSH-9.1 == "ADT"', 'PID-8 == "F"'])
    assert f is not None and f(m()) is False


def test_no_filter() -> None:
    assert Filter.compile(None) is None and Filter.compile([]) is None


def test_segment_terminators_and_custom_separators() -> None:
    text = ADT.replace("\r", "\r\n").replace("|", "#").replace("MSH#", "MSH#", 1)
    f = Filter.compile('PID-5.1 == "Wang"')
    assert f is not None and f(m(text)) is True


def test_chinese_gb18030() -> None:
    raw = "MSH|^~\\&|A|B|C|D|2026||ADT^A01|1|P|2.5|||||CHN|GB 18030-2000\rPID|1||9||张^三\r".encode("gb18030")
    msg = Message(channel="c", raw=raw, charset="gb18030")
    f = Filter.compile('PID-5.1 == "张"')
    assert f is not None and f(msg) is True


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ('MSH-9.1 = "ADT"', "column 9"),
        ('MSH-9.1 == ADT', "quote it"),
        ('MSH-9.1 == "ADT" xor 1', "unknown word"),
        ('MSH-9.1 == "ADT" and', "end of expression"),
        ('PID-5 =~ "("', "bad regular expression"),
        ('$nope == "x"', "unknown variable"),
        ('(MSH-9.1 == "ADT"', "expected ')'"),
        ('MSH-9.2 in "A01"', "needs a list"),
    ],
)
def test_errors_name_the_problem(expr: str, fragment: str) -> None:
    with pytest.raises(ExpressionError, match=None) as info:
        f = Filter.compile(expr)
        assert f is not None
        f(m())
    assert fragment in str(info.value)
