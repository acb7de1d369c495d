"""XDS.b Document Registry: ITI-42 Register Document Set-b (ITI TF-2b 3.42).

:meth:`XdsRegistry.register` takes the ``lcm:SubmitObjectsRequest`` and registers its SubmissionSet,
DocumentEntries, Folders and Associations, all or nothing, in one database transaction
(ITI TF-2b 3.42.4.1.3: a submission is accepted or rejected as a whole).

What the registry does to a submission before storing it:

* symbolic ids (any id that is not a ``urn:uuid:``, e.g. ``Document01``) are replaced by fresh UUIDs,
  consistently in every reference (classifiedObject, registryObject, sourceObject, targetObject, lid);
  nested Classifications and ExternalIdentifiers without an id get one (ITI TF-3 4.2.3.1.3,
  ebRIM 3.0 ``IdentifiableType``: the registry generates a UUID URN);
* ``status`` = Approved on every new object (ITI TF-3 4.1.4), ``lid`` = id (first version),
  ``lastUpdateTime`` on Folders (ITI TF-3 4.2.3.4.3), top-level Classifications (e.g. the one that
  makes a RegistryPackage a SubmissionSet) nested into the object they classify, ``objectType`` of
  packages, associations, classifications and external identifiers when left out;
* RPLC / XFRM_RPLC: the replaced DocumentEntry becomes Deprecated and the replacement is added to every
  Folder the original was a member of (ITI TF-3 4.2.2.2.1, ITI TF-2b 3.42.4.1.3.5).

Checks and their errors (ITI TF-3 Table 4.2.4.1-2):

* required attributes (ITI TF-3 Tables 4.2.3.2-1 / 4.2.3.3-1 / 4.2.3.4-1, IHE.md), formats (DTM,
  CX, SHA-1), value sets per coding scheme -> ``XDSRegistryMetadataError`` naming object and attribute;
* patient of a DocumentEntry / Folder / referenced entry differs from the SubmissionSet's ->
  ``XDSPatientIdDoesNotMatch``; patient unknown to the affinity domain -> ``XDSUnknownPatientId``;
* the same uniqueId twice in the message (DocumentEntries, or Folders and SubmissionSets) or a
  SubmissionSet / Folder uniqueId already registered -> ``XDSRegistryDuplicateUniqueIdInMessage``;
* a DocumentEntry uniqueId already registered: the Table defines ``XDSNonIdenticalHash`` / ``...Size``
  as "document being registered was a duplicate (uniqueId already in Document Registry) but hash/size
  does not match" -- so a resubmission with the same hash and size is accepted and registered as
  another DocumentEntry of the same document, a different hash or size is refused;
* an association to an object that is neither in the submission nor in the registry ->
  ``UnresolvedReferenceException`` (ebRS 3.0, listed in the Table); replacing / appending /
  transforming a DocumentEntry that is not Approved -> ``XDSRegistryMetadataError`` (the older
  ``XDSReplaceFailed`` is deprecated, ITI TF-2b 3.42.4.1.3.5);
* metadata-limited objects (limitedMetadata classification) -> ``XDSRegistryMetadataError``;
* the patient lookup or the database failing -> ``XDSRegistryError`` (nothing registered).

Concurrent submissions: on PostgreSQL the registered objects an association refers to are read
``FOR UPDATE``; on SQLite one submission is checked and written at a time (per registry instance).
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from lxml import etree
from sqlalchemy import Engine, Row, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from ihehub.bus.db import is_sqlite
from ihehub.xds import ebrim as e
from ihehub.xds import tables as t
from ihehub.xds.errors import (
    DUPLICATE_UNIQUE_ID,
    FAILURE,
    NON_IDENTICAL_HASH,
    NON_IDENTICAL_SIZE,
    PATIENT_ID_DOES_NOT_MATCH,
    REGISTRY_ERROR,
    REGISTRY_METADATA_ERROR,
    SUCCESS,
    UNKNOWN_PATIENT_ID,
    UNRESOLVED_REFERENCE,
    XdsError,
    XdsFailure,
    registry_response,
)

log = logging.getLogger(__name__)

__all__ = ["RegistryResult", "XdsRegistry"]

DE, SS, FOLDER = "DocumentEntry", "SubmissionSet", "Folder"

_UUID_RE = re.compile(r"^urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DTM_RE = re.compile(r"^\d{4}(?:\d{2}){0,5}$")  # ITI TF-3 Table 4.2.3.1.7-2 DTM: YYYY[MM[DD[hh[mm[ss]]]]] UTC
_CX_RE = re.compile(r"^[^\^&]+\^\^\^&[0-2](?:\.(?:0|[1-9][0-9]*))+&ISO$")  # ITI TF-3 4.2.3.1.7 CX
_SHA1_RE = re.compile(r"^[0-9a-fA-F]{40}$")  # ITI TF-3 4.2.3.2.11 hash (SHA-1, hex)
_MAX_UNIQUE_ID = 256
_MAX_TEXT = 256

# required slots / code schemes / external identifiers (ITI TF-3 4.2.3, IHE.md "XDS.b")
_DE_SLOTS = ("creationTime", "languageCode", "sourcePatientId")
_DE_STABLE_SLOTS = ("hash", "size", "repositoryUniqueId")
_DE_SINGLE_SLOTS = ("creationTime", "languageCode", "sourcePatientId", "serviceStartTime", "serviceStopTime",
                    "hash", "size", "repositoryUniqueId", "legalAuthenticator")
_DE_CODES_ONE = (e.DE_CLASS_CODE, e.DE_FORMAT_CODE, e.DE_HEALTHCARE_FACILITY_TYPE_CODE, e.DE_PRACTICE_SETTING_CODE,
                 e.DE_TYPE_CODE)
_DE_CODES_MANY = (e.DE_CONFIDENTIALITY_CODE,)
_DTM_SLOTS = ("creationTime", "serviceStartTime", "serviceStopTime", "submissionTime", "lastUpdateTime")
# searchable multi-valued slots kept in xds_slots (authorPerson comes from the author classifications)
_SEARCH_SLOTS = ("sourcePatientId", "languageCode", "intendedRecipient", "urn:ihe:iti:xds:2013:referenceIdList")
_SLOT_ROW_NAMES = {"urn:ihe:iti:xds:2013:referenceIdList": "referenceIdList"}
_KNOWN_ASSOCIATIONS = frozenset({e.ASSOC_HAS_MEMBER, *e.DOCUMENT_RELATIONSHIPS})
_LIMITED = frozenset({e.DE_LIMITED_METADATA, e.SS_LIMITED_METADATA, e.FOLDER_LIMITED_METADATA})
_REF_ATTRIBUTES = ("classifiedObject", "registryObject", "sourceObject", "targetObject", "lid")


def dtm_now(clock: Callable[[], float]) -> str:
    """The current UTC time as a DTM of 14 digits (ITI TF-3 Table 4.2.3.1.7-2)."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(clock()))


