"""PIXm (ITI-83) and PDQm (ITI-78): the EMPI's cross-reference and demographics queries as FHIR R4.

The HTTP binding is `ihehub.api.routes_fhir_patient`; this module turns FHIR parameters into EMPI calls and
EMPI answers into FHIR resources, and every refusal into a `FhirError` carrying the HTTP status and the
OperationOutcome issue the profile prescribes.

* **ITI-83** ``GET [base]/Patient/$ihe-pix?sourceIdentifier=system|value[&targetSystem=uri]*`` (ITI TF-2c /
  PIXm 3.83.4.1-2): the answer is a ``Parameters`` resource with one ``targetIdentifier`` per identifier of
  the patient in the asked domains (all domains when none is asked; the queried identifier left out) and
  one ``targetId`` reference to the patient.  Unknown source domain: 400, issue ``code-invalid``,
  "sourceIdentifier Assigning Authority not found" (3.83.4.2.2.3); unknown target domain: 403,
  ``code-invalid``, "targetSystem not found" (3.83.4.2.2.4); unknown identifier: 404 ``not-found``,
  "sourceIdentifier Patient Identifier not found"; a known patient without an identifier in the target
  domains: 200 with no ``targetIdentifier``.
* **ITI-78** ``GET [base]/Patient?…`` and ``GET [base]/Patient/{id}`` (PDQm 2.3.78.4.1): search parameters
  ``_id family given name birthdate gender identifier telecom address address-city address-postalcode
  mothersMaidenName`` plus ``_count`` and the paging cursor ``_offset``; one Patient per enterprise patient
  (``id`` = the enterprise id), with the identifiers of all its records.  An unknown parameter is ignored
  (FHIR R4 3.1.1.4) unless the client sends ``Prefer: handling=strict``, then it is 400.  Unknown
  ``identifier`` domain: 404 "Unknown domain" is not prescribed — the result is an empty Bundle, as for any
  search that matches nothing.

Identifier systems: a domain with an ISO universal id is ``urn:oid:<oid>``; a domain whose universal id is a
URI is that URI; any other is ``urn:ihehub:domain:<namespace>``.  Incoming systems are resolved the same way
(``urn:oid:``, the bare OID, the URI, or the namespace).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable, Sequence
from typing import Any

from ihehub.empi import HD, Empi, EmpiError, Identifier, PatientQuery
from ihehub.empi.errors import UnknownDomain, UnknownPatient
from ihehub.empi.model import Domain, PatientMatch, PatientRecord, SourceRecord

DOMAIN_PREFIX = "urn:ihehub:domain:"
OID_PREFIX = "urn:oid:"
DEFAULT_COUNT = 20
MAX_COUNT = 500
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_GENDER_IN = {"male": "M", "female": "F", "other": "O", "unknown": "U"}
_GENDER_OUT = {v: k for k, v in _GENDER_IN.items()}
_PDQM_PARAMS = frozenset({"_id", "family", "given", "name", "birthdate", "gender", "identifier", "telecom",
                          "address", "address-city", "address-postalcode", "mothersMaidenName", "_count",
                          "_offset", "_format", "active"})


class FhirError(Exception):
    """A refusal: HTTP ``status`` and the OperationOutcome issue ``code`` with ``diagnostics``."""

    def __init__(self, status: int, code: str, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics = status, code, diagnostics

    def outcome(self) -> dict[str, Any]:
        return {"resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": self.code, "diagnostics": self.diagnostics}]}


# -- identifier systems -----------------------------------------------------------------------------
def system_of(domain: Domain) -> str:
    """The FHIR ``Identifier.system`` of an identifier domain."""
    uid = domain.universal_id or ""
    if uid and (domain.universal_id_type or "ISO").upper() == "ISO" and _OID.match(uid):
        return OID_PREFIX + uid
    if ":" in uid:
        return uid
    return DOMAIN_PREFIX + domain.namespace


def domain_key(system: str) -> str | HD:
    """What to hand `Empi.domain` for a FHIR system URI (or a bare OID or namespace)."""
    system = system.strip()
    if system.startswith(OID_PREFIX):
        return HD(universal_id=system[len(OID_PREFIX):])
    if system.startswith(DOMAIN_PREFIX):
        return system[len(DOMAIN_PREFIX):]
    if _OID.match(system) or ":" in system:
        return HD(universal_id=system)
    return system


def parse_token(raw: str, *, name: str) -> tuple[str, str]:
    """``system|value`` of a token parameter; both parts are required here (PIXm sourceIdentifier, PDQm
    identifier search with a domain)."""
    system, bar, value = raw.partition("|")
    if not bar or not system.strip() or not value.strip():
        raise FhirError(400, "invalid", f"{name} must be 'system|value' with both parts, not {raw!r}")
    return system.strip(), value.strip()


# -- ITI-83 -----------------------------------------------------------------------------------------
def pix_query(empi: Empi, source_identifier: str | None, target_systems: Sequence[str]) -> dict[str, Any]:
    """The ITI-83 ``Parameters`` answer (see the module docstring for the error cases)."""
    if not source_identifier:
        raise FhirError(400, "required", "sourceIdentifier is required (system|value)")
    system, value = parse_token(source_identifier, name="sourceIdentifier")
    try:
        source = empi.domain(domain_key(system))
    except UnknownDomain:
        raise FhirError(400, "code-invalid", "sourceIdentifier Assigning Authority not found") from None
    targets: list[Domain] = []
    for t in target_systems:
        try:
            targets.append(empi.domain(domain_key(t)))
        except UnknownDomain:
            raise FhirError(403, "code-invalid", "targetSystem not found") from None
    try:
        xref = empi.cross_reference(Identifier(value=value, domain=source.namespace),
                                    [d.namespace for d in targets] or None)
    except UnknownPatient:
        raise FhirError(404, "not-found", "sourceIdentifier Patient Identifier not found") from None
    except EmpiError as exc:
        raise FhirError(400, "invalid", exc.message) from None
    systems = _systems(empi)
    params: list[dict[str, Any]] = [
        {"name": "targetIdentifier", "valueIdentifier": identifier(i, systems)} for i in xref.identifiers]
    params.append({"name": "targetId", "valueReference": {"reference": f"Patient/{xref.patient}"}})
    return {"resourceType": "Parameters", "parameter": params}


# -- ITI-78 -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PatientSearch:
    """A parsed PDQm search: the EMPI query, the enterprise id asked by ``_id``, paging."""

    query: PatientQuery
    patient_id: str | None
    count: int
    offset: int
    ignored: tuple[str, ...]


def parse_search(items: Iterable[tuple[str, str]], *, strict: bool = False) -> PatientSearch:
    """PDQm search parameters → `PatientSearch`; `FhirError` 400 for a bad value (or an unknown parameter
    when ``strict``)."""
    fields: dict[str, Any] = {}
    patient_id = None
    count, offset = DEFAULT_COUNT, 0
    ignored: list[str] = []

    def put(attr: str, value: Any, param: str) -> None:
        if attr in fields and fields[attr] != value:
            raise FhirError(400, "not-supported", f"{param} is given twice with different values")
        fields[attr] = value

    for name, raw in items:
        base, _, modifier = name.partition(":")
        value = raw.strip()
        if base not in _PDQM_PARAMS:
            if strict:
                raise FhirError(400, "not-supported", f"unknown search parameter {name!r}")
            ignored.append(name)
            continue
        if modifier and modifier not in ("exact", "contains"):
            raise FhirError(400, "not-supported", f"modifier :{modifier} of {base} is not supported")
        if base in ("_format", "active"):
            continue
        if not value:
            raise FhirError(400, "invalid", f"search parameter {name} has no value")
        text = f"*{value}*" if modifier == "contains" else (value if modifier == "exact" else f"{value}*")
        if base == "_id":
            patient_id = value
        elif base in ("family", "given"):
            put(base, text, name)
        elif base == "name":
            put("family", text, name)
        elif base == "birthdate":
            put("birth_date", _birthdate(value), name)
        elif base == "gender":
            sex = _GENDER_IN.get(value.lower())
            if sex is None:
                raise FhirError(400, "code-invalid", f"gender must be one of male, female, other, unknown, "
                                                     f"not {value!r}")
            put("sex", sex, name)
        elif base == "identifier":
            system, bar, ident = value.partition("|")
            if not bar:
                put("identifier_value", value, name)
            else:
                put("identifier", (system.strip(), ident.strip()), name)
        elif base == "telecom":
            put("phone", value.partition("|")[2] or value, name)
        elif base in ("address-city", "address"):
            put("city", text, name)
        elif base == "address-postalcode":
            put("postcode", value, name)
        elif base == "mothersMaidenName":
            put("mother_maiden_name", text, name)
        elif base == "_count":
            count = _int(value, "_count", 1, MAX_COUNT)
        elif base == "_offset":
            offset = _int(value, "_offset", 0, 10**9)
    bare_id = fields.pop("identifier_value", None)
    if bare_id is not None:
        raise FhirError(400, "not-supported", f"identifier={bare_id!r} needs its system: identifier=system|value "
                                              "(an identifier is only unique within its assigning authority)")
    ident = fields.pop("identifier", None)
    query = PatientQuery(**fields)
    if ident is not None:
        query = dataclasses.replace(query, identifier=Identifier(value=ident[1], domain=ident[0]))
    if patient_id is None and query == PatientQuery():
        raise FhirError(400, "invalid", "give at least one search parameter (family, given, birthdate, gender, "
                                        "identifier, telecom, address-city, address-postalcode or _id)")
    return PatientSearch(query=query, patient_id=patient_id, count=count, offset=offset, ignored=tuple(ignored))


def search(empi: Empi, params: PatientSearch) -> tuple[list[dict[str, Any]], int]:
    """(Patient resources of the page, total matches) of a PDQm search."""
    systems = _systems(empi)
    if params.patient_id is not None:
        try:
            found = [read(empi, params.patient_id, systems=systems)]
        except FhirError:
            found = []
        return found[params.offset:params.offset + params.count], len(found)
    query = params.query
    if query.identifier is not None:
        try:
            dom = empi.domain(domain_key(query.identifier.domain))
        except UnknownDomain:
            return [], 0
        query = dataclasses.replace(query, identifier=Identifier(value=query.identifier.value, domain=dom.namespace))
    try:
        result = empi.find(query, limit=params.count, offset=params.offset)
    except EmpiError as exc:
        raise FhirError(400, "invalid", exc.message) from None
    return [patient_resource(m, systems) for m in result.matches], result.total


def read(empi: Empi, patient_id: str, *, systems: dict[str, str] | None = None) -> dict[str, Any]:
    """``GET Patient/{id}``: the enterprise patient ``patient_id`` (404 when unknown or merged away)."""
    systems = systems if systems is not None else _systems(empi)
    try:
        view = empi.patient(Identifier(value=patient_id, domain=empi.config.enterprise_namespace))
    except EmpiError:
        raise FhirError(404, "not-found", f"Patient/{patient_id} is not known") from None
    if view.status != "active":
        detail = f" (merged into Patient/{view.merged_into})" if view.merged_into else ""
        raise FhirError(404, "not-found", f"Patient/{patient_id} is {view.status}{detail}")
    active = [r for r in view.records if r.status == "active"]
    if not active:
        raise FhirError(404, "not-found", f"Patient/{patient_id} has no active record")
    best = max(active, key=lambda r: r.updated_at)
    return patient_resource(PatientMatch(patient=view.patient, identifiers=tuple(r.identifier for r in active),
                                         record=best), systems)


# -- resources --------------------------------------------------------------------------------------
def _systems(empi: Empi) -> dict[str, str]:
    return {d.namespace: system_of(d) for d in empi.domains()}


def identifier(ident: Identifier, systems: dict[str, str]) -> dict[str, Any]:
    return {"use": "usual", "system": systems.get(ident.domain, DOMAIN_PREFIX + ident.domain), "value": ident.value}


def patient_resource(match: PatientMatch, systems: dict[str, str]) -> dict[str, Any]:
    """A FHIR R4 Patient of one enterprise patient (PDQm Patient profile: identifiers, name, gender…)."""
    rec: PatientRecord = match.record.record
    res: dict[str, Any] = {"resourceType": "Patient", "id": match.patient, "active": True,
                           "identifier": [identifier(i, systems) for i in match.identifiers]}
    if rec.national_id:
        res["identifier"].append({"use": "official", "type": {"text": rec.national_id_type},
                                  "system": f"urn:ihehub:national-id:{rec.national_id_type}",
                                  "value": rec.national_id})
    names = []
    for n in rec.names:
        name: dict[str, Any] = {}
        if n.family:
            name["family"] = n.family
        given = [g for g in (n.given, n.middle) if g]
        if given:
            name["given"] = given
        if n.prefix:
            name["prefix"] = [n.prefix]
        if n.suffix:
            name["suffix"] = [n.suffix]
        if name:
            names.append(name)
    if names:
        res["name"] = names
    if rec.sex:
        res["gender"] = _GENDER_OUT.get(rec.sex.upper()[:1], "unknown")
    if rec.birth_date:
        res["birthDate"] = _fhir_date(rec.birth_date)
    if rec.phones:
        res["telecom"] = [{"system": "phone", "value": p} for p in rec.phones]
    addresses = []
    for a in rec.addresses:
        addr: dict[str, Any] = {k: v for k, v in (("city", a.city), ("district", a.district), ("state", a.state),
                                  ("postalCode", a.postcode), ("country", a.country)) if v}
        lines = [x for x in (a.line1, a.line2) if x]
        if lines:
            addr["line"] = lines
        if addr:
            addresses.append(addr)
    if addresses:
        res["address"] = addresses
    if rec.mother_maiden_name:
        res["extension"] = [{"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
                             "valueString": rec.mother_maiden_name}]
    res["meta"] = {"lastUpdated": _instant(match.record)}
    return res


def _instant(rec: SourceRecord) -> str:
    return dt.datetime.fromtimestamp(rec.updated_at, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _fhir_date(value: dt.date | str) -> str:
    if isinstance(value, dt.date):
        return value.isoformat()
    digits = value.strip()
    if len(digits) >= 8 and digits[:8].isdigit():
        return f"{digits[:4]}-{digits[4:6]}-{digits[6:8]}"
    if len(digits) == 6 and digits.isdigit():
        return f"{digits[:4]}-{digits[4:6]}"
    return digits


def _birthdate(value: str) -> str:
    """A PDQm ``birthdate`` (``eq`` prefix only; YYYY, YYYY-MM or YYYY-MM-DD) → the EMPI's YYYY[MM[DD]]."""
    v = value[2:] if value[:2] == "eq" else value
    if value[:2] in ("ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"):
        raise FhirError(400, "not-supported", f"birthdate prefix {value[:2]!r} is not supported (only eq)")
    if not re.fullmatch(r"\d{4}(-\d{2}(-\d{2})?)?", v):
        raise FhirError(400, "invalid", f"birthdate must be YYYY, YYYY-MM or YYYY-MM-DD, not {value!r}")
    return v.replace("-", "")


def _int(value: str, name: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise FhirError(400, "invalid", f"{name} must be an integer, not {value!r}") from None
    if not lo <= n <= hi:
        raise FhirError(400, "invalid", f"{name} must be between {lo} and {hi}, not {n}")
    return n
