"""ITI-18 Registry Stored Query: the 16 stored queries of ITI TF-2a 3.18.4.1.2.3.7 on the registry tables.

``StoredQueries(engine).run(request)`` takes a ``query:AdhocQueryRequest`` and answers a
``query:AdhocQueryResponse`` (ebRS 3.0 query.xsd): the matching objects as LeafClass (the registered
``rim:ExtrinsicObject`` / ``rim:RegistryPackage`` / ``rim:Association`` with their current
availabilityStatus) or as ObjectRef, or status Failure with a ``rs:RegistryErrorList`` (ITI TF-2a
3.18.4.1.3): XDSUnknownStoredQuery, XDSStoredQueryMissingParam, XDSStoredQueryParamNumber,
XDSTooManyResults (more than ``max_results`` objects), XDSResultNotSinglePatient (a Get query whose objects
belong to several patients), XDSUnknownCommunity, XDSRegistryError (a malformed value, with the
parameter named in ``location``).  Bad input never raises.

The Find queries are one SQL statement each (SQLAlchemy Core): a patient index of ``xds_objects``
(patient_id, or the (patient_id, kind, status) composite) selects the patient's objects, codes and authors
are EXISTS sub-queries on ``xds_codes`` / ``xds_slots`` (by object_id), times compare as DTM strings in SQL
(:func:`time_from`), and nothing is filtered row by row in Python.  With 1,000,000 DocumentEntries in
PostgreSQL the statement runs in under 1 ms (EXPLAIN ANALYZE); see :mod:`ihehub.xds.query_bench`.
FindDocumentsForMultiplePatients and FindFoldersForMultiplePatients are the ITI-51 queries.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lxml import etree
from sqlalchemy import ColumnElement, Connection, Engine, Row, and_, func, literal, or_, select
from sqlalchemy.exc import SQLAlchemyError

from ihehub.xds import ebrim
from ihehub.xds import tables as t
from ihehub.xds.errors import FAILURE, REGISTRY_ERROR, SUCCESS, XdsError, XdsFailure, error_list
from ihehub.xds.query_params import MISSING_PARAM, UNKNOWN_COMMUNITY, Kind, Param, Params, read_params

log = logging.getLogger(__name__)

NS = ebrim.NS
QUERY = f"{{{NS['query']}}}"
RIM = ebrim.RIM

# ITI TF-3 Table 4.2.4.1-2
UNKNOWN_STORED_QUERY = "XDSUnknownStoredQuery"
TOO_MANY_RESULTS = "XDSTooManyResults"
RESULT_NOT_SINGLE_PATIENT = "XDSResultNotSinglePatient"

DOCUMENT_ENTRY, SUBMISSION_SET, FOLDER = "DocumentEntry", "SubmissionSet", "Folder"
AUTHOR_PERSON = "authorPerson"
REFERENCE_ID_SLOTS = ("referenceIdList", "urn:ihe:iti:xds:2013:referenceIdList")  # ITI TF-3 4.2.3.2.28
LEAF_CLASS, OBJECT_REF = "LeafClass", "ObjectRef"
_CHUNK = 500  # ids per IN (...) list

# ITI TF-2a 3.18.4.1.2.3.7 (and ITI-51, ITI TF-2b 3.51.4.1.2.3.7)
QUERY_IDS: dict[str, str] = {
    "FindDocuments": "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d",
    "FindSubmissionSets": "urn:uuid:f26abbcb-ac74-4422-8a30-edb644bbc1a9",
    "FindFolders": "urn:uuid:958f3006-baad-4929-a4de-ff1114824431",
    "GetAll": "urn:uuid:10b545ea-725c-446d-9b95-8aeb444eddf3",
    "GetDocuments": "urn:uuid:5c4f972b-d56b-40ac-a5fc-c8ca9b40b9d4",
    "GetFolders": "urn:uuid:5737b14c-8a1a-4539-b659-e03a34a5e1e4",
    "GetAssociations": "urn:uuid:a7ae438b-4bc2-4642-93e9-be891f7bb155",
    "GetDocumentsAndAssociations": "urn:uuid:bab9529a-4a10-40b3-a01f-f68a615d247a",
    "GetSubmissionSets": "urn:uuid:51224314-5390-4169-9b91-b1980040715a",
    "GetSubmissionSetAndContents": "urn:uuid:e8e3cb2c-e39c-46b9-99e4-c12f57260b83",
    "GetFolderAndContents": "urn:uuid:b909a503-523d-4517-8acf-8e5834dfc4c7",
    "GetFoldersForDocument": "urn:uuid:10cae35a-c7f9-4cf5-b61e-fc3278ffb578",
    "GetRelatedDocuments": "urn:uuid:d90e5407-b356-4d91-a89f-873917b4b0e6",
    "FindDocumentsByReferenceId": "urn:uuid:12941a89-e02e-4be5-967c-ce4bfc8fe492",
    "FindDocumentsForMultiplePatients": "urn:uuid:3d1bdb10-39a2-11de-89c2-2f44d94eaa9f",
    "FindFoldersForMultiplePatients": "urn:uuid:50d3f5ac-39a2-11de-a1ca-b366239e58df",
}

OBJ, CODES, SLOTS, ASSOC = t.objects, t.codes, t.slots, t.associations


# ---------------------------------------------------------------- parameters of each query (Tables 3.18.4.1.2.3.7.x-1)

def _p(kind: Kind = Kind.STRING, *, required: bool = False, multi: bool = False, and_or: bool = False) -> Param:
    return Param(kind=kind, required=required, multi=multi, and_or=and_or)


_CODE_M = _p(Kind.CODE, multi=True)
_CODE_ANDOR = _p(Kind.CODE, multi=True, and_or=True)
_TIME = _p(Kind.TIME)
_STATUS = _p(required=True, multi=True)
_TYPE = _p(Kind.OBJECT_TYPE, multi=True)
_HOME = _p()
_UUIDS = _p(multi=True)

# the DocumentEntry filters of FindDocuments: parameter -> classificationScheme
DE_CODE_PARAMS: dict[str, str] = {
    "$XDSDocumentEntryClassCode": ebrim.DE_CLASS_CODE,
    "$XDSDocumentEntryTypeCode": ebrim.DE_TYPE_CODE,
    "$XDSDocumentEntryPracticeSettingCode": ebrim.DE_PRACTICE_SETTING_CODE,
    "$XDSDocumentEntryHealthcareFacilityTypeCode": ebrim.DE_HEALTHCARE_FACILITY_TYPE_CODE,
    "$XDSDocumentEntryEventCodeList": ebrim.DE_EVENT_CODE,
    "$XDSDocumentEntryConfidentialityCode": ebrim.DE_CONFIDENTIALITY_CODE,
    "$XDSDocumentEntryFormatCode": ebrim.DE_FORMAT_CODE,
}
# parameter prefix -> xds_objects column (From: >=, To: <)
DE_TIME_PARAMS: dict[str, str] = {
    "$XDSDocumentEntryCreationTime": "creation_time",
    "$XDSDocumentEntryServiceStartTime": "service_start_time",
    "$XDSDocumentEntryServiceStopTime": "service_stop_time",
}
_AND_OR_CODES = {"$XDSDocumentEntryEventCodeList", "$XDSDocumentEntryConfidentialityCode"}

DOCUMENT_FILTERS: dict[str, Param] = {
    **{n: (_CODE_ANDOR if n in _AND_OR_CODES else _CODE_M) for n in DE_CODE_PARAMS},
    **{f"{n}{edge}": _TIME for n in DE_TIME_PARAMS for edge in ("From", "To")},
    "$XDSDocumentEntryAuthorPerson": _p(multi=True),
    "$XDSDocumentEntryStatus": _STATUS,
    "$XDSDocumentEntryType": _TYPE,
}
CONTENT_FILTERS: dict[str, Param] = {  # GetAll, GetSubmissionSetAndContents, GetFolderAndContents
    "$XDSDocumentEntryFormatCode": _CODE_M,
    "$XDSDocumentEntryConfidentialityCode": _CODE_ANDOR,
    "$XDSDocumentEntryType": _TYPE,
}
DOC_REF: dict[str, Param] = {"$XDSDocumentEntryEntryUUID": _UUIDS, "$XDSDocumentEntryUniqueId": _UUIDS,
                             "$homeCommunityId": _HOME}
DOC_REF_ONE: dict[str, Param] = {"$XDSDocumentEntryEntryUUID": _p(), "$XDSDocumentEntryUniqueId": _p(),
                                 "$homeCommunityId": _HOME}
DOC_ALTERNATIVES = (("$XDSDocumentEntryEntryUUID", "$XDSDocumentEntryUniqueId"),)


# ---------------------------------------------------------------- SQL building blocks

def time_from(column: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    """``column >= value`` compared at the precision of the shorter DTM (ITI TF-2a 3.18.4.1.2.3.7.1:
    ...TimeFrom is inclusive): 2004 >= 20041225 holds, as both are 2004 at year precision."""
    return func.substr(column, 1, len(value)) >= func.substr(literal(value), 1, func.length(column))


def time_to(column: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    """``column < value`` at the precision of the shorter DTM (...TimeTo is exclusive)."""
    return func.substr(column, 1, len(value)) < func.substr(literal(value), 1, func.length(column))


def has_codes(scheme: str, groups: Sequence[Sequence[tuple[str, str]]]) -> list[ColumnElement[bool]]:
    """One EXISTS per AND group: the object has a classification of ``scheme`` with one of the group's
    (code, codingScheme) pairs (ITI TF-2a 3.18.4.1.2.3.6 AND/OR semantics)."""
    return [
        select(CODES.c.id).where(CODES.c.object_id == OBJ.c.id, CODES.c.scheme == scheme,
                             or_(*(and_(CODES.c.code == code, CODES.c.coding_scheme == cs) for code, cs in group)))
        .exists()
        for group in groups
    ]


def has_slot(names: Sequence[str], values: Sequence[str], *, like: bool = False) -> ColumnElement[bool]:
    """EXISTS a searchable slot value among ``values`` (LIKE patterns with % and _ when ``like``; SQL LIKE:
    case-sensitive on PostgreSQL, ASCII case-insensitive on SQLite)."""
    match = or_(*(SLOTS.c.value.like(v) for v in values)) if like else SLOTS.c.value.in_(list(values))
    name = SLOTS.c.name == names[0] if len(names) == 1 else SLOTS.c.name.in_(list(names))
    return select(SLOTS.c.id).where(SLOTS.c.object_id == OBJ.c.id, name, match).exists()


def _in(column: ColumnElement[Any], values: Sequence[str]) -> ColumnElement[bool]:
    return column == values[0] if len(values) == 1 else column.in_(list(values))


def _chunks(values: Iterable[str]) -> Iterable[list[str]]:
    items = sorted(set(values))
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


# ---------------------------------------------------------------- one query run


@dataclass
class Result:
    """What a stored query found: registry objects and associations (rows), in registration order."""

    objects: list[Row[Any]] = field(default_factory=list)
    associations: list[Row[Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.objects) + len(self.associations)


@dataclass
class Run:
    """The state of one query: its connection, parameters, return type and result limit."""

    conn: Connection
    params: Params
    leaf: bool
    max_results: int

    # -- columns
    def object_columns(self) -> list[ColumnElement[Any]]:
        cols: list[ColumnElement[Any]] = [OBJ.c.id, OBJ.c.entry_uuid, OBJ.c.kind, OBJ.c.patient_id, OBJ.c.status,
                                          OBJ.c.home_community_id]
        return [*cols, OBJ.c.xml] if self.leaf else cols

    def association_columns(self) -> list[ColumnElement[Any]]:
        cols: list[ColumnElement[Any]] = [ASSOC.c.id, ASSOC.c.entry_uuid, ASSOC.c.type, ASSOC.c.source_uuid,
                                          ASSOC.c.target_uuid, ASSOC.c.status]
        return [*cols, ASSOC.c.xml] if self.leaf else cols

    # -- reads
    def find(self, where: Sequence[ColumnElement[bool]]) -> list[Row[Any]]:
        """Objects matching ``where``, at most max_results + 1 (enough to tell XDSTooManyResults)."""
        stmt = select(*self.object_columns()).where(*where).order_by(OBJ.c.id).limit(self.max_results + 1)
        rows = list(self.conn.execute(stmt))
        if len(rows) > self.max_results:
            raise too_many(self.max_results)
        return rows

    def objects(self, kind: str | None, column: ColumnElement[Any], values: Iterable[str],
                where: Sequence[ColumnElement[bool]] = ()) -> list[Row[Any]]:
        """Objects (of ``kind``) whose ``column`` is one of ``values``."""
        rows: dict[int, Row[Any]] = {}
        for chunk in _chunks(values):
            conds = [_in(column, chunk), *where] + ([OBJ.c.kind == kind] if kind else [])
            rows.update((r.id, r) for r in self.conn.execute(select(*self.object_columns()).where(*conds)))
        return [rows[k] for k in sorted(rows)]

    def associations(self, *, sources: Iterable[str] = (), targets: Iterable[str] = (),
                     types: Sequence[str] | None = None, ids: Iterable[str] = ()) -> list[Row[Any]]:
        """Associations whose source is in ``sources`` or target in ``targets`` or id in ``ids``."""
        rows: dict[int, Row[Any]] = {}
        pairs = ((ASSOC.c.source_uuid, sources), (ASSOC.c.target_uuid, targets), (ASSOC.c.entry_uuid, ids))
        for column, values in pairs:
            for chunk in _chunks(values):
                conds = [_in(column, chunk)] + ([ASSOC.c.type.in_(list(types))] if types else [])
                rows.update((r.id, r) for r in self.conn.execute(select(*self.association_columns()).where(*conds)))
        return [rows[k] for k in sorted(rows)]

    def among(self, objects: Sequence[Row[Any]]) -> list[Row[Any]]:
        """The associations linking ``objects`` with each other, and those (SubmissionSet HasMember) whose
        target is such an association (GetAll: "Associations between these objects")."""
        ids = {o.entry_uuid for o in objects}
        candidates = self.associations(sources=ids)
        chosen = {a.entry_uuid for a in candidates if a.target_uuid in ids}
        while True:
            more = {a.entry_uuid for a in candidates if a.entry_uuid not in chosen and a.target_uuid in chosen}
            if not more:
                break
            chosen |= more
        return [a for a in candidates if a.entry_uuid in chosen]

    def refs(self, kind: str, uuid_param: str, unique_param: str) -> list[Row[Any]]:
        """Objects of ``kind`` named by entryUUID (``uuid_param``) or by uniqueId (``unique_param``)."""
        if uuid_param in self.params:
            return self.objects(kind, OBJ.c.entry_uuid, self.params.many(uuid_param) or [])
        return self.objects(kind, OBJ.c.unique_id, self.params.many(unique_param) or [])

    def documents(self) -> list[Row[Any]]:
        """DocumentEntries named by $XDSDocumentEntryEntryUUID or $XDSDocumentEntryUniqueId."""
        return self.refs(DOCUMENT_ENTRY, "$XDSDocumentEntryEntryUUID", "$XDSDocumentEntryUniqueId")


def too_many(limit: int) -> XdsFailure:
    return XdsFailure(XdsError(TOO_MANY_RESULTS, f"the query matches more than {limit} objects; "
                               "narrow it (more parameters, shorter time range)"))


# ---------------------------------------------------------------- filters shared by several queries

def document_filters(p: Params) -> list[ColumnElement[bool]]:
    """The DocumentEntry conditions of the FindDocuments family (ITI TF-2a Table 3.18.4.1.2.3.7.1-1):
    codes (EXISTS per AND group), time ranges, authorPerson LIKE, objectType (default: stable only)."""
    where: list[ColumnElement[bool]] = [OBJ.c.kind == DOCUMENT_ENTRY]
    statuses = p.many("$XDSDocumentEntryStatus")
    if statuses:
        where.append(_in(OBJ.c.status, statuses))
    for name, scheme in DE_CODE_PARAMS.items():
        if groups := p.codes(name):
            where += has_codes(scheme, groups)
    for name, column in DE_TIME_PARAMS.items():
        col = OBJ.c[column]
        if (lo := p.one(f"{name}From")) is not None:
            where.append(time_from(col, lo))
        if (hi := p.one(f"{name}To")) is not None:
            where.append(time_to(col, hi))
    authors = p.many("$XDSDocumentEntryAuthorPerson")
    if authors:
        where.append(has_slot([AUTHOR_PERSON], authors, like=True))
    where.append(_in(OBJ.c.object_type, p.many("$XDSDocumentEntryType") or [ebrim.DE_OBJECT_TYPE_STABLE]))
    return where


def content_filters(p: Params) -> list[ColumnElement[bool]]:
    """formatCode, confidentialityCode and objectType of the Get...AndContents queries and GetAll."""
    where: list[ColumnElement[bool]] = []
    for name in ("$XDSDocumentEntryFormatCode", "$XDSDocumentEntryConfidentialityCode"):
        if groups := p.codes(name):
            where += has_codes(DE_CODE_PARAMS[name], groups)
    where.append(_in(OBJ.c.object_type, p.many("$XDSDocumentEntryType") or [ebrim.DE_OBJECT_TYPE_STABLE]))
    return where


def folder_filters(p: Params) -> list[ColumnElement[bool]]:
    """FindFolders conditions (ITI TF-2a Table 3.18.4.1.2.3.7.3-1)."""
    where: list[ColumnElement[bool]] = [OBJ.c.kind == FOLDER, _in(OBJ.c.status, p.many("$XDSFolderStatus") or [])]
    if (lo := p.one("$XDSFolderLastUpdateTimeFrom")) is not None:
        where.append(time_from(OBJ.c.last_update_time, lo))
    if (hi := p.one("$XDSFolderLastUpdateTimeTo")) is not None:
        where.append(time_to(OBJ.c.last_update_time, hi))
    if groups := p.codes("$XDSFolderCodeList"):
        where += has_codes(ebrim.FOLDER_CODE_LIST, groups)
    return where


# ---------------------------------------------------------------- the queries

def find_documents(r: Run) -> Result:
    """FindDocuments (3.18.4.1.2.3.7.1): the patient's DocumentEntries matching every given filter."""
    pid = r.params.one("$XDSDocumentEntryPatientId") or ""
    return Result(objects=r.find([OBJ.c.patient_id == pid, *document_filters(r.params)]))


