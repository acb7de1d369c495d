"""Stored query parameters of ITI-18 (ITI TF-2a 3.18.4.1.2.3): reading, syntax and validation.

A parameter is a ``rim:Slot`` of the ``rim:AdhocQuery``; its value is written in the SQL-like syntax of
ITI TF-2a 3.18.4.1.2.3: strings in single quotes (a quote inside doubled), numbers (times) bare, a
multi-valued parameter as a parenthesised list ``('a','b')``, which may be spread over several
``rim:Value`` elements (each a list of its own, or one list cut after a comma).  Several Slots with the
same name are the AND of ORs for the code lists that allow it (``$XDSDocumentEntryEventCodeList``,
``$XDSDocumentEntryConfidentialityCode``, ``$XDSFolderCodeList``; here ``$XDSDocumentEntryReferenceIdList``
too); for any other parameter a repeated Slot is XDSStoredQueryParamNumber.

Coded values are HL7 CE strings ``code^^codingScheme`` (``code^^^codingScheme`` is accepted too); a value
without a coding scheme is an XDSRegistryError (NIST pre-connectathon test 11897 "classcode_scheme_mismatch"
and "old_scheme").  Times are DTM digits (YYYY[MM[DD[hh[mm[ss]]]]], ITI TF-3 4.2.3.1.5).  Parameters a
query does not define are ignored, as test 11897 requires ("extra parameters must be accepted and ignored").
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from lxml import etree

from ihehub.xds.ebrim import DE_OBJECT_TYPE_ON_DEMAND, DE_OBJECT_TYPE_STABLE, RIM
from ihehub.xds.errors import REGISTRY_ERROR, XdsError, XdsFailure

# ITI TF-3 Table 4.2.4.1-2 (stored query errors)
MISSING_PARAM = "XDSStoredQueryMissingParam"
PARAM_NUMBER = "XDSStoredQueryParamNumber"
UNKNOWN_COMMUNITY = "XDSUnknownCommunity"

_DTM = re.compile(r"\d{4}(?:\d{2}){0,5}")
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
DOCUMENT_ENTRY_TYPES = frozenset({DE_OBJECT_TYPE_STABLE, DE_OBJECT_TYPE_ON_DEMAND})


class Kind(Enum):
    """How a parameter's values are checked and converted."""

    STRING = "string"  # any non-empty text (ids, statuses, uuids, LIKE patterns)
    CODE = "code"  # code^^codingScheme -> (code, codingScheme)
    TIME = "time"  # DTM digits
    OBJECT_TYPE = "objectType"  # DocumentEntry objectType UUID (stable / on-demand)


@dataclass(frozen=True, kw_only=True)
class Param:
    """One parameter of a stored query (ITI TF-2a Tables 3.18.4.1.2.3.7.x-1): ``required`` (R),
    ``multi`` (M: a list of values), ``and_or`` (several Slots of this name are ANDed)."""

    kind: Kind = Kind.STRING
    required: bool = False
    multi: bool = False
    and_or: bool = False


def _fail(code: str, context: str, name: str = "") -> XdsFailure:
    return XdsFailure(XdsError(code, context, location=name))


def split_values(text: str, name: str) -> list[str]:
    """The values of one ``rim:Value`` text: ``'a'`` -> [a]; ``('a', 'b')`` -> [a, b]; ``2004`` -> [2004].

    Raises XDSRegistryError naming the parameter when the text is not of that syntax (unbalanced quotes or
    parentheses, junk between the values)."""
    s = text.strip()
    if not s:
        raise _fail(REGISTRY_ERROR, f"parameter {name}: empty Value", name)
    listed = s.startswith("(")
    if listed:
        if not s.endswith(")"):
            raise _fail(REGISTRY_ERROR, f"parameter {name}: list {text!r} has no closing parenthesis", name)
        s = s[1:-1]
    elif not s.startswith("'"):
        if s.endswith(")"):
            raise _fail(REGISTRY_ERROR, f"parameter {name}: value {text!r} has no opening parenthesis", name)
        return [s]  # a bare number (time) or an unquoted single value (lenient)
    values: list[str] = []
    i, n = 0, len(s)
    while True:
        while i < n and s[i].isspace():
            i += 1
        if i >= n:
            raise _fail(REGISTRY_ERROR, f"parameter {name}: empty list element in {text!r}", name)
        if s[i] == "'":
            i += 1
            buf: list[str] = []
            while True:
                j = s.find("'", i)
                if j < 0:
                    raise _fail(REGISTRY_ERROR, f"parameter {name}: unterminated quote in {text!r}", name)
                buf.append(s[i:j])
                if j + 1 < n and s[j + 1] == "'":  # '' is a quote inside the string
                    buf.append("'")
                    i = j + 2
                    continue
                i = j + 1
                break
            values.append("".join(buf))
        else:
            m = _NUMBER.match(s, i)
            if m is None:
                raise _fail(REGISTRY_ERROR, f"parameter {name}: {text!r} is neither a quoted string nor a number",
                            name)
            values.append(m.group())
            i = m.end()
        while i < n and s[i].isspace():
            i += 1
        if i >= n:
            break
        if s[i] != "," or not listed:
            raise _fail(REGISTRY_ERROR, f"parameter {name}: unexpected {s[i:i + 10]!r} in {text!r}", name)
        i += 1
    return values


def join_split_lists(texts: Sequence[str]) -> list[str]:
    """Join a list written across Value elements (``('a',`` + ``'b')``) back into one text; complete lists
    (``('a')`` + ``('b')``) and single values stay as they are."""
    out: list[str] = []
    pending: str | None = None
    for text in texts:
        s = text.strip()
        if pending is not None:
            pending += s
            if s.endswith(")"):
                out.append(pending)
                pending = None
        elif s.startswith("(") and not s.endswith(")"):
            pending = s
        else:
            out.append(s)
    if pending is not None:
        out.append(pending)  # unterminated: split_values names the error
    return out