def _new_uuid() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _xml(element: etree._Element) -> str:
    """``element`` serialised on its own with only the namespaces it uses."""
    clone = copy.deepcopy(element)
    clone.tail = None
    etree.cleanup_namespaces(clone)
    return etree.tostring(clone, encoding="unicode")


@dataclass
class RegistryResult:
    """Outcome of one ITI-42 submission."""

    status: str
    errors: list[XdsError] = field(default_factory=list)
    submission_set_uuid: str | None = None
    patient_id: str | None = None
    document_unique_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS

    def to_xml(self) -> etree._Element:
        """The ``rs:RegistryResponse`` of ITI TF-2b 3.42.4.2."""
        return registry_response(self.errors, status=self.status)

    @classmethod
    def failure(cls, errors: list[XdsError]) -> RegistryResult:
        return cls(status=FAILURE, errors=errors)


@dataclass
class _Plan:
    """A submission after id assignment: what to check against the registry and what to write."""

    sub: e.Submission
    names: dict[str, str]  # uuid -> id as submitted (for error messages)
    kinds: dict[str, str]  # uuid -> DocumentEntry | SubmissionSet | Folder | Association (in the submission)
    patients: dict[str, str | None]  # uuid -> patientId of the DE / Folder / SS in the submission
    errors: list[XdsError] = field(default_factory=list)

    def name(self, uid: str) -> str:
        original = self.names.get(uid, uid)
        return original if original == uid else f"{original} ({uid})"

    def fail(self, code: str, context: str, location: str = "") -> None:
        self.errors.append(XdsError(code, context, location=location))