def find_documents_by_reference_id(r: Run) -> Result:
    """FindDocumentsByReferenceId (3.18.4.1.2.3.7.14): FindDocuments plus referenceIdList (AND of ORs)."""
    pid = r.params.one("$XDSDocumentEntryPatientId") or ""
    where = [OBJ.c.patient_id == pid, *document_filters(r.params)]
    for group in r.params.and_groups("$XDSDocumentEntryReferenceIdList") or []:
        where.append(has_slot(REFERENCE_ID_SLOTS, group))
    return Result(objects=r.find(where))


def find_documents_multi(r: Run) -> Result:
    """FindDocumentsForMultiplePatients (ITI-51, ITI TF-2b 3.51.4.1.2.3.7.1): patients optional."""
    pids = r.params.many("$XDSDocumentEntryPatientId")
    where = document_filters(r.params) + ([_in(OBJ.c.patient_id, pids)] if pids else [])
    return Result(objects=r.find(where))


def find_submission_sets(r: Run) -> Result:
    """FindSubmissionSets (3.18.4.1.2.3.7.2)."""
    p = r.params
    where: list[ColumnElement[bool]] = [
        OBJ.c.patient_id == (p.one("$XDSSubmissionSetPatientId") or ""), OBJ.c.kind == SUBMISSION_SET,
        _in(OBJ.c.status, p.many("$XDSSubmissionSetStatus") or [])]
    if sources := p.many("$XDSSubmissionSetSourceId"):
        where.append(_in(OBJ.c.source_id, sources))
    if (lo := p.one("$XDSSubmissionSetSubmissionTimeFrom")) is not None:
        where.append(time_from(OBJ.c.submission_time, lo))
    if (hi := p.one("$XDSSubmissionSetSubmissionTimeTo")) is not None:
        where.append(time_to(OBJ.c.submission_time, hi))
    if (author := p.one("$XDSSubmissionSetAuthorPerson")) is not None:
        where.append(has_slot([AUTHOR_PERSON], [author], like=True))
    if groups := p.codes("$XDSSubmissionSetContentType"):
        where += has_codes(ebrim.SS_CONTENT_TYPE_CODE, groups)
    return Result(objects=r.find(where))


