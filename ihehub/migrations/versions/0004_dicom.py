"""dicom: image manager index (patients, studies, series, instances)

Revision ID: 0004_dicom
Revises: 0001
Create Date: 2026-11-28 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_dicom"
down_revision = "0001"
branch_labels = ("dicom",)
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "dicom_patients",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=400), nullable=True),
        sa.Column("name_key", sa.String(length=400), nullable=True),
        sa.Column("birth_date", sa.String(length=8), nullable=True),
        sa.Column("sex", sa.String(length=16), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("patient_id", "issuer", name="uq_dicom_patients_id_issuer"),
    )
    op.create_index("ix_dicom_patients_name_key", "dicom_patients", ["name_key"], unique=False)
    op.create_table(
        "dicom_studies",
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_pk", sa.BigInteger(), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("study_time", sa.String(length=16), nullable=True),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("study_id", sa.String(length=16), nullable=True),
        sa.Column("description", sa.String(length=64), nullable=True),
        sa.Column("referring_physician", sa.String(length=400), nullable=True),
        sa.Column("referring_key", sa.String(length=400), nullable=True),
        sa.Column("modalities", sa.String(length=64), nullable=True),
        sa.Column("sop_classes", sa.String(length=1024), nullable=True),
        sa.Column("num_series", sa.Integer(), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("study_uid"),
    )
    op.create_index("ix_dicom_studies_patient", "dicom_studies", ["patient_pk"], unique=False)
    op.create_index("ix_dicom_studies_date", "dicom_studies", ["study_date"], unique=False)
    op.create_index("ix_dicom_studies_accession", "dicom_studies", ["accession_number"], unique=False)
    op.create_table(
        "dicom_series",
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("description", sa.String(length=64), nullable=True),
        sa.Column("body_part", sa.String(length=16), nullable=True),
        sa.Column("series_date", sa.String(length=8), nullable=True),
        sa.Column("series_time", sa.String(length=16), nullable=True),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("series_uid"),
    )
    op.create_index("ix_dicom_series_study", "dicom_series", ["study_uid"], unique=False)
    op.create_index("ix_dicom_series_modality", "dicom_series", ["modality"], unique=False)
    op.create_table(
        "dicom_instances",
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("content_date", sa.String(length=8), nullable=True),
        sa.Column("content_time", sa.String(length=16), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("frames", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("indexed_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("sop_instance_uid"),
    )
    op.create_index("ix_dicom_instances_series", "dicom_instances", ["series_uid"], unique=False)
    op.create_index("ix_dicom_instances_study", "dicom_instances", ["study_uid"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_dicom_instances_study", table_name="dicom_instances")
    op.drop_index("ix_dicom_instances_series", table_name="dicom_instances")
    op.drop_table("dicom_instances")
    op.drop_index("ix_dicom_series_modality", table_name="dicom_series")
    op.drop_index("ix_dicom_series_study", table_name="dicom_series")
    op.drop_table("dicom_series")
    op.drop_index("ix_dicom_studies_accession", table_name="dicom_studies")
    op.drop_index("ix_dicom_studies_date", table_name="dicom_studies")
    op.drop_index("ix_dicom_studies_patient", table_name="dicom_studies")
    op.drop_table("dicom_studies")
    op.drop_index("ix_dicom_patients_name_key", table_name="dicom_patients")
    op.drop_table("dicom_patients")
