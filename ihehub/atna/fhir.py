"""IHE ITI-81 Retrieve ATNA Audit Event (ITI TF-2c 3.81): DICOM audit messages as FHIR R4 AuditEvent
resources, and the AuditEvent search parameters as an `AuditQuery` — framework-free.

* `to_audit_event(msg, id=)` maps a DICOM PS3.15 A.5 message to an AuditEvent following the
  FHIR R4 "DICOM audit message" mapping (https://hl7.org/fhir/R4/auditevent-mappings.html#dicom):
  EventID -> type, EventTypeCode -> subtype, EventActionCode -> action, EventDateTime -> recorded,
  EventOutcomeIndicator -> outcome, ActiveParticipant -> agent (who/altId/name/requestor/network/
  role), AuditSourceIdentification -> source (site/observer/type), ParticipantObjectIdentification
  -> entity (what.identifier, type, role, lifecycle, securityLabel, name, query base64, detail).
* `parse_search(items)` reads the ITI-81 search parameters (TF-2c 3.81.4.1.2): ``date`` (required,
  prefixes ``eq ge gt le lt``, may repeat), ``patient.identifier``, ``agent.identifier`` /
  ``agent``, ``entity-id`` / ``entity``, ``outcome``, ``source``, ``type``, ``subtype``,
  ``address``, ``action``, ``_count``; raises `FhirSearchError` for anything it cannot honour.
* `searchset(...)` builds the Bundle (FHIR R4 3.1.1.4 searchset) with ``self`` / ``next`` links.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from ihehub.atna.codes import Code
from ihehub.atna.model import (
    ActiveParticipant,
    AuditMessage,
    AuditXMLError,
    ParticipantObjectIdentification,
    format_datetime,
    parse_datetime,
)
from ihehub.atna.store import AuditPage, AuditQuery, StoredAudit

__all__ = [
    "FHIR_JSON",
    "FhirSearch",
    "FhirSearchError",
    "next_cursor",
    "operation_outcome",
    "parse_search",
    "record_to_audit_event",
    "searchset",
    "to_audit_event",
]

FHIR_JSON = "application/fhir+json"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
# codeSystemName of a DICOM audit message -> FHIR system URI
SYSTEMS = {
    "DCM": DCM,
    "IHE Transactions": "urn:ihe:event-type-code",
    "IHE": "urn:ihe:event-type-code",
}
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
LIFECYCLE = "http://terminology.hl7.org/CodeSystem/dicom-audit-lifecycle"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
NETWORK_TYPES = frozenset({"1", "2", "3", "4", "5"})
DEFAULT_COUNT = 50
MAX_COUNT = 1000
CURSOR = "_cursor"  # the keyset paging parameter of the next link
SEARCH_PARAMETERS = (
    "date", "patient.identifier", "agent.identifier", "agent", "entity-id", "entity", "outcome", "source",
    "type", "subtype", "address", "action", "_count", CURSOR, "_format",
)
_YEAR_TO_DAY = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_PREFIXES = ("eq", "ge", "gt", "le", "lt")


class FhirSearchError(ValueError):
    """A search the server cannot run as asked (FHIR R4 3.1.1.4: answered 400 with an OperationOutcome)."""


# -- conversion ------------------------------------------------------------------------------------------


def _system(name: str) -> str | None:
    if not name:
        return None
    return SYSTEMS.get(name, name if ":" in name else f"urn:ihehub:code-system:{name.replace(' ', '-')}")


def _coding(code: Code) -> dict[str, Any]:
    out: dict[str, Any] = {}
    system = _system(code.system)
    if system:
        out["system"] = system
    out["code"] = code.code
    display = code.text or code.display
    if display:
        out["display"] = display
    return out


def _concept(code: Code) -> dict[str, Any]:
    return {"coding": [_coding(code)]}


def _agent(p: ActiveParticipant) -> dict[str, Any]:
    agent: dict[str, Any] = {}
    if p.roles:
        agent["type"] = _concept(p.roles[0])
        if len(p.roles) > 1:
            agent["role"] = [_concept(r) for r in p.roles[1:]]
    agent["who"] = {"identifier": {"value": p.user_id}}
    if p.alt_user_id:
        agent["altId"] = p.alt_user_id
    if p.user_name:
        agent["name"] = p.user_name
    agent["requestor"] = p.requestor
    if p.media_type is not None:
        agent["media"] = _coding(p.media_type)
    if p.network_id:
        network: dict[str, Any] = {"address": p.network_id}
        if p.network_type in NETWORK_TYPES:
            network["type"] = p.network_type
        agent["network"] = network
    return agent


def _entity(o: ParticipantObjectIdentification) -> dict[str, Any]:
    entity: dict[str, Any] = {}
    if o.object_id is not None:
        identifier: dict[str, Any] = {"value": o.object_id}
        if o.id_type.code:
            identifier["type"] = _concept(o.id_type)
        entity["what"] = {"identifier": identifier}
    if o.type_code is not None:
        entity["type"] = {"system": ENTITY_TYPE, "code": str(o.type_code)}
    if o.role is not None:
        entity["role"] = {"system": OBJECT_ROLE, "code": str(o.role)}
    if o.life_cycle is not None:
        entity["lifecycle"] = {"system": LIFECYCLE, "code": str(o.life_cycle)}
    if o.sensitivity:
        entity["securityLabel"] = [{"code": o.sensitivity}]
    if o.name is not None:
        entity["name"] = o.name
    if o.query is not None:
        entity["query"] = _b64(o.query)
    if o.details:
        entity["detail"] = [{"type": d.type, "valueBase64Binary": _b64(d.value)} for d in o.details]
    return entity


def _b64(value: bytes) -> str:
    import base64

    return base64.b64encode(value).decode("ascii")


def to_audit_event(msg: AuditMessage, *, id: str | None = None) -> dict[str, Any]:
    """The FHIR R4 AuditEvent of a DICOM audit message (the R4 DICOM mapping; see the module docstring)."""
    ev = msg.event
    res: dict[str, Any] = {"resourceType": "AuditEvent"}
    if id is not None:
        res["id"] = id
    res["type"] = _coding(ev.event_id)
    if ev.type_codes:
        res["subtype"] = [_coding(c) for c in ev.type_codes]
    if ev.action:
        res["action"] = ev.action
    # recorded is required (1..1); a received message with an unreadable EventDateTime has none to give
    res["recorded"] = format_datetime(ev.date_time) if ev.date_time is not None else None
    res["outcome"] = str(ev.outcome)
    if ev.outcome_description:
        res["outcomeDesc"] = ev.outcome_description
    if ev.purpose_of_use:
        res["purposeOfEvent"] = [_concept(c) for c in ev.purpose_of_use]
    res["agent"] = [_agent(p) for p in msg.participants]
    source: dict[str, Any] = {}
    if msg.source.enterprise_site_id:
        source["site"] = msg.source.enterprise_site_id
    source["observer"] = {"identifier": {"value": msg.source.source_id}}
    if msg.source.type_codes:
        source["type"] = [{"system": SOURCE_TYPE, "code": c.code, **({"display": c.text} if c.text else {})}
                          for c in msg.source.type_codes]
    res["source"] = source
    if msg.objects:
        res["entity"] = [_entity(o) for o in msg.objects]
    if res["recorded"] is None:
        del res["recorded"]
    return res


def record_to_audit_event(rec: StoredAudit) -> dict[str, Any] | None:
    """The AuditEvent of a stored record (loaded with its raw bytes), id = its ``seq``; None when the
    record holds no readable audit message (stored invalid: not XML, not an AuditMessage)."""
    xml = rec.xml()
    if xml is None:
        return None
    try:
        msg = AuditMessage.from_xml(xml)
    except AuditXMLError:
        return None
    return to_audit_event(msg, id=str(rec.seq))


def operation_outcome(text: str, *, code: str = "invalid", severity: str = "error") -> dict[str, Any]:
    """A FHIR R4 OperationOutcome with one issue (``code`` from the IssueType value set)."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": text}]}


