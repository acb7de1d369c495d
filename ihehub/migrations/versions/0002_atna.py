"""atna: audit record repository (records, search ids, hash chain head)

Revision ID: 0002_atna
Revises: 0001
Create Date: 2026-11-28 09:00:00
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0002_atna"
down_revision = "0001"
branch_labels = ("atna",)
depends_on = None

GENESIS = "0" * 64


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=False, nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("transport", sa.String(length=8), nullable=False),
        sa.Column("peer", sa.String(length=255), nullable=True),
        sa.Column("tls_subject", sa.String(length=512), nullable=True),
        sa.Column("syslog_host", sa.String(length=255), nullable=True),
        sa.Column("syslog_app", sa.String(length=48), nullable=True),
        sa.Column("syslog_procid", sa.String(length=128), nullable=True),
        sa.Column("syslog_msgid", sa.String(length=32), nullable=True),
        sa.Column("event_id", sa.String(length=64), nullable=True),
        sa.Column("event_type", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=1), nullable=True),
        sa.Column("outcome", sa.Integer(), nullable=True),
        sa.Column("event_time", sa.Float(), nullable=True),
        sa.Column("source_id", sa.String(length=255), nullable=True),
        sa.Column("site_id", sa.String(length=255), nullable=True),
        sa.Column("ids", sa.Text(), nullable=True),
        sa.Column("valid", sa.Boolean(), nullable=False),
        sa.Column("errors", sa.Text(), nullable=True),
        sa.Column("body_at", sa.Integer(), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.create_index("ix_audit_records_event_time", ["event_time"], unique=False)
        batch_op.create_index("ix_audit_records_event_id_time", ["event_id", "event_time"], unique=False)
        batch_op.create_index("ix_audit_records_source_time", ["source_id", "event_time"], unique=False)

    op.create_table(
        "audit_ids",
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "value", "seq", name="pk_audit_ids"),
        sqlite_with_rowid=False,
    )
    with op.batch_alter_table("audit_ids", schema=None) as batch_op:
        batch_op.create_index("ix_audit_ids_seq", ["seq"], unique=False)
    chain = op.create_table(
        "audit_chain",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.Column("pruned_seq", sa.BigInteger(), nullable=False),
        sa.Column("pruned_hash", sa.String(length=64), nullable=False),
        sa.Column("pruned_at", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.bulk_insert(chain, [{
        "name": "main", "last_seq": 0, "last_hash": GENESIS, "pruned_seq": 0, "pruned_hash": GENESIS,
        "pruned_at": None, "updated_at": time.time(),
    }])


def downgrade() -> None:
    op.drop_table("audit_chain")
    with op.batch_alter_table("audit_ids", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_ids_seq")
    op.drop_table("audit_ids")
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_records_source_time")
        batch_op.drop_index("ix_audit_records_event_id_time")
        batch_op.drop_index("ix_audit_records_event_time")
    op.drop_table("audit_records")
