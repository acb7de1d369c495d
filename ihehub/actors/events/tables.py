"""SQL schema of the patient-event publisher (its own ``MetaData``; migration branch ``empi_events``).

* ``empi_event_cursors``: how far each publisher has read the EMPI's ``empi_events`` outbox (the id of the
  last event turned into bus messages), so that a restarted hub — or one killed with ``-9`` — goes on
  where it stopped instead of losing or re-reading everything.
* ``empi_event_outbox``: the local ``db`` listener kind — one row per (listener, event), readable by any SQL
  client (``SELECT * FROM empi_event_outbox WHERE listener = 'x' AND id > :last ORDER BY id``).  A resent
  event updates its row (``payload``, ``delivered_at``, ``deliveries`` + 1) instead of adding a second one.
  External databases (``sql`` URLs of a ``db`` listener) get a table of the same shape (`outbox_table`).

Timestamps are UNIX epoch seconds (float).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, MetaData, String, Table, Text

from ihehub.bus.tables import IdType

metadata = MetaData()

OUTBOX_TABLE = "empi_event_outbox"

cursors = Table(
    "empi_event_cursors",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("last_id", BigInteger, nullable=False),
    Column("updated_at", Float, nullable=False),
)


def outbox_table(meta: MetaData, name: str = OUTBOX_TABLE) -> Table:
    """The outbox table shape, in ``meta`` (the hub's own here; a fresh MetaData for an external database)."""
    table = Table(
        name,
        meta,
        Column("id", IdType, primary_key=True, autoincrement=True),
        Column("listener", String(64), nullable=False),
        Column("event_id", BigInteger, nullable=False),
        Column("type", String(16), nullable=False),
        Column("patient", String(64), nullable=False),
        Column("payload", Text, nullable=False),  # PatientEvent.to_json() as JSON text
        Column("event_at", Float, nullable=False),
        Column("delivered_at", Float, nullable=False),
        Column("deliveries", Integer, nullable=False),
    )
    Index(f"ux_{name}_event", table.c.listener, table.c.event_id, unique=True)
    return table


outbox = outbox_table(metadata)
