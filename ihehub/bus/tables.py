"""SQL schema of the bus: messages, per-destination deliveries (the lease queue), attempts, dedup keys,
API tokens and persisted channel state.

Timestamps are UNIX epoch seconds (float): cheap to compare in claim queries on SQLite and PostgreSQL
alike.  Bodies are bytes exactly as received; retention sets them to NULL and keeps the row.
The schema is created and evolved by the Alembic migrations in ``ihehub/migrations``; this
module is the model those migrations are generated from.
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
    String,
    Table,
    Text,
)

metadata = MetaData()

# Auto-increment keys: BIGINT on PostgreSQL, INTEGER (rowid alias) on SQLite.
IdType = BigInteger().with_variant(Integer(), "sqlite")

messages = Table(
    "messages",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("channel", String(128), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("content_type", String(128)),
    Column("charset", String(32)),
    Column("control_id", String(200)),
    Column("message_type", String(64)),
    Column("correlation_id", String(200)),
    Column("source", String(255)),
    Column("headers", Text),  # JSON object
    Column("size", Integer, nullable=False),
    Column("raw", LargeBinary),  # NULL once pruned by retention
    Column("transformed", LargeBinary),  # NULL when the transformer passed the message through
    # ingest status: queued (has deliveries), stored (no destination), filtered, duplicate, error
    Column("status", String(16), nullable=False),
    Column("error", Text),
    Column("pruned_at", Float),
)
Index("ix_messages_received", messages.c.received_at)
Index("ix_messages_channel_received", messages.c.channel, messages.c.received_at)
Index("ix_messages_control", messages.c.control_id)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("message_id", String(32), nullable=False),
    Column("queue", String(260), nullable=False),  # "<channel>/<destination>"
    Column("destination", String(128), nullable=False),
    # queued -> sending (leased) -> sent | error (retry later) | dead
    Column("state", String(8), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_owner", String(64)),
    Column("lease_expires", Float),
    Column("dispatched", Boolean, nullable=False, default=False),  # handed to the broker (scale-out)
    Column("response_status", String(64)),
    Column("response", LargeBinary),
    Column("error", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)
Index("ix_deliveries_claim", deliveries.c.queue, deliveries.c.state, deliveries.c.next_attempt_at)
Index("ix_deliveries_message", deliveries.c.message_id)
Index("ix_deliveries_undispatched", deliveries.c.dispatched, deliveries.c.state)

attempts = Table(
    "attempts",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("delivery_id", BigInteger, nullable=False),
    Column("message_id", String(32), nullable=False),
    Column("number", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float, nullable=False),
    Column("ok", Boolean, nullable=False),
    Column("status", String(64)),
    Column("response", LargeBinary),
    Column("error", Text),
    Column("worker", String(64)),
)
Index("ix_attempts_delivery", attempts.c.delivery_id)

dedup_keys = Table(
    "dedup_keys",
    metadata,
    Column("channel", String(128), primary_key=True),
    Column("control_id", String(200), primary_key=True),
    Column("message_id", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("token_hash", String(128), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float),
    Column("revoked_at", Float),
)

channel_state = Table(
    "channel_state",
    metadata,
    Column("channel", String(128), primary_key=True),
    Column("enabled", Boolean, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("updated_by", String(128)),
)
