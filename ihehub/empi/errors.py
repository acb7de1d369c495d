"""EMPI errors, each naming the field at fault and the HL7 table 0357 code an actor should answer with.

The EMPI knows no HL7, but the PIX Manager and PDQ Supplier turn these errors into an ``ERR`` segment
(HL7 v2.5 section 2.15.5: ERR-2 location, ERR-3 code from table 0357).  ``field`` is the EMPI's own
name for the input (``"birth_date"``, ``"national_id"``, ``"identifier.domain"``); `PID_LOCATION`
maps it to the PID field of an ITI-8 feed so that the actor can fill ERR-2 without guessing.
IHE ITI TF-2a 3.8.4.1.3 / 3.9.4.2.2.6: an unknown patient or assigning authority is 204
"Unknown key identifier".
"""

from __future__ import annotations

from types import MappingProxyType

# EMPI input field -> ERR-2 location (segment^sequence^field[^component]) in an ITI-8 feed.
PID_LOCATION = MappingProxyType(
    {
        "identifier": "PID^1^3",
        "identifier.value": "PID^1^3^1^1",
        "identifier.domain": "PID^1^3^1^4",
        "names": "PID^1^5",
        "birth_date": "PID^1^7",
        "sex": "PID^1^8",
        "addresses": "PID^1^11",
        "phones": "PID^1^13",
        "national_id": "PID^1^19",
        "department": "PV1^1^3",
        "subsumed": "MRG^1^1",
        "subsumed.value": "MRG^1^1^1^1",
        "subsumed.domain": "MRG^1^1^1^4",
    }
)

# EMPI query field -> ERR-2 location in an ITI-9 PIX query (QBP^Q23).  For ITI-21 PDQ the what-domains-returned
# field is QPD-8 and the demographic fields are components of QPD-3.
QPD_LOCATION = MappingProxyType(
    {
        "identifier": "QPD^1^3",
        "identifier.value": "QPD^1^3^1^1",
        "identifier.domain": "QPD^1^3^1^4",
        "what_domains": "QPD^1^4",
        "query": "QPD^1^3",
    }
)


class EmpiError(Exception):
    """Base of every EMPI error: a readable ``message``, the ``field`` at fault, a table 0357 ``code``."""

    code = "207"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    @property
    def location(self) -> str | None:
        """ERR-2 of an ITI-8 feed for `field`, when the field has one."""
        return PID_LOCATION.get(self.field or "")

    @property
    def query_location(self) -> str | None:
        """ERR-2 of an ITI-9 query for `field`, when the field has one."""
        return QPD_LOCATION.get(self.field or "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, field={self.field!r}, code={self.code!r})"


class InvalidData(EmpiError):
    """A value that cannot be read or fails its check (impossible date, bad ID checksum): 102 Data type error."""

    code = "102"


class MissingField(InvalidData):
    """A required value is absent (no patient identifier, no name): 101 Required field missing."""

    code = "101"


class UnknownValue(InvalidData):
    """A coded value outside its table (sex not in HL7 table 0001): 103 Table value not found."""

    code = "103"


class UnknownDomain(EmpiError):
    """The assigning authority is not a configured identifier domain: 204 Unknown key identifier."""

    code = "204"

    def __init__(self, domain: str, *, field: str | None = "identifier.domain") -> None:
        super().__init__(f"unknown identifier domain {domain!r}", field=field)
        self.domain = domain


class UnknownPatient(EmpiError):
    """No patient (source record or enterprise patient) has this identifier: 204 Unknown key identifier."""

    code = "204"

    def __init__(self, value: str, domain: str, *, field: str | None = "identifier.value",
                 message: str | None = None) -> None:
        super().__init__(message or f"unknown patient {value!r} in domain {domain!r}", field=field)
        self.value = value
        self.domain = domain


class SubsumedPatient(UnknownPatient):
    """The identifier was merged away (A40 MRG-1) and is no longer active: 204, with the survivor named.

    IHE ITI TF-2a 3.8.4.2.3 lets the manager reject later use of a subsumed identifier; ``surviving``
    tells an actor that prefers to redirect where to.
    """

    def __init__(self, value: str, domain: str, surviving: tuple[str, str], *,
                 field: str | None = "identifier.value") -> None:
        super().__init__(value, domain, field=field,
                         message=f"patient {value!r} in domain {domain!r} was merged into "
                                 f"{surviving[0]!r} ({surviving[1]})")
        self.surviving = surviving


class NotFound(EmpiError):
    """No such review item or merge: 204 Unknown key identifier."""

    code = "204"


class Conflict(EmpiError):
    """The request contradicts the index (merge a patient into itself, accept a closed review): 207."""

    code = "207"


class DuplicateIdentifier(Conflict):
    """A new identifier that already exists where uniqueness is required: 205 Duplicate key identifier."""

    code = "205"
