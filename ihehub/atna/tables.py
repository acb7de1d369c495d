"""SQL schema of the Audit Record Repository (its own ``MetaData``; migration branch ``atna``).

* ``audit_records``: every received message, raw bytes as received, the fields search needs, the
  validation result, and ``hash``: SHA-256 over the previous record's hash and this record's
  content (a hash chain; ``seq`` is the position in the chain, gapless).
* ``audit_ids``: the multi-valued search keys of a record (patient, user, study, document and other
  object ids): one row each, the primary key is the search index; with the record's event time, so
  that an id within a time range is found from the index alone.  Network addresses are kept in
  ``audit_records.ids`` only (searched there, within the other criteria).
* ``audit_chain``: the head of the chain (last seq and hash) and what retention removed (the
  last pruned seq and its hash, so that the rest still verifies).

Timestamps are UNIX epoch seconds (float).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from ihehub.bus.tables import IdType

metadata = MetaData()

SeqType = IdType  # BIGINT, INTEGER (the rowid) on SQLite

# column sizes (values are cut to fit before they are hashed and stored)
SIZES = {
    "transport": 8, "peer": 255, "tls_subject": 512, "syslog_host": 255, "syslog_app": 48,
    "syslog_procid": 128, "syslog_msgid": 32, "event_id": 64, "event_type": 64, "action": 1,
    "source_id": 255, "site_id": 255,
}
ID_VALUE_SIZE = 255

audit_records = Table(
    "audit_records",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=False),
    Column("received_at", Float, nullable=False),
    Column("transport", String(SIZES["transport"]), nullable=False),  # tls, tcp, udp, local
    Column("peer", String(SIZES["peer"])),  # address:port of the sender
    Column("tls_subject", String(SIZES["tls_subject"])),  # client certificate subject (mutual TLS)
    Column("syslog_host", String(SIZES["syslog_host"])),
    Column("syslog_app", String(SIZES["syslog_app"])),
    Column("syslog_procid", String(SIZES["syslog_procid"])),
    Column("syslog_msgid", String(SIZES["syslog_msgid"])),
    Column("event_id", String(SIZES["event_id"])),  # EventID code (110112 ...)
    Column("event_type", String(SIZES["event_type"])),  # first EventTypeCode code (ITI-9 ...)
    Column("action", String(SIZES["action"])),  # EventActionCode
    Column("outcome", Integer),  # EventOutcomeIndicator
    Column("event_time", Float),  # EventDateTime
    Column("source_id", String(SIZES["source_id"])),  # AuditSourceID
    Column("site_id", String(SIZES["site_id"])),  # AuditEnterpriseSiteID
    Column("ids", Text),  # JSON [[kind, value], ...]: the rows of audit_ids, kept here for verification
    Column("valid", Boolean, nullable=False),
    Column("errors", Text),  # validation errors and warnings, one per line
    Column("body_at", Integer),  # offset of the audit XML in raw (None: none found)
    Column("size", Integer, nullable=False),
    Column("raw", LargeBinary, nullable=False),
    Column("hash", String(64), nullable=False),
)
Index("ix_audit_records_event_time", audit_records.c.event_time)
Index("ix_audit_records_event_id_time", audit_records.c.event_id, audit_records.c.event_time)
Index("ix_audit_records_source_time", audit_records.c.source_id, audit_records.c.event_time)

audit_ids = Table(
    "audit_ids",
    metadata,
    Column("kind", String(8), nullable=False),  # patient, user, study, document, object
    Column("value", String(ID_VALUE_SIZE), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("event_time", Float),  # the record's EventDateTime (copied: ITI-81 searches an id within a time range)
    PrimaryKeyConstraint("kind", "value", "seq", name="pk_audit_ids"),
    sqlite_with_rowid=False,
)
Index("ix_audit_ids_seq", audit_ids.c.seq)  # verification and retention walk the chain by seq
# an id's records within a time range, newest event first, without reading the records (ITI-81)
Index("ix_audit_ids_time", audit_ids.c.kind, audit_ids.c.value, audit_ids.c.event_time, audit_ids.c.seq)

audit_chain = Table(
    "audit_chain",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("last_seq", BigInteger, nullable=False),
    Column("last_hash", String(64), nullable=False),
    Column("pruned_seq", BigInteger, nullable=False),  # records up to this seq were removed by retention
    Column("pruned_hash", String(64), nullable=False),  # the hash of record pruned_seq: the chain goes on from it
    Column("pruned_at", Float),
    Column("updated_at", Float, nullable=False),
)

# The persistent audit sender's queue (ITI TF-2a 3.20.4.1.1: an audit is kept until a repository has
# it): one row per message and configured repository, the RFC 5424 message ready to frame.  ``state``:
# queued (waiting or being sent), sent (kept ``keep_sent`` seconds, then purged), dead (not delivered
# within ``expire_after`` of ``queued_at``: kept until an operator resends it, never deleted by the
# sender).  ``lease_*``: the process sending it now (several serve processes may share PostgreSQL).
OUTBOX_STATES = ("queued", "sent", "dead")
atna_outbox = Table(
    "atna_outbox",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("repository", String(64), nullable=False),
    Column("created_at", Float, nullable=False),  # when the audit was emitted
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(64)),
    Column("lease_expires", Float),
    Column("last_error", Text),
    Column("payload", LargeBinary, nullable=False),
    Column("state", String(8), nullable=False, default="queued", server_default="queued"),
    Column("queued_at", Float),  # when it (last) entered the queue: created, or resent by an operator
    Column("sent_at", Float),
    Column("dead_at", Float),
)
Index("ix_atna_outbox_queue", atna_outbox.c.repository, atna_outbox.c.state, atna_outbox.c.id)
Index("ix_atna_outbox_sent", atna_outbox.c.state, atna_outbox.c.sent_at)
