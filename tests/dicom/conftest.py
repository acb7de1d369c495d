"""Fixtures: an ImageManager on a free port, on SQLite and on the machine's PostgreSQL (scale-out)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from ihehub.bus.db import make_engine
from ihehub.dicom import DicomSettings, ImageManager
from ihehub.dicom.tables import metadata
from tests.dicom.dicomkit import LoopThread


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def _engine(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Engine:
    if kind == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path}/index.sqlite")
    else:
        engine = make_engine(request.getfixturevalue("pg_url"))
        with engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                conn.execute(text(f"DROP TABLE IF EXISTS {table.name}"))
    metadata.create_all(engine)
    return engine


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    eng = _engine(request.param, tmp_path, request)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    eng = _engine("sqlite", tmp_path, request)
    yield eng
    eng.dispose()


ManagerFactory = Callable[..., ImageManager]


@pytest.fixture
def start_manager(loop_thread: LoopThread, tmp_path: Path) -> Iterator[ManagerFactory]:
    """``start_manager(engine, **settings)`` -> a started ImageManager on port 0 (stopped after the test)."""
    started: list[ImageManager] = []

    def start(engine: Engine, *, data_dir: Path | None = None, on_study_complete: Any = None,
              **settings: Any) -> ImageManager:
        settings.setdefault("port", 0)
        settings.setdefault("host", "127.0.0.1")
        manager = ImageManager(DicomSettings(**settings), engine, data_dir or tmp_path / "data",
                               on_study_complete=on_study_complete)
        loop_thread.run(manager.start())
        started.append(manager)
        return manager

    yield start
    for manager in started:
        loop_thread.run(manager.stop())


@pytest.fixture
def manager(start_manager: ManagerFactory, engine: Engine) -> ImageManager:
    return start_manager(engine)


