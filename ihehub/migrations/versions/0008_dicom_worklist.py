"""dicom: Modality Worklist scheduled procedure steps (fed by HL7 orders)

Revision ID: 0008_dicom_worklist
Revises: 0004_dicom
Create Date: 2026-11-27 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_dicom_worklist"
down_revision = "0004_dicom"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "dicom_worklist",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("accession_number", sa.String(length=16), nullable=False),
        sa.Column("sps_id", sa.String(length=16), nullable=False),
        sa.Column("requested_procedure_id", sa.String(length=16), nullable=True),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("placer_order", sa.String(length=64), nullable=True),
        sa.Column("filler_order", sa.String(length=64), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("patient_name", sa.String(length=400), nullable=True),
        sa.Column("name_key", sa.String(length=400), nullable=True),
        sa.Column("birth_date", sa.String(length=8), nullable=True),
        sa.Column("sex", sa.String(length=16), nullable=True),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("station_ae", sa.String(length=16), nullable=True),
        sa.Column("station_name", sa.String(length=16), nullable=True),
        sa.Column("start_date", sa.String(length=8), nullable=True),
        sa.Column("start_time", sa.String(length=16), nullable=True),
        sa.Column("description", sa.String(length=64), nullable=True),
        sa.Column("code_value", sa.String(length=16), nullable=True),
        sa.Column("code_scheme", sa.String(length=16), nullable=True),
        sa.Column("referring_physician", sa.String(length=400), nullable=True),
        sa.Column("performing_physician", sa.String(length=400), nullable=True),
        sa.Column("charset", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("accession_number", "sps_id", name="uq_dicom_worklist_step"),
    )
    op.create_index("ix_dicom_worklist_start", "dicom_worklist", ["start_date"], unique=False)
    op.create_index("ix_dicom_worklist_patient", "dicom_worklist", ["patient_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_dicom_worklist_patient", table_name="dicom_worklist")
    op.drop_index("ix_dicom_worklist_start", table_name="dicom_worklist")
    op.drop_table("dicom_worklist")