def find_folders(r: Run) -> Result:
    """FindFolders (3.18.4.1.2.3.7.3)."""
    pid = r.params.one("$XDSFolderPatientId") or ""
    return Result(objects=r.find([OBJ.c.patient_id == pid, *folder_filters(r.params)]))


def find_folders_multi(r: Run) -> Result:
    """FindFoldersForMultiplePatients (ITI-51, ITI TF-2b 3.51.4.1.2.3.7.2)."""
    pids = r.params.many("$XDSFolderPatientId")
    return Result(objects=r.find(folder_filters(r.params) + ([_in(OBJ.c.patient_id, pids)] if pids else [])))


def get_all(r: Run) -> Result:
    """GetAll (3.18.4.1.2.3.7.4): the patient's SubmissionSets, DocumentEntries, Folders (by status) and the
    Associations between them."""
    p = r.params
    pid = p.one("$patientId") or ""
    docs = r.find([OBJ.c.patient_id == pid, OBJ.c.kind == DOCUMENT_ENTRY,
                   _in(OBJ.c.status, p.many("$XDSDocumentEntryStatus") or []), *content_filters(p)])
    sets = r.find([OBJ.c.patient_id == pid, OBJ.c.kind == SUBMISSION_SET,
                   _in(OBJ.c.status, p.many("$XDSSubmissionSetStatus") or [])])
    folders = r.find([OBJ.c.patient_id == pid, OBJ.c.kind == FOLDER,
                      _in(OBJ.c.status, p.many("$XDSFolderStatus") or [])])
    objects = sorted(docs + sets + folders, key=lambda row: row.id)
    return Result(objects=objects, associations=r.among(objects))


