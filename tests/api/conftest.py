"""Fixtures of the API tests (see api_support for what they build)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ihehub.bus import schema
from ihehub.bus.db import Writer, make_engine
from ihehub.bus.store import MessageStore
from tests.api.api_support import Receiver, Running, seed, start_hub


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def running(tmp_path: Path, receiver: Receiver) -> Iterator[Running]:
    with start_hub(tmp_path, receiver) as hub:
        yield hub


@pytest.fixture(scope="module")
def shared_receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, shared_receiver: Receiver) -> Iterator[Running]:
    """One running hub for a whole module of tests that only read."""
    with start_hub(tmp_path_factory.mktemp("shared"), shared_receiver) as hub:
        yield hub


@pytest.fixture(scope="module")
def seeded(shared: Running) -> tuple[Running, dict[str, str]]:
    """The module's hub with `seed` done once; tests that use it only read."""
    return shared, seed(shared)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MessageStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    schema.upgrade(engine)
    writer = Writer(engine)
    writer.start()
    try:
        yield MessageStore(engine, writer)
    finally:
        writer.close()
        engine.dispose()
