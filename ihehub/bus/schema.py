"""Schema migrations (Alembic) for the bus store: `upgrade` brings any database to the newest revision."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

# The migrations of every domain live in one Alembic folder at the package root (ihehub/migrations):
# the bus owns revision 0001; each domain (atna, empi, xds, ...) adds its own branch from it.
MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "heads") -> str | None:
    """Run pending migrations of every branch; returns the revision(s) the database is at afterwards."""
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current_revision(engine)


def autogenerate(engine: Engine, message: str, *, rev_id: str, head: str = "0001@head",
                 branch_label: str | None = None) -> None:
    """Write a new migration from the difference between ``engine``'s database and the models listed in
    migrations/env.py (a developer tool: run it against a database upgraded to the current heads)."""
    cfg = alembic_config(engine)
    cfg.attributes["autogenerate"] = True
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.revision(cfg, message=message, autogenerate=True, rev_id=rev_id, head=head,
                         branch_label=branch_label)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        heads = MigrationContext.configure(conn).get_current_heads()
    return ",".join(sorted(heads)) or None


def head_revision(engine: Engine) -> str | None:
    return ",".join(sorted(ScriptDirectory.from_config(alembic_config(engine)).get_heads())) or None
