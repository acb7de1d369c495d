"""atna: the event time on the search-index rows (audit_ids.event_time) and their (kind, value, time) index

Revision ID: 0011_atnafin_ids_time
Revises: 0010_atnafin_outbox
Create Date: 2026-11-27 15:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_atnafin_ids_time"
down_revision = "0010_atnafin_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_ids", schema=None) as batch_op:
        batch_op.add_column(sa.Column("event_time", sa.Float(), nullable=True))
    # existing rows take their record's event time (one pass; large repositories: run `ihehub db upgrade`
    # in a quiet hour)
    op.execute("UPDATE audit_ids SET event_time = (SELECT r.event_time FROM audit_records r "
               "WHERE r.seq = audit_ids.seq)")
    with op.batch_alter_table("audit_ids", schema=None) as batch_op:
        batch_op.create_index("ix_audit_ids_time", ["kind", "value", "event_time", "seq"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("audit_ids", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_ids_time")
        batch_op.drop_column("event_time")
