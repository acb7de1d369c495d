"""atna: the persistent audit sender's queue (atna_outbox)

Revision ID: 0006_atna_outbox
Revises: 0002_atna
Create Date: 2026-11-27 11:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_atna_outbox"
down_revision = "0002_atna"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "atna_outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("repository", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("atna_outbox", schema=None) as batch_op:
        batch_op.create_index("ix_atna_outbox_repository", ["repository", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("atna_outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_atna_outbox_repository")
    op.drop_table("atna_outbox")
