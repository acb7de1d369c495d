"""dicom: pending study-complete timers (dicom_pending_studies)

Revision ID: 0009_dicom_pending
Revises: 0008_dicom_worklist
Create Date: 2026-11-27 12:25:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_dicom_pending"
down_revision = "0008_dicom_worklist"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicom_pending_studies",
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("first_received_at", sa.Float(), nullable=False),
        sa.Column("last_received_at", sa.Float(), nullable=False),
        sa.Column("received", sa.Integer(), nullable=False),
        sa.Column("calling_aes", sa.String(length=1024), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("study_uid"),
    )


def downgrade() -> None:
    op.drop_table("dicom_pending_studies")