class XdsRegistry:
    """The Document Registry actor's ITI-42 side (storage in the ``xds_*`` tables).

    ``patient_known(cx)``: whether the affinity domain knows the patient (the EMPI); None accepts all.
    ``value_sets``: classification scheme (UUID or attribute name, e.g. ``"classCode"``) ->
    allowed ``(code, codingScheme)``; schemes not listed are not checked.
    """

    def __init__(self, engine: Engine, *, patient_known: Callable[[str], bool] | None = None,
                 value_sets: Mapping[str, Iterable[tuple[str, str]]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.patient_known = patient_known
        by_name = {name: scheme for scheme, name in e.CODE_SCHEMES.items()}
        self.value_sets: dict[str, frozenset[tuple[str, str]]] = {
            by_name.get(k, k): frozenset((str(c), str(s)) for c, s in v) for k, v in (value_sets or {}).items()}
        self.clock = clock
        # SQLite reads outside the write transaction (pysqlite begins it at the first write): one submission at
        # a time, so that checks and writes see the same registry.  PostgreSQL locks rows (FOR UPDATE) instead.
        self._write_lock: AbstractContextManager[Any] = threading.Lock() if is_sqlite(engine) else nullcontext()

    # -- public API ------------------------------------------------------------------------------------------

    def register(self, request: etree._Element) -> RegistryResult:
        """ITI-42: register the ``lcm:SubmitObjectsRequest`` ``request`` (left unchanged)."""
        try:
            sub = e.parse_submission(request)
        except XdsFailure as exc:
            return RegistryResult.failure(exc.errors)
        return self.register_submission(sub)

    def register_submission(self, sub: e.Submission) -> RegistryResult:
        """Register an already parsed submission (ITI-41 passes it on); ``sub`` is left unchanged."""
        try:
            work = e.parse_submission(copy.deepcopy(sub.request))
            plan = self._prepare(work)
            self._check_patient_known(work.patient_id)
            with self._write_lock, self.engine.begin() as conn:
                self._store(conn, plan)
        except XdsFailure as exc:
            return RegistryResult.failure(exc.errors)
        except SQLAlchemyError as exc:
            log.exception("ITI-42: database error")
            return RegistryResult.failure([XdsError(REGISTRY_ERROR, f"registry database error: {type(exc).__name__}")])
        return RegistryResult(status=SUCCESS, submission_set_uuid=work.submission_set_uuid,
                              patient_id=work.patient_id,
                              document_unique_ids=[d.unique_id for d in work.documents if d.unique_id])

    def _check_patient_known(self, patient_id: str | None) -> None:
        """XDSUnknownPatientId unless the affinity domain (``patient_known``, the EMPI) knows the patient."""
        if self.patient_known is None or not patient_id:
            return
        try:
            known = self.patient_known(patient_id)
        except Exception as exc:  # the identity source failing must not crash the transaction
            log.exception("ITI-42: patient identity lookup failed")
            raise XdsFailure(XdsError(REGISTRY_ERROR, f"patient identity lookup failed: {type(exc).__name__}",
                                      location=patient_id)) from None
        if not known:
            raise XdsFailure(XdsError(UNKNOWN_PATIENT_ID, f"patient {patient_id} is not known in the affinity domain",
                                      location=patient_id))

    def document(self, unique_id: str) -> Row[Any] | None:
        """The DocumentEntry of ``unique_id`` (the Approved one first, then the newest), or None."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(t.objects).where(t.objects.c.kind == DE, t.objects.c.unique_id == unique_id)
                                .order_by(t.objects.c.id.desc())).all()
        for row in rows:
            if row.status == e.APPROVED:
                return row
        return rows[0] if rows else None

    # -- preparation (no database) ---------------------------------------------------------------------------

    def _prepare(self, sub: e.Submission) -> _Plan:
        names = _assign_ids(sub)
        # re-read what the id assignment changed
        for d in sub.documents:
            d.entry_uuid = d.element.get("id") or ""
        sub.submission_set_uuid = sub.submission_set.get("id") or ""
        kinds = {d.entry_uuid: DE for d in sub.documents}
        kinds.update({f.get("id") or "": FOLDER for f in sub.folders})
        kinds[sub.submission_set_uuid] = SS
        kinds.update({a.get("id") or "": "Association" for a in sub.associations})
        patients: dict[str, str | None] = {d.entry_uuid: d.patient_id for d in sub.documents}
        patients.update({f.get("id") or "": e.external_id(f, e.FOLDER_PATIENT_ID) for f in sub.folders})
        patients[sub.submission_set_uuid] = sub.patient_id
        plan = _Plan(sub, names, kinds, patients)
        for c in sub.classifications:  # top-level classifications go into the object they classify
            _nest(c, plan)
        now = dtm_now(self.clock)
        for obj in [sub.submission_set, *sub.folders, *(d.element for d in sub.documents), *sub.associations]:
            obj.set("status", e.APPROVED)
            _set_object_types(obj)
        for obj in [sub.submission_set, *sub.folders, *(d.element for d in sub.documents)]:
            _set_lid(obj, plan)
        for f in sub.folders:
            e.set_slot(f, "lastUpdateTime", [now])
        self._check_submission_set(plan)
        for d in sub.documents:
            self._check_document(plan, d)
        for f in sub.folders:
            self._check_folder(plan, f)
        for obj in [sub.submission_set, *sub.folders, *(d.element for d in sub.documents)]:
            if any(c.get("classificationNode") in _LIMITED for c in obj.iterchildren(f"{e.RIM}Classification")):
                plan.fail(REGISTRY_METADATA_ERROR, f"{plan.kinds.get(obj.get('id') or '', 'object')} "
                                                   f"{plan.name(obj.get('id') or '')}: limited metadata is not "
                                                   f"accepted by an XDS registry (limitedMetadata, ITI TF-3 4.2.5)")
        _check_unique_ids_in_message(plan)
        _check_associations_in_message(plan)
        if plan.errors:
            raise XdsFailure(plan.errors)
        return plan

    def _check_codes(self, plan: _Plan, obj: etree._Element, what: str) -> None:
        """Coded classifications: a code and one codingScheme (ITI TF-3 4.2.3.1.2); value sets when configured."""
        for cl in obj.iterchildren(f"{e.RIM}Classification"):
            scheme = cl.get("classificationScheme") or ""
            if scheme not in e.CODE_SCHEMES:
                continue
            attr, code = e.CODE_SCHEMES[scheme], cl.get("nodeRepresentation") or ""
            coding = e.slot_values(cl, "codingScheme")
            if not code.strip() or len(code) > _MAX_TEXT:
                plan.fail(REGISTRY_METADATA_ERROR, f"{what}: {attr} without a valid nodeRepresentation (code)", attr)
            elif len(coding) != 1 or not coding[0].strip() or len(coding[0]) > _MAX_TEXT:
                plan.fail(REGISTRY_METADATA_ERROR, f"{what}: {attr} {code} needs exactly one codingScheme value", attr)
            elif (allowed := self.value_sets.get(scheme)) is not None and (code, coding[0]) not in allowed:
                plan.fail(REGISTRY_METADATA_ERROR,
                          f"{what}: {attr} {code} (codingScheme {coding[0]}) is not in the configured value set", code)

    def _check_submission_set(self, plan: _Plan) -> None:
        """SubmissionSet attributes (ITI TF-3 Table 4.2.3.3-1)."""
        ss = plan.sub.submission_set
        what = f"SubmissionSet {plan.name(plan.sub.submission_set_uuid)}"
        _check_slots(plan, ss, what, required=("submissionTime",), single=("submissionTime",))
        _check_ids(plan, ss, what, {e.SS_UNIQUE_ID: "uniqueId", e.SS_SOURCE_ID: "sourceId",
                                    e.SS_PATIENT_ID: "patientId"})
        _check_code_count(plan, ss, what, e.SS_CONTENT_TYPE_CODE, exactly_one=True)
        self._check_codes(plan, ss, what)

    def _check_document(self, plan: _Plan, d: e.DocumentEntry) -> None:
        """DocumentEntry attributes (ITI TF-3 Table 4.2.3.2-1, IHE.md)."""
        what = f"DocumentEntry {plan.name(d.entry_uuid)}"
        el = d.element
        if d.object_type not in (e.DE_OBJECT_TYPE_STABLE, e.DE_OBJECT_TYPE_ON_DEMAND):
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: objectType {d.object_type!r} is neither the stable "
                                               f"({e.DE_OBJECT_TYPE_STABLE}) nor the on-demand type")
        if not d.mime_type or len(d.mime_type) > 128:
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: missing attribute mimeType")
        required = _DE_SLOTS + (_DE_STABLE_SLOTS if d.object_type != e.DE_OBJECT_TYPE_ON_DEMAND else ())
        _check_slots(plan, el, what, required=required, single=_DE_SINGLE_SLOTS)
        if d.hash is not None and not _SHA1_RE.match(d.hash):
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: hash {d.hash!r} is not a SHA-1 in hexadecimal")
        if d.size is not None and d.size < 0:
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: size {d.size} is negative")
        if d.repository_unique_id is not None and not 0 < len(d.repository_unique_id) <= _MAX_TEXT:
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: invalid repositoryUniqueId")
        if d.home_community_id is not None and len(d.home_community_id) > _MAX_TEXT:
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: home attribute too long")
        _check_ids(plan, el, what, {e.DE_UNIQUE_ID: "uniqueId", e.DE_PATIENT_ID: "patientId"})
        for scheme in _DE_CODES_ONE:
            _check_code_count(plan, el, what, scheme, exactly_one=True)
        for scheme in _DE_CODES_MANY:
            _check_code_count(plan, el, what, scheme, exactly_one=False)
        self._check_codes(plan, el, what)
        _check_patient(plan, d.entry_uuid, what)

    def _check_folder(self, plan: _Plan, folder: etree._Element) -> None:
        """Folder attributes (ITI TF-3 Table 4.2.3.4-1)."""
        fid = folder.get("id") or ""
        what = f"Folder {plan.name(fid)}"
        _check_ids(plan, folder, what, {e.FOLDER_UNIQUE_ID: "uniqueId", e.FOLDER_PATIENT_ID: "patientId"})
        self._check_codes(plan, folder, what)
        _check_patient(plan, fid, what)

    # -- registry checks and storage (one transaction) -------------------------------------------------------

    def _store(self, conn: Connection, plan: _Plan) -> None:
        sub = plan.sub
        new_uuids = list(plan.kinds)
        taken = set(conn.scalars(select(t.objects.c.entry_uuid).where(t.objects.c.entry_uuid.in_(new_uuids))))
        taken |= set(conn.scalars(select(t.associations.c.entry_uuid)
                                  .where(t.associations.c.entry_uuid.in_(new_uuids))))
        for uid in sorted(taken):
            plan.fail(REGISTRY_METADATA_ERROR, f"{plan.kinds[uid]} {plan.name(uid)}: entryUUID is already registered",
                      uid)
        self._check_registered_unique_ids(conn, plan)
        referenced = {a.get(attr) or "" for a in sub.associations for attr in ("sourceObject", "targetObject")}
        # FOR UPDATE (PostgreSQL): a concurrent submission replacing the same entry waits and then sees it
        # Deprecated, so an original is replaced once; SQLite serialises writers anyway
        existing = {r.entry_uuid: r for r in conn.execute(
            select(t.objects).where(t.objects.c.entry_uuid.in_(sorted(referenced - set(plan.kinds))))
            .order_by(t.objects.c.id).with_for_update())}
        deprecate, touched_folders, carry = _check_associations_in_registry(plan, existing)
        if plan.errors:
            raise XdsFailure(plan.errors)
        now = self.clock()
        dtm = dtm_now(self.clock)
        # folder membership of replaced entries carries over (ITI TF-2b 3.42.4.1.3.5)
        extra: list[etree._Element] = []
        if carry:
            for row in conn.execute(select(t.associations).where(
                    t.associations.c.type == e.ASSOC_HAS_MEMBER, t.associations.c.target_uuid.in_(list(carry)),
                    t.associations.c.status == e.APPROVED)):
                folder = conn.execute(select(t.objects.c.kind, t.objects.c.status)
                                      .where(t.objects.c.entry_uuid == row.source_uuid)).first()
                if folder is None or folder.kind != FOLDER or folder.status != e.APPROVED:
                    continue
                for replacement in carry[row.target_uuid]:
                    extra.append(_association(e.ASSOC_HAS_MEMBER, row.source_uuid, replacement))
                    touched_folders.add(row.source_uuid)
        stored = [(sub.submission_set, SS), *((f, FOLDER) for f in sub.folders),
                  *((d.element, DE) for d in sub.documents)]
        # one INSERT ... RETURNING for all objects (ids in parameter order), then codes and slots
        object_ids = conn.execute(insert(t.objects).returning(t.objects.c.id, sort_by_parameter_order=True),
                                  [_object_row(obj, kind, now) for obj, kind in stored]).scalars().all()
        code_rows = [{"object_id": oid, "scheme": c.scheme, "code": c.code, "coding_scheme": c.coding_scheme}
                     for oid, (obj, _) in zip(object_ids, stored, strict=True) for c in e.codes(obj)]
        if code_rows:
            conn.execute(insert(t.codes), code_rows)
        slot_rows = [{"object_id": oid, "name": name, "value": value}
                     for oid, (obj, _) in zip(object_ids, stored, strict=True) for name, value in _slot_rows(obj)]
        if slot_rows:
            conn.execute(insert(t.slots), slot_rows)
        assoc_rows = [{"entry_uuid": a.get("id"), "type": a.get("associationType"),
                       "source_uuid": a.get("sourceObject"), "target_uuid": a.get("targetObject"),
                       "status": e.APPROVED, "xml": _xml(a), "registered_at": now}
                      for a in [*sub.associations, *extra]]
        if assoc_rows:
            conn.execute(insert(t.associations), assoc_rows)
        for uid in sorted(deprecate):
            _update_object(conn, uid, status=e.DEPRECATED)
        for uid in sorted(touched_folders - set(plan.kinds)):
            _update_object(conn, uid, last_update_time=dtm)

    def _check_registered_unique_ids(self, conn: Connection, plan: _Plan) -> None:
        """uniqueIds already in the registry (ITI TF-3 Table 4.2.4.1-2: XDSNonIdenticalHash / ...Size)."""
        sub = plan.sub
        by_uid = {d.unique_id: d for d in sub.documents if d.unique_id}
        if by_uid:
            for row in conn.execute(select(t.objects.c.unique_id, t.objects.c.hash, t.objects.c.size)
                                    .where(t.objects.c.kind == DE, t.objects.c.unique_id.in_(list(by_uid)))):
                d = by_uid[row.unique_id]
                what = f"DocumentEntry {plan.name(d.entry_uuid)} uniqueId {d.unique_id}"
                if (row.hash or "").lower() != (d.hash or "").lower():
                    plan.fail(NON_IDENTICAL_HASH, f"{what} is already registered with hash {row.hash}, "
                                                  f"this submission has {d.hash}", d.unique_id or "")
                elif row.size is not None and d.size is not None and row.size != d.size:
                    plan.fail(NON_IDENTICAL_SIZE, f"{what} is already registered with size {row.size}, "
                                                  f"this submission has {d.size}", d.unique_id or "")
        packages = {e.external_id(p, s): (kind, p) for p, s, kind in
                    [(sub.submission_set, e.SS_UNIQUE_ID, SS), *((f, e.FOLDER_UNIQUE_ID, FOLDER) for f in sub.folders)]}
        for prow in conn.execute(select(t.objects.c.unique_id, t.objects.c.kind).where(
                t.objects.c.kind.in_([SS, FOLDER]), t.objects.c.unique_id.in_([u for u in packages if u]))):
            kind, p = packages[prow.unique_id]
            plan.fail(DUPLICATE_UNIQUE_ID, f"{kind} {plan.name(p.get('id') or '')}: uniqueId {prow.unique_id} is "
                                           f"already registered (as a {prow.kind})", prow.unique_id)


# -- module helpers --------------------------------------------------------------------------------------------


def _assign_ids(sub: e.Submission) -> dict[str, str]:
    """Replace symbolic ids by UUIDs everywhere; give nested objects without id one (ITI TF-3 4.2.3.1.3).

    Returns uuid -> id as submitted.  Invalid ``urn:uuid:`` ids or ids used twice raise XdsFailure.
    """
    objects = [sub.submission_set, *sub.folders, *(d.element for d in sub.documents), *sub.associations,
               *sub.classifications]
    mapping: dict[str, str] = {}
    names: dict[str, str] = {}
    errors: list[XdsError] = []
    for obj in objects:
        old = obj.get("id") or ""
        if not old:
            continue
        if old in mapping:
            errors.append(XdsError(REGISTRY_METADATA_ERROR, f"id {old} is used by more than one object",
                                   location=old))
            continue
        if old.lower().startswith("urn:uuid:"):
            if not _UUID_RE.match(old):
                errors.append(XdsError(REGISTRY_METADATA_ERROR, f"id {old} is not a valid urn:uuid",
                                       location=old))
            new = old
        else:
            new = _new_uuid()
        mapping[old] = new
        names[new] = old
    if errors:
        raise XdsFailure(errors)
    for obj in sub.request.iter(f"{e.RIM}*"):
        for attr in ("id", *_REF_ATTRIBUTES):
            value = obj.get(attr)
            if value is not None and value in mapping:
                obj.set(attr, mapping[value])
    for obj in objects:  # nested Classifications and ExternalIdentifiers (ebRIM: id required)
        for child in obj.iterchildren(f"{e.RIM}Classification", f"{e.RIM}ExternalIdentifier"):
            if not _UUID_RE.match(child.get("id") or ""):
                child.set("id", _new_uuid())
            ref = "classifiedObject" if child.tag == f"{e.RIM}Classification" else "registryObject"
            child.set(ref, obj.get("id") or "")
    for c in sub.classifications:
        if not _UUID_RE.match(c.get("id") or ""):
            c.set("id", _new_uuid())
    return names


def _nest(classification: etree._Element, plan: _Plan) -> None:
    """Move a top-level Classification into the object it classifies (stored and returned with it)."""
    sub, target = plan.sub, classification.get("classifiedObject")
    for obj in [sub.submission_set, *sub.folders, *(d.element for d in sub.documents)]:
        if obj.get("id") == target:
            classification.getparent().remove(classification)
            ext = obj.find(f"{e.RIM}ExternalIdentifier")
            if ext is not None:
                ext.addprevious(classification)
            else:
                obj.append(classification)
            return
    plan.fail(REGISTRY_METADATA_ERROR, f"Classification {plan.name(classification.get('id') or '')}: classified "
                                       f"object {target} is not part of the submission", target or "")


_OBJECT_TYPES = {f"{e.RIM}RegistryPackage": e.OT_REGISTRY_PACKAGE, f"{e.RIM}Association": e.OT_ASSOCIATION,
                 f"{e.RIM}Classification": e.OT_CLASSIFICATION, f"{e.RIM}ExternalIdentifier": e.OT_EXTERNAL_IDENTIFIER}


def _set_object_types(obj: etree._Element) -> None:
    """The ebRIM objectType of a package, association and their nested objects when the source left it out."""
    for el in (obj, *obj.iterchildren(f"{e.RIM}Classification", f"{e.RIM}ExternalIdentifier")):
        ot = _OBJECT_TYPES.get(el.tag)
        if ot and not el.get("objectType"):
            el.set("objectType", ot)


def _set_lid(obj: etree._Element, plan: _Plan) -> None:
    """``lid`` = id for the first version; another lid would be a metadata update (ITI-57, not ITI-42)."""
    lid, oid = obj.get("lid"), obj.get("id") or ""
    if lid is None or lid == oid:
        obj.set("lid", oid)
    else:
        plan.fail(REGISTRY_METADATA_ERROR, f"{plan.kinds.get(oid, 'object')} {plan.name(oid)}: lid {lid} differs from "
                                           f"its id (metadata update is ITI-57, not ITI-42)", oid)


def _check_slots(plan: _Plan, obj: etree._Element, what: str, *, required: Iterable[str],
                 single: Iterable[str]) -> None:
    for name in required:
        values = e.slot_values(obj, name)
        if not values or not any(v.strip() for v in values):
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: missing slot {name}", name)
    for name in single:
        if len(e.slot_values(obj, name)) > 1:
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: slot {name} has more than one value", name)
    for name in _DTM_SLOTS:
        for v in e.slot_values(obj, name):
            if not _DTM_RE.match(v):
                plan.fail(REGISTRY_METADATA_ERROR, f"{what}: {name} {v!r} is not a DTM (YYYY[MM[DD[hh[mm[ss]]]]])",
                          name)
    if len([s for s in obj.iterchildren(f"{e.RIM}Slot")]) != len({s.get("name") for s in
                                                                  obj.iterchildren(f"{e.RIM}Slot")}):
        plan.fail(REGISTRY_METADATA_ERROR, f"{what}: a slot name is used twice")


def _check_ids(plan: _Plan, obj: etree._Element, what: str, schemes: Mapping[str, str]) -> None:
    """Required ExternalIdentifiers, exactly one each; patientIds are CX (ITI TF-3 4.2.3.1.7)."""
    for scheme, attr in schemes.items():
        values = [x.get("value") or "" for x in obj.iterchildren(f"{e.RIM}ExternalIdentifier")
                  if x.get("identificationScheme") == scheme]
        if not values or not values[0].strip():
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: missing external identifier {attr} ({scheme})", attr)
        elif len(values) > 1:
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: more than one external identifier {attr}", attr)
        elif attr == "patientId" and not _CX_RE.match(values[0]):
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: patientId {values[0]!r} is not a CX id^^^&OID&ISO", attr)
        elif len(values[0]) > _MAX_UNIQUE_ID:
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: {attr} longer than {_MAX_UNIQUE_ID} characters", attr)


def _check_code_count(plan: _Plan, obj: etree._Element, what: str, scheme: str, *, exactly_one: bool) -> None:
    n = len(e.classifications(obj, scheme))
    attr = e.CODE_SCHEMES[scheme]
    if n == 0:
        plan.fail(REGISTRY_METADATA_ERROR, f"{what}: missing classification {attr} ({scheme})", attr)
    elif exactly_one and n > 1:
        plan.fail(REGISTRY_METADATA_ERROR, f"{what}: {attr} given {n} times, allowed once", attr)


def _check_patient(plan: _Plan, uid: str, what: str) -> None:
    """An entry's / folder's patientId equals the SubmissionSet's (ITI TF-2b 3.42.4.1.3)."""
    mine, theirs = plan.patients.get(uid), plan.sub.patient_id
    if mine and theirs and mine != theirs:
        plan.fail(PATIENT_ID_DOES_NOT_MATCH, f"{what}: patientId {mine} differs from the SubmissionSet's {theirs}",
                  mine)


def _check_unique_ids_in_message(plan: _Plan) -> None:
    """The same uniqueId twice in one message (DocumentEntries; SubmissionSet and Folders)."""
    seen: dict[str, str] = {}
    for d in plan.sub.documents:
        if d.unique_id in seen:
            plan.fail(DUPLICATE_UNIQUE_ID, f"DocumentEntry {plan.name(d.entry_uuid)}: uniqueId {d.unique_id} is also "
                                           f"used by DocumentEntry {seen[d.unique_id]}", d.unique_id)
        elif d.unique_id:
            seen[d.unique_id] = plan.name(d.entry_uuid)
    seen = {}
    for kind, scheme, pkg in [(SS, e.SS_UNIQUE_ID, plan.sub.submission_set),
                              *((FOLDER, e.FOLDER_UNIQUE_ID, f) for f in plan.sub.folders)]:
        uid = e.external_id(pkg, scheme)
        label = f"{kind} {plan.name(pkg.get('id') or '')}"
        if uid in seen:
            plan.fail(DUPLICATE_UNIQUE_ID, f"{label}: uniqueId {uid} is also used by {seen[uid]}", uid or "")
        elif uid:
            seen[uid] = label


def _check_associations_in_message(plan: _Plan) -> None:
    """Association structure that needs no registry lookup (ITI TF-3 4.2.2, 4.2.1.3)."""
    ss = plan.sub.submission_set_uuid
    members: set[str] = set()
    replaced: set[str] = set()
    for a in plan.sub.associations:
        aid, atype = a.get("id") or "", a.get("associationType") or ""
        src, tgt = a.get("sourceObject") or "", a.get("targetObject") or ""
        what = f"Association {plan.name(aid)}"
        if atype not in _KNOWN_ASSOCIATIONS:
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: associationType {atype!r} is not an XDS association type",
                      aid)
            continue
        for ref in (src, tgt):
            if not _UUID_RE.match(ref):
                plan.fail(UNRESOLVED_REFERENCE, f"{what}: {ref!r} is neither in the submission nor a UUID", ref)
        if atype == e.ASSOC_HAS_MEMBER:
            if src == ss and plan.kinds.get(tgt) == DE:
                members.add(tgt)
                status = e.slot_values(a, "SubmissionSetStatus")
                if status not in (["Original"], ["Reference"]):
                    plan.fail(REGISTRY_METADATA_ERROR, f"{what}: SubmissionSet-DocumentEntry HasMember needs the slot "
                                                       f"SubmissionSetStatus Original or Reference", aid)
            elif src == ss and plan.kinds.get(tgt) == FOLDER:
                members.add(tgt)
            elif plan.kinds.get(src) == DE or plan.kinds.get(tgt) == SS:
                plan.fail(REGISTRY_METADATA_ERROR, f"{what}: HasMember from {plan.name(src)} to {plan.name(tgt)} "
                                                   f"is not a SubmissionSet or Folder membership", aid)
        else:
            if plan.kinds.get(src) != DE:
                plan.fail(REGISTRY_METADATA_ERROR, f"{what}: the source of {atype.rsplit(':', 1)[-1]} must be a "
                                                   f"DocumentEntry of this submission", aid)
            if atype in e.REPLACING:
                if tgt in replaced:
                    plan.fail(REGISTRY_METADATA_ERROR, f"{what}: {plan.name(tgt)} is replaced twice", aid)
                replaced.add(tgt)
    for uid, kind in plan.kinds.items():
        if kind in (DE, FOLDER) and uid not in members:
            plan.fail(REGISTRY_METADATA_ERROR, f"{kind} {plan.name(uid)} is not a member of the SubmissionSet "
                                               f"(no HasMember association from it)", uid)


def _check_associations_in_registry(plan: _Plan, existing: Mapping[str, Row[Any]]) \
        -> tuple[set[str], set[str], dict[str, list[str]]]:
    """References to registered objects: they exist, have the right kind, status and patient.

    Returns the entries to deprecate, the registered Folders that get members and
    original -> replacements (folder membership to carry over).
    """
    ss_patient = plan.sub.patient_id
    deprecate: set[str] = set()
    folders: set[str] = set()
    carry: dict[str, list[str]] = {}
    for a in plan.sub.associations:
        aid, atype = a.get("id") or "", a.get("associationType") or ""
        src, tgt = a.get("sourceObject") or "", a.get("targetObject") or ""
        if atype not in _KNOWN_ASSOCIATIONS or not (_UUID_RE.match(src) and _UUID_RE.match(tgt)):
            continue  # reported already
        what = f"Association {plan.name(aid)}"
        refs = [r for r in (src, tgt) if r not in plan.kinds]
        missing = [r for r in refs if r not in existing]
        for r in missing:
            plan.fail(UNRESOLVED_REFERENCE, f"{what}: {r} is neither in the submission nor in the registry", r)
        if missing:
            continue
        for r in refs:
            row = existing[r]
            if row.patient_id and ss_patient and row.patient_id != ss_patient:
                plan.fail(PATIENT_ID_DOES_NOT_MATCH, f"{what}: registered {row.kind} {r} has patientId "
                                                     f"{row.patient_id}, the SubmissionSet {ss_patient}", r)
        if atype == e.ASSOC_HAS_MEMBER:
            if src in existing:
                if existing[src].kind != FOLDER or existing[src].status != e.APPROVED:
                    plan.fail(REGISTRY_METADATA_ERROR, f"{what}: registered source {src} is not an Approved Folder",
                              src)
                elif plan.kinds.get(tgt, existing[tgt].kind if tgt in existing else "") != DE:
                    plan.fail(REGISTRY_METADATA_ERROR, f"{what}: a Folder's members are DocumentEntries", tgt)
                else:
                    folders.add(src)
            elif tgt in existing and existing[tgt].kind not in (DE, FOLDER):
                plan.fail(REGISTRY_METADATA_ERROR, f"{what}: registered target {tgt} is a {existing[tgt].kind}", tgt)
            elif tgt in existing and existing[tgt].status != e.APPROVED:
                plan.fail(REGISTRY_METADATA_ERROR, f"{what}: registered target {tgt} is not Approved", tgt)
            continue
        # document relationships: RPLC, APND, XFRM, XFRM_RPLC, signs (ITI TF-3 4.2.2.2)
        if tgt in plan.kinds:
            if atype != e.ASSOC_SIGNS or plan.kinds[tgt] != DE:
                plan.fail(REGISTRY_METADATA_ERROR, f"{what}: the target of {atype.rsplit(':', 1)[-1]} must be a "
                                                   f"registered DocumentEntry", tgt)
            continue
        row = existing[tgt]
        if row.kind != DE:
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: target {tgt} is a {row.kind}, not a DocumentEntry", tgt)
        elif row.status != e.APPROVED and atype != e.ASSOC_SIGNS:
            plan.fail(REGISTRY_METADATA_ERROR, f"{what}: target DocumentEntry {tgt} is not Approved "
                                               f"(status {row.status.rsplit(':', 1)[-1]})", tgt)
        elif atype in e.REPLACING:
            deprecate.add(tgt)
            carry.setdefault(tgt, []).append(src)
    return deprecate, folders, carry


def _association(atype: str, source: str, target: str) -> etree._Element:
    """A registry-made Association (Approved)."""
    return etree.Element(f"{e.RIM}Association", nsmap={"rim": e.NS["rim"]}, id=_new_uuid(), associationType=atype,
                         sourceObject=source, targetObject=target, status=e.APPROVED,
                         objectType=e.OT_ASSOCIATION)


_OBJECT_COLUMNS = tuple(c.name for c in t.objects.columns if c.name != "id")


def _object_row(obj: etree._Element, kind: str, now: float) -> dict[str, Any]:
    """The ``xds_objects`` row of a DocumentEntry / SubmissionSet / Folder element."""
    sv = e.slot_value
    row: dict[str, Any] = dict.fromkeys(_OBJECT_COLUMNS)  # every row has every key (one executemany)
    row.update({"entry_uuid": obj.get("id"), "kind": kind, "lid": obj.get("lid"), "version": 1,
                "status": obj.get("status") or e.APPROVED, "home_community_id": obj.get("home"),
                "xml": _xml(obj), "registered_at": now})
    if kind == DE:
        size = sv(obj, "size")
        row.update(unique_id=e.external_id(obj, e.DE_UNIQUE_ID), patient_id=e.external_id(obj, e.DE_PATIENT_ID),
                   object_type=obj.get("objectType"), creation_time=sv(obj, "creationTime"),
                   service_start_time=sv(obj, "serviceStartTime"), service_stop_time=sv(obj, "serviceStopTime"),
                   mime_type=obj.get("mimeType"), hash=(sv(obj, "hash") or "").lower() or None,
                   size=int(size) if size is not None else None,
                   repository_unique_id=sv(obj, "repositoryUniqueId"))
    elif kind == SS:
        row.update(unique_id=e.external_id(obj, e.SS_UNIQUE_ID), patient_id=e.external_id(obj, e.SS_PATIENT_ID),
                   submission_time=sv(obj, "submissionTime"), source_id=e.external_id(obj, e.SS_SOURCE_ID))
    else:
        row.update(unique_id=e.external_id(obj, e.FOLDER_UNIQUE_ID),
                   patient_id=e.external_id(obj, e.FOLDER_PATIENT_ID), last_update_time=sv(obj, "lastUpdateTime"))
    return row


def _slot_rows(obj: etree._Element) -> list[tuple[str, str]]:
    """Searchable slot values: authorPerson of every author classification and :data:`_SEARCH_SLOTS`."""
    rows = [("authorPerson", v) for a in e.authors(obj) for v in e.slot_values(a, "authorPerson") if v]
    for name in _SEARCH_SLOTS:
        rows.extend((_SLOT_ROW_NAMES.get(name, name), v) for v in e.slot_values(obj, name) if v)
    return rows


def _update_object(conn: Connection, entry_uuid: str, *, status: str | None = None,
                   last_update_time: str | None = None) -> None:
    """Change the status or lastUpdateTime of a registered object, in its column and in its xml."""
    row = conn.execute(select(t.objects.c.id, t.objects.c.xml).where(t.objects.c.entry_uuid == entry_uuid)).one()
    el = e.parse_xml(row.xml.encode("utf-8"))
    values: dict[str, Any] = {}
    if status is not None:
        el.set("status", status)
        values["status"] = status
    if last_update_time is not None:
        e.set_slot(el, "lastUpdateTime", [last_update_time])
        values["last_update_time"] = last_update_time
    values["xml"] = _xml(el)
    conn.execute(update(t.objects).where(t.objects.c.id == row.id).values(**values))
