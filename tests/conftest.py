"""Shared fixtures: the real services this machine runs (PostgreSQL, RabbitMQ) and the public corpus.

Scale-out tests use the machine's real PostgreSQL (127.0.0.1:5432, trust auth) and RabbitMQ
(127.0.0.1:5672, guest/guest) — never mocks.  A service that is down FAILS the test with the
command that starts it.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = (ROOT / ".." / "shared" / "corpus").resolve()

PG_ADMIN_URL = os.environ.get("IHEHUB_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
BROKER_URL = os.environ.get("IHEHUB_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//")

START_PG = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
START_RABBIT = "rabbitmq-server -detached"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.fail(f"the public corpus is missing at {CORPUS}: the repo expects ../shared/corpus beside it")
    return CORPUS


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    if not _port_open("127.0.0.1", 5432):
        pytest.fail(f"PostgreSQL is not running on 127.0.0.1:5432; start it with: {START_PG}")
    import psycopg

    name = f"ihehub_t_{secrets.token_hex(4)}"
    admin = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        pytest.fail(f"cannot create a test database on {admin}: {exc}; start PostgreSQL with: {START_PG}")
    base = admin.rsplit("/", 1)[0]
    yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_database() -> Iterator[tuple[str, str]]:
    """A database of this test's own on the machine's PostgreSQL: (name, SQLAlchemy URL); dropped after."""
    if not _port_open("127.0.0.1", 5432):
        pytest.fail(f"PostgreSQL is not running on 127.0.0.1:5432; start it with: {START_PG}")
    import psycopg

    name = f"ihehub_t_{secrets.token_hex(4)}"
    admin = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0].split("://", 1)[1]
    yield name, f"postgresql+psycopg://{base}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def broker_url() -> str:
    """The machine's RabbitMQ; fails with the start command when it is down."""
    if not _port_open("127.0.0.1", 5672):
        pytest.fail(f"RabbitMQ is not running on 127.0.0.1:5672; start it with: {START_RABBIT}")
    return BROKER_URL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_config(cfg: object, **changes: object) -> object:
    """A hub config for in-process tests: HTTP and the audit repository's syslog ports on free ports
    of 127.0.0.1 (port 0), so test hubs never collide with each other or with a developer's `make run`;
    the DICOM image manager off (tests/dicom and test_hub_actors run it on purpose)."""
    import dataclasses

    from ihehub.config import DicomActorConfig, HttpConfig, SyslogActorConfig

    actors = dataclasses.replace(cfg.actors, syslog=SyslogActorConfig(tls_port=0, udp_port=0),  # type: ignore[attr-defined]
                                 dicom=DicomActorConfig(enabled=False))
    return dataclasses.replace(cfg, http=HttpConfig(host="127.0.0.1", port=0), actors=actors,  # type: ignore[type-var]
                               **changes)