def get_documents(r: Run) -> Result:
    """GetDocuments (3.18.4.1.2.3.7.5): DocumentEntries by entryUUID or uniqueId, any status."""
    return Result(objects=r.documents())


def get_documents_and_associations(r: Run) -> Result:
    """GetDocumentsAndAssociations (3.18.4.1.2.3.7.8): the documents and every association naming one."""
    docs = r.documents()
    ids = [d.entry_uuid for d in docs]
    return Result(objects=docs, associations=r.associations(sources=ids, targets=ids))


def get_folders(r: Run) -> Result:
    """GetFolders (3.18.4.1.2.3.7.6): Folders by entryUUID or uniqueId."""
    return Result(objects=r.refs(FOLDER, "$XDSFolderEntryUUID", "$XDSFolderUniqueId"))


def get_associations(r: Run) -> Result:
    """GetAssociations (3.18.4.1.2.3.7.7): associations whose source or target is one of $uuid."""
    ids = r.params.many("$uuid") or []
    return Result(associations=r.associations(sources=ids, targets=ids))


def get_submission_sets(r: Run) -> Result:
    """GetSubmissionSets (3.18.4.1.2.3.7.9): the SubmissionSets holding the objects of $uuid (HasMember)
    and those HasMember associations."""
    links = r.associations(targets=r.params.many("$uuid") or [], types=[ebrim.ASSOC_HAS_MEMBER])
    sets = r.objects(SUBMISSION_SET, OBJ.c.entry_uuid, {a.source_uuid for a in links})
    set_ids = {s.entry_uuid for s in sets}
    return Result(objects=sets, associations=[a for a in links if a.source_uuid in set_ids])


