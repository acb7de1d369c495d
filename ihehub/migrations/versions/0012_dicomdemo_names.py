"""dicom: the EMPI's demographics of linked DICOM patients (empi_name, empi_name_key, empi_birth_date, empi_sex,
empi_read_at) that C-FIND and QIDO answer with (IHE RAD Patient Information Reconciliation)

Revision ID: 0012_dicomdemo_names
Revises: 0010_dicomempi_link
Create Date: 2026-11-27 19:20:00

Existing linked rows get their demographics from the EMPI when the linker next starts (rows with
``empi_read_at`` NULL are read again); nothing is copied here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_dicomdemo_names"
down_revision = "0010_dicomempi_link"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dicom_patients", sa.Column("empi_name", sa.String(length=400), nullable=True))
    op.add_column("dicom_patients", sa.Column("empi_name_key", sa.String(length=400), nullable=True))
    op.add_column("dicom_patients", sa.Column("empi_birth_date", sa.String(length=8), nullable=True))
    op.add_column("dicom_patients", sa.Column("empi_sex", sa.String(length=16), nullable=True))
    op.add_column("dicom_patients", sa.Column("empi_read_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dicom_patients") as batch:
        batch.drop_column("empi_read_at")
        batch.drop_column("empi_sex")
        batch.drop_column("empi_birth_date")
        batch.drop_column("empi_name_key")
        batch.drop_column("empi_name")
