"""SQL index of the stored instances (its own ``MetaData``; migration branch ``dicom``).

The four levels of the DICOM information model (PS3.4 C.6.1.1 Patient Root, C.6.2.1 Study Root):

* ``dicom_patients``: one row per (Patient ID, Issuer of Patient ID), with the newest demographics.
  ``name`` is the Patient's Name decoded to text (all component groups, ``=``-separated); ``name_key`` is
  its case-folded form that C-FIND narrows on before matching each group exactly.  ``patient_id`` and
  ``issuer`` stay as received; ``enterprise_id`` / ``empi_state`` / ``merged_into`` link the row to the EMPI
  (`ihehub.dicom.patients`); ``empi_name`` / ``empi_birth_date`` / ``empi_sex`` are the EMPI's demographics
  that C-FIND and QIDO answer a linked row with (Patient Information Reconciliation), the file's stay as they are.
* ``dicom_studies`` / ``dicom_series``: the attributes C-FIND matches and returns, with the counts of
  their instances kept up to date at every index batch (``num_series``, ``num_instances``, ``modalities``).
* ``dicom_instances``: one row per SOP instance and the file it lives in (relative to ``data_dir/dicom``).

Dates are the DICOM DA text ``YYYYMMDD`` (they sort and range-compare as text), times the TM text;
timestamps are UNIX epoch seconds.  Values are cut to the column sizes before they are written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import BigInteger, Column, Float, Index, Integer, MetaData, String, Table, UniqueConstraint

from ihehub.bus.tables import IdType

__all__ = ["fit", "instances", "metadata", "patients", "series", "studies", "worklist"]

metadata = MetaData()

UID = 64
PN = 400  # three component groups of up to 64 characters per component, decoded

patients = Table(
    "dicom_patients",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("patient_id", String(64), nullable=False),  # (0010,0020), '' when absent
    Column("issuer", String(64), nullable=False),  # (0010,0021), '' when absent
    Column("name", String(PN)),  # (0010,0010)
    Column("name_key", String(PN)),
    Column("birth_date", String(8)),  # (0010,0030)
    Column("sex", String(16)),  # (0010,0040)
    Column("updated_at", Float, nullable=False),
    # the link to the hub's EMPI (migration 0010_dicomempi; ihehub.dicom.patients): NULL state = not looked at yet
    Column("enterprise_id", String(64)),  # the enterprise patient the record (patient_id, issuer) belongs to
    Column("empi_state", String(16)),  # linked | merged | unknown | no-domain | error
    Column("merged_into", String(64)),  # merged: the surviving Patient ID (same issuer) after an A40
    # the EMPI's demographics of the identity the row is answered under (migration 0012_dicomdemo_names; PIR): set by
    # the linker for linked / merged rows when actors.dicom.empi.demographics is on; NULL empi_read_at = the
    # file's demographics answer
    Column("empi_name", String(PN)),  # a DICOM PN (alphabetic=ideographic groups) built from the EMPI's names
    Column("empi_name_key", String(PN)),
    Column("empi_birth_date", String(8)),
    Column("empi_sex", String(16)),
    Column("empi_read_at", Float),  # epoch seconds of the EMPI read
    UniqueConstraint("patient_id", "issuer", name="uq_dicom_patients_id_issuer"),
    Index("ix_dicom_patients_name_key", "name_key"),
    Index("ix_dicom_patients_enterprise", "enterprise_id"),
    Index("ix_dicom_patients_empi_state", "empi_state"),
)

studies = Table(
    "dicom_studies",
    metadata,
    Column("study_uid", String(UID), primary_key=True),  # (0020,000D)
    Column("patient_pk", BigInteger, nullable=False),
    Column("study_date", String(8)),  # (0008,0020)
    Column("study_time", String(16)),  # (0008,0030)
    Column("accession_number", String(16)),  # (0008,0050)
    Column("study_id", String(16)),  # (0020,0010)
    Column("description", String(64)),  # (0008,1030)
    Column("referring_physician", String(PN)),  # (0008,0090)
    Column("referring_key", String(PN)),
    Column("modalities", String(64)),  # Modalities in Study (0008,0061), backslash-separated
    Column("sop_classes", String(1024)),  # SOP Classes in Study (0008,0062), backslash-separated
    Column("num_series", Integer, nullable=False, default=0),  # (0020,1206)
    Column("num_instances", Integer, nullable=False, default=0),  # (0020,1208)
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_dicom_studies_patient", "patient_pk"),
    Index("ix_dicom_studies_date", "study_date"),
    Index("ix_dicom_studies_accession", "accession_number"),
)

series = Table(
    "dicom_series",
    metadata,
    Column("series_uid", String(UID), primary_key=True),  # (0020,000E)
    Column("study_uid", String(UID), nullable=False),
    Column("modality", String(16)),  # (0008,0060)
    Column("series_number", Integer),  # (0020,0011)
    Column("description", String(64)),  # (0008,103E)
    Column("body_part", String(16)),  # (0018,0015)
    Column("series_date", String(8)),  # (0008,0021)
    Column("series_time", String(16)),  # (0008,0031)
    Column("num_instances", Integer, nullable=False, default=0),  # (0020,1209)
    Column("updated_at", Float, nullable=False),
    Index("ix_dicom_series_study", "study_uid"),
    Index("ix_dicom_series_modality", "modality"),
)

instances = Table(
    "dicom_instances",
    metadata,
    Column("sop_instance_uid", String(UID), primary_key=True),  # (0008,0018)
    Column("series_uid", String(UID), nullable=False),
    Column("study_uid", String(UID), nullable=False),
    Column("sop_class_uid", String(UID), nullable=False),  # (0008,0016)
    Column("instance_number", Integer),  # (0020,0013)
    Column("content_date", String(8)),  # (0008,0023)
    Column("content_time", String(16)),  # (0008,0033)
    Column("rows", Integer),  # (0028,0010)
    Column("columns", Integer),  # (0028,0011)
    Column("frames", Integer),  # (0028,0008)
    Column("transfer_syntax", String(UID), nullable=False),
    Column("path", String(512), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("calling_ae", String(16)),
    Column("received_at", Float, nullable=False),
    Column("indexed_at", Float, nullable=False),
    Index("ix_dicom_instances_series", "series_uid"),
    Index("ix_dicom_instances_study", "study_uid"),
)


worklist = Table(
    "dicom_worklist",
    metadata,
    # one Scheduled Procedure Step of the Modality Worklist (PS3.4 K.6.1), fed by HL7 orders (IHE RAD-4)
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("accession_number", String(16), nullable=False),  # (0008,0050), '' when absent
    Column("sps_id", String(16), nullable=False),  # Scheduled Procedure Step ID (0040,0009)
    Column("requested_procedure_id", String(16)),  # (0040,1001)
    Column("study_uid", String(UID)),  # (0020,000D)
    Column("placer_order", String(64)),  # ORC-2
    Column("filler_order", String(64)),  # ORC-3
    Column("patient_id", String(64), nullable=False),  # (0010,0020)
    Column("issuer", String(64), nullable=False),  # (0010,0021)
    Column("patient_name", String(PN)),  # (0010,0010)
    Column("name_key", String(PN)),
    Column("birth_date", String(8)),  # (0010,0030)
    Column("sex", String(16)),  # (0010,0040)
    Column("modality", String(16)),  # (0008,0060)
    Column("station_ae", String(16)),  # Scheduled Station AE Title (0040,0001)
    Column("station_name", String(16)),  # (0040,0010)
    Column("start_date", String(8)),  # (0040,0002)
    Column("start_time", String(16)),  # (0040,0003)
    Column("description", String(64)),  # Requested Procedure Description (0032,1060) / SPS Description
    Column("code_value", String(16)),  # (0008,0100) of the requested procedure code
    Column("code_scheme", String(16)),  # (0008,0102)
    Column("referring_physician", String(PN)),  # (0008,0090)
    Column("performing_physician", String(PN)),  # (0040,0006)
    Column("charset", String(64)),  # the Specific Character Set the values need
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("accession_number", "sps_id", name="uq_dicom_worklist_step"),
    Index("ix_dicom_worklist_start", "start_date"),
    Index("ix_dicom_worklist_patient", "patient_id"),
)


def fit(table: Table, row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with every string cut to its column's length (PostgreSQL refuses longer values)."""
    out = dict(row)
    for key, value in row.items():
        if isinstance(value, str):
            length = getattr(table.c[key].type, "length", None)
            if length is not None and len(value) > length:
                out[key] = value[:length]
    return out

# Studies whose quiet period is running (migration 0009_dicom_pending): the study-complete timers survive a
# restart (or kill -9); a row goes once its study-complete event was handed over.
pending_studies = Table(
    "dicom_pending_studies",
    metadata,
    Column("study_uid", String(UID), primary_key=True),
    Column("first_received_at", Float, nullable=False),
    Column("last_received_at", Float, nullable=False),
    Column("received", Integer, nullable=False),
    Column("calling_aes", String(1024), nullable=False),  # backslash-separated
    Column("updated_at", Float, nullable=False),  # epoch seconds of the last instance indexed
)