def get_submission_set_and_contents(r: Run) -> Result:
    """GetSubmissionSetAndContents (3.18.4.1.2.3.7.10): the SubmissionSet, its DocumentEntries (filtered by
    formatCode, confidentialityCode, objectType) and Folders, and the associations among them that it holds;
    associations naming a filtered-out DocumentEntry are left out."""
    sets = r.refs(SUBMISSION_SET, "$XDSSubmissionSetEntryUUID", "$XDSSubmissionSetUniqueId")
    if not sets:
        return Result()
    ss = sets[0]
    links = r.associations(sources=[ss.entry_uuid], types=[ebrim.ASSOC_HAS_MEMBER])
    targets = {a.target_uuid for a in links}
    all_docs = {d.entry_uuid for d in r.objects(DOCUMENT_ENTRY, OBJ.c.entry_uuid, targets)}
    docs = r.objects(DOCUMENT_ENTRY, OBJ.c.entry_uuid, all_docs, content_filters(r.params))
    folders = r.objects(FOLDER, OBJ.c.entry_uuid, targets)
    excluded = all_docs - {d.entry_uuid for d in docs}
    members = [a for a in r.associations(ids=targets)
               if a.source_uuid not in excluded and a.target_uuid not in excluded]
    kept = {o.entry_uuid for o in docs + folders} | {a.entry_uuid for a in members}
    assocs = sorted([a for a in links if a.target_uuid in kept] + members, key=lambda a: a.id)
    return Result(objects=sorted([ss, *docs, *folders], key=lambda o: o.id), associations=assocs)


