"""Fixtures of the ATNA tests: the public corpus (schema, Schematron rules, sample messages), a validator,
an audit store on SQLite and on the machine's PostgreSQL, a private PKI for mutual TLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ihehub.atna import AuditContext, AuditStore, Endpoint, Validator
from ihehub.bus import schema
from ihehub.bus.db import Writer, make_engine
from ihehub.config.model import HubConfig
from ihehub.tls import ensure_tls, issue_client_cert


@pytest.fixture(scope="session")
def xsd(corpus: Path) -> Path:
    return corpus / "ipf" / "audit" / "dicom2017c.xsd"


@pytest.fixture(scope="session")
def rules(corpus: Path) -> Path:
    return corpus / "wustl" / "atna-schematron"


@pytest.fixture(scope="session")
def validator(xsd: Path, rules: Path) -> Validator:
    return Validator(xsd, rules)


@pytest.fixture
def audit() -> AuditContext:
    return AuditContext(source_id="ihehub-test", enterprise_site="HOSP-A", host="10.0.0.5",
                        home_community_id="urn:oid:1.2.3.99")


@pytest.fixture
def peer() -> Endpoint:
    return Endpoint(user_id="HIS|HOSP-A", host="10.0.0.9")


def open_store(url: str) -> tuple[AuditStore, Writer]:
    engine = make_engine(url)
    schema.upgrade(engine)
    writer = Writer(engine)
    return AuditStore(engine, writer), writer


def close_store(store: AuditStore, writer: Writer) -> None:
    store.close()
    writer.close()
    store.engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/audit.sqlite"
    _name, url = request.getfixturevalue("pg_database")
    return str(url)


@pytest.fixture
def store(store_url: str) -> Iterator[AuditStore]:
    st, writer = open_store(store_url)
    yield st
    close_store(st, writer)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A private CA, a server certificate for localhost/127.0.0.1, and a client certificate."""
    cfg = HubConfig(home=tmp_path_factory.mktemp("atna-pki"))
    ensure_tls(cfg, key_type="ec")
    cert, key = issue_client_cert(cfg, "audit-sender", key_type="ec")
    return {"ca": str(cfg.tls.ca), "cert": str(cfg.tls.cert), "key": str(cfg.tls.key),
            "client": str(cert), "client_key": str(key)}