def parse_code(value: str, name: str) -> tuple[str, str]:
    """``code^^codingScheme`` (HL7 CE, ITI TF-2a 3.18.4.1.2.3.4) -> (code, codingScheme)."""
    parts = value.split("^")
    scheme = next((p for p in parts[2:] if p), "")
    if len(parts) < 3 or not scheme:
        raise _fail(REGISTRY_ERROR, f"parameter {name}: {value!r} is not a coded value code^^codingScheme", name)
    return parts[0], scheme


class Params:
    """The validated parameters of one stored query request (values per Slot, converted by kind)."""

    def __init__(self, values: Mapping[str, list[list[str]]], specs: Mapping[str, Param]) -> None:
        self._values = values
        self._specs = specs

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def one(self, name: str) -> str | None:
        """A single-valued parameter (None when absent)."""
        groups = self._values.get(name)
        return groups[0][0] if groups else None

    def many(self, name: str) -> list[str] | None:
        """A multi-valued parameter: all values of all its Slots (None when absent)."""
        groups = self._values.get(name)
        return [v for g in groups for v in g] if groups else None

    def codes(self, name: str) -> list[list[tuple[str, str]]] | None:
        """A code parameter as AND groups of OR-ed (code, codingScheme) pairs (None when absent)."""
        groups = self._values.get(name)
        if not groups:
            return None
        parsed = [[parse_code(v, name) for v in g] for g in groups]
        if not self._specs[name].and_or:
            return [[c for g in parsed for c in g]]
        return parsed

    def and_groups(self, name: str) -> list[list[str]] | None:
        """A string parameter with AND/OR semantics: AND groups of OR-ed values (None when absent)."""
        groups = self._values.get(name)
        return [list(g) for g in groups] if groups else None


def read_params(query: etree._Element, specs: Mapping[str, Param],
                alternatives: Sequence[Sequence[str]] = ()) -> Params:
    """Read and check the Slots of ``query`` (a ``rim:AdhocQuery``) against ``specs``.

    Errors (ITI TF-2a 3.18.4.1.3): a required parameter missing, or none of an ``alternatives`` group ->
    XDSStoredQueryMissingParam; several values for a single-valued parameter, a Slot repeated for a
    parameter without AND/OR semantics, or more than one of an alternatives group ->
    XDSStoredQueryParamNumber; a value of the wrong syntax -> XDSRegistryError.  All are collected."""
    slots: dict[str, list[list[str]]] = {}
    errors: list[XdsError] = []
    for slot in query.iterchildren(f"{RIM}Slot"):
        name = slot.get("name") or ""
        spec = specs.get(name)
        if spec is None:
            continue  # not a parameter of this query: ignored
        values: list[str] = []
        try:
            for text in join_split_lists([v.text or "" for v in slot.iterfind(f"{RIM}ValueList/{RIM}Value")]):
                values.extend(split_values(text, name))
        except XdsFailure as exc:
            errors.extend(exc.errors)
            continue
        if not values:
            errors.append(XdsError(REGISTRY_ERROR, f"parameter {name} has no Value", location=name))
            continue
        slots.setdefault(name, []).append(values)
    for name, groups in slots.items():
        spec = specs[name]
        count = sum(len(g) for g in groups)
        if not spec.multi and count > 1:
            errors.append(XdsError(PARAM_NUMBER, f"parameter {name} is single-valued, {count} values given",
                                   location=name))
            continue
        if spec.multi and len(groups) > 1 and not spec.and_or:
            errors.append(XdsError(PARAM_NUMBER, f"parameter {name} is given in {len(groups)} Slots; only "
                                   "code lists with AND/OR semantics may repeat", location=name))
            continue
        errors.extend(_check_kind(name, spec.kind, [v for g in groups for v in g]))
    for name, spec in specs.items():
        if spec.required and name not in slots:
            errors.append(XdsError(MISSING_PARAM, f"required parameter {name} is missing", location=name))
    for group in alternatives:
        given = [n for n in group if n in slots]
        if not given:
            errors.append(XdsError(MISSING_PARAM, f"one of {', '.join(group)} is required", location=group[0]))
        elif len(given) > 1:
            errors.append(XdsError(PARAM_NUMBER, f"only one of {', '.join(group)} may be given",
                                   location=given[1]))
    if errors:
        raise XdsFailure(errors)
    return Params(slots, specs)


def _check_kind(name: str, kind: Kind, values: list[str]) -> list[XdsError]:
    errors: list[XdsError] = []
    for v in values:
        if kind is Kind.TIME and not _DTM.fullmatch(v):
            errors.append(XdsError(REGISTRY_ERROR, f"parameter {name}: {v!r} is not a time YYYY[MM[DD[hh[mm[ss]]]]]",
                                   location=name))
        elif kind is Kind.CODE:
            try:
                parse_code(v, name)
            except XdsFailure as exc:
                errors.extend(exc.errors)
        elif kind is Kind.OBJECT_TYPE and v not in DOCUMENT_ENTRY_TYPES:
            errors.append(XdsError(REGISTRY_ERROR, f"parameter {name}: {v!r} is not a DocumentEntry objectType "
                                   f"({DE_OBJECT_TYPE_STABLE} or {DE_OBJECT_TYPE_ON_DEMAND})", location=name))
        elif kind is Kind.STRING and not v.strip():
            errors.append(XdsError(REGISTRY_ERROR, f"parameter {name}: empty value", location=name))
    return errors
