"""HL7 v2 errors carrying an HL7 table 0357 code, so every failure can become an ERR segment.

HL7 v2.5 chapter 2, section 2.15.5 (ERR segment): ERR-2 is the error location (ERL), ERR-3 the HL7
error code from user table 0357 "Message error condition codes".
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ihehub.hl7.codec import Header

# HL7 table 0357 (v2.5; 104 added in v2.6).  The description is ERR-3.2 when the code is sent.
ERROR_CODES = MappingProxyType(
    {
        "0": "Message accepted",
        "100": "Segment sequence error",
        "101": "Required field missing",
        "102": "Data type error",
        "103": "Table value not found",
        "104": "Value too long",
        "200": "Unsupported message type",
        "201": "Unsupported event code",
        "202": "Unsupported processing id",
        "203": "Unsupported version id",
        "204": "Unknown key identifier",
        "205": "Duplicate key identifier",
        "206": "Application record locked",
        "207": "Application internal error",
    }
)


class HL7Error(Exception):
    """A message that cannot be accepted, with its table 0357 ``code`` and ERR-2 ``location``.

    ``location`` uses ERL notation with ``^`` between components (``"MSH^1^18"`` = segment MSH,
    first occurrence, field 18).  ``header`` is the part of MSH that could be read, when any, so
    that the negative acknowledgment can still echo MSH-10 and swap the applications.
    """

    def __init__(
        self, message: str, code: str = "207", location: str | None = None, *, header: Header | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.location = location
        self.header = header

    def __repr__(self) -> str:
        return f"HL7Error({self.message!r}, code={self.code!r}, location={self.location!r})"


def describe_error(code: str) -> str:
    """The table 0357 description of ``code`` ("Application error" for a code outside the table)."""
    return ERROR_CODES.get(code, "Application error")
