"""A MessageStore on SQLite (embedded default) and on the machine's PostgreSQL (scale-out)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from ihehub.bus import schema
from ihehub.bus.db import Writer, make_engine
from ihehub.bus.store import MessageStore
from ihehub.bus.tables import metadata


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MessageStore]:
    url = f"sqlite:///{tmp_path}/bus.sqlite" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    engine = make_engine(url)
    schema.upgrade(engine)
    if request.param == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE " + ", ".join(t.name for t in metadata.sorted_tables)))
    writer = Writer(engine)
    st = MessageStore(engine, writer, worker_id="test-worker")
    yield st
    writer.close()
    engine.dispose()
