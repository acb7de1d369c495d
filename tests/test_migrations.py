"""The migrations build exactly the tables the models describe (every domain branch), on SQLite and
PostgreSQL — so `ihehub db upgrade` and autogenerate never disagree with the code."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData

from ihehub.bus import schema
from ihehub.bus.db import make_engine

MIGRATIONS_ENV = Path(__file__).resolve().parents[1] / "ihehub" / "migrations" / "env.py"


def _models() -> MetaData:
    tree = ast.parse(MIGRATIONS_ENV.read_text(encoding="utf-8"))
    (modules,) = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "METADATA_MODULES" for t in node.targets)]
    combined = MetaData()
    for module in modules:  # the one list of model modules
        for table in importlib.import_module(module).metadata.tables.values():
            table.to_metadata(combined)
    return combined


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def test_migrations_match_models(db: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path}/m.sqlite" if db == "sqlite" else request.getfixturevalue("pg_database")[1]
    engine = make_engine(url)
    try:
        heads = schema.upgrade(engine)
        assert heads == schema.head_revision(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), _models())
        # SQLite cannot tell some type variants apart; only structural differences count
        structural = [d for d in diff if not (isinstance(d, list) and d and d[0][0] == "modify_type")]
        assert structural == [], structural
    finally:
        engine.dispose()
