"""dicom: the link of DICOM patients to the EMPI (enterprise_id, empi_state, merged_into)

Revision ID: 0010_dicomempi_link
Revises: 0009_dicom_pending
Create Date: 2026-11-27 15:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_dicomempi_link"
down_revision = "0009_dicom_pending"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dicom_patients", sa.Column("enterprise_id", sa.String(length=64), nullable=True))
    op.add_column("dicom_patients", sa.Column("empi_state", sa.String(length=16), nullable=True))
    op.add_column("dicom_patients", sa.Column("merged_into", sa.String(length=64), nullable=True))
    op.create_index("ix_dicom_patients_enterprise", "dicom_patients", ["enterprise_id"])
    op.create_index("ix_dicom_patients_empi_state", "dicom_patients", ["empi_state"])


def downgrade() -> None:
    op.drop_index("ix_dicom_patients_empi_state", table_name="dicom_patients")
    op.drop_index("ix_dicom_patients_enterprise", table_name="dicom_patients")
    with op.batch_alter_table("dicom_patients") as batch:
        batch.drop_column("merged_into")
        batch.drop_column("empi_state")
        batch.drop_column("enterprise_id")
