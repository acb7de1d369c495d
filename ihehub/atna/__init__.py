"""ATNA (IHE ITI TF-1 9, ITI TF-2a 3.19/3.20): audit messages, their emission and the Audit Record
Repository — transport-free, no web or CLI framework.

* model:        DICOM PS3.15 A.5 audit messages (frozen dataclasses) and their XML
* transactions: the audit strategy of every transaction and node event (one table)
* context:      `AuditContext`: build and emit a transaction's audit in one line
* validate:     DICOM audit schema + connectathon Schematron rules
* syslog:       RFC 5424 messages, RFC 5425 / 6587 framing
* sender:       send over TLS (RFC 5425) and UDP (RFC 5426)
* store:        the repository's SQL store: hash chain, search, verify, retention
* fhir:         ITI-81: audit messages as FHIR R4 AuditEvent, the AuditEvent search parameters
* receiver:     `AuditRepository`: TLS, UDP and TCP listeners
* pool:         `ParallelExaminer`: received messages validated in worker processes
* forward:      `AuditForwarder`: the persistent audit sender to other repositories (queue, backoff, dead
                rows, purge of sent rows); `outbox_summary`, `outbox_rows`, `resend_op` for operators
* timeclient:   `TimeClient`: Consistent Time (ITI-1) NTP offset, jitter and alert
"""

from ihehub.atna.codes import Code
from ihehub.atna.context import AuditBuildError, AuditContext, AuditSink, DocumentRef, Endpoint, StudyRef
from ihehub.atna.fhir import (
    FHIR_JSON,
    FhirSearch,
    FhirSearchError,
    next_cursor,
    operation_outcome,
    parse_search,
    record_to_audit_event,
    searchset,
    to_audit_event,
)
from ihehub.atna.forward import (
    FORWARD_SCHEMES,
    AuditForwarder,
    OutboxSummary,
    RemoteRepository,
    outbox_rows,
    outbox_summary,
    repositories_from_config,
    resend_op,
)
from ihehub.atna.ingest import AuditRecord, examine
from ihehub.atna.model import (
    ActiveParticipant,
    AuditMessage,
    AuditSourceIdentification,
    AuditXMLError,
    EventIdentification,
    ObjectDescription,
    ObjectDetail,
    ParticipantObjectIdentification,
    SOPClass,
    parse_xml,
)
from ihehub.atna.pool import ParallelExaminer
from ihehub.atna.receiver import AuditRepository, SecurityHook
from ihehub.atna.sender import SyslogTlsClient, send_tls, send_udp, syslog_message
from ihehub.atna.store import AuditPage, AuditQuery, AuditStore, ChainHead, StoredAudit, VerifyReport
from ihehub.atna.syslog import (
    FrameError,
    OctetCountingDecoder,
    StreamDecoder,
    SyslogError,
    SyslogMessage,
    format_syslog,
    octet_frame,
    parse_syslog,
)
from ihehub.atna.timeclient import TimeClient, TimeSample, parse_ntp_server
from ihehub.atna.transactions import TRANSACTIONS, SideEvent, TransactionAudit
from ihehub.atna.validate import ValidationResult, Validator, ValidatorError

__all__ = [
    "FHIR_JSON",
    "FORWARD_SCHEMES",
    "TRANSACTIONS",
    "ActiveParticipant",
    "AuditBuildError",
    "AuditContext",
    "AuditForwarder",
    "AuditMessage",
    "AuditPage",
    "AuditQuery",
    "AuditRecord",
    "AuditRepository",
    "AuditSink",
    "AuditSourceIdentification",
    "AuditStore",
    "AuditXMLError",
    "ChainHead",
    "Code",
    "DocumentRef",
    "Endpoint",
    "EventIdentification",
    "FhirSearch",
    "FhirSearchError",
    "FrameError",
    "ObjectDescription",
    "ObjectDetail",
    "OctetCountingDecoder",
    "OutboxSummary",
    "ParallelExaminer",
    "ParticipantObjectIdentification",
    "RemoteRepository",
    "SOPClass",
    "SecurityHook",
    "SideEvent",
    "StoredAudit",
    "StreamDecoder",
    "StudyRef",
    "SyslogError",
    "SyslogMessage",
    "SyslogTlsClient",
    "TimeClient",
    "TimeSample",
    "TransactionAudit",
    "ValidationResult",
    "Validator",
    "ValidatorError",
    "VerifyReport",
    "examine",
    "format_syslog",
    "next_cursor",
    "octet_frame",
    "operation_outcome",
    "outbox_rows",
    "outbox_summary",
    "parse_ntp_server",
    "parse_search",
    "parse_syslog",
    "parse_xml",
    "record_to_audit_event",
    "repositories_from_config",
    "resend_op",
    "searchset",
    "send_tls",
    "send_udp",
    "syslog_message",
    "to_audit_event",
]
