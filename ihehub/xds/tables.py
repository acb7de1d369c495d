"""SQL schema of the XDS.b Document Registry (its own ``MetaData``; migration branch ``xds``).

The ebRIM 3.0 objects of ITI TF-3 4.2 as registered by ITI-42:

* ``xds_objects``: one row per DocumentEntry, SubmissionSet and Folder with the attributes stored
  queries filter on as columns and ``xml``, the ``rim:ExtrinsicObject`` / ``rim:RegistryPackage`` as
  registered (ids resolved, availabilityStatus and registry-set slots filled in), which LeafClass query
  responses return as is.
* ``xds_codes``: one row per coded classification (classCode, typeCode, ..., eventCodeList,
  contentTypeCode, Folder codeList): ``scheme`` is the classificationScheme UUID.
* ``xds_slots``: one row per value of the multi-valued searchable attributes (authorPerson from the
  author classifications, referenceIdList, sourcePatientId, intendedRecipient, languageCode).
* ``xds_associations``: every Association (HasMember, RPLC, APND, XFRM, XFRM_RPLC, signs) with its xml.

Times (creationTime ...) are the DTM digits as given (ITI TF-3 Table 4.2.3.1.7-2); timestamps
(``registered_at``) are UNIX epoch seconds.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text

from ihehub.bus.tables import IdType

__all__ = ["associations", "codes", "metadata", "objects", "slots"]

metadata = MetaData()

UUID = 128  # "urn:uuid:" + 36, with room for symbolic ids of other registries
DTM = 14

objects = Table(
    "xds_objects",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("entry_uuid", String(UUID), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),  # DocumentEntry | SubmissionSet | Folder
    Column("lid", String(UUID)),
    Column("version", Integer, default=1),
    Column("unique_id", String(256)),
    Column("patient_id", String(512)),  # the CX exactly as in the ExternalIdentifier value
    Column("status", String(80), nullable=False),  # availabilityStatus URN
    Column("object_type", String(UUID)),  # DocumentEntry objectType (stable / on-demand)
    Column("creation_time", String(DTM)),
    Column("service_start_time", String(DTM)),
    Column("service_stop_time", String(DTM)),
    Column("submission_time", String(DTM)),  # SubmissionSet
    Column("last_update_time", String(DTM)),  # Folder
    Column("source_id", String(256)),  # SubmissionSet
    Column("mime_type", String(128)),
    Column("hash", String(40)),
    Column("size", BigInteger),
    Column("repository_unique_id", String(256)),
    Column("home_community_id", String(256)),
    Column("xml", Text, nullable=False),
    Column("registered_at", Float, nullable=False),
)
Index("ix_xds_objects_unique_id", objects.c.unique_id)
Index("ix_xds_objects_patient_id", objects.c.patient_id)
Index("ix_xds_objects_patient_kind_status", objects.c.patient_id, objects.c.kind, objects.c.status)

codes = Table(
    "xds_codes",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("object_id", BigInteger, ForeignKey("xds_objects.id"), nullable=False),
    Column("scheme", String(UUID), nullable=False),  # classificationScheme UUID
    Column("code", String(256), nullable=False),  # nodeRepresentation
    Column("coding_scheme", String(256), nullable=False, default=""),
)
Index("ix_xds_codes_object_id", codes.c.object_id)
Index("ix_xds_codes_scheme_code", codes.c.scheme, codes.c.code)

slots = Table(
    "xds_slots",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("object_id", BigInteger, ForeignKey("xds_objects.id"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("value", Text, nullable=False),
)
Index("ix_xds_slots_object_id", slots.c.object_id)
Index("ix_xds_slots_name", slots.c.name)

associations = Table(
    "xds_associations",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("entry_uuid", String(UUID), unique=True),
    Column("type", String(128), nullable=False),  # associationType URN
    Column("source_uuid", String(UUID)),
    Column("target_uuid", String(UUID)),
    Column("status", String(80), nullable=False),
    Column("xml", Text, nullable=False),
    Column("registered_at", Float, nullable=False),
)
Index("ix_xds_associations_source_uuid", associations.c.source_uuid)
Index("ix_xds_associations_target_uuid", associations.c.target_uuid)
