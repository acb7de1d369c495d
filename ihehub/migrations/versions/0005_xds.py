"""xds: document registry (objects, codes, slots, associations)

Revision ID: 0005_xds
Revises: 0001
Create Date: 2026-11-27 11:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_xds"
down_revision = "0001"
branch_labels = ("xds",)
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "xds_objects",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("entry_uuid", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("lid", sa.String(length=128), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("unique_id", sa.String(length=256), nullable=True),
        sa.Column("patient_id", sa.String(length=512), nullable=True),
        sa.Column("status", sa.String(length=80), nullable=False),
        sa.Column("object_type", sa.String(length=128), nullable=True),
        sa.Column("creation_time", sa.String(length=14), nullable=True),
        sa.Column("service_start_time", sa.String(length=14), nullable=True),
        sa.Column("service_stop_time", sa.String(length=14), nullable=True),
        sa.Column("submission_time", sa.String(length=14), nullable=True),
        sa.Column("last_update_time", sa.String(length=14), nullable=True),
        sa.Column("source_id", sa.String(length=256), nullable=True),
        sa.Column("mime_type", sa.String(length=128), nullable=True),
        sa.Column("hash", sa.String(length=40), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("repository_unique_id", sa.String(length=256), nullable=True),
        sa.Column("home_community_id", sa.String(length=256), nullable=True),
        sa.Column("xml", sa.Text(), nullable=False),
        sa.Column("registered_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("entry_uuid"),
    )
    op.create_index("ix_xds_objects_unique_id", "xds_objects", ["unique_id"], unique=False)
    op.create_index("ix_xds_objects_patient_id", "xds_objects", ["patient_id"], unique=False)
    op.create_index("ix_xds_objects_patient_kind_status", "xds_objects", ["patient_id", "kind", "status"],
                    unique=False)
    op.create_table(
        "xds_codes",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("object_id", sa.BigInteger(), nullable=False),
        sa.Column("scheme", sa.String(length=128), nullable=False),
        sa.Column("code", sa.String(length=256), nullable=False),
        sa.Column("coding_scheme", sa.String(length=256), nullable=False),
        sa.ForeignKeyConstraint(["object_id"], ["xds_objects.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_xds_codes_object_id", "xds_codes", ["object_id"], unique=False)
    op.create_index("ix_xds_codes_scheme_code", "xds_codes", ["scheme", "code"], unique=False)
    op.create_table(
        "xds_slots",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("object_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["object_id"], ["xds_objects.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_xds_slots_object_id", "xds_slots", ["object_id"], unique=False)
    op.create_index("ix_xds_slots_name", "xds_slots", ["name"], unique=False)
    op.create_table(
        "xds_associations",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("entry_uuid", sa.String(length=128), nullable=True),
        sa.Column("type", sa.String(length=128), nullable=False),
        sa.Column("source_uuid", sa.String(length=128), nullable=True),
        sa.Column("target_uuid", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=80), nullable=False),
        sa.Column("xml", sa.Text(), nullable=False),
        sa.Column("registered_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("entry_uuid"),
    )
    op.create_index("ix_xds_associations_source_uuid", "xds_associations", ["source_uuid"], unique=False)
    op.create_index("ix_xds_associations_target_uuid", "xds_associations", ["target_uuid"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_xds_associations_target_uuid", table_name="xds_associations")
    op.drop_index("ix_xds_associations_source_uuid", table_name="xds_associations")
    op.drop_table("xds_associations")
    op.drop_index("ix_xds_slots_name", table_name="xds_slots")
    op.drop_index("ix_xds_slots_object_id", table_name="xds_slots")
    op.drop_table("xds_slots")
    op.drop_index("ix_xds_codes_scheme_code", table_name="xds_codes")
    op.drop_index("ix_xds_codes_object_id", table_name="xds_codes")
    op.drop_table("xds_codes")
    op.drop_index("ix_xds_objects_patient_kind_status", table_name="xds_objects")
    op.drop_index("ix_xds_objects_patient_id", table_name="xds_objects")
    op.drop_index("ix_xds_objects_unique_id", table_name="xds_objects")
    op.drop_table("xds_objects")