def searchset(resources: Iterable[dict[str, Any]], *, base: str, self_url: str, next_url: str | None,
              notes: Sequence[str] = ()) -> dict[str, Any]:
    """A FHIR R4 Bundle of type searchset; ``notes`` become an OperationOutcome entry (mode outcome)."""
    links = [{"relation": "self", "url": self_url}]
    if next_url is not None:
        links.append({"relation": "next", "url": next_url})
    entries: list[dict[str, Any]] = [
        {"fullUrl": f"{base}/AuditEvent/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in resources
    ]
    if notes:
        outcome = {"resourceType": "OperationOutcome",
                   "issue": [{"severity": "warning", "code": "processing", "diagnostics": n} for n in notes]}
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})
    return {"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries}


# -- search ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FhirSearch:
    """A parsed ITI-81 search: the store query, the patient system to check on each record, the
    parameters to repeat in the next link."""

    query: AuditQuery
    patient_system: str | None = None
    params: tuple[tuple[str, str], ...] = ()

    def accepts(self, rec: StoredAudit) -> bool:
        """False when ``patient.identifier`` named a system this record's patients are not in."""
        if self.patient_system is None or self.query.patient is None:
            return True
        return any(_cx_matches(cx, self.patient_system, self.query.patient) for cx in rec.values("patient"))


def _cx_matches(cx: str, system: str, value: str) -> bool:
    """Whether an HL7 CX (``value^^^ns&oid&ISO``) is ``value`` in the assigning authority ``system``
    (``urn:oid:<oid>``, the bare OID, or the namespace)."""
    parts = cx.split("^")
    if parts[0] != value or len(parts) < 4:
        return False
    authority = parts[3].split("&")
    wanted = system.removeprefix("urn:oid:")
    return wanted in [a for a in authority[:2] if a]


def _split(value: str, sep: str) -> list[str]:
    """``value`` split at unescaped ``sep`` (FHIR R4 3.1.1.4.8: ``\\|``, ``\\,``, ``\\$`` and ``\\\\``
    stand for the character itself); the parts are unescaped only by `_unescape`."""
    parts, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            cur.append(value[i:i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\([|,$\\])", r"\1", value)


def _token(value: str) -> tuple[str | None, str]:
    """A FHIR token ``[system|]code`` (an HL7 ``APP|FACILITY`` user id is sent as ``APP\\|FACILITY``)."""
    parts = _split(value, "|")
    if len(parts) == 1:
        return None, _unescape(value)
    system, code = parts[0], "|".join(parts[1:])
    return (_unescape(system) or None), _unescape(code)


def _date_range(name: str, text: str) -> tuple[float, float]:
    """The [start, end) epoch seconds a FHIR date/dateTime value covers at its precision (R4 3.1.1.5.3)."""
    m = _YEAR_TO_DAY.fullmatch(text)
    try:
        if m:
            year, month, day = int(m[1]), int(m[2] or 1), int(m[3] or 1)
            start = dt.datetime(year, month, day, tzinfo=dt.UTC)
            if m[3]:
                end = start + dt.timedelta(days=1)
            elif m[2]:
                end = dt.datetime(year + month // 12, month % 12 + 1, 1, tzinfo=dt.UTC)
            else:
                end = dt.datetime(year + 1, 1, 1, tzinfo=dt.UTC)
            return start.timestamp(), end.timestamp()
    except ValueError:
        pass
    else:
        when = parse_datetime(text) if "T" in text else None
        if when is not None:
            clock = text.partition("T")[2]
            step = 0.001 if "." in clock else (1.0 if clock.count(":") >= 2 else 60.0)
            return when.timestamp(), when.timestamp() + step
    raise FhirSearchError(f"{name}: {text!r} is not a FHIR date or dateTime (e.g. 2026-11-27 or "
                          "2026-11-27T10:00:00Z)")


def _dates(values: Sequence[str]) -> tuple[float | None, float | None]:
    since: float | None = None
    until: float | None = None
    for raw in values:
        prefix, text = ("eq", raw)
        if raw[:2].isalpha():
            prefix, text = raw[:2], raw[2:]
            if prefix not in _PREFIXES:
                raise FhirSearchError(f"date: prefix {prefix!r} is not supported; use one of {', '.join(_PREFIXES)}")
        start, end = _date_range("date", text)
        low, high = {"eq": (start, end), "ge": (start, None), "gt": (end, None),
                     "le": (None, end), "lt": (None, start)}[prefix]
        if low is not None:
            since = low if since is None else max(since, low)
        if high is not None:
            until = high if until is None else min(until, high)
    return since, until


def _single(name: str, values: Sequence[str]) -> str | None:
    if not values:
        return None
    if len(values) > 1:
        raise FhirSearchError(f"{name} may be given once (found {len(values)})")
    if len(_split(values[0], ",")) > 1:
        raise FhirSearchError(f"{name}: several values (OR with ',') are not supported")
    return values[0]


def next_cursor(page: AuditPage) -> str | None:
    """The ``_cursor`` of the next page (the last record's event time and seq), None after the last page."""
    if page.next_before is None or page.next_before_time is None:
        return None
    return f"{page.next_before_time!r}:{page.next_before}"


def _cursor(value: str) -> tuple[float, int]:
    time_part, _, seq = value.partition(":")
    try:
        t = float(time_part)
    except ValueError:
        t = math.nan
    if not seq.isdigit() or not math.isfinite(t):
        raise FhirSearchError(f"{CURSOR} {value!r} is not a page cursor from a next link")
    return t, int(seq)


def parse_search(items: Iterable[tuple[str, str]], *, default_count: int = DEFAULT_COUNT) -> FhirSearch:
    """The ITI-81 search of a query string's ``(name, value)`` pairs (ITI TF-2c 3.81.4.1.2)."""
    given: dict[str, list[str]] = {}
    kept: list[tuple[str, str]] = []
    for name, value in items:
        if name not in SEARCH_PARAMETERS:
            raise FhirSearchError(f"unknown search parameter {name!r}; supported: "
                                  f"{', '.join(p for p in SEARCH_PARAMETERS if p != '_format')}")
        value = value.strip()
        if not value:
            raise FhirSearchError(f"{name} is empty")
        given.setdefault(name, []).append(value)
        if name != CURSOR:
            kept.append((name, value))
    if "date" not in given:
        raise FhirSearchError("the date search parameter is required (ITI TF-2c 3.81.4.1.2.1), "
                              "e.g. date=ge2026-11-27&date=le2026-11-28")
    since, until = _dates(given["date"])
    patient_system = patient = None
    if (p := _single("patient.identifier", given.get("patient.identifier", []))) is not None:
        patient_system, patient = _token(p)
        if not patient:
            raise FhirSearchError("patient.identifier needs a value: system|value or value")
    user = None
    for name in ("agent.identifier", "agent"):
        if (a := _single(name, given.get(name, []))) is not None:
            if user is not None:
                raise FhirSearchError("give agent.identifier or agent, not both")
            user = _token(a)[1].removeprefix("Practitioner/")
    entity = None
    for name in ("entity-id", "entity"):
        if (e := _single(name, given.get(name, []))) is not None:
            if entity is not None:
                raise FhirSearchError("give entity-id or entity, not both")
            entity = _token(e)[1]
    outcome = None
    if (o := _single("outcome", given.get("outcome", []))) is not None:
        code = _token(o)[1]
        if code not in ("0", "4", "8", "12"):
            raise FhirSearchError(f"outcome {code!r} is not an AuditEventOutcome code (0, 4, 8, 12)")
        outcome = int(code)
    action = _single("action", given.get("action", []))
    source, address = _single("source", given.get("source", [])), _single("address", given.get("address", []))
    if action is not None and action not in ("C", "R", "U", "D", "E"):
        raise FhirSearchError(f"action {action!r} is not an AuditEventAction code (C, R, U, D, E)")
    type_ = _single("type", given.get("type", []))
    subtype = _single("subtype", given.get("subtype", []))
    count = default_count
    if (c := _single("_count", given.get("_count", []))) is not None:
        if not c.isdigit() or not 1 <= int(c) <= MAX_COUNT:
            raise FhirSearchError(f"_count must be a whole number from 1 to {MAX_COUNT}, not {c!r}")
        count = int(c)
    before = before_time = None
    if (b := _single(CURSOR, given.get(CURSOR, []))) is not None:
        before_time, before = _cursor(b)
    query = AuditQuery(
        patient=patient, user=user, entity=entity, outcome=outcome, action=action,
        source=_unescape(source) if source else None, address=_unescape(address) if address else None,
        event_id=_token(type_)[1] if type_ else None, event_type=_token(subtype)[1] if subtype else None,
        since=since, until=until, limit=count, before=before, before_time=before_time, by_time=True,
    )
    return FhirSearch(query=query, patient_system=patient_system, params=tuple(kept))