def get_folder_and_contents(r: Run) -> Result:
    """GetFolderAndContents (3.18.4.1.2.3.7.11): the Folder, its DocumentEntries (filtered) and the
    HasMember associations between them."""
    folders = r.refs(FOLDER, "$XDSFolderEntryUUID", "$XDSFolderUniqueId")
    if not folders:
        return Result()
    links = r.associations(sources=[folders[0].entry_uuid], types=[ebrim.ASSOC_HAS_MEMBER])
    docs = r.objects(DOCUMENT_ENTRY, OBJ.c.entry_uuid, {a.target_uuid for a in links}, content_filters(r.params))
    ids = {d.entry_uuid for d in docs}
    return Result(objects=[folders[0], *docs], associations=[a for a in links if a.target_uuid in ids])


def get_folders_for_document(r: Run) -> Result:
    """GetFoldersForDocument (3.18.4.1.2.3.7.12): the Folders holding the DocumentEntry."""
    docs = r.documents()
    links = r.associations(targets=[d.entry_uuid for d in docs], types=[ebrim.ASSOC_HAS_MEMBER])
    return Result(objects=r.objects(FOLDER, OBJ.c.entry_uuid, {a.source_uuid for a in links}))


def get_related_documents(r: Run) -> Result:
    """GetRelatedDocuments (3.18.4.1.2.3.7.13): the DocumentEntry, the DocumentEntries related to it by an
    association of $AssociationTypes (either direction) and those associations; empty if none is related."""
    docs = r.documents()
    if not docs:
        return Result()
    doc = docs[0].entry_uuid
    types = r.params.many("$AssociationTypes") or []
    links = r.associations(sources=[doc], targets=[doc], types=types)
    others = {a.target_uuid if a.source_uuid == doc else a.source_uuid for a in links}
    type_filter = [_in(OBJ.c.object_type, r.params.many("$XDSDocumentEntryType") or [ebrim.DE_OBJECT_TYPE_STABLE])]
    related = r.objects(DOCUMENT_ENTRY, OBJ.c.entry_uuid, others - {doc}, type_filter)
    if not related:
        return Result()
    ids = {doc} | {d.entry_uuid for d in related}
    return Result(objects=sorted([docs[0], *related], key=lambda o: o.id),
                  associations=[a for a in links if a.source_uuid in ids and a.target_uuid in ids])


# ---------------------------------------------------------------- the query table


@dataclass(frozen=True, kw_only=True)
class StoredQuery:
    """One stored query: its parameters, the parameter groups of which exactly one is needed, whether its
    result must be of one patient (XDSResultNotSinglePatient), and the function that runs it."""

    name: str
    params: Mapping[str, Param]
    run: Callable[[Run], Result]
    alternatives: tuple[tuple[str, ...], ...] = ()
    single_patient: bool = False


_PATIENT = _p(required=True)
_FIND_DOCS = {"$XDSDocumentEntryPatientId": _PATIENT, **DOCUMENT_FILTERS}
_FOLDER_FILTERS = {"$XDSFolderLastUpdateTimeFrom": _TIME, "$XDSFolderLastUpdateTimeTo": _TIME,
                   "$XDSFolderCodeList": _CODE_ANDOR, "$XDSFolderStatus": _STATUS}
_SS_REF = {"$XDSSubmissionSetEntryUUID": _p(), "$XDSSubmissionSetUniqueId": _p(), "$homeCommunityId": _HOME}
_FOLDER_REF_ONE = {"$XDSFolderEntryUUID": _p(), "$XDSFolderUniqueId": _p(), "$homeCommunityId": _HOME}

