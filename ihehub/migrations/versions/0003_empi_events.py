"""empi_events: patient-event publisher (outbox cursors, local db-listener outbox table)

Revision ID: 0003_empi_events
Revises: 0001
Create Date: 2026-11-27 11:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_empi_events"
down_revision = "0001"
branch_labels = ("empi_events",)
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "empi_event_cursors",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "empi_event_outbox",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("listener", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("patient", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("event_at", sa.Float(), nullable=False),
        sa.Column("delivered_at", sa.Float(), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ux_empi_event_outbox_event", "empi_event_outbox", ["listener", "event_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_empi_event_outbox_event", table_name="empi_event_outbox")
    op.drop_table("empi_event_outbox")
    op.drop_table("empi_event_cursors")
