"""Alembic migrations of every ihehub table (see env.py)."""
