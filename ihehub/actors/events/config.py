"""The ``listeners:`` option of a ``pix-manager`` channel: who hears of patient events, and how.

Each listener gets every EMPI patient event (registered, updated, merged, unmerged, linked, unlinked,
deleted) of the types it asks for, through its own bus destination queue ``empi-events/<name>`` (tracked,
retried, dead-lettered and resent like any delivery).  Kinds:

``webhook``  HTTP(S) POST of the event JSON; ``secret`` adds ``X-Ihehub-Signature: sha256=<HMAC-SHA256 hex>``
             of the body (RFC 2104).  ``options``: the http destination's (headers, timeout, tls, ...).
``soap``     SOAP 1.2 POST (W3C SOAP 1.2 Part 2, 7: ``application/soap+xml``) of a ``PatientEvent`` envelope
             with WS-Addressing Action/MessageID/To; a ``env:Sender`` fault is not retried.
``db``       a row per event in an outbox table any SQL client reads: ``url: local`` (the default) is the
             hub's own ``empi_event_outbox``; any SQLAlchemy URL (``postgresql+psycopg://``,
             ``mysql+pymysql://``) writes ``table`` (default ``empi_event_outbox``, created if missing) there.
``amqp``     a persistent message (AMQP 0-9-1 delivery-mode 2, publisher confirms) to ``exchange`` (default:
             the default exchange) with ``routing_key`` (``{type}`` is replaced; default ``empi.{type}``);
             ``queue`` declares a durable queue bound to it.
``mllp``     HL7 v2.5 ADT^A31 (registered, updated, linked, unlinked, unmerged) or ADT^A40 (merged) whose PID-3
             lists the patient's identifiers in ``domains`` (all when absent), as ITI-10 (TF-2a 3.10.4.1.2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import jsonschema

from ihehub.empi import EventType

CHANNEL = "empi-events"  # the bus channel of patient events; each listener is the queue empi-events/<name>
KINDS = ("webhook", "soap", "db", "amqp", "mllp")
ALL_EVENTS = tuple(e.value for e in EventType)
MLLP_EVENTS = tuple(e.value for e in EventType if e is not EventType.DELETED)  # A31/A40 need a cross-reference
LOCAL = "local"

_NAME = {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_.-]+$"}

LISTENER_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "kind"],
    "properties": {
        "name": {**_NAME, "description": "the destination name (queue empi-events/<name>)"},
        "kind": {"enum": list(KINDS)},
        "url": {"type": "string", "minLength": 1,
                "description": "http(s):// (webhook, soap), mllp(s)://, amqp(s)://, or for db: local or a "
                               "SQLAlchemy URL"},
        "events": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": list(ALL_EVENTS)},
                   "description": "event types sent to this listener (default: all its kind carries)"},
        "options": {"type": "object", "description": "the transport's options (http or mllp destination)"},
        "secret": {"type": "string", "minLength": 1, "description": "webhook: HMAC-SHA256 key"},
        "signature_header": {"type": "string", "minLength": 1, "pattern": "^[A-Za-z0-9-]+$"},
        "soap_action": {"type": "string", "minLength": 1},
        "table": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,62}$"},
        "exchange": {"type": "string"},
        "exchange_type": {"enum": ["direct", "topic", "fanout", "headers"]},
        "routing_key": {"type": "string"},
        "queue": {"type": "string", "minLength": 1, "maxLength": 255},
        "domains": {"type": ["array", "null"], "items": {"type": "string", "minLength": 1}},
        "receiving_application": {"type": "string"},
        "receiving_facility": {"type": "string"},
    },
}

# which keys each kind accepts besides name, kind, url, events
_KIND_KEYS: Mapping[str, frozenset[str]] = {
    "webhook": frozenset({"options", "secret", "signature_header"}),
    "soap": frozenset({"options", "soap_action"}),
    "db": frozenset({"table"}),
    "amqp": frozenset({"exchange", "exchange_type", "routing_key", "queue"}),
    "mllp": frozenset({"options", "domains", "receiving_application", "receiving_facility"}),
}
_SCHEMES: Mapping[str, tuple[str, ...]] = {
    "webhook": ("http", "https"), "soap": ("http", "https"), "amqp": ("amqp", "amqps"), "mllp": ("mllp", "mllps"),
}


class ListenerError(ValueError):
    """A ``listeners`` entry is wrong; the text names the entry and the key."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Listener:
    """One configured listener (an entry of ``listeners``)."""

    name: str
    kind: str
    url: str
    events: frozenset[str]
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the kind's own keys

    @property
    def queue(self) -> str:
        return f"{CHANNEL}/{self.name}"

    def wants(self, event_type: str) -> bool:
        return event_type in self.events

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.settings.get("options") or {})


def _one(raw: Mapping[str, Any], index: int) -> Listener:
    where = f"listeners/{raw.get('name', index) if isinstance(raw, Mapping) else index}"
    try:
        jsonschema.validate(raw, LISTENER_SCHEMA)
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        raise ListenerError(f"{where}{'/' + path if path else ''}: {exc.message}") from None
    kind = raw["kind"]
    extra = set(raw) - {"name", "kind", "url", "events"} - _KIND_KEYS[kind]
    if extra:
        raise ListenerError(f"{where}: {', '.join(sorted(extra))} do(es) not apply to a {kind} listener "
                            f"(it takes {', '.join(sorted(_KIND_KEYS[kind]))})")
    url = raw.get("url") or (LOCAL if kind == "db" else "")
    if kind in _SCHEMES:
        if not url:
            raise ListenerError(f"{where}: a {kind} listener needs a url ({' or '.join(_SCHEMES[kind])}://...)")
        scheme = urlsplit(url).scheme.lower()
        if scheme not in _SCHEMES[kind]:
            raise ListenerError(f"{where}/url: {url!r} is not a {kind} URL "
                                f"({' or '.join(s + '://' for s in _SCHEMES[kind])})")
    elif url != LOCAL and "://" not in url:
        raise ListenerError(f"{where}/url: {url!r} is neither 'local' (the hub's empi_event_outbox) nor a "
                            "SQLAlchemy database URL (e.g. postgresql+psycopg://host/db, mysql+pymysql://host/db)")
    if kind == "db" and url == LOCAL and raw.get("table"):
        raise ListenerError(f"{where}/table: the local db listener writes the hub's empi_event_outbox; table "
                            "applies to an external database url")
    default = MLLP_EVENTS if kind == "mllp" else ALL_EVENTS
    events = frozenset(raw.get("events") or default)
    if kind == "mllp" and EventType.DELETED.value in events:
        raise ListenerError(f"{where}/events: an mllp listener gets ADT^A31/A40, which carry a cross-reference; "
                            "'deleted' has none (use a webhook, soap, db or amqp listener for it)")
    settings = {k: v for k, v in raw.items() if k in _KIND_KEYS[kind]}
    return Listener(name=raw["name"], kind=kind, url=url, events=events, settings=settings)


def parse_listeners(raw: Sequence[Mapping[str, Any]] | None) -> tuple[Listener, ...]:
    """The ``listeners`` option as `Listener`s; `ListenerError` names the entry and key at fault."""
    if raw is None:
        return ()
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes):
        raise ListenerError("listeners: must be a list of listener entries")
    out = [_one(r, i) for i, r in enumerate(raw)]
    names = [x.name for x in out]
    for name in names:
        if names.count(name) > 1:
            raise ListenerError(f"listeners: the name {name!r} is used twice")
    return tuple(out)
