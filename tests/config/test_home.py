"""The home folder: first-start defaults, path resolution and environment overrides."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from ihehub.channels.registry import Registry
from ihehub.config import (
    ConfigError,
    HubConfig,
    home_from_env,
    init_home,
    load_channels,
    load_home,
    load_schema,
    resolve_database,
    validate_home,
)
from ihehub.config.templates import HUB_YAML
from ihehub.config.yamlfile import plain, read_yaml

NO_ENV: dict[str, str] = {}


def test_init_home_writes_the_layout_once(tmp_path: Path) -> None:
    home = tmp_path / "var"
    written = init_home(home)
    relative = sorted(p.relative_to(home).as_posix() for p in written if p != home)
    assert relative == [
        "channels",
        "channels/adt-to-ris.yaml",
        "channels/hl7-inbound.yaml",
        "data",
        "db",
        "ihehub.yaml",
        "tls",
    ]
    assert home in written
    assert (home / "tls").stat().st_mode & 0o777 == 0o700
    assert init_home(home) == []


def test_init_home_never_overwrites_and_does_not_revive_deleted_channels(tmp_path: Path) -> None:
    init_home(tmp_path)
    (tmp_path / "ihehub.yaml").write_text("node_id: mine\n", encoding="utf-8")
    (tmp_path / "channels" / "adt-to-ris.yaml").unlink()
    (tmp_path / "db").rmdir()
    assert init_home(tmp_path) == [tmp_path / "db"]
    assert (tmp_path / "ihehub.yaml").read_text(encoding="utf-8") == "node_id: mine\n"
    assert not (tmp_path / "channels" / "adt-to-ris.yaml").exists()


def test_init_home_on_a_file_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "home"
    blocker.write_text("not a folder", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot create the home folder"):
        init_home(blocker)


def test_default_home_loads_to_the_dataclass_defaults(tmp_path: Path) -> None:
    init_home(tmp_path)
    assert load_home(tmp_path, environ=NO_ENV) == HubConfig(home=tmp_path)


def test_default_home_is_valid_and_its_channels_load(tmp_path: Path, registry: Registry) -> None:
    init_home(tmp_path)
    assert validate_home(tmp_path, registry, environ=NO_ENV) == []
    channels = load_channels(tmp_path, registry, environ=NO_ENV)
    assert [c.name for c in channels] == ["adt-to-ris", "hl7-inbound"]
    example, inbound = channels
    assert inbound.enabled and inbound.source.url == "mllp://0.0.0.0:2575"
    (archive,) = inbound.destinations
    assert archive.name == "archive" and archive.url == "file:data/hl7-archive" and archive.options["overwrite"]
    assert not example.enabled
    assert example.filter == ('MSH-9.1 == "ADT"',)
    (ris,) = example.destinations
    assert ris.url == "http://127.0.0.1:9000/adt"
    assert (ris.retry.max_attempts, ris.retry.max_backoff, ris.retry.initial_backoff) == (20, 600.0, 1.0)


def test_missing_hub_file_means_defaults(tmp_path: Path) -> None:
    assert load_home(tmp_path, environ=NO_ENV) == HubConfig(home=tmp_path)


def test_missing_home_is_reported(tmp_path: Path, registry: Registry) -> None:
    (problem,) = validate_home(tmp_path / "nowhere", registry, environ=NO_ENV)
    assert "does not exist" in problem.message


def test_paths_resolve_against_the_home(tmp_path: Path) -> None:
    (tmp_path / "ihehub.yaml").write_text(
        "data_dir: payload\ntls: {ca: /etc/pki/ca.pem}\ndatabase: sqlite:///db/x.sqlite?timeout=5\n",
        encoding="utf-8",
    )
    hub = load_home(tmp_path, environ=NO_ENV)
    assert hub.home == tmp_path.absolute()
    assert hub.data_dir == tmp_path / "payload"
    assert hub.tls.ca == Path("/etc/pki/ca.pem")
    assert hub.tls.key == tmp_path / "tls" / "server-key.pem"
    assert hub.database == f"sqlite:///{tmp_path.as_posix()}/db/x.sqlite?timeout=5"
    assert hub.channels_dir == tmp_path / "channels" and hub.db_dir == tmp_path / "db"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:////srv/ihehub.sqlite",
        "postgresql+psycopg://hub@db.local/ihehub",
    ],
)
def test_database_urls_that_are_not_relative_files_are_kept(url: str, tmp_path: Path) -> None:
    assert resolve_database(url, tmp_path) == url


def test_relative_sqlite_with_driver_is_resolved(tmp_path: Path) -> None:
    assert resolve_database("sqlite+pysqlite:///a.db", tmp_path) == f"sqlite+pysqlite:///{tmp_path}/a.db"


def test_environment_overrides(tmp_path: Path) -> None:
    init_home(tmp_path)
    environ = {
        "IHEHUB_DATABASE": "postgresql+psycopg://hub@127.0.0.1/ihehub",
        "IHEHUB_BROKER": "amqp://guest:guest@127.0.0.1:5672//",
        "IHEHUB_HTTP_PORT": "18080",
    }
    hub = load_home(tmp_path, environ=environ)
    assert hub.database == environ["IHEHUB_DATABASE"]
    assert hub.broker == environ["IHEHUB_BROKER"] and not hub.embedded_broker
    assert hub.http.port == 18080 and hub.http.host == "0.0.0.0"
    (tmp_path / "ihehub.yaml").write_text("broker: amqp://rabbit//\n", encoding="utf-8")
    assert load_home(tmp_path, environ={"IHEHUB_BROKER": ""}).broker is None


def test_bad_environment_values_are_reported_without_passwords(tmp_path: Path) -> None:
    environ = {
        "IHEHUB_DATABASE": "mysql://hub:s3cret@db/ihehub",
        "IHEHUB_BROKER": "redis://localhost",
        "IHEHUB_HTTP_PORT": "80a",
    }
    with pytest.raises(ConfigError) as caught:
        load_home(tmp_path, environ=environ)
    shown = str(caught.value)
    assert [p.file for p in caught.value.problems] == [
        "$IHEHUB_BROKER",
        "$IHEHUB_DATABASE",
        "$IHEHUB_HTTP_PORT",
    ]
    assert "s3cret" not in shown and "mysql://hub:***@db/ihehub" in shown
    assert "$IHEHUB_HTTP_PORT: '80a' is not a port number (0-65535)" in shown


def test_home_from_env() -> None:
    assert home_from_env({}) == Path("var")
    assert home_from_env({"IHEHUB_HOME": ""}) == Path("var")
    assert home_from_env({"IHEHUB_HOME": "/srv/hub"}) == Path("/srv/hub")


def test_config_is_frozen(tmp_path: Path) -> None:
    hub = HubConfig(home=tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hub.node_id = "other"  # type: ignore[misc]


def _walk_objects(schema: Any, where: str = "#") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            found.append((where, schema))
        for key, value in schema.items():
            found += _walk_objects(value, f"{where}/{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            found += _walk_objects(value, f"{where}/{i}")
    return found


@pytest.mark.parametrize("name", ["hub", "channel"])
def test_schemas_are_valid_and_closed(name: str) -> None:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    objects = _walk_objects(schema)
    assert objects
    open_objects = [
        where
        for where, obj in objects
        if "properties" in obj and obj.get("additionalProperties") is not False
    ]
    assert open_objects == []


def test_channel_retry_schema_matches_hub_delivery() -> None:
    hub, channel = load_schema("hub"), load_schema("channel")
    defs = hub["$defs"]
    delivery = {
        key: defs[value["$ref"].rsplit("/", 1)[1]] if "$ref" in value else value
        for key, value in hub["properties"]["delivery"]["properties"].items()
        if key != "lease_seconds"
    }
    retry = channel["properties"]["destinations"]["items"]["properties"]["retry"]["properties"]
    assert json.dumps(retry, sort_keys=True) == json.dumps(delivery, sort_keys=True)


def _leaf_paths(schema: dict[str, Any], defs: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in schema.get("properties", {}).items():
        if "$ref" in value:
            value = defs[value["$ref"].rsplit("/", 1)[1]]
        if "properties" in value:
            paths |= _leaf_paths(value, defs, f"{prefix}{key}.")
        else:
            paths.add(prefix + key)
    return paths


def _data_paths(data: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in data.items():
        if isinstance(value, dict) and value:
            paths |= _data_paths(value, f"{prefix}{key}.")
        else:
            paths.add(prefix + key)
    return paths


def test_default_ihehub_yaml_shows_every_key(tmp_path: Path) -> None:
    path = tmp_path / "ihehub.yaml"
    path.write_text(HUB_YAML, encoding="utf-8")
    document, problems = read_yaml(path, "ihehub.yaml")
    assert problems == []
    schema = load_schema("hub")
    assert _data_paths(plain(document)) == _leaf_paths(schema, schema["$defs"])
    for line in HUB_YAML.splitlines():
        assert len(line) <= 110


def test_default_home_is_valid_with_the_real_connectors(tmp_path: Path, write: Any) -> None:
    init_home(tmp_path)
    assert validate_home(tmp_path, Registry(), environ=NO_ENV) == []
    write("channels/typo.yaml", "source:\n  url: mllps://0.0.0.0:2577\n  options: {max_frame_byte: 4096}\n")
    assert [str(p) for p in validate_home(tmp_path, Registry(), environ=NO_ENV)] == [
        "channels/typo.yaml:3:13: source.options.max_frame_byte: unknown key 'max_frame_byte'"
        " (did you mean 'max_frame_bytes'?)"
    ]


def test_xds_imaging_enabled_needs_a_source_id(tmp_path: Path) -> None:
    home = tmp_path / "home"
    init_home(home)
    text = (home / "ihehub.yaml").read_text(encoding="utf-8")
    (home / "ihehub.yaml").write_text(text.replace("      enabled: false         # true needs source_id;",
                                                   "      enabled: true          #", 1), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"ihehub.yaml:\d+:\d+.*needs source_id"):
        load_home(home)
