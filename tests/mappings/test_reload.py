"""MappingSet: a changed file is compiled and checked before it replaces the running version."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ihehub.bus.message import Message
from ihehub.config.errors import ConfigError
from ihehub.mappings import MappingSet

MSG = "MSH|^~\\&|HIS|H1|HUB|X|20260110||ADT^A01|C1|P|2.5\rPID|1||77||Li^Lei||19900101|M\r"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rewrite(path: Path, text: str) -> None:
    """Write and move the modification time forward (some file systems keep whole seconds)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


MAPPING = """
input: {kind: hl7}
output: {kind: json}
tables: {sex: sex.csv}
rules:
  - id <- PID-3.1
  - sex <- table("sex", PID-8)
  - version <- "%s"
tests:
  - input_text: "MSH|^~\\\\&|A|B|C|D|2026||ADT^A01|1|P|2.5\\rPID|1||5||X^Y||2000|M\\r"
    expect: {id: "5"}
"""


@pytest.fixture
def files(write: Callable[..., Path]) -> Path:
    write("sex.csv", "code,value\nM,male\n")
    return write("adt.yaml", MAPPING % "one")


def test_reload_on_change(files: Path) -> None:
    clock = Clock()
    mappings = MappingSet(files.parent, interval=1.0, clock=clock)
    first = mappings.get("adt.yaml")
    assert json.loads(first.to_bytes(MSG))["version"] == "one"
    rewrite(files, MAPPING % "two")
    assert mappings.get("adt.yaml") is first  # not checked again within the interval
    clock.now = 1.5
    second = mappings.get("adt.yaml")
    assert second is not first and second.version != first.version
    assert json.loads(second.to_bytes(MSG))["version"] == "two"
    clock.now = 3.0
    assert mappings.get("adt.yaml") is second  # unchanged files: the same object


def test_a_table_change_reloads_too(files: Path) -> None:
    clock = Clock()
    mappings = MappingSet(files.parent, clock=clock)
    first = mappings.get("adt.yaml")
    rewrite(files.parent / "sex.csv", "code,value\nM,man\n")
    clock.now = 2
    second = mappings.get("adt.yaml")
    assert second.version != first.version and json.loads(second.to_bytes(MSG))["sex"] == "man"


def test_broken_change_keeps_the_running_version(files: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    mappings = MappingSet(files.parent, clock=clock)
    first = mappings.get("adt.yaml")
    rewrite(files, (MAPPING % "two").replace("table(", "tabel("))
    clock.now = 2
    with caplog.at_level(logging.WARNING, logger="ihehub.mappings"):
        assert mappings.get("adt.yaml") is first
    problems = mappings.problems("adt.yaml")
    assert len(problems) == 1 and problems[0].line == 7 and "unknown function tabel()" in problems[0].message
    assert "change not applied" in caplog.text
    rewrite(files, MAPPING % "three")  # fixed: taken at the next check
    clock.now = 4
    assert json.loads(mappings.get("adt.yaml").to_bytes(MSG))["version"] == "three"
    assert mappings.problems("adt.yaml") == []


def test_a_change_whose_tests_fail_is_not_taken(files: Path) -> None:
    clock = Clock()
    mappings = MappingSet(files.parent, clock=clock)
    first = mappings.get("adt.yaml")
    rewrite(files, (MAPPING % "two").replace("id <- PID-3.1", "id <- PID-3.2"))
    clock.now = 2
    assert mappings.get("adt.yaml") is first
    assert "test 'test 1' failed: id: expected '5', got None" in mappings.problems("adt.yaml")[0].message


def test_first_load_failure_raises(write: Callable[..., Path]) -> None:
    write("bad.yaml", "input: {kind: hl7}\n")
    mappings = MappingSet(write("x", "").parent)
    with pytest.raises(ConfigError, match="missing required key 'output'"):
        mappings.get("bad.yaml")


def test_transformer_follows_reloads(files: Path) -> None:
    clock = Clock()
    mappings = MappingSet(files.parent, clock=clock)
    transform = mappings.transformer("adt.yaml")
    msg = Message(channel="adt", raw=MSG.encode(), headers={"from": "his"})
    first = transform(msg)
    assert json.loads(first.raw)["version"] == "one"
    # the output carries which mapping and which version of it produced it (kept by the store)
    v1 = mappings.get("adt.yaml").version
    assert first.headers == {"from": "his", "mapping": "adt.yaml", "mapping_version": v1}
    rewrite(files, MAPPING % "two")
    clock.now = 2
    second = transform(msg)
    assert json.loads(second.raw)["version"] == "two"
    assert second.headers["mapping_version"] == mappings.get("adt.yaml").version != v1
    assert mappings.unmapped("adt.yaml") == []
    assert json.loads(transform(MSG.encode()))["version"] == "two"  # not a bus message: just the bytes
