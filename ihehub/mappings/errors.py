"""Errors of the mapping engine: one `MappingError` per failed message, naming rule, field and value."""

from __future__ import annotations

from typing import Any


class EvalError(Exception):
    """Raised inside an expression; the rule that ran it turns it into a `MappingError`.

    ``value`` is the input value the failing step was given (the unmapped code, the bad date).
    """

    def __init__(self, reason: str, value: Any = None, *, code: str = "207") -> None:
        super().__init__(reason)
        self.reason = reason
        self.value = value
        self.code = code


class MappingError(Exception):
    """A message could not be mapped.

    ``mapping`` is the mapping's name, ``location`` the ``file:line`` of the rule, ``rule`` its
    text, ``target`` the output field it writes, ``value`` the offending input value and ``reason``
    what went wrong.  ``code`` is the HL7 table 0357 code a channel can put in ERR-3 (101 required
    field missing, 102 data type error, 103 table value not found, 207 anything else).
    """

    def __init__(
        self,
        reason: str,
        *,
        mapping: str = "",
        location: str = "",
        rule: str = "",
        target: str = "",
        value: Any = None,
        code: str = "207",
    ) -> None:
        self.reason = reason
        self.mapping = mapping
        self.location = location
        self.rule = rule
        self.target = target
        self.value = value
        self.code = code
        super().__init__(self._text())

    def _text(self) -> str:
        where = self.location or self.mapping or "mapping"
        parts = [f"{where}:"]
        if self.rule:
            parts.append(f"rule {self.rule!r}:")
        if self.target:
            parts.append(f"field {self.target}:")
        parts.append(self.reason)
        if self.value is not None and repr(self.value) not in self.reason:
            shown = repr(self.value)
            parts.append(f"(value {shown[:200]})")
        return " ".join(parts)
