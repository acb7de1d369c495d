"""Settings of the image manager, the nodes registry, and the migration of the index tables."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jsonschema
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from ihehub.bus import schema
from ihehub.bus.db import make_engine
from ihehub.config.model import DicomActorConfig
from ihehub.dicom import SETTINGS_SCHEMA, DicomSettings, InvalidSettings
from ihehub.dicom.tables import metadata


def test_from_mapping_with_nodes_and_listener() -> None:
    s = DicomSettings.from_mapping(
        {"require_known_callers": True, "fsync": "never",
         "nodes": {"ct1": {"ae_title": "CT1", "host": "127.0.0.1", "port": 104},
                   "pacs": {"ae_title": "PACS", "host": "localhost", "port": 11112, "tls": True}}},
        listener=DicomActorConfig(port=4242, ae_title="HUB2"))
    assert (s.ae_title, s.port, s.fsync, s.require_known_callers) == ("HUB2", 4242, "never", True)
    assert s.node("CT1 ") is not None and s.node("CT1").accepts_address("127.0.0.1")  # type: ignore[union-attr]
    assert not s.node("CT1").accepts_address("127.0.0.2")  # type: ignore[union-attr]
    pacs = s.node("PACS")
    assert pacs is not None and pacs.tls and pacs.accepts_address("127.0.0.1")
    assert s.node("NOBODY") is None
    listed = DicomSettings.from_mapping({"nodes": [{"ae_title": "X1"}, {"ae_title": "X2", "name": "second"}]})
    assert [(n.name, n.ae_title, n.host) for n in listed.nodes] == [("X1", "X1", None), ("second", "X2", None)]
    assert listed.nodes[0].accepts_address("198.51.100.7")  # no host: from anywhere


@pytest.mark.parametrize(("data", "message"), [
    ({"ae_title": "A\\B"}, "ae_title"),
    ({"ae_title": "THIS_TITLE_IS_TOO_LONG"}, "ae_title"),
    ({"port": 70000}, "port"),
    ({"port": "11112"}, "port: expected an integer"),
    ({"fsync": "sometimes"}, "fsync"),
    ({"colour": "blue"}, "colour: unknown setting"),
    ({"nodes": {"a": {"ae_title": "A", "port": "104"}}}, "nodes.a.port"),
    ({"nodes": {"a": {"host": "x"}}}, "nodes.a.ae_title: required"),
    ({"nodes": {"a": {"ae_title": "A", "tls": "yes"}}}, "nodes.a.tls"),
    ({"nodes": {"a": {"ae_title": "A", "hots": "x"}}}, "nodes.a.hots: unknown key"),
    ({"nodes": {"a": {"ae_title": "A"}, "b": {"ae_title": "A"}}}, "also the title of a"),
    ({"nodes": "CT1"}, "nodes: expected"),
    ({"study_quiet_seconds": 0}, "study_quiet_seconds"),
])
def test_bad_settings_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSettings, match=message.replace("\\", "\\\\")):
        DicomSettings.from_mapping(data)


def test_schema_covers_every_setting() -> None:
    fields = {f.name for f in dataclasses.fields(DicomSettings)}
    assert set(SETTINGS_SCHEMA["properties"]) == fields
    jsonschema.validate({"ae_title": "IHEHUB", "port": 11112, "nodes": {"ct": {"ae_title": "CT1", "port": 104}}},
                        SETTINGS_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"nodes": {"ct": {"port": 104}}}, SETTINGS_SCHEMA)


def test_migration_matches_tables_and_downgrades(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/m.sqlite")
    cfg = schema.alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "dicom@head")
    with engine.connect() as conn:
        mine = {"include_name": lambda name, kind, parent: kind != "table" or str(name).startswith("dicom_")}
        diff = compare_metadata(MigrationContext.configure(conn, opts=mine), metadata)
    assert diff == []
    tables = set(inspect(engine).get_table_names())
    assert {"dicom_patients", "dicom_studies", "dicom_series", "dicom_instances"} <= tables
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert not any(n.startswith("dicom_") for n in inspect(engine).get_table_names())
    engine.dispose()
