"""The home folder: first-start defaults, loading ``ihehub.yaml`` and ``channels/*.yaml``, validation.

Layout of a home (``$IHEHUB_HOME``, default ``./var``)::

    ihehub.yaml        node settings (schemas/hub.json)
    channels/*.yaml    one channel per file (schemas/channel.json + each connector's options schema)
    db/                SQLite database of the embedded deployment
    data/              documents, images and other payload files
    tls/               private CA and server certificate (ihehub.tls)

Every function that reads configuration collects *all* problems of all files before failing, so
one run tells a person everything to fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ihehub.channels.registry import Registry, did_you_mean
from ihehub.config.errors import ConfigError, Problem, redact, sort_key
from ihehub.config.model import (
    ActorsConfig,
    AtnaConfig,
    AuthConfig,
    ChannelConfig,
    DeliveryConfig,
    DestinationConfig,
    DicomActorConfig,
    HttpConfig,
    HubConfig,
    MllpActorConfig,
    RetentionConfig,
    RetryPolicy,
    SourceConfig,
    StoreConfig,
    SyslogActorConfig,
    TimeConfig,
    TlsConfig,
    XdsActorConfig,
)
from ihehub.config.schema import check, load_schema
from ihehub.config.templates import DEFAULT_CHANNELS, HUB_YAML
from ihehub.config.yamlfile import PathStep, dotted, expand_env, plain, position, read_yaml

HOME_ENV = "IHEHUB_HOME"
DEFAULT_HOME = Path("var")
HUB_FILE = "ihehub.yaml"
CHANNELS_DIR = "channels"
CHANNEL_SUFFIXES = (".yaml", ".yml")

_CONNECTOR_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CHANNEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_CONVERTERS: Mapping[str, Any] = {"int": int, "float": float, "Path": Path, "str": str, "bool": bool,
                                  "tuple[str, ...]": tuple, "tuple[dict[str, Any], ...]": tuple}


def home_from_env(environ: Mapping[str, str] | None = None) -> Path:
    """``$IHEHUB_HOME``, or ``./var`` when it is unset or empty."""
    env = os.environ if environ is None else environ
    return Path(env.get(HOME_ENV) or DEFAULT_HOME)


def init_home(path: str | os.PathLike[str]) -> list[Path]:
    """Create a default home at ``path`` on first start; return the folders and files written.

    Existing files are never overwritten.  The example channels are written only together with a
    new ``channels/`` folder, so a channel file a user deleted does not come back.
    Raises `ConfigError` when the folder cannot be created or written.
    """
    home = Path(path)
    created: list[Path] = []
    try:
        _mkdir(home, created, parents=True)
        for sub in ("db", "data"):
            _mkdir(home / sub, created)
        _mkdir(home / "tls", created, mode=0o700)
        new_channels = _mkdir(home / CHANNELS_DIR, created)
        _write_new(home / HUB_FILE, HUB_YAML, created)
        if new_channels:
            for name, text in DEFAULT_CHANNELS:
                _write_new(home / CHANNELS_DIR / name, text, created)
    except OSError as exc:
        where = Path(exc.filename) if exc.filename else home
        raise ConfigError(
            [Problem(file=str(where), message=f"cannot create the home folder: {exc.strerror or exc}")]
        ) from exc
    return created


def _mkdir(path: Path, created: list[Path], *, mode: int = 0o755, parents: bool = False) -> bool:
    try:
        path.mkdir(mode=mode, parents=parents)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(20, "exists and is not a folder", str(path)) from None
        return False
    created.append(path)
    return True


def _write_new(path: Path, text: str, created: list[Path]) -> None:
    try:
        with path.open("x", encoding="utf-8") as out:
            out.write(text)
    except FileExistsError:
        return
    created.append(path)


def load_home(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> HubConfig:
    """Read ``ihehub.yaml`` of the home at ``path`` (defaults if absent) plus environment overrides.

    ``IHEHUB_DATABASE``, ``IHEHUB_BROKER`` (empty means null) and ``IHEHUB_HTTP_PORT`` override
    the file.  Raises `ConfigError` listing every problem.
    """
    hub, problems = _read_hub(Path(path), os.environ if environ is None else environ)
    if problems:
        raise ConfigError(problems)
    return hub


def load_channels(
    home: str | os.PathLike[str],
    registry: Registry | None = None,
    *,
    hub: HubConfig | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[ChannelConfig]:
    """Every channel of ``home/channels`` (enabled or not), in file-name order.

    Retry policies default to ``delivery:`` of ``hub`` (read from the home when not given).
    Raises `ConfigError` listing every problem of every file.
    """
    home_path = Path(home)
    problems: list[Problem] = []
    env = os.environ if environ is None else environ
    if hub is None:
        hub, problems = _read_hub(home_path, env)
    channels, channel_problems = _read_channels(
        home_path, hub, Registry() if registry is None else registry, env
    )
    problems += channel_problems
    if problems:
        raise ConfigError(problems)
    return channels


def validate_home(
    path: str | os.PathLike[str],
    registry: Registry | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> list[Problem]:
    """All problems of the home at ``path``: ``ihehub.yaml``, the environment and every channel file."""
    home = Path(path)
    if not home.is_dir():
        message = "home folder does not exist (ihehub creates it on first start)"
        return [Problem(file=str(home), message=message)]
    env = os.environ if environ is None else environ
    hub, problems = _read_hub(home, env)
    _, channel_problems = _read_channels(home, hub, Registry() if registry is None else registry, env)
    return problems + channel_problems


# --- ihehub.yaml --------------------------------------------------------------------------------


def _display(home: Path, file: Path) -> str:
    try:
        return file.relative_to(home).as_posix()
    except ValueError:
        return str(file)


def _located(file: str, document: Any, path: tuple[PathStep, ...], message: str) -> Problem:
    line, column = position(document, path)
    return Problem(file=file, line=line, column=column, path=dotted(path), message=message)


def _build(cls: Any, values: Any) -> Any:
    """Construct a config dataclass from the validated mapping of its section."""
    if not isinstance(values, dict):
        return cls()
    kwargs = {
        field.name: _CONVERTERS.get(str(field.type), lambda v: v)(values[field.name])
        for field in dataclasses.fields(cls)
        if field.name in values
    }
    return cls(**kwargs)


def _read_hub(home: Path, environ: Mapping[str, str]) -> tuple[HubConfig, list[Problem]]:
    """The node settings and the problems found; the settings are the defaults where broken."""
    file = home / HUB_FILE
    display = _display(home, file)
    problems: list[Problem] = []
    data: dict[str, Any] = {}
    document: Any = None
    if file.exists():
        document, problems = read_yaml(file, display)
        loaded = plain(document) if document is not None else ({} if not problems else None)
        if isinstance(loaded, dict):
            data, unset = expand_env(loaded, environ)
            problems += [_located(display, document, where, message) for where, message in unset]
            problems += check(data, load_schema("hub"), file=display, document=document)
        elif loaded is not None:
            problems.append(Problem(file=display, line=1, column=1, message="expected a mapping of settings"))
    problems += _check_delivery(data, display, document)
    problems += _check_imaging(data, display, document)
    problems += _check_routing_tags(data, display, document)
    if problems:  # build from defaults only: half-valid data may have any type
        data = {}
    overrides, env_problems = _environment(environ)
    problems += env_problems
    scalars = ("node_id", "database", "broker", "queue_prefix", "log_level")
    sections: dict[str, Any] = {key: data[key] for key in scalars if key in data}
    if "data_dir" in data:
        sections["data_dir"] = Path(data["data_dir"])
    for key, cls in (
        ("http", HttpConfig),
        ("tls", TlsConfig),
        ("delivery", DeliveryConfig),
        ("store", StoreConfig),
        ("retention", RetentionConfig),
        ("auth", AuthConfig),
        ("atna", AtnaConfig),
        ("time", TimeConfig),
    ):
        sections[key] = _build(cls, data.get(key))
    actors = data.get("actors") or {}
    sections["actors"] = ActorsConfig(
        mllp=_build(MllpActorConfig, actors.get("mllp")),
        dicom=_build(DicomActorConfig, actors.get("dicom")),
        syslog=_build(SyslogActorConfig, actors.get("syslog")),
        xds=_build(XdsActorConfig, actors.get("xds")),
    )
    if "http_port" in overrides:
        sections["http"] = dataclasses.replace(sections["http"], port=overrides.pop("http_port"))
    sections.update(overrides)
    return HubConfig(home=home, **sections), sorted(problems, key=sort_key)


def _check_delivery(data: dict[str, Any], display: str, document: Any) -> list[Problem]:
    """``max_backoff`` must not be below ``initial_backoff`` (a rule JSON Schema cannot state)."""
    section = data.get("delivery")
    if not isinstance(section, dict):
        return []
    defaults = DeliveryConfig()
    initial = section.get("initial_backoff", defaults.initial_backoff)
    maximum = section.get("max_backoff", defaults.max_backoff)
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (initial, maximum))
    if not numbers or maximum >= initial:
        return []
    at = ("delivery", "max_backoff") if "max_backoff" in section else ("delivery", "initial_backoff")
    return [_located(display, document, at, _backoff_message(float(maximum), float(initial)))]


def _check_routing_tags(data: dict[str, Any], display: str, document: Any) -> list[Problem]:
    """``actors.dicom.routing_tags``: keywords must be in the DICOM data dictionary (the schema checks the form)."""
    tags = ((data.get("actors") or {}).get("dicom") or {}).get("routing_tags")
    if not isinstance(tags, list) or not tags:
        return []
    from ihehub.dicom.routing import parse_routing_tags  # pydicom's dictionary, only when tags are configured

    problems = []
    for i, tag in enumerate(tags):
        if not isinstance(tag, str):
            continue  # the schema says so
        try:
            parse_routing_tags([tag])
        except ValueError as exc:
            problems.append(_located(display, document, ("actors", "dicom", "routing_tags", i),
                                     str(exc).removeprefix("routing_tags: ")))
    return problems


def _check_imaging(data: dict[str, Any], display: str, document: Any) -> list[Problem]:
    """``actors.xds.imaging.enabled: true`` needs ``source_id`` (a rule the closed schemas do not state)."""
    imaging = ((data.get("actors") or {}).get("xds") or {}).get("imaging")
    if not isinstance(imaging, dict) or imaging.get("enabled") is not True or imaging.get("source_id"):
        return []
    return [_located(display, document, ("actors", "xds", "imaging", "enabled"),
                     "the XDS-I.b Imaging Document Source needs source_id (its OID) when enabled")]


def _environment(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[Problem]]:
    """Overrides from ``IHEHUB_DATABASE``, ``IHEHUB_BROKER`` and ``IHEHUB_HTTP_PORT``."""
    props = load_schema("hub")["properties"]
    out: dict[str, Any] = {}
    problems: list[Problem] = []
    database = environ.get("IHEHUB_DATABASE", "").strip()
    if database:
        if re.match(props["database"]["pattern"], database):
            out["database"] = database
        else:
            hint = props["database"]["x-hint"]
            problems.append(Problem(file="$IHEHUB_DATABASE", message=f"{redact(repr(database))} {hint}"))
    if "IHEHUB_BROKER" in environ:
        broker = environ["IHEHUB_BROKER"].strip()
        if broker.lower() in ("", "null", "none"):
            out["broker"] = None
        elif re.match(props["broker"]["pattern"], broker):
            out["broker"] = broker
        else:
            problems.append(
                Problem(file="$IHEHUB_BROKER", message=f"{redact(repr(broker))} {props['broker']['x-hint']}")
            )
    port = environ.get("IHEHUB_HTTP_PORT", "").strip()
    if port:
        if port.isdigit() and int(port) <= 65535:
            out["http_port"] = int(port)
        else:
            message = f"{port!r} is not a port number (0-65535)"
            problems.append(Problem(file="$IHEHUB_HTTP_PORT", message=message))
    return out, problems


# --- channels/*.yaml ----------------------------------------------------------------------------


def _read_channels(
    home: Path, hub: HubConfig, registry: Registry, environ: Mapping[str, str]
) -> tuple[list[ChannelConfig], list[Problem]]:
    folder = home / CHANNELS_DIR
    if not folder.exists():
        return [], []
    if not folder.is_dir():
        return [], [Problem(file=_display(home, folder), message="expected a folder of channel files")]
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix in CHANNEL_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    channels: list[ChannelConfig] = []
    problems: list[Problem] = []
    first_use: dict[str, str] = {}
    schema = load_schema("channel")
    for file in files:
        reader = _ChannelReader(
            file=file,
            display=_display(home, file),
            hub=hub,
            registry=registry,
            environ=environ,
            schema=schema,
        )
        channel = reader.read()
        if reader.name is not None:
            where = f"{reader.display}:{reader.name_at[0]}"
            if reader.name in first_use:
                reader.problem(
                    reader.name_path,
                    f"duplicate channel name {reader.name!r} (also {first_use[reader.name]})",
                )
                channel = None
            else:
                first_use[reader.name] = where
        problems += sorted(reader.problems, key=sort_key)
        if channel is not None:
            channels.append(channel)
    return channels, problems


class _ChannelReader:
    """Reads and checks one channel file, collecting every problem it has."""

    def __init__(
        self,
        *,
        file: Path,
        display: str,
        hub: HubConfig,
        registry: Registry,
        environ: Mapping[str, str],
        schema: Mapping[str, Any],
    ) -> None:
        self.file = file
        self.schema = schema
        self.environ = environ
        self.display = display
        self.hub = hub
        self.registry = registry
        self.document: Any = None
        self.problems: list[Problem] = []
        self.name: str | None = None
        self.name_path: tuple[PathStep, ...] = ()
        self.name_at: tuple[int, int] = (1, 1)

    def problem(self, path: tuple[PathStep, ...], message: str) -> None:
        self.problems.append(_located(self.display, self.document, path, message))

    def read(self) -> ChannelConfig | None:
        self.document, self.problems = read_yaml(self.file, self.display)
        if self.document is None and self.problems:
            return None
        data = plain(self.document) if self.document is not None else {}
        if not isinstance(data, dict):
            self.problem((), "expected a mapping with source:, destinations: and the other channel keys")
            return None
        data, unset = expand_env(data, self.environ)
        for where, message in unset:
            self.problem(where, message)
        self.problems += check(data, self.schema, file=self.display, document=self.document)
        self._name(data)
        if data.get("transformer") and data.get("mapping"):
            self.problem(("mapping",), "give either transformer: or mapping:, not both")
        self._filters(("filter",), data.get("filter"))
        source = data.get("source")
        if isinstance(source, dict):
            self._connector(("source",), source, role="source")
        destinations = data.get("destinations") or []
        built: list[DestinationConfig] = []
        if isinstance(destinations, list):
            built = self._destinations(destinations)
        if self.problems or self.name is None or not isinstance(source, dict):
            return None
        return ChannelConfig(
            name=self.name,
            source=SourceConfig(url=source["url"], options=source.get("options") or {}),
            description=data.get("description", ""),
            enabled=data.get("enabled", True),
            filter=_expressions(data.get("filter")),
            transformer=data.get("transformer"),
            mapping=data.get("mapping"),
            actor=_actor(data.get("actor"))[0],
            actor_options=_actor(data.get("actor"))[1],
            fifo=data.get("fifo", False),
            dedup=data.get("dedup", False),
            destinations=tuple(built),
            file=self.file,
        )

    def _name(self, data: dict[str, Any]) -> None:
        given = data.get("name")
        if "name" in data:
            if isinstance(given, str) and _CHANNEL_NAME.match(given):
                self.name, self.name_path = given, ("name",)
                self.name_at = position(self.document, ("name",))
            return  # a bad name: was reported by the schema
        stem = self.file.stem
        if _CHANNEL_NAME.match(stem):
            self.name = stem
        else:
            self.problem(
                (),
                f"the file name {stem!r} is not a valid channel name (lower-case letters, digits, '-', '_'): "
                "rename the file or add a name: key",
            )

    def _destinations(self, items: list[Any]) -> list[DestinationConfig]:
        built: list[DestinationConfig] = []
        names: dict[str, int] = {}
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                continue  # reported by the schema
            at: tuple[PathStep, ...] = ("destinations", index)
            self._connector(at, item, role="destination")
            name = item.get("name")
            if isinstance(name, str):
                if name in names:
                    other = f"destinations[{names[name]}]"
                    self.problem((*at, "name"), f"duplicate destination name {name!r} (also {other})")
                else:
                    names[name] = index
            self._filters((*at, "filter"), item.get("filter"))
            retry = self._retry(at, item.get("retry"))
            if isinstance(name, str) and isinstance(item.get("url"), str):
                built.append(
                    DestinationConfig(
                        name=name,
                        url=item["url"],
                        options=item.get("options") or {},
                        filter=_expressions(item.get("filter")),
                        retry=retry,
                    )
                )
        return built

    def _filters(self, at: tuple[PathStep, ...], given: Any) -> None:
        """Parse each filter expression now, so a typo is reported at load rather than at start."""
        # Imported here: ihehub.engine builds on this package, so a module-level import could cycle.
        from ihehub.engine.expr import Filter

        items = [(at, given)] if isinstance(given, str) else list(enumerate(given or []))
        for where, expression in items:
            path = where if isinstance(where, tuple) else (*at, where)
            if not isinstance(expression, str) or not expression:
                continue  # reported by the schema
            try:
                Filter.compile(expression)
            except Exception as exc:  # the parser's message names the column; never crash validation
                self.problem(path, f"bad filter expression {expression!r}: {exc}")

    def _retry(self, at: tuple[PathStep, ...], given: Any) -> RetryPolicy:
        policy = self.hub.delivery.retry
        if not isinstance(given, dict):
            return policy
        fields = {f.name: _CONVERTERS.get(str(f.type), lambda v: v) for f in dataclasses.fields(RetryPolicy)}
        try:
            policy = dataclasses.replace(
                policy, **{k: fields[k](v) for k, v in given.items() if k in fields and v is not None}
            )
        except (TypeError, ValueError):
            return policy  # wrong types were reported by the schema
        if policy.max_backoff < policy.initial_backoff:
            self.problem(
                (*at, "retry"),
                _backoff_message(policy.max_backoff, policy.initial_backoff),
            )
        return policy

    def _connector(self, at: tuple[PathStep, ...], section: dict[str, Any], *, role: str) -> None:
        """Check the URL's scheme against the registry and ``options`` against the connector's schema."""
        url = section.get("url")
        if not isinstance(url, str) or not _CONNECTOR_URL.match(url):
            return  # missing or malformed: reported by the schema
        url_at = (*at, "url")
        scheme = url.split("://", 1)[0].lower()
        known = self.registry.schemes
        if scheme not in known:
            self.problem(
                url_at,
                f"unknown connector scheme {scheme + '://'!r}{did_you_mean(scheme, known)}; "
                f"known: {', '.join(s + '://' for s in known)}",
            )
            return
        try:
            _ = urlsplit(url).port  # parsing the port is the check
        except ValueError as exc:
            if "${" not in url:  # an unset ${VARIABLE} was reported already
                self.problem(url_at, f"bad port in {redact(url)!r}: {exc}")
        try:
            spec = self.registry.spec(scheme)
        except Exception as exc:  # a connector module that fails to import must not crash validation
            self.problem(url_at, f"the {scheme}:// connector cannot be loaded: {type(exc).__name__}: {exc}")
            return
        if (spec.source if role == "source" else spec.destination) is None:
            self.problem(url_at, f"{scheme}:// cannot be used as a {role}")
        options = section.get("options")
        options = {} if options is None else options
        if isinstance(options, dict):
            self.problems += check(
                options,
                _as_dict(spec.options_schema),
                file=self.display,
                document=self.document,
                base=(*at, "options"),
            )


def _actor(value: Any) -> tuple[str | None, dict[str, Any]]:
    """``actor: name`` or ``actor: {name: ..., options: {...}}`` (already schema-checked)."""
    if isinstance(value, dict):
        return value["name"], _as_dict(value.get("options") or {})
    return value, {}


def _as_dict(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _as_dict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_dict(v) for v in value]
    return value


def _backoff_message(max_backoff: float, initial_backoff: float) -> str:
    return f"max_backoff {max_backoff} is less than initial_backoff {initial_backoff}"


def _expressions(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)
