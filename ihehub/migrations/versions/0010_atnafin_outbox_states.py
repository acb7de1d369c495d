"""atna: audit sender queue states (queued, sent, dead), retention of sent rows, expiry

Revision ID: 0010_atnafin_outbox
Revises: 0006_atna_outbox
Create Date: 2026-11-27 15:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_atnafin_outbox"
down_revision = "0006_atna_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("atna_outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("state", sa.String(length=8), server_default="queued", nullable=False))
        batch_op.add_column(sa.Column("queued_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("sent_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("dead_at", sa.Float(), nullable=True))
        batch_op.drop_index("ix_atna_outbox_repository")
        batch_op.create_index("ix_atna_outbox_queue", ["repository", "state", "id"], unique=False)
        batch_op.create_index("ix_atna_outbox_sent", ["state", "sent_at"], unique=False)
    op.execute("UPDATE atna_outbox SET queued_at = created_at")


def downgrade() -> None:
    op.execute("DELETE FROM atna_outbox WHERE state = 'sent'")
    with op.batch_alter_table("atna_outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_atna_outbox_sent")
        batch_op.drop_index("ix_atna_outbox_queue")
        batch_op.create_index("ix_atna_outbox_repository", ["repository", "id"], unique=False)
        batch_op.drop_column("dead_at")
        batch_op.drop_column("sent_at")
        batch_op.drop_column("queued_at")
        batch_op.drop_column("state")
