"""Settings of the image manager and the DICOM nodes registry.

`DicomSettings` is a frozen, keyword-only value; `DicomSettings.from_mapping` builds it from the YAML-shaped
``actors.dicom`` section (plus ``nodes:``) with an `InvalidSettings` error that names the key, and
`SETTINGS_SCHEMA` is the JSON Schema of that section for the hub's configuration loader.

Nodes (PS3.8 "Application Entity", PS3.15 Annex B for TLS) may be given as a mapping
``{name: {ae_title, host, port, tls}}`` or as a list of such mappings (``name`` defaults to the AE title).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ihehub.dicom.routing import parse_routing_tags
from ihehub.dicom.websettings import DICOMWEB_SCHEMA, DicomWebSettings

__all__ = [
    "FSYNC_POLICIES",
    "SETTINGS_SCHEMA",
    "DicomNode",
    "DicomSettings",
    "InvalidSettings",
    "ListenerConfig",
]

FSYNC_POLICIES = ("always", "batch", "never")
# PS3.5 6.2 VR AE: 1-16 characters of the default repertoire, no backslash, no control characters.
_AE_TITLE = re.compile(r"^[!-\[\]-~][ -\[\]-~]{0,15}$")


class InvalidSettings(ValueError):
    """A setting of the ``actors.dicom`` section is wrong; the message names the key."""


class ListenerConfig(Protocol):
    """What the hub's ``actors.dicom`` config value offers (`ihehub.config.model.DicomActorConfig`)."""

    @property
    def port(self) -> int: ...

    @property
    def ae_title(self) -> str: ...


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DicomNode:
    """A known peer: its AE title, where it listens (for C-MOVE and forwarding) and whether it speaks TLS.

    ``host`` also restricts where the node may call from when the manager requires known callers;
    ``None`` accepts the title from any address.
    """

    name: str
    ae_title: str
    host: str | None = None
    port: int | None = None
    tls: bool = False

    def __post_init__(self) -> None:
        _check_ae_title(self.ae_title, f"nodes.{self.name}.ae_title")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise InvalidSettings(f"nodes.{self.name}.port: {self.port} is not a TCP port (1-65535)")

    def accepts_address(self, address: str) -> bool:
        """True when ``address`` (the caller's IP) is this node's host (an IP, or a name that resolves to it)."""
        if self.host is None:
            return True
        try:
            peer = ipaddress.ip_address(address)
        except ValueError:
            return False
        return peer in _resolve(self.host)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DicomSettings:
    """The image manager: one AE, its listener and its storage policy.

    * ``ae_title`` / ``port`` / ``host``: the listener (``port`` 0 binds a free port).
    * ``require_known_callers``: reject associations whose calling AE title is not in ``nodes`` (PS3.8 7.1.1.3
      A-ASSOCIATE-RJ, reason "calling-AE-title-not-recognized"), or that call from another host than the node's.
    * ``fsync``: ``always`` syncs each file before the C-STORE response; ``batch`` (default) syncs the files
      of an index batch before their rows commit, so whatever is queryable is on disk; ``never`` leaves it to
      the operating system.
    * ``study_quiet_seconds``: a study is complete once no instance of it arrived for this long.
    * ``max_pdu``: the largest P-DATA-TF PDU we accept (0: no limit); large PDUs make ingest faster.
    * ``idle_timeout``: seconds an association may stay silent (``None``: forever; TCP keep-alive still
      notices dead peers).
    * ``index_process``: decode and index in a worker process (default) so that receiving never waits for
      the GIL; ``false`` indexes in a thread of the hub process.
    * ``routing_tags``: extra attributes (keywords or tags) the study-complete message carries under ``tags``
      for routing rules (`ihehub.dicom.routing`).
    * ``native_store``: serve storage-only associations on the plain listener with the native upper layer
      (`ihehub.dicom.native`) instead of pynetdicom's; ``false`` sends every association through pynetdicom.
    """

    ae_title: str = "IHEHUB"
    port: int = 11112
    host: str = "0.0.0.0"
    tls_port: int | None = None
    require_known_callers: bool = False
    nodes: tuple[DicomNode, ...] = ()
    fsync: str = "batch"
    study_quiet_seconds: float = 30.0
    max_associations: int = 64
    max_pdu: int = 0
    idle_timeout: float | None = 600.0
    index_queue: int = 256
    index_process: bool = True
    find_limit: int = 10_000
    routing_tags: tuple[str, ...] = ()
    native_store: bool = True
    dicomweb: DicomWebSettings = dataclasses.field(default_factory=DicomWebSettings)  # DICOMweb (PS3.18)

    def __post_init__(self) -> None:
        _check_ae_title(self.ae_title, "ae_title")
        if not 0 <= self.port <= 65535:
            raise InvalidSettings(f"port: {self.port} is not a TCP port (0-65535)")
        if self.tls_port is not None and not 0 <= self.tls_port <= 65535:
            raise InvalidSettings(f"tls_port: {self.tls_port} is not a TCP port (0-65535)")
        if self.fsync not in FSYNC_POLICIES:
            raise InvalidSettings(f"fsync: {self.fsync!r} is not one of {', '.join(FSYNC_POLICIES)}")
        if self.study_quiet_seconds <= 0:
            raise InvalidSettings("study_quiet_seconds: must be greater than 0")
        if self.max_associations < 1:
            raise InvalidSettings("max_associations: must be at least 1")
        if self.max_pdu < 0:
            raise InvalidSettings("max_pdu: must be 0 (no limit) or a positive number of bytes")
        if self.index_queue < 1:
            raise InvalidSettings("index_queue: must be at least 1")
        try:
            parse_routing_tags(self.routing_tags)
        except ValueError as exc:
            raise InvalidSettings(str(exc)) from None
        titles: dict[str, str] = {}
        for node in self.nodes:
            other = titles.setdefault(node.ae_title, node.name)
            if other != node.name:
                raise InvalidSettings(f"nodes.{node.name}.ae_title: {node.ae_title!r} is also the title of {other}")

    def node(self, ae_title: str) -> DicomNode | None:
        """The registered node with this AE title (trailing spaces ignored), if any."""
        title = ae_title.strip()
        return next((n for n in self.nodes if n.ae_title == title), None)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, *, listener: ListenerConfig | None = None,
                     nodes: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None) -> DicomSettings:
        """Build from the YAML-shaped ``actors.dicom`` section; ``listener`` (the hub's typed
        ``actors.dicom``) supplies ``ae_title``/``port`` when ``data`` does not; ``nodes`` overrides
        ``data["nodes"]``."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidSettings(f"{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})")
        if listener is not None:
            data.setdefault("ae_title", listener.ae_title)
            data.setdefault("port", listener.port)
        raw_nodes = nodes if nodes is not None else data.pop("nodes", None)
        if "dicomweb" in data:
            try:
                data["dicomweb"] = DicomWebSettings.from_mapping(data["dicomweb"])
            except (TypeError, ValueError) as exc:
                raise InvalidSettings(str(exc)) from exc
        data.pop("nodes", None)
        if "routing_tags" in data:
            tags = data["routing_tags"]
            if not isinstance(tags, list | tuple) or not all(isinstance(x, str) for x in tags):
                raise InvalidSettings(f"routing_tags: expected a list of keywords or tags, got {tags!r}")
            data["routing_tags"] = tuple(tags)
        for key, kind in (("port", int), ("max_associations", int), ("max_pdu", int), ("index_queue", int),
                          ("find_limit", int), ("study_quiet_seconds", (int, float)),
                          ("require_known_callers", bool), ("index_process", bool), ("native_store", bool),
                          ("ae_title", str),
                          ("host", str), ("fsync", str)):
            if key in data and (not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool))):
                raise InvalidSettings(f"{key}: expected {_kind_name(kind)}, got {data[key]!r}")
        for key in ("tls_port", "idle_timeout"):
            if data.get(key) is not None and not isinstance(data[key], int | float):
                raise InvalidSettings(f"{key}: expected a number or null, got {data[key]!r}")
        return cls(nodes=parse_nodes(raw_nodes), **data)


def parse_nodes(raw: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> tuple[DicomNode, ...]:
    """Nodes from ``{name: {...}}`` or ``[{name?, ae_title, host, port, tls}, ...]``."""
    if raw is None:
        return ()
    items: list[tuple[str | None, Any]]
    if isinstance(raw, Mapping):
        items = [(str(k), v) for k, v in raw.items()]
    elif isinstance(raw, Sequence) and not isinstance(raw, str | bytes):
        items = [(None, v) for v in raw]
    else:
        raise InvalidSettings(f"nodes: expected a mapping of name -> node or a list of nodes, got {raw!r}")
    out = []
    for i, (name, spec) in enumerate(items):
        where = f"nodes.{name}" if name is not None else f"nodes[{i}]"
        if not isinstance(spec, Mapping):
            raise InvalidSettings(f"{where}: expected a mapping with ae_title, host, port, tls")
        extra = sorted(set(spec) - {"name", "ae_title", "host", "port", "tls"})
        if extra:
            raise InvalidSettings(f"{where}.{extra[0]}: unknown key (known: ae_title, host, port, tls)")
        title = spec.get("ae_title")
        if not isinstance(title, str):
            raise InvalidSettings(f"{where}.ae_title: required, a string of 1-16 characters")
        port = spec.get("port")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
            raise InvalidSettings(f"{where}.port: expected an integer, got {port!r}")
        host = spec.get("host")
        if host is not None and not isinstance(host, str):
            raise InvalidSettings(f"{where}.host: expected a host name or address, got {host!r}")
        tls = spec.get("tls", False)
        if not isinstance(tls, bool):
            raise InvalidSettings(f"{where}.tls: expected true or false, got {tls!r}")
        out.append(DicomNode(name=str(spec.get("name") or name or title), ae_title=title, host=host, port=port,
                             tls=tls))
    return tuple(out)


def _check_ae_title(value: str, key: str) -> None:
    if not isinstance(value, str) or not _AE_TITLE.match(value):
        raise InvalidSettings(f"{key}: {value!r} is not a valid AE title: 1 to 16 printable ASCII characters, "
                              "no backslash, not starting with a space")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if isinstance(kind, tuple):
        return "a number"
    return names.get(kind, kind.__name__)


def _resolve(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return {ipaddress.ip_address(host)}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return set()
    out: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for info in infos:
        try:
            out.add(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        except ValueError:
            continue
    return out


_PORT = {"type": "integer", "minimum": 0, "maximum": 65535}
_AE = {"type": "string", "pattern": _AE_TITLE.pattern,
       "description": "DICOM AE title (PS3.5 6.2, VR AE): 1-16 characters, no backslash"}

SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "ae_title": _AE,
        "port": _PORT,
        "host": {"type": "string"},
        "tls_port": {"oneOf": [_PORT, {"type": "null"}]},
        "require_known_callers": {"type": "boolean"},
        "fsync": {"enum": list(FSYNC_POLICIES)},
        "study_quiet_seconds": {"type": "number", "exclusiveMinimum": 0},
        "max_associations": {"type": "integer", "minimum": 1},
        "max_pdu": {"type": "integer", "minimum": 0},
        "idle_timeout": {"oneOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]},
        "index_queue": {"type": "integer", "minimum": 1},
        "index_process": {"type": "boolean"},
        "native_store": {"type": "boolean",
                         "description": "storage-only associations on the native upper layer (default true)"},
        "find_limit": {"type": "integer", "minimum": 1},
        "routing_tags": {"type": "array", "items": {"type": "string", "minLength": 1},
                         "description": "extra attributes of the study-complete message (keywords or tags)"},
        "dicomweb": DICOMWEB_SCHEMA,
        "nodes": {
            "description": "Known DICOM nodes: name -> {ae_title, host, port, tls}",
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["ae_title"],
                "properties": {"ae_title": _AE, "host": {"type": "string"}, "port": _PORT,
                               "tls": {"type": "boolean"}},
            },
        },
    },
}