QUERIES: tuple[StoredQuery, ...] = (
    StoredQuery(name="FindDocuments", params=_FIND_DOCS, run=find_documents),
    StoredQuery(name="FindSubmissionSets", run=find_submission_sets, params={
        "$XDSSubmissionSetPatientId": _PATIENT, "$XDSSubmissionSetSourceId": _p(multi=True),
        "$XDSSubmissionSetSubmissionTimeFrom": _TIME, "$XDSSubmissionSetSubmissionTimeTo": _TIME,
        "$XDSSubmissionSetAuthorPerson": _p(), "$XDSSubmissionSetContentType": _CODE_M,
        "$XDSSubmissionSetStatus": _STATUS}),
    StoredQuery(name="FindFolders", run=find_folders, params={"$XDSFolderPatientId": _PATIENT, **_FOLDER_FILTERS}),
    StoredQuery(name="GetAll", run=get_all, params={
        "$patientId": _PATIENT, "$XDSDocumentEntryStatus": _STATUS, "$XDSSubmissionSetStatus": _STATUS,
        "$XDSFolderStatus": _STATUS, **CONTENT_FILTERS}),
    StoredQuery(name="GetDocuments", params=DOC_REF, alternatives=DOC_ALTERNATIVES, single_patient=True,
                run=get_documents),
    StoredQuery(name="GetFolders", run=get_folders, single_patient=True,
                params={"$XDSFolderEntryUUID": _UUIDS, "$XDSFolderUniqueId": _UUIDS, "$homeCommunityId": _HOME},
                alternatives=(("$XDSFolderEntryUUID", "$XDSFolderUniqueId"),)),
    StoredQuery(name="GetAssociations", run=get_associations,
                params={"$uuid": _p(required=True, multi=True), "$homeCommunityId": _HOME}),
    StoredQuery(name="GetDocumentsAndAssociations", params=DOC_REF, alternatives=DOC_ALTERNATIVES,
                single_patient=True, run=get_documents_and_associations),
    StoredQuery(name="GetSubmissionSets", run=get_submission_sets, single_patient=True,
                params={"$uuid": _p(required=True, multi=True), "$homeCommunityId": _HOME}),
    StoredQuery(name="GetSubmissionSetAndContents", run=get_submission_set_and_contents, single_patient=True,
                params={**_SS_REF, **CONTENT_FILTERS},
                alternatives=(("$XDSSubmissionSetEntryUUID", "$XDSSubmissionSetUniqueId"),)),
    StoredQuery(name="GetFolderAndContents", run=get_folder_and_contents, single_patient=True,
                params={**_FOLDER_REF_ONE, **CONTENT_FILTERS},
                alternatives=(("$XDSFolderEntryUUID", "$XDSFolderUniqueId"),)),
    StoredQuery(name="GetFoldersForDocument", params=DOC_REF_ONE, alternatives=DOC_ALTERNATIVES,
                single_patient=True, run=get_folders_for_document),
    StoredQuery(name="GetRelatedDocuments", alternatives=DOC_ALTERNATIVES, single_patient=True,
                run=get_related_documents,
                params={**DOC_REF_ONE, "$AssociationTypes": _p(required=True, multi=True),
                        "$XDSDocumentEntryType": _TYPE}),
    StoredQuery(name="FindDocumentsByReferenceId", run=find_documents_by_reference_id, params={
        **_FIND_DOCS, "$XDSDocumentEntryReferenceIdList": _p(required=True, multi=True, and_or=True)}),
    StoredQuery(name="FindDocumentsForMultiplePatients", run=find_documents_multi,
                params={**_FIND_DOCS, "$XDSDocumentEntryPatientId": _p(multi=True)}),
    StoredQuery(name="FindFoldersForMultiplePatients", run=find_folders_multi,
                params={"$XDSFolderPatientId": _p(multi=True), **_FOLDER_FILTERS}),
)
QUERIES_BY_ID: dict[str, StoredQuery] = {QUERY_IDS[q.name]: q for q in QUERIES}
# ITI-51: at least one of these is required (ITI TF-2b 3.51.4.1.2.3.7.1)
MULTI_PATIENT_REQUIRED = ("$XDSDocumentEntryClassCode", "$XDSDocumentEntryEventCodeList",
                          "$XDSDocumentEntryHealthcareFacilityTypeCode")


# ---------------------------------------------------------------- the service


