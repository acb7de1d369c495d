"""Configuration problems that point at the file, line and key a person has to fix."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Problem:
    """One thing wrong with the configuration.

    ``file`` is shown relative to the home folder (``channels/adt.yaml``) or names the source of a
    value that has no file (``$IHEHUB_DATABASE``).  ``line`` and ``column`` are 1-based and
    ``None`` when unknown.  ``path`` is the dotted key path inside the file
    (``destinations[0].retry.jitter``), empty for a problem with the whole file.
    """

    file: str
    line: int | None = None
    column: int | None = None
    path: str = ""
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every reason, each with its location."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid configuration")

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems) or "invalid configuration"


def sort_key(problem: Problem) -> tuple[str, int, int, str]:
    """Order problems by file, then position (problems without a position first)."""
    return (problem.file, problem.line or 0, problem.column or 0, problem.path)


_URL_PASSWORD = re.compile(r"(://[^/:@\s]*:)[^/@\s]+@")


def redact(text: str) -> str:
    """Hide the password of any ``scheme://user:password@host`` in ``text`` (for messages and logs)."""
    return _URL_PASSWORD.sub(r"\1***@", text)
