"""The audit strategy of every transaction and event ihehub serves or sends: one table, one entry each.

An entry says which EventID / EventActionCode this node writes when it plays the Source role
(110153: it sends the data) or the Destination role (110152: it receives it), which side is the
requestor, and which participant objects the IHE profile requires.  `AuditContext.transaction`
builds the message from the entry; tests check each entry's output against the DICOM schema and the
connectathon (WUSTL Syslog Collector) Schematron rules named in ``schematron``.

Sources: ITI TF-2a/2b/2c section "Security Considerations / Audit Record Considerations" of each
transaction (cited per entry), RAD TF-3 4.68.4.1.4 / 4.69.4.1.4, DICOM PS3.15 A.5.3 (DICOM events,
application activity, user authentication, security alert, export, patient record, audit log used).
Where the WUSTL rules and ../shared/design/IHE.md differ (ITI-10: the Manager writes R, the
Consumer U), the rules win: they are what the connectathon checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping
from typing import Literal

from ihehub.atna import codes
from ihehub.atna.codes import Code, ihe_transaction

__all__ = ["TRANSACTIONS", "SideEvent", "TransactionAudit", "lookup"]

Participants = Literal["transfer", "node"]
Requestor = Literal["source", "destination"]
# Participant objects an entry can require
ObjectKind = Literal["patient", "query", "submission_set", "document", "study", "subject", "audit_log"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SideEvent:
    """The EventID and EventActionCode one side of a transaction writes."""

    event_id: Code
    action: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TransactionAudit:
    """The audit strategy of one transaction or node event."""

    key: str  # "ITI-9", "DICOM-STORE", "LOGIN", ...
    name: str
    section: str  # where the Technical Framework / DICOM defines the message
    event_type: Code | None
    as_source: SideEvent  # this node plays the Source role (110153) / is the node reporting
    as_destination: SideEvent | None = None  # this node plays the Destination role (110152); None: as_source
    participants: Participants = "transfer"  # transfer: Source + Destination; node: user + application
    requestor: Requestor = "source"  # which role initiated the transaction (UserIsRequestor=true)
    requires: frozenset[ObjectKind] = frozenset()  # participant objects the profile requires
    patient_detail: str | None = None  # ParticipantObjectDetail type on the patient object ("MSH-10")
    query_id_type: Code | None = None  # ParticipantObjectIDTypeCode of the query object (2/24)
    query_detail: str | None = None  # "MSH-10" or "QueryEncoding" or "TransferSyntax"
    query_object_id: str | None = None  # a fixed ParticipantObjectID of the query object (FHIR queries)
    triggers: Mapping[str, str] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    schematron: str | None = None  # folder of ../shared/corpus/wustl/atna-schematron that checks it

    def side(self, side: str) -> SideEvent:
        """The EventID/action this node writes in the ``source`` or ``destination`` role."""
        if side == "destination" and self.as_destination is not None:
            return self.as_destination
        return self.as_source


def _ev(event_id: Code, action: str) -> SideEvent:
    return SideEvent(event_id=event_id, action=action)


EXPORT_R = _ev(codes.EXPORT, "R")  # the side that sends documents/images (ITI TF-2b 3.41.7.1.1)
IMPORT_C = _ev(codes.IMPORT, "C")  # the side that receives them


def _hl7_query(key: str, name: str, section: str, folder: str) -> TransactionAudit:
    return TransactionAudit(
        key=key, name=name, section=section, event_type=ihe_transaction(key, name),
        as_source=_ev(codes.QUERY, "E"), requires=frozenset({"query"}),
        query_id_type=ihe_transaction(key, name), query_detail="MSH-10", schematron=folder,
    )


_ENTRIES = [
    # -- PIX / PDQ (HL7 v2) -----------------------------------------------------------------------
    TransactionAudit(
        key="ITI-8", name="Patient Identity Feed", section="ITI TF-2a 3.8.5.1 (merge: 3.8.5.2)",
        event_type=ihe_transaction("ITI-8", "Patient Identity Feed"),
        as_source=_ev(codes.PATIENT_RECORD, "C"), requires=frozenset({"patient"}), patient_detail="MSH-10",
        triggers=types.MappingProxyType({"A01": "C", "A04": "C", "A05": "C", "A08": "U", "A40": "U"}),
        schematron="ITI-08_Patient_Identity_Feed",
    ),
    _hl7_query("ITI-9", "PIX Query", "ITI TF-2a 3.9.5.1", "ITI-09_PIX_Query"),
    TransactionAudit(
        key="ITI-10", name="PIX Update Notification", section="ITI TF-2a 3.10.5.1",
        event_type=ihe_transaction("ITI-10", "PIX Update Notification"),
        as_source=SideEvent(event_id=codes.PATIENT_RECORD, action="R"),
        as_destination=SideEvent(event_id=codes.PATIENT_RECORD, action="U"),
        requires=frozenset({"patient"}), patient_detail="MSH-10",
        schematron="ITI-10_PIX_Update_Notification",
    ),
    _hl7_query("ITI-21", "Patient Demographics Query", "ITI TF-2a 3.21.5.1",
               "ITI-21_Patient_Demographics_Query"),
    _hl7_query("ITI-22", "Patient Demographics and Visit Query", "ITI TF-2a 3.22.5.1",
               "ITI-22_Patient_Demographics_and_Visit_Query"),
    # -- PIXm / PDQm (FHIR) --------------------------------------------------------------------------
    TransactionAudit(
        key="ITI-83", name="Mobile Patient Identifier Cross-reference Query", section="ITI TF-2c 3.83.5",
        event_type=ihe_transaction("ITI-83", "Mobile Patient Identifier Cross-reference Query"),
        as_source=_ev(codes.QUERY, "E"), requires=frozenset({"query"}),
        query_id_type=ihe_transaction("ITI-83", "Mobile Patient Identifier Cross-reference Query"),
        query_object_id="PIXmQuery",
    ),
    TransactionAudit(
        key="ITI-78", name="Mobile Patient Demographics Query", section="ITI TF-2c 3.78.5",
        event_type=ihe_transaction("ITI-78", "Mobile Patient Demographics Query"),
        as_source=_ev(codes.QUERY, "E"), requires=frozenset({"query"}),
        query_id_type=ihe_transaction("ITI-78", "Mobile Patient Demographics Query"),
        query_object_id="MobilePatientDemographicsQuery",
    ),
    # -- XDS.b -------------------------------------------------------------------------------------
    TransactionAudit(
        key="ITI-18", name="Registry Stored Query", section="ITI TF-2a 3.18.5.1",
        event_type=ihe_transaction("ITI-18", "Registry Stored Query"),
        as_source=_ev(codes.QUERY, "E"), requires=frozenset({"query"}),
        query_id_type=ihe_transaction("ITI-18", "Registry Stored Query"), query_detail="QueryEncoding",
        schematron="ITI-18_Registry_Stored_Query",
    ),
    TransactionAudit(
        key="ITI-41", name="Provide and Register Document Set-b", section="ITI TF-2b 3.41.7.1",
        event_type=ihe_transaction("ITI-41", "Provide and Register Document Set-b"),
        as_source=EXPORT_R, as_destination=IMPORT_C, requires=frozenset({"patient", "submission_set"}),
        schematron="ITI-41_Provide_and_Register_Document_Set-b",
    ),
    TransactionAudit(
        key="ITI-42", name="Register Document Set-b", section="ITI TF-2b 3.42.7.1",
        event_type=ihe_transaction("ITI-42", "Register Document Set-b"),
        as_source=EXPORT_R, as_destination=IMPORT_C, requires=frozenset({"submission_set"}),
        schematron="ITI-42_Register_Document_Set-b",
    ),
    TransactionAudit(
        key="ITI-43", name="Retrieve Document Set", section="ITI TF-2b 3.43.6.1",
        event_type=ihe_transaction("ITI-43", "Retrieve Document Set"),
        as_source=EXPORT_R, as_destination=IMPORT_C, requestor="destination", requires=frozenset({"document"}),
        schematron="ITI-43_Retrieve_Document_Set",
    ),
    # -- XDS-I.b -----------------------------------------------------------------------------------
    TransactionAudit(
        key="RAD-68", name="Provide and Register Imaging Document Set - MTOM/XOP", section="RAD TF-3 4.68.4.1.4",
        event_type=ihe_transaction("RAD-68", "Provide and Register Imaging Document Set - MTOM/XOP"),
        as_source=EXPORT_R, as_destination=IMPORT_C, requires=frozenset({"patient", "submission_set"}),
    ),
    TransactionAudit(
        key="RAD-69", name="Retrieve Imaging Document Set", section="RAD TF-3 4.69.4.1.4",
        event_type=ihe_transaction("RAD-69", "Retrieve Imaging Document Set"),
        as_source=EXPORT_R, as_destination=IMPORT_C, requestor="destination", requires=frozenset({"study"}),
    ),
    # -- DICOM (PS3.15 A.5.3) ------------------------------------------------------------------------
    TransactionAudit(
        key="DICOM-STORE", name="DICOM Instances Transferred", section="DICOM PS3.15 A.5.3.4",
        event_type=None,
        as_source=SideEvent(event_id=codes.DICOM_INSTANCES_TRANSFERRED, action="R"),
        as_destination=SideEvent(event_id=codes.DICOM_INSTANCES_TRANSFERRED, action="C"),
        requires=frozenset({"study"}),
    ),
    TransactionAudit(
        key="DICOM-QUERY", name="Query", section="DICOM PS3.15 A.5.3.11",
        event_type=None, as_source=_ev(codes.QUERY, "E"), requires=frozenset({"query"}),
        query_id_type=codes.SOP_CLASS_UID, query_detail="TransferSyntax",
    ),
    # -- node events ---------------------------------------------------------------------------------
    TransactionAudit(
        key="APP-START", name="Application Start", section="DICOM PS3.15 A.5.3.1",
        event_type=codes.APPLICATION_START, as_source=_ev(codes.APPLICATION_ACTIVITY, "E"), participants="node",
    ),
    TransactionAudit(
        key="APP-STOP", name="Application Stop", section="DICOM PS3.15 A.5.3.1",
        event_type=codes.APPLICATION_STOP, as_source=_ev(codes.APPLICATION_ACTIVITY, "E"), participants="node",
    ),
    TransactionAudit(
        key="LOGIN", name="User Authentication: Login", section="DICOM PS3.15 A.5.3.11; ITI TF-2a 3.2.6",
        event_type=codes.LOGIN, as_source=_ev(codes.USER_AUTHENTICATION, "E"), participants="node",
        schematron="110122_ITI-2_Get_User_Authentication_Login",
    ),
    TransactionAudit(
        key="LOGOUT", name="User Authentication: Logout", section="DICOM PS3.15 A.5.3.11; ITI TF-2a 3.2.6",
        event_type=codes.LOGOUT, as_source=_ev(codes.USER_AUTHENTICATION, "E"), participants="node",
        schematron="110123_ITI-2_Get_User_Authentication_Logout",
    ),
    TransactionAudit(
        key="SECURITY-ALERT", name="Security Alert", section="DICOM PS3.15 A.5.3.12",
        event_type=codes.SECURITY_ALERT_TYPES["node-authentication"], as_source=_ev(codes.SECURITY_ALERT, "E"),
        participants="node",
    ),
    TransactionAudit(
        key="EXPORT", name="Export (film sharing, media)", section="DICOM PS3.15 A.5.3.5",
        event_type=None, as_source=_ev(codes.EXPORT, "R"), participants="node", requires=frozenset({"patient"}),
    ),
    TransactionAudit(
        key="PATIENT-RECORD", name="Patient Record", section="DICOM PS3.15 A.5.3.8",
        event_type=None, as_source=_ev(codes.PATIENT_RECORD, "R"), participants="node", requires=frozenset({"patient"}),
    ),
    TransactionAudit(
        key="AUDIT-LOG-USED", name="Audit Log Used", section="DICOM PS3.15 A.5.3.2; ITI TF-2c 3.81.5",
        event_type=None, as_source=_ev(codes.AUDIT_LOG_USED, "R"), participants="node",
        requires=frozenset({"audit_log"}),
    ),
]

TRANSACTIONS: Mapping[str, TransactionAudit] = types.MappingProxyType({e.key: e for e in _ENTRIES})


def lookup(key: str, table: Mapping[str, TransactionAudit] = TRANSACTIONS) -> TransactionAudit:
    """The entry for ``key`` (``ITI-09`` and ``iti-9`` find ``ITI-9``); `KeyError` names close keys."""
    norm = key.strip().upper()
    if norm in table:
        return table[norm]
    prefix, sep, number = norm.partition("-")
    if sep and number.isdigit() and f"{prefix}-{int(number)}" in table:
        return table[f"{prefix}-{int(number)}"]
    close = difflib.get_close_matches(norm, list(table), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(table))}"
    raise KeyError(f"no audit strategy for {key!r}{hint}")
