"""SQL schema of the EMPI (SQLite and PostgreSQL); created by migration ``0003_empi`` (branch ``empi``).

Nothing is ever deleted by the EMPI: a merged or deleted record changes ``status``; a link that ends gets
``closed_at``; each received version of a record's demographics is a row of ``empi_record_history``; each
merge keeps what it moved (``snapshot``) so that unmerge can put it back.  Timestamps are epoch seconds.
JSON documents are stored as text (portable between the two databases).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from ihehub.bus.tables import IdType

metadata = MetaData()


domains = Table(
    "empi_domains",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("namespace", String(64), nullable=False, unique=True),  # HD-1
    Column("universal_id", String(128), unique=True),  # HD-2 (an OID)
    Column("universal_id_type", String(16)),  # HD-3 (ISO)
    Column("type", String(16), nullable=False),  # source, enterprise, national
    Column("description", Text),
    Column("created_at", Float, nullable=False),
)

patients = Table(
    "empi_patients",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("epid", String(64), unique=True),  # the enterprise identifier, set right after insert
    Column("status", String(16), nullable=False),  # active, merged, retired (no record left)
    Column("merged_into", BigInteger),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

records = Table(
    "empi_records",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("domain_id", Integer, nullable=False),
    Column("pid", String(128), nullable=False),
    Column("patient_id", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),  # active, merged, deleted
    Column("merged_into", BigInteger),  # the surviving record of an A40
    Column("version", Integer, nullable=False),
    Column("data", Text, nullable=False),  # the demographics as last received (JSON)
    Column("norm", Text, nullable=False),  # the normalised form (JSON) the matcher reads
    Column("warnings", Text),  # JSON list
    Column("birth_date", String(8)),
    Column("sex", String(1)),
    Column("national_id", String(32)),
    Column("postcode", String(16)),
    Column("city", String(128)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("domain_id", "pid", name="uq_empi_records_domain_pid"),
)
Index("ix_empi_records_patient", records.c.patient_id)
Index("ix_empi_records_birth", records.c.birth_date)
Index("ix_empi_records_national", records.c.national_id)
Index("ix_empi_records_postcode", records.c.postcode)

names = Table(
    "empi_names",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("record_id", BigInteger, nullable=False),
    Column("family", String(128), nullable=False),  # upper-case Latin or pinyin, no spaces
    Column("given", String(128), nullable=False),
    Column("family_hanzi", String(128)),
    Column("given_hanzi", String(128)),
)
Index("ix_empi_names_family", names.c.family, names.c.given)
Index("ix_empi_names_hanzi", names.c.family_hanzi, names.c.given_hanzi)
Index("ix_empi_names_record", names.c.record_id)

history = Table(
    "empi_record_history",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("record_id", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
    Column("event", String(32), nullable=False),  # A01, A08, manual, ...
    Column("data", Text, nullable=False),
    Column("message_id", String(64)),
    Column("at", Float, nullable=False),
)
Index("ix_empi_history_record", history.c.record_id, history.c.version)

block_keys = Table(
    "empi_block_keys",
    metadata,
    Column("key", String(160), primary_key=True),
    Column("record_id", BigInteger, primary_key=True),
)
Index("ix_empi_block_keys_record", block_keys.c.record_id)

links = Table(
    "empi_links",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("record_id", BigInteger, nullable=False),
    Column("patient_id", BigInteger, nullable=False),
    Column("kind", String(16), nullable=False),  # auto, manual, review
    Column("score", Float),
    Column("fields", Text),  # JSON: the per-field explanation of the score
    Column("reason", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("closed_at", Float),
    Column("closed_reason", Text),
)
Index("ix_empi_links_record", links.c.record_id, links.c.closed_at)
Index("ix_empi_links_patient", links.c.patient_id, links.c.closed_at)

reviews = Table(
    "empi_review",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("record_id", BigInteger, nullable=False),
    Column("candidate_id", BigInteger, nullable=False),
    Column("score", Float, nullable=False),
    Column("fields", Text),
    Column("state", String(16), nullable=False),  # open, accepted, rejected, obsolete
    Column("reason", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("decided_at", Float),
    Column("decided_by", String(128)),
)
Index("ix_empi_review_state", reviews.c.state, reviews.c.score)
Index("ix_empi_review_record", reviews.c.record_id)
Index("ix_empi_review_candidate", reviews.c.candidate_id)

exclusions = Table(
    "empi_exclusions",
    metadata,
    Column("record_a", BigInteger, primary_key=True),  # the smaller record id
    Column("record_b", BigInteger, primary_key=True),
    Column("reason", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(128), nullable=False),
)
Index("ix_empi_exclusions_b", exclusions.c.record_b)

merges = Table(
    "empi_merges",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # A40, manual
    Column("surviving_patient_id", BigInteger, nullable=False),
    Column("subsumed_patient_id", BigInteger, nullable=False),
    Column("surviving_record_id", BigInteger),
    Column("subsumed_record_id", BigInteger),
    Column("snapshot", Text, nullable=False),  # JSON: links closed and opened, statuses before
    Column("at", Float, nullable=False),
    Column("by", String(128), nullable=False),
    Column("undone_at", Float),
    Column("undone_by", String(128)),
)
Index("ix_empi_merges_surviving", merges.c.surviving_patient_id)
Index("ix_empi_merges_subsumed", merges.c.subsumed_patient_id)

events = Table(
    "empi_events",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("type", String(16), nullable=False),
    Column("patient", String(64), nullable=False),
    Column("payload", Text, nullable=False),  # PatientEvent.to_json()
    Column("at", Float, nullable=False),
)
Index("ix_empi_events_patient", events.c.patient, events.c.id)

parameters = Table(
    "empi_parameters",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("profile", String(32), nullable=False),
    Column("params", Text, nullable=False),  # FSParameters.to_json()
    Column("pairs", Integer, nullable=False),  # how many candidate pairs the estimate saw
    Column("created_at", Float, nullable=False),
)
Index("ix_empi_parameters_profile", parameters.c.profile, parameters.c.id)

visits = Table(  # migration 0007_empi_visits: the PV1 of each feed, for ITI-22 (PDQ with visits)
    "empi_visits",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("record_id", BigInteger, nullable=False),
    Column("visit_number", String(64), nullable=False),  # PV1-19.1 ('' when the feed has none)
    Column("patient_class", String(8)),  # PV1-2
    Column("location", String(128)),  # PV1-3 point of care^room^bed^facility (as text)
    Column("point_of_care", String(64)),  # PV1-3.1
    Column("attending", String(256)),  # PV1-7 (first repetition, as text)
    Column("attending_key", String(128)),  # PV1-7.1 id or family name, folded
    Column("referring", String(256)),  # PV1-8
    Column("hospital_service", String(16)),  # PV1-10
    Column("admitting", String(256)),  # PV1-17
    Column("admit_time", String(26)),  # PV1-44
    Column("discharge_time", String(26)),  # PV1-45
    Column("pv1", Text, nullable=False),  # the segment as received (decoded text)
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("record_id", "visit_number", name="uq_empi_visits_record_visit"),
)
Index("ix_empi_visits_number", visits.c.visit_number)
Index("ix_empi_visits_point_of_care", visits.c.point_of_care)
