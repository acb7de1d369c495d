"""Alembic environment of every ihehub table (run through `ihehub db upgrade` or on start).

Each domain keeps its own ``MetaData`` in its ``tables`` module and its own migration branch
(``down_revision = "0001"``, a ``branch_labels`` of its name); list the module here so that
autogenerate sees every table and never proposes to drop another domain's.
"""

from __future__ import annotations

import importlib

from alembic import context

METADATA_MODULES = [
    "ihehub.bus.tables",
    "ihehub.atna.tables",
    "ihehub.empi.tables",
    "ihehub.actors.events.tables",
    "ihehub.dicom.tables",
    "ihehub.xds.tables",
]

config = context.config
# Only autogenerate compares against the models.  Importing them on every start would load every domain
# package (EMPI: pypinyin and numpy; DICOM: pydicom) into processes that never use them (~90 MB).
target_metadata = (
    [importlib.import_module(m).metadata for m in METADATA_MODULES] if config.attributes.get("autogenerate") else None
)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        from ihehub.bus.db import make_engine

        engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.begin() as conn:
            context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
        engine.dispose()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
