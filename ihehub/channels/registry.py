"""Connector registry keyed by URL scheme, with lazy imports and "did you mean" on a typo.

Each connector lives in one module that defines ``SPEC`` (a `ConnectorSpec`) and the classes it
names.  The registry only knows module paths, so nothing is imported until a channel uses it.
A registry is a value: tests build one with just the connectors they need.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ihehub.channels.base import ConnectorError, ConnectorSpec, Destination, Source

DEFAULT_CONNECTORS: Mapping[str, str] = {
    "mllp": "ihehub.channels.mllp",
    "mllps": "ihehub.channels.mllp",
    "http": "ihehub.channels.http",
    "https": "ihehub.channels.http",
    "file": "ihehub.channels.file",
    "sql": "ihehub.channels.sql",
    "amqp": "ihehub.channels.amqp",
    "sftp": "ihehub.channels.sftp",
    "dicom": "ihehub.channels.dicom",
    "soap": "ihehub.channels.soap",
    "soaps": "ihehub.channels.soap",
    "xdsi": "ihehub.channels.xdsi",
    "dicomweb+http": "ihehub.channels.stowrs",
    "dicomweb+https": "ihehub.channels.stowrs",
}


def import_ref(ref: str) -> Any:
    """Import ``package.module:name`` (connectors, transformers, actors); `ValueError` names the bad part."""
    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"{ref!r} must look like 'package.module:name'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {mod_name!r}: {exc}") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ValueError(f"{mod_name!r} has no {attr!r}") from None


def did_you_mean(word: str, choices: list[str] | tuple[str, ...] | Any) -> str:
    """`` (did you mean 'x'?)`` when a close match exists, else an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ConnectorContext:
    """What connectors may need from the running hub, passed in rather than read from globals."""

    home: str = "."
    tls: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    http_routes: Any = None  # ihehub.channels.http.RouteTable when the API app is running
    # (kind, peer, detail) -> None: refused TLS handshakes and connections, audited by the hub (110113)
    on_security_event: Any = None
    # (channel, error or None) -> None: a running source reports a problem (its database is down) or its end
    on_source_status: Any = None
    services: Mapping[str, Any] | None = None  # the hub's domain services by name ("dicom": the image manager)


class Registry:
    def __init__(self, modules: Mapping[str, str] | None = None) -> None:
        self._modules = dict(DEFAULT_CONNECTORS if modules is None else modules)

    @property
    def schemes(self) -> list[str]:
        return sorted(self._modules)

    def module(self, scheme: str) -> Any:
        try:
            path = self._modules[scheme]
        except KeyError:
            raise ConnectorError(
                f"unknown connector scheme {scheme + '://'!r}{did_you_mean(scheme, self._modules)}; "
                f"known: {', '.join(s + '://' for s in self.schemes)}"
            ) from None
        return importlib.import_module(path)

    def spec(self, scheme: str) -> ConnectorSpec:
        spec: ConnectorSpec = self.module(scheme).SPEC
        return spec

    def _load(self, scheme: str, role: str) -> Any:
        spec = self.spec(scheme)
        target = spec.source if role == "source" else spec.destination
        if target is None:
            raise ConnectorError(f"{scheme}:// cannot be used as a {role}")
        try:
            return import_ref(target)
        except ValueError as exc:
            raise ConnectorError(f"{scheme}:// {role}: {exc}") from None

    def build_source(
        self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext
    ) -> Source:
        cls = self._load(scheme_of(url), "source")
        source: Source = cls(name=name, url=url, options=dict(options), context=context)
        return source

    def build_destination(
        self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext
    ) -> Destination:
        cls = self._load(scheme_of(url), "destination")
        dest: Destination = cls(name=name, url=url, options=dict(options), context=context)
        return dest


def scheme_of(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise ConnectorError(f"{url!r} is not a connector URL (expected scheme://..., e.g. mllp://0.0.0.0:2575)")
    return scheme
