"""`AuditContext`: the one-line way for any actor to build and emit the audit message of a transaction.

    audit = AuditContext(source_id="ihehub-1", enterprise_site="HOSP-A", sinks=(repository.sink,))
    audit.emit("ITI-9", outcome=0, source=peer, destination=audit.me("IHEHUB|HUB"),
               patients=[cx], query=raw_qbp, message_id=msh10)

The table entry of the transaction (`ihehub.atna.transactions`) decides EventID, EventActionCode,
the requestor and the participant objects; the context adds what is the same for every message of
this node: AuditSourceIdentification (ITI TF-2a 3.20.7), this process's id as AlternativeUserID of
the local participant, and the time (the hub's corrected time when a CT clock is given).

`emit` is a *notification*: it never raises and never blocks the transaction it audits (sinks queue
the message; their errors are logged).  `transaction` builds without emitting and raises
`AuditBuildError` on a programming error (unknown key, missing participant, missing required object).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence

from ihehub.atna import codes
from ihehub.atna.codes import Code
from ihehub.atna.model import (
    ACTIONS,
    OUTCOMES,
    ActiveParticipant,
    AuditMessage,
    AuditSourceIdentification,
    EventIdentification,
    ObjectDescription,
    ObjectDetail,
    ParticipantObjectIdentification,
    SOPClass,
)
from ihehub.atna.transactions import TRANSACTIONS, TransactionAudit, lookup

__all__ = ["AuditBuildError", "AuditContext", "AuditSink", "DocumentRef", "Endpoint", "StudyRef"]

log = logging.getLogger("ihehub.atna")

AuditSink = Callable[[AuditMessage], object]
DEFAULT_TRANSFER_SYNTAX = "1.2.840.10008.1.2"  # Implicit VR Little Endian


class AuditBuildError(ValueError):
    """The audit message cannot be built: the caller passed too little or something invalid."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Endpoint:
    """A participant of a transaction (PS3.15 ActiveParticipant).

    ``user_id``: HL7 "application|facility" (MSH-3/4 or MSH-5/6), the SOAP endpoint or wsa:ReplyTo
    URL, an AE title, a user's login.  ``host``: NetworkAccessPointID (an IP address or a DNS name).
    ``local`` marks this node; `AuditContext.me` makes one with this process's id.
    """

    user_id: str
    host: str | None = None
    process_id: str | None = None  # AlternativeUserID
    user_name: str | None = None
    local: bool = False
    media_type: Code | None = None  # for Destination Media (EXPORT)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DocumentRef:
    """An XDS document: uniqueId, repositoryUniqueId, homeCommunityId."""

    unique_id: str
    repository_id: str | None = None
    home_community_id: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StudyRef:
    """A DICOM study, with the SOP instances of each SOP class it refers to (PS3.15 A.5.2)."""

    uid: str
    sop_classes: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    accession: str | None = None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _network_type(host: str) -> str:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine (DNS) name."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return "1"
    return "2"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AuditContext:
    """What every audit message of this node shares, and the builders."""

    source_id: str  # AuditSourceID
    enterprise_site: str | None = None  # AuditEnterpriseSiteID
    source_type: int = 4  # AuditSourceTypeCode: application server process
    host: str = dataclasses.field(default_factory=socket.gethostname)  # this node's NetworkAccessPointID
    app_id: str = "ihehub"  # this node's UserID where the transaction names none
    home_community_id: str | None = None  # XCA homeCommunityId, written on document objects
    clock: Callable[[], dt.datetime] = _now
    sinks: tuple[AuditSink, ...] = ()
    table: Mapping[str, TransactionAudit] = dataclasses.field(default_factory=lambda: TRANSACTIONS)

    def me(self, user_id: str | None = None, *, host: str | None = None) -> Endpoint:
        """This node as a participant: ``user_id`` (default ``app_id``), this host and process id."""
        return Endpoint(user_id=user_id or self.app_id, host=host or self.host, process_id=str(os.getpid()),
                        local=True)

    def with_sinks(self, *sinks: AuditSink) -> AuditContext:
        return dataclasses.replace(self, sinks=(*self.sinks, *sinks))

    # -- emitting -------------------------------------------------------------------------------
    def emit(self, key: str, **kw: object) -> AuditMessage | None:
        """Build the audit of ``key`` (see `transaction`) and hand it to every sink; never raises."""
        try:
            msg = self.transaction(key, **kw)  # type: ignore[arg-type]
        except Exception:
            log.exception("audit: cannot build the %s audit message; it was not emitted", key)
            return None
        self.send(msg)
        return msg

    def send(self, msg: AuditMessage) -> None:
        """Hand a built message to every sink; a failing sink is logged and does not stop the others."""
        for sink in self.sinks:
            try:
                sink(msg)
            except Exception:
                log.exception("audit: sink %r failed", sink)

    # -- building -------------------------------------------------------------------------------
    def transaction(
        self,
        key: str,
        *,
        outcome: int = 0,
        source: Endpoint | None = None,
        destination: Endpoint | None = None,
        user: Endpoint | None = None,
        side: str | None = None,
        action: str | None = None,
        trigger: str | None = None,
        patients: Sequence[str] = (),
        query: bytes | str | None = None,
        query_id: str | None = None,
        message_id: str | None = None,
        query_encoding: str = "UTF-8",
        transfer_syntax: str | None = None,
        submission_set: str | None = None,
        documents: Sequence[DocumentRef | str] = (),
        studies: Sequence[StudyRef | str] = (),
        subject: str | None = None,
        detail: str | None = None,
        audit_log: str | None = None,
        alert: str | None = None,
        outcome_description: str | None = None,
        time: dt.datetime | None = None,
    ) -> AuditMessage:
        """The audit message of transaction or event ``key`` (a key of the table: ``ITI-9``, ``LOGIN``...).

        Transfers (ITI/RAD/DICOM transactions) take ``source`` and ``destination`` in the IHE audit
        sense (Source role 110153 sends the data, Destination 110152 receives it: for ITI-43 the
        repository is the source); the one that is `local` decides which side's EventID/action is
        written (``side="source"|"destination"`` when both or neither are local).  Node events
        (APP-START/STOP, LOGIN/LOGOUT, SECURITY-ALERT, EXPORT, PATIENT-RECORD, AUDIT-LOG-USED) take an
        optional ``user``; ``destination`` of EXPORT is the destination media or share link.
        ``query`` is the raw query (HL7 QBP, ebRIM AdhocQueryRequest, FHIR URL, DICOM identifier);
        ``message_id`` is MSH-10; ``trigger`` (A01, A08...) chooses the ITI-8 action.
        """
        entry = lookup(key, self.table)
        if outcome not in OUTCOMES:
            raise AuditBuildError(f"EventOutcomeIndicator must be one of 0, 4, 8, 12, not {outcome!r}")
        if entry.participants == "transfer":
            participants, local_side = self._transfer_participants(entry, source, destination, user, side)
        else:
            participants, local_side = self._node_participants(entry, user, destination), "source"
        side_event = entry.side(local_side)
        if action is None and trigger is not None:
            action = entry.triggers.get(trigger.upper())
            if action is None:
                raise AuditBuildError(f"{entry.key} has no audit action for trigger {trigger!r}; "
                                      f"known: {', '.join(entry.triggers) or 'none'}")
        action = action or side_event.action
        if action not in ACTIONS:
            raise AuditBuildError(f"EventActionCode must be one of {', '.join(ACTIONS)}, not {action!r}")
        event_type = entry.event_type
        if alert is not None:
            event_type = codes.SECURITY_ALERT_TYPES.get(alert)
            if event_type is None:
                raise AuditBuildError(f"unknown security alert {alert!r}; known: "
                                      f"{', '.join(codes.SECURITY_ALERT_TYPES)}")
        objects = self._objects(
            entry, patients=patients, query=query, query_id=query_id, message_id=message_id,
            query_encoding=query_encoding, transfer_syntax=transfer_syntax, submission_set=submission_set,
            documents=documents, studies=studies, subject=subject, detail=detail, audit_log=audit_log,
        )
        event = EventIdentification(
            event_id=side_event.event_id,
            date_time=time or self.clock(),
            outcome=outcome,
            action=action,
            type_codes=(event_type,) if event_type is not None else (),
            outcome_description=outcome_description,
        )
        src = AuditSourceIdentification(source_id=self.source_id, enterprise_site_id=self.enterprise_site,
                                        type_codes=(codes.source_type(self.source_type),))
        return AuditMessage(event=event, participants=tuple(participants), source=src, objects=tuple(objects))

    def _transfer_participants(
        self, entry: TransactionAudit, source: Endpoint | None, destination: Endpoint | None,
        user: Endpoint | None, side: str | None,
    ) -> tuple[list[ActiveParticipant], str]:
        if source is None or destination is None:
            raise AuditBuildError(f"{entry.key} needs both source= and destination= participants")
        if side is None:
            if source.local != destination.local:
                side = "source" if source.local else "destination"
            else:
                raise AuditBuildError(
                    f"{entry.key}: mark this node's participant with AuditContext.me() or pass "
                    "side='source'|'destination'"
                )
        if side not in ("source", "destination"):
            raise AuditBuildError(f"side must be 'source' or 'destination', not {side!r}")
        out = [
            _participant(source, codes.SOURCE, requestor=entry.requestor == "source"),
            _participant(destination, codes.DESTINATION, requestor=entry.requestor == "destination"),
        ]
        if user is not None:  # the human requestor, when known (ITI TF-2a 3.20.7.1)
            out.append(_participant(user, None, requestor=True))
        return out, side

    def _node_participants(
        self, entry: TransactionAudit, user: Endpoint | None, destination: Endpoint | None
    ) -> list[ActiveParticipant]:
        me = self.me()
        out: list[ActiveParticipant] = []
        if user is not None:
            role = codes.APPLICATION_LAUNCHER if entry.key in ("APP-START", "APP-STOP") else None
            out.append(_participant(user, role, requestor=True))
        my_role = codes.SOURCE if entry.key == "EXPORT" else codes.APPLICATION
        out.append(_participant(me, my_role, requestor=user is None and entry.key not in ("APP-START", "APP-STOP")))
        if destination is not None:
            role = codes.DESTINATION_MEDIA if entry.key == "EXPORT" else codes.DESTINATION
            out.append(_participant(destination, role, requestor=False))
        return out

    def _objects(
        self, entry: TransactionAudit, *, patients: Sequence[str], query: bytes | str | None, query_id: str | None,
        message_id: str | None, query_encoding: str, transfer_syntax: str | None, submission_set: str | None,
        documents: Sequence[DocumentRef | str], studies: Sequence[StudyRef | str], subject: str | None,
        detail: str | None, audit_log: str | None,
    ) -> list[ParticipantObjectIdentification]:
        given = {
            "patient": bool(patients), "query": query is not None, "submission_set": submission_set is not None,
            "document": bool(documents), "study": bool(studies), "subject": subject is not None,
            "audit_log": audit_log is not None,
        }
        missing = sorted(k for k in entry.requires if not given[k])
        if missing:
            raise AuditBuildError(f"{entry.key} ({entry.section}) requires: {', '.join(missing)}")
        msh10 = message_id.encode() if message_id is not None else None
        if entry.patient_detail == "MSH-10" and msh10 is None:
            raise AuditBuildError(f"{entry.key} needs message_id= (MSH-10) for the patient object")
        out: list[ParticipantObjectIdentification] = []
        if query is not None:
            out.append(self._query_object(entry, query, query_id, msh10, query_encoding, transfer_syntax))
        for cx in patients:
            details = (ObjectDetail(type="MSH-10", value=msh10),) if entry.patient_detail and msh10 else ()
            out.append(ParticipantObjectIdentification(
                id_type=codes.PATIENT_NUMBER, object_id=cx, type_code=1, role=1, details=details))
        if submission_set is not None:
            out.append(ParticipantObjectIdentification(
                id_type=codes.SUBMISSION_SET, object_id=submission_set, type_code=2, role=20))
        for doc in documents:
            out.append(self._document_object(doc))
        for study in studies:
            out.append(_study_object(study if isinstance(study, StudyRef) else StudyRef(uid=study)))
        if subject is not None:
            out.append(ParticipantObjectIdentification(
                id_type=codes.NODE_ID, object_id=subject, type_code=2, role=13,
                details=(ObjectDetail(type="Alert Description", value=detail.encode()),) if detail else ()))
        if audit_log is not None:
            out.append(ParticipantObjectIdentification(
                id_type=codes.URI, object_id=audit_log, type_code=2, role=13, name="Security Audit Log"))
        return out

    def _query_object(
        self, entry: TransactionAudit, query: bytes | str, query_id: str | None, msh10: bytes | None,
        encoding: str, transfer_syntax: str | None,
    ) -> ParticipantObjectIdentification:
        if entry.query_id_type is None:
            raise AuditBuildError(f"{entry.key} has no query object")
        raw = query.encode("utf-8") if isinstance(query, str) else query
        details: tuple[ObjectDetail, ...] = ()
        if entry.query_detail == "MSH-10":
            if msh10 is None:
                raise AuditBuildError(f"{entry.key} needs message_id= (MSH-10) for the query object")
            details = (ObjectDetail(type="MSH-10", value=msh10),)
        elif entry.query_detail == "QueryEncoding":
            details = (ObjectDetail(type="QueryEncoding", value=encoding.encode()),)
        elif entry.query_detail == "TransferSyntax":
            syntax = transfer_syntax or DEFAULT_TRANSFER_SYNTAX
            details = (ObjectDetail(type="TransferSyntax", value=syntax.encode()),)
        object_id = query_id or entry.query_object_id
        if object_id is None and msh10 is not None:
            object_id = msh10.decode()
        if entry.key in ("ITI-18", "DICOM-QUERY") and not object_id:
            what = "the stored query id (urn:uuid:...)" if entry.key == "ITI-18" else "the SOP Class UID"
            raise AuditBuildError(f"{entry.key} needs query_id= ({what})")
        return ParticipantObjectIdentification(
            id_type=entry.query_id_type, object_id=object_id, type_code=2, role=24, query=raw, details=details)

    def _document_object(self, doc: DocumentRef | str) -> ParticipantObjectIdentification:
        ref = doc if isinstance(doc, DocumentRef) else DocumentRef(unique_id=doc)
        details = []
        if ref.repository_id:
            details.append(ObjectDetail(type="Repository Unique Id", value=ref.repository_id.encode()))
        community = ref.home_community_id or self.home_community_id
        if community:
            details.append(ObjectDetail(type="ihe:homeCommunityID", value=community.encode()))
        return ParticipantObjectIdentification(
            id_type=codes.REPORT_NUMBER, object_id=ref.unique_id, type_code=2, role=3, details=tuple(details))


def _participant(ep: Endpoint, role: Code | None, *, requestor: bool) -> ActiveParticipant:
    return ActiveParticipant(
        user_id=ep.user_id,
        requestor=requestor,
        alt_user_id=ep.process_id,
        user_name=ep.user_name,
        network_id=ep.host,
        network_type=_network_type(ep.host) if ep.host else None,
        roles=(role,) if role is not None else (),
        media_type=ep.media_type,
    )


def _study_object(study: StudyRef) -> ParticipantObjectIdentification:
    descriptions: tuple[ObjectDescription, ...] = ()
    if study.sop_classes or study.accession:
        descriptions = (ObjectDescription(
            accessions=(study.accession,) if study.accession else (),
            sop_classes=tuple(SOPClass(uid=uid, count=len(inst), instances=tuple(inst))
                              for uid, inst in study.sop_classes.items()),
        ),)
    return ParticipantObjectIdentification(
        id_type=codes.STUDY_INSTANCE_UID, object_id=study.uid, type_code=2, role=3, descriptions=descriptions)
