"""Typed values of the EMPI: what a feed brings in, and what every call gives back.

Inputs mirror the HL7 v2 PID segment without depending on HL7: `Identifier` is a CX (value +
assigning authority), `PersonName` an XPN, `Address` an XAD, `PatientRecord` the demographics of one
source record (PID-3/5/7/8/11/13/19 plus the visit's department).  Outputs are frozen dataclasses; every
state-changing call returns the `PatientEvent` list it produced (also kept in ``empi_events``, the
outbox a publisher can read), so that ITI-10 notifications and listeners need no second query.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from enum import StrEnum
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Identifier:
    """A patient identifier in one identifier domain (HL7 CX: CX-1 value, CX-4 assigning authority).

    ``domain`` is the domain's namespace id or its universal id (OID); both resolve.
    """

    value: str
    domain: str

    def __str__(self) -> str:
        return f"{self.value}^^^{self.domain}"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HD:
    """An assigning authority as HL7 HD: namespace id, universal id (OID), universal id type (ISO)."""

    namespace: str | None = None
    universal_id: str | None = None
    universal_id_type: str | None = None


class DomainType(StrEnum):
    SOURCE = "source"  # a hospital's or department's patient id numbers
    ENTERPRISE = "enterprise"  # the EMPI's own master patient index
    NATIONAL = "national"  # a shared number (resident ID, insurance card) used for matching only


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Domain:
    """An identifier domain (assigning authority) known to the EMPI."""

    id: int
    namespace: str
    universal_id: str | None
    universal_id_type: str | None
    type: DomainType
    description: str = ""

    @property
    def hd(self) -> HD:
        return HD(namespace=self.namespace, universal_id=self.universal_id,
                  universal_id_type=self.universal_id_type)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PersonName:
    """One name of a person (HL7 XPN).  A Chinese name may come whole in ``family`` ("张三"): it is split
    on the known (compound) surnames.  ``use`` is XPN-7 (L legal, A alias, D display, ...)."""

    family: str = ""
    given: str = ""
    middle: str = ""
    prefix: str = ""
    suffix: str = ""
    use: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Address:
    """A postal address (HL7 XAD): street lines, city, district, state/province, postcode, country."""

    line1: str = ""
    line2: str = ""
    city: str = ""
    district: str = ""
    state: str = ""
    postcode: str = ""
    country: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PatientRecord:
    """The demographics of one source record, as received.

    ``birth_date`` may be a `datetime.date` or text (``YYYYMMDD``, ``YYYY-MM-DD``, an HL7 TS).
    ``sex`` is HL7 table 0001 (F, M, O, U, A, N) or a common spelling (female, 男, GB/T 2261.1 ``1``/``2``).
    ``national_id`` is a number shared across hospitals (a Chinese resident ID when ``national_id_type``
    is ``"CN-RIC"``, the default; any other type is only compacted).  ``extra`` keeps anything else the
    source sent that the EMPI stores but does not match on.
    """

    pid: str
    names: tuple[PersonName, ...] = ()
    birth_date: dt.date | str | None = None
    sex: str | None = None
    phones: tuple[str, ...] = ()
    addresses: tuple[Address, ...] = ()
    national_id: str | None = None
    national_id_type: str = "CN-RIC"
    mother_maiden_name: str | None = None
    department: str | None = None
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict)


class EventType(StrEnum):
    REGISTERED = "registered"
    UPDATED = "updated"
    MERGED = "merged"
    UNMERGED = "unmerged"
    LINKED = "linked"
    UNLINKED = "unlinked"
    DELETED = "deleted"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PatientEvent:
    """A change of the index, for ITI-10 (A31/A40) notifications and event listeners.

    ``patient`` is the enterprise id the event is about and ``identifiers`` its cross-reference after
    the change (every active source identifier, the enterprise id first).  ``record`` is the source
    record concerned; ``other_patient`` the enterprise id it came from (link, unlink) or the subsumed one
    (merge, unmerge); ``subsumed`` the MRG-1 identifier of a record merge.
    """

    id: int
    type: EventType
    patient: str
    identifiers: tuple[Identifier, ...]
    at: float
    record: Identifier | None = None
    other_patient: str | None = None
    subsumed: Identifier | None = None
    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "type": self.type.value, "patient": self.patient, "at": self.at,
            "identifiers": [{"value": i.value, "domain": i.domain} for i in self.identifiers],
            "record": None if self.record is None else {"value": self.record.value, "domain": self.record.domain},
            "other_patient": self.other_patient,
            "subsumed": None if self.subsumed is None else {"value": self.subsumed.value,
                                                            "domain": self.subsumed.domain},
            "detail": dict(self.detail),
        }


class LinkKind(StrEnum):
    AUTO = "auto"  # by the matcher above the auto-link threshold (or the record founded its patient)
    MANUAL = "manual"  # by a person (link, unlink, manual merge)
    REVIEW = "review"  # a review item that a person accepted


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FieldScore:
    """How one field compared: the agreement ``level`` (exact, close, ..., missing), the similarity in
    [0, 1], and the weight it added (log2 m/u for Fellegi–Sunter; the weighted share for a weighted profile)."""

    field: str
    level: str
    similarity: float
    weight: float


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MatchScore:
    """The score of a record against a candidate record, with the per-field explanation."""

    record: Identifier
    patient: str
    score: float
    probability: float
    decision: str  # "link", "review" or "none"
    fields: tuple[FieldScore, ...]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """A source record's membership of an enterprise patient; closed links are kept as history."""

    id: int
    record: Identifier
    patient: str
    kind: LinkKind
    score: float | None
    fields: tuple[FieldScore, ...]
    reason: str
    created_at: float
    created_by: str
    closed_at: float | None = None
    closed_reason: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ReviewItem:
    """A possible match between a record and a patient, scored between the review and auto-link thresholds."""

    id: int
    record: Identifier
    candidate: Identifier
    patient: str
    score: float
    fields: tuple[FieldScore, ...]
    state: str  # open, accepted, rejected, obsolete
    reason: str
    created_at: float
    decided_at: float | None = None
    decided_by: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SourceRecord:
    """A source record as stored: its demographics as last received and its normalised form."""

    identifier: Identifier
    patient: str
    status: str  # active, merged, deleted
    version: int
    record: PatientRecord
    warnings: tuple[str, ...]
    created_at: float
    updated_at: float
    merged_into: Identifier | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RecordVersion:
    """One entry of a record's history: the demographics a feed brought, and which feed."""

    identifier: Identifier
    version: int
    event: str
    record: PatientRecord
    at: float
    message_id: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Merge:
    """A merge (A40 or manual): the surviving and subsumed patients, and whether it was undone."""

    id: int
    kind: str  # "A40" (record merge of one domain) or "manual" (enterprise patients)
    surviving_patient: str
    subsumed_patient: str
    surviving: Identifier | None
    subsumed: Identifier | None
    at: float
    by: str
    undone_at: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FeedResult:
    """What a register/update did: the record, its patient, how it was matched, the events."""

    identifier: Identifier
    patient: str
    created: bool
    outcome: str  # new (own patient), linked, review, updated, unchanged
    best: MatchScore | None
    review: tuple[ReviewItem, ...]
    warnings: tuple[str, ...]
    events: tuple[PatientEvent, ...]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ChangeResult:
    """What a merge, unmerge, link, unlink, accept, reject or delete did."""

    patient: str
    events: tuple[PatientEvent, ...]
    merge: Merge | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CrossReference:
    """The answer to a PIX query (ITI-9): the enterprise patient and its identifiers in the asked domains
    (the queried identifier itself left out, IHE ITI TF-2a 3.9.4.2.2.6)."""

    patient: str
    query: Identifier
    identifiers: tuple[Identifier, ...]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PatientQuery:
    """A PDQ query (ITI-21 QPD-3): every given value must match; ``*`` is a wildcard in text values.

    Names match the hanzi, the pinyin or the Latin spelling (``ZHANG*`` finds 张三).  ``birth_date`` may
    be ``YYYY``, ``YYYYMM`` or a full date.
    """

    family: str | None = None
    given: str | None = None
    birth_date: str | None = None
    sex: str | None = None
    identifier: Identifier | None = None
    national_id: str | None = None
    phone: str | None = None
    city: str | None = None
    postcode: str | None = None
    line1: str | None = None
    mother_maiden_name: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Visit:
    """A patient visit as a feed's PV1 tells it (HL7 v2.5 3.4.3), kept per record and visit number."""

    visit_number: str = ""  # PV1-19.1
    patient_class: str = ""  # PV1-2 (E, I, O, P, R, B ...)
    location: str = ""  # PV1-3 as text (point of care^room^bed^facility...)
    point_of_care: str = ""  # PV1-3.1
    attending: str = ""  # PV1-7 first repetition as text
    attending_key: str = ""  # PV1-7.1 (id) or PV1-7.2 (family name), folded for matching
    referring: str = ""  # PV1-8
    hospital_service: str = ""  # PV1-10
    admitting: str = ""  # PV1-17
    admit_time: str = ""  # PV1-44
    discharge_time: str = ""  # PV1-45
    pv1: str = ""  # the segment as received (decoded), returned unchanged by ITI-22


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VisitQuery:
    """The visit part of an ITI-22 query (QPD-3 @PV1.x); ``*`` is a wildcard in every value."""

    patient_class: str | None = None
    point_of_care: str | None = None
    attending: str | None = None
    hospital_service: str | None = None
    visit_number: str | None = None

    def empty(self) -> bool:
        return not any(dataclasses.astuple(self))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VisitMatch:
    """One visit found by an ITI-22 query, with its patient (identifiers in the asked domains)."""

    patient: str
    identifiers: tuple[Identifier, ...]
    record: SourceRecord
    visit: Visit


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VisitResult:
    total: int
    offset: int
    matches: tuple[VisitMatch, ...]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PatientMatch:
    """One patient found by `find`: its enterprise id, identifiers, and the record that matched."""

    patient: str
    identifiers: tuple[Identifier, ...]
    record: SourceRecord


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FindResult:
    """Matches of one page (``offset``, ``limit``) and how many there are in all (for DSC continuation)."""

    total: int
    offset: int
    matches: tuple[PatientMatch, ...]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PatientView:
    """An enterprise patient with its records, links (open and closed), merges and events."""

    patient: str
    status: str  # active, merged, retired (no record left)
    merged_into: str | None
    records: tuple[SourceRecord, ...]
    links: tuple[Link, ...]
    merges: tuple[Merge, ...]
    events: tuple[PatientEvent, ...]
