"""XDS.b error reporting: ``rs:RegistryResponse`` with an ``rs:RegistryErrorList``.

ebRS 3.0 (``rs.xsd``) defines the response; ITI TF-3 4.2.4 (Table 4.2.4.1-2) defines the error codes
(``errorCode`` attribute) and the status values: ``...ResponseStatusType:Success``, ``...:Failure`` and
``urn:ihe:iti:2007:ResponseStatusType:PartialSuccess`` (ITI TF-3 4.2.4.2).  A response with any error of
severity Error is a Failure unless the caller says otherwise (partial success of ITI-43).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lxml import etree

RS_NS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
SEVERITY_ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"
SEVERITY_WARNING = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Warning"
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
PARTIAL_SUCCESS = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"

# ITI TF-3 Table 4.2.4.1-2 (error codes used by the registry; the others are plain strings where used)
REGISTRY_METADATA_ERROR = "XDSRegistryMetadataError"
REGISTRY_ERROR = "XDSRegistryError"
DUPLICATE_UNIQUE_ID = "XDSRegistryDuplicateUniqueIdInMessage"
NON_IDENTICAL_HASH = "XDSNonIdenticalHash"
NON_IDENTICAL_SIZE = "XDSNonIdenticalSize"
PATIENT_ID_DOES_NOT_MATCH = "XDSPatientIdDoesNotMatch"
UNKNOWN_PATIENT_ID = "XDSUnknownPatientId"
UNRESOLVED_REFERENCE = "UnresolvedReferenceException"  # ebRS 3.0; ITI TF-3 4.1.12.4 / 4.2.4.1
INVALID_REQUEST = "InvalidRequestException"  # ebRS 3.0


@dataclass(frozen=True)
class XdsError:
    """One ``rs:RegistryError``: ``code`` is the IHE ``errorCode``, ``context`` the ``codeContext`` text.

    ``severity`` and ``location`` are keyword-only (a positional third argument was too easy to misplace).
    """

    code: str
    context: str
    severity: str = field(default=SEVERITY_ERROR, kw_only=True)
    location: str = field(default="", kw_only=True)


class XdsFailure(Exception):
    """Raised to abort a transaction with these errors (nothing of it is kept)."""

    def __init__(self, errors: Sequence[XdsError] | XdsError) -> None:
        self.errors: list[XdsError] = [errors] if isinstance(errors, XdsError) else list(errors)
        super().__init__("; ".join(f"{e.code}: {e.context}" for e in self.errors))


class XdsParseError(XdsFailure):
    """The XML could not be parsed or is not the expected document (XDSRegistryMetadataError)."""

    def __init__(self, context: str) -> None:
        super().__init__(XdsError(REGISTRY_METADATA_ERROR, context))


def error_list(errors: Sequence[XdsError]) -> etree._Element:
    """``rs:RegistryErrorList`` of ``errors`` (ebRS 3.0 rs.xsd; highestSeverity is set)."""
    root = etree.Element(f"{{{RS_NS}}}RegistryErrorList", nsmap={"rs": RS_NS})
    if any(e.severity == SEVERITY_ERROR for e in errors):
        root.set("highestSeverity", SEVERITY_ERROR)
    elif errors:
        root.set("highestSeverity", SEVERITY_WARNING)
    for e in errors:
        item = etree.SubElement(root, f"{{{RS_NS}}}RegistryError")
        item.set("errorCode", e.code)
        item.set("codeContext", e.context)
        item.set("severity", e.severity)
        if e.location:
            item.set("location", e.location)
    return root


def response_status(errors: Sequence[XdsError]) -> str:
    """Failure when any error has severity Error, else Success (warnings only)."""
    return FAILURE if any(e.severity == SEVERITY_ERROR for e in errors) else SUCCESS


def registry_response(errors: Sequence[XdsError] = (), *, status: str | None = None) -> etree._Element:
    """``rs:RegistryResponse`` with ``status`` (default: from the errors) and the errors, if any."""
    root = etree.Element(f"{{{RS_NS}}}RegistryResponse", nsmap={"rs": RS_NS})
    root.set("status", status or response_status(errors))
    if errors:
        root.append(error_list(errors))
    return root