class StoredQueries:
    """The ITI-18 Registry Stored Query service of the Document Registry on ``engine``.

    ``max_results``: more matching objects than this -> XDSTooManyResults.  ``home_community_id``: the
    registry's community (``urn:oid:...``); when set, a query naming another one gets XDSUnknownCommunity,
    and returned objects carry it as their ``home`` attribute (as XCA responding gateways need).
    """

    QUERY_IDS = QUERY_IDS

    def __init__(self, engine: Engine, *, max_results: int = 1000, home_community_id: str | None = None) -> None:
        self.engine = engine
        self.max_results = max_results
        self.home_community_id = home_community_id

    def run(self, request: etree._Element) -> etree._Element:
        """Answer one ``query:AdhocQueryRequest`` with a ``query:AdhocQueryResponse`` (errors inside it)."""
        try:
            query, leaf = self._read_request(request)
            result = self.execute(query, leaf=leaf)
        except XdsFailure as exc:
            return self.response(Result(), leaf=False, errors=exc.errors, request=request)
        except SQLAlchemyError as exc:
            log.exception("stored query failed in the database")
            return self.response(Result(), leaf=False, request=request, errors=[
                XdsError(REGISTRY_ERROR, f"registry database error: {type(exc).__name__}")])
        return self.response(result, leaf=leaf, request=request)

    def execute(self, query: etree._Element, *, leaf: bool) -> Result:
        """Run the stored query ``query`` (a ``rim:AdhocQuery``); raises :class:`XdsFailure`."""
        query_id = query.get("id") or ""
        sq = QUERIES_BY_ID.get(query_id)
        if sq is None:
            raise XdsFailure(XdsError(UNKNOWN_STORED_QUERY, f"unknown stored query id {query_id!r}",
                                      location=query_id))
        params = read_params(query, sq.params, sq.alternatives)
        if sq.name == "FindDocumentsForMultiplePatients" and not any(n in params for n in MULTI_PATIENT_REQUIRED):
            raise XdsFailure(XdsError(MISSING_PARAM,
                                      f"one of {', '.join(MULTI_PATIENT_REQUIRED)} is required",
                                      location=MULTI_PATIENT_REQUIRED[0]))
        self._check_community(params.one("$homeCommunityId") if "$homeCommunityId" in sq.params else None)
        self._check_community(query.get("home"))
        with self.engine.connect() as conn:
            if conn.dialect.name != "sqlite":
                # reads only: no BEGIN / ROLLBACK round trips (READ COMMITTED gives each statement its own
                # snapshot anyway); SQLite keeps its transaction, a snapshot for the Get queries' statements
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            result = sq.run(Run(conn=conn, params=params, leaf=leaf, max_results=self.max_results))
        if len(result) > self.max_results:
            raise too_many(self.max_results)
        if sq.single_patient:
            patients = sorted({o.patient_id for o in result.objects if o.patient_id})
            if len(patients) > 1:
                raise XdsFailure(XdsError(RESULT_NOT_SINGLE_PATIENT,
                                          f"{sq.name}: the objects belong to {len(patients)} patients"))
        return result

    def _check_community(self, home: str | None) -> None:
        if home and self.home_community_id and home != self.home_community_id:
            raise XdsFailure(XdsError(UNKNOWN_COMMUNITY, f"homeCommunityId {home!r} is not this registry's "
                                      f"({self.home_community_id})", location="$homeCommunityId"))

    @staticmethod
    def _read_request(request: etree._Element) -> tuple[etree._Element, bool]:
        if request.tag != f"{QUERY}AdhocQueryRequest":
            raise XdsFailure(XdsError(REGISTRY_ERROR, f"expected query:AdhocQueryRequest, got {request.tag}"))
        query = request.find(f"{RIM}AdhocQuery")
        if query is None:
            raise XdsFailure(XdsError(REGISTRY_ERROR, "AdhocQueryRequest without rim:AdhocQuery"))
        option = request.find(f"{QUERY}ResponseOption")
        return_type = option.get("returnType", OBJECT_REF) if option is not None else OBJECT_REF
        if return_type not in (LEAF_CLASS, OBJECT_REF, "LeafClassWithRepositoryItem"):
            raise XdsFailure(XdsError(REGISTRY_ERROR, f"returnType {return_type!r} is not LeafClass or ObjectRef",
                                      location="returnType"))
        return query, return_type != OBJECT_REF

    def response(self, result: Result, *, leaf: bool, errors: Sequence[XdsError] = (),
                 request: etree._Element | None = None) -> etree._Element:
        """The ``query:AdhocQueryResponse`` of ``result`` (or of ``errors``: status Failure, empty list)."""
        root = etree.Element(f"{QUERY}AdhocQueryResponse",
                             nsmap={"query": NS["query"], "rim": NS["rim"], "rs": NS["rs"]})
        root.set("status", FAILURE if errors else SUCCESS)
        if request is not None and request.get("id"):
            root.set("requestId", request.get("id") or "")
        if errors:
            root.append(error_list(errors))
        objects = etree.SubElement(root, f"{RIM}RegistryObjectList")
        rows = sorted(result.objects, key=lambda o: o.id)
        for row in rows:
            objects.append(self._leaf(row) if leaf else self._ref(row.entry_uuid, row.home_community_id))
        for assoc in result.associations:
            objects.append(self._leaf(assoc, association=True) if leaf else self._ref(assoc.entry_uuid, None))
        return root

    def _ref(self, entry_uuid: str, home: str | None) -> etree._Element:
        ref = etree.Element(f"{RIM}ObjectRef", id=entry_uuid)
        if home or self.home_community_id:
            ref.set("home", home or self.home_community_id or "")
        return ref

    def _leaf(self, row: Row[Any], *, association: bool = False) -> etree._Element:
        """The registered element with its current availabilityStatus (RPLC deprecates, ITI TF-3 4.1.4)."""
        element = ebrim.parse_xml(row.xml.encode("utf-8"))
        element.set("status", row.status)
        if association:
            return element
        home = row.home_community_id or self.home_community_id
        if home and not element.get("home"):
            element.set("home", home)
        node = {SUBMISSION_SET: ebrim.SS_CLASSIFICATION_NODE, FOLDER: ebrim.FOLDER_CLASSIFICATION_NODE}.get(row.kind)
        if node and not any(c.get("classificationNode") == node for c in element.iterchildren(f"{RIM}Classification")):
            _add_package_classification(element, node)
        return element


def _add_package_classification(package: etree._Element, node: str) -> None:
    """Nest the SubmissionSet / Folder classification (ITI TF-3 4.2.1.3) in a RegistryPackage registered
    with it at the top level, so that a LeafClass answer says what the package is."""
    pid = package.get("id") or ""
    cl = etree.Element(f"{RIM}Classification", id=f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, pid + node)}",
                       classificationNode=node, classifiedObject=pid)
    cl.set("objectType", ebrim.OT_CLASSIFICATION)
    # ebRIM RegistryObjectType order: Slot*, Name?, Description?, VersionInfo?, Classification*, ...
    anchors = [c for c in package if isinstance(c.tag, str) and etree.QName(c).localname in
               ("Slot", "Name", "Description", "VersionInfo", "Classification")]
    if anchors:
        anchors[-1].addnext(cl)
    else:
        package.insert(0, cl)
