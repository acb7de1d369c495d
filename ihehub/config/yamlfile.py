"""Read one YAML configuration file keeping the line and column of every key and item.

ruamel.yaml's round-trip loader records positions (``.lc``) on each mapping and sequence, so a
problem found later by JSON Schema can be reported at the line of the offending key or value.
YAML 1.2 (ruamel's default) applies: ``yes``/``no``/``on``/``off`` are strings, not booleans.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.scalarbool import ScalarBoolean

from ihehub.config.errors import Problem

PathStep = str | int


def read_yaml(path: Path, display: str) -> tuple[Any, list[Problem]]:
    """Parse ``path``; return the round-trip document (``None`` if unusable) and the problems found.

    Problems cover unreadable files, bytes that are not UTF-8, YAML syntax errors (at the parser's
    line and column) and keys repeated within one mapping (all of them, not only the first).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, [Problem(file=display, message=f"cannot read file: {exc.strerror or exc}")]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        column = len(raw[line_start : exc.start].decode("utf-8", "replace")) + 1
        return None, [
            Problem(
                file=display,
                line=line,
                column=column,
                message=f"byte 0x{raw[exc.start]:02x} is not valid UTF-8; save the file as UTF-8",
            )
        ]
    try:
        node = YAML(typ="rt").compose(text)
    except MarkedYAMLError as exc:
        return None, [_syntax_problem(display, exc)]
    except YAMLError as exc:
        return None, [Problem(file=display, message=f"YAML error: {exc}")]
    except RecursionError:
        return None, [Problem(file=display, message="YAML nesting is too deep")]
    problems = [
        Problem(
            file=display,
            line=key.start_mark.line + 1,
            column=key.start_mark.column + 1,
            path=dotted([*where, key.value]),
            message=f"duplicate key {key.value!r} (first given on line {first.start_mark.line + 1})",
        )
        for where, key, first in _duplicate_keys(node)
    ]
    loader = YAML(typ="rt")
    loader.allow_duplicate_keys = True
    try:
        document = loader.load(text)
    except MarkedYAMLError as exc:
        return None, [*problems, _syntax_problem(display, exc)]
    except YAMLError as exc:
        return None, [*problems, Problem(file=display, message=f"YAML error: {exc}")]
    except RecursionError:
        return None, [*problems, Problem(file=display, message="YAML nesting is too deep")]
    return document, problems


def _syntax_problem(display: str, exc: MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    what = exc.problem or "syntax error"
    if exc.context:
        what = f"{what} ({exc.context})"
    return Problem(
        file=display,
        line=mark.line + 1 if mark is not None else None,
        column=mark.column + 1 if mark is not None else None,
        message=f"YAML syntax error: {what}",
    )


def _duplicate_keys(root: Node | None) -> Iterator[tuple[list[PathStep], ScalarNode, ScalarNode]]:
    """Yield ``(path of the mapping, repeated key node, first key node)`` for every repeat."""
    seen_nodes: set[int] = set()
    stack: list[tuple[Node, list[PathStep]]] = [(root, [])] if root is not None else []
    while stack:
        node, where = stack.pop()
        if id(node) in seen_nodes:  # aliases may share (or even nest) nodes
            continue
        seen_nodes.add(id(node))
        if isinstance(node, MappingNode):
            first: dict[tuple[str, str], ScalarNode] = {}
            for key, value in node.value:
                if isinstance(key, ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    ident = (str(key.tag), str(key.value))
                    if ident in first:
                        yield where, key, first[ident]
                    else:
                        first[ident] = key
                    stack.append((value, [*where, str(key.value)]))
        elif isinstance(node, SequenceNode):
            stack.extend((item, [*where, i]) for i, item in enumerate(node.value))


def position(root: Any, path: Sequence[PathStep], *, at_key: bool = False) -> tuple[int, int]:
    """1-based ``(line, column)`` of the value at ``path`` (of its key when ``at_key``).

    Walks as far as the document allows and returns the last known position, so a path into a
    missing key still lands near the mapping that should have held it.
    """
    line, column = 0, 0
    node = root
    for i, step in enumerate(path):
        last = i == len(path) - 1
        try:
            if isinstance(node, CommentedMap) and step in node:
                line, column = node.lc.key(step) if (at_key and last) else node.lc.value(step)
            elif isinstance(node, CommentedSeq) and isinstance(step, int) and 0 <= step < len(node):
                line, column = node.lc.item(step)
            else:
                break
        except (KeyError, TypeError):  # keys pulled in by a YAML merge (<<) carry no position
            break
        node = node[step]
    return line + 1, column + 1


def dotted(path: Sequence[PathStep]) -> str:
    """``["destinations", 0, "retry"]`` -> ``"destinations[0].retry"``."""
    out = ""
    for step in path:
        if isinstance(step, int):
            out += f"[{step}]"
        else:
            out += f".{step}" if out else str(step)
    return out


def plain(value: Any) -> Any:
    """Turn a round-trip document into plain dicts, lists, str, int, float, bool and None."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, ScalarBoolean):  # an anchored boolean
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


def yaml_type(value: Any) -> str:
    """The YAML word for a value's type, as a person editing the file would say it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


_ENV_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(
    value: Any, environ: Mapping[str, str], path: tuple[PathStep, ...] = ()
) -> tuple[Any, list[tuple[tuple[PathStep, ...], str]]]:
    """Replace ``${NAME}`` (or ``${NAME:-default}``) in every string by the environment variable.

    Keeps secrets such as tokens and passwords out of the files.  ``$${`` writes a literal ``${``.
    Returns the expanded plain data and ``(path, message)`` for each variable that is not set.
    """
    missing: list[tuple[tuple[PathStep, ...], str]] = []

    def walk(node: Any, where: tuple[PathStep, ...]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, (*where, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, (*where, i)) for i, v in enumerate(node)]
        if not isinstance(node, str) or "$" not in node:
            return node

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$${":
                return "${"
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            hint = f"${{{name}:-default}}"
            missing.append(
                (where, f"environment variable {name} is not set (write {hint} to give a default)")
            )
            return match.group(0)

        return _ENV_REFERENCE.sub(substitute, node)

    return walk(value, path), missing
