"""Filter expressions over JSON bodies (``json.<dotted.path>``): the study-complete message of the image manager
is what routing rules read; lists compare any-of, ``contains`` on a list is membership; the body is decoded once
per message however many operands and destination filters read it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ihehub.bus.message import Message
from ihehub.engine import expr
from ihehub.engine.expr import ExpressionError, Filter

STUDY: dict[str, Any] = {
    "study_uid": "1.2.3", "modalities": ["CT", "SR"], "calling_aes": ["CT01"], "study_description": "Chest CT 胸部",
    "num_instances": 12, "institution_name": None, "body_parts": ["CHEST"],
    "tags": {"BodyPartExamined": ["CHEST"], "00191010": [], "SliceThickness": [1.25, 5]},
    "series": [{"series_uid": "1.2.3.1", "modality": "CT", "tags": {"ProtocolName": ["LUNG"]}},
               {"series_uid": "1.2.3.2", "modality": "SR", "tags": {"ProtocolName": []}}],
}


def _msg(body: Any, **kw: Any) -> Message:
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return Message(channel="dicom-studies", raw=raw, content_type="application/json", charset="utf-8", **kw)


@pytest.mark.parametrize(("expression", "expected"), [
    ('json.modalities contains "CT"', True),
    ('json.modalities contains "C"', False),  # membership, not a substring of an element
    ('json.modalities contains "MR"', False),
    ('not json.modalities contains "MR"', True),
    ('json.calling_aes contains "CT01"', True),
    ('json.calling_aes contains "CT0"', False),
    ('json.study_description =~ "(?i)chest"', True),
    ('json.study_description contains "胸部"', True),  # text: a substring
    ('json.study_description startswith "Chest"', True),
    ('json.tags.BodyPartExamined == "CHEST"', True),
    ('json.tags.BodyPartExamined == "HEAD"', False),
    ('json.tags.BodyPartExamined in ["HEAD", "CHEST"]', True),
    ('json.tags.SliceThickness < 2', True),  # any of the values; numbers compare as numbers
    ('json.tags.SliceThickness > 6', False),
    ('json.tags.00191010', False),  # an empty list: no value at all
    ('json.tags.00191010 == ""', False),
    ('json.series.modality contains "SR"', True),  # through a list of objects: every element's value
    ('json.series.tags.ProtocolName == "LUNG"', True),
    ('json.series.0.modality == "CT"', True),  # a number indexes a list
    ('json.series.1.modality == "CT"', False),
    ('json.series.5.modality == "CT"', False),
    ('json.num_instances > 10 and json.num_instances <= 12', True),
    ('json.num_instances == 12', True),
    ('json.nothing == ""', True),  # missing reads "", like an absent HL7 field
    ('json.institution_name == ""', True),  # null reads ""
    ('json.study_uid startswith "1.2"', True),
    ('json.modalities contains "CT" and $type == "study-complete"', True),
])
def test_json_paths(expression: str, expected: bool) -> None:
    f = Filter.compile(expression)
    assert f is not None
    assert f(_msg(STUDY, message_type="study-complete")) is expected


def test_bodies_that_are_not_json_have_no_values() -> None:
    f = Filter.compile('json.study_uid == ""')
    assert f is not None
    assert f(Message(channel="c", raw=b"MSH|^~\\&|HIS|H|RIS|R|202401011200||ADT^A01|1|P|2.5\r"))
    assert f(_msg(b'{"study_uid": '))  # broken JSON: like no JSON
    g = Filter.compile('json.0.study_uid == "9"')
    assert g is not None and g(_msg([{"study_uid": "9"}])) and not g(_msg({"study_uid": "9"}))
    # a UTF-8 BOM and leading blanks are allowed; GB18030 text is decoded with its charset
    assert Filter.compile('json.a == "中"')(Message(channel="c", raw='\ufeff {"a": "中"}'.encode()))  # type: ignore[misc]
    gb = Message(channel="c", raw='{"a": "中"}'.encode("gb18030"), charset="gb18030")
    assert Filter.compile('json.a == "中"')(gb)  # type: ignore[misc]


def test_the_body_is_decoded_once_per_message(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = json.loads

    def counting(text: Any, *a: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(text, *a, **kw)

    monkeypatch.setattr(expr.json, "loads", counting)
    channel = Filter.compile(['json.modalities contains "CT"', 'json.study_uid != ""'])
    destinations = [Filter.compile(e) for e in ('json.calling_aes contains "CT01"', 'json.tags.BodyPartExamined == "X"',
                                                'json.series.modality contains "SR"')]
    message = _msg(STUDY)
    assert channel is not None and channel(message)
    assert [d(message) for d in destinations if d is not None] == [True, False, True]
    assert len(calls) == 1  # five operands, four filters: one decode
    other = _msg(dict(STUDY, modalities=["MR"]))
    assert not channel(other) and len(calls) == 2


@pytest.mark.parametrize(("expression", "problem"), [
    ("json.", "bad JSON path at column 1"),
    ("json..a == 1", "bad JSON path"),
    ('json.a b == "x"', "unknown word 'b'"),
    ("json.modalities =~ CT", "unknown word 'CT'"),
    ('json.modalities in "CT"', "'in' needs a list"),
])
def test_bad_json_paths_are_refused_at_load(expression: str, problem: str) -> None:
    with pytest.raises(ExpressionError, match=problem):
        Filter.compile(expression)
