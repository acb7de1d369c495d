"""empi: visits (PV1 of each feed) for ITI-22 Patient Demographics and Visit Query

Revision ID: 0007_empi_visits
Revises: 0003_empi
Create Date: 2026-11-27 11:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_empi_visits"
down_revision = "0003_empi"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "empi_visits",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("record_id", sa.BigInteger(), nullable=False),
        sa.Column("visit_number", sa.String(length=64), nullable=False),
        sa.Column("patient_class", sa.String(length=8), nullable=True),
        sa.Column("location", sa.String(length=128), nullable=True),
        sa.Column("point_of_care", sa.String(length=64), nullable=True),
        sa.Column("attending", sa.String(length=256), nullable=True),
        sa.Column("attending_key", sa.String(length=128), nullable=True),
        sa.Column("referring", sa.String(length=256), nullable=True),
        sa.Column("hospital_service", sa.String(length=16), nullable=True),
        sa.Column("admitting", sa.String(length=256), nullable=True),
        sa.Column("admit_time", sa.String(length=26), nullable=True),
        sa.Column("discharge_time", sa.String(length=26), nullable=True),
        sa.Column("pv1", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("record_id", "visit_number", name="uq_empi_visits_record_visit"),
    )
    with op.batch_alter_table("empi_visits", schema=None) as batch_op:
        batch_op.create_index("ix_empi_visits_number", ["visit_number"], unique=False)
        batch_op.create_index("ix_empi_visits_point_of_care", ["point_of_care"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("empi_visits", schema=None) as batch_op:
        batch_op.drop_index("ix_empi_visits_point_of_care")
        batch_op.drop_index("ix_empi_visits_number")
    op.drop_table("empi_visits")
