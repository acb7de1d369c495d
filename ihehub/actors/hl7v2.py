"""HL7 v2 pieces shared by the PIX Manager and the PDQ Supplier: options, PID <-> `PatientRecord`, RSP building.

* PID mapping follows IHE ITI TF-2a 3.8.4.1.2.3 (ITI-8 Patient Identity Feed, PID of ADT A01/A04/A05/A08/A40)
  and HL7 v2.5 section 3.4.2 (PID), data types CX (2.A.14), XPN (2.A.88), XAD (2.A.85), XTN (2.A.89).
* Responses follow HL7 v2.5 section 5.5 (RSP segment pattern response): MSH, MSA, [ERR], QAK, QPD echoed as
  received, the hits, [DSC] — the layout of IHE ITI TF-2a 3.9.4.2 (RSP^K23) and 3.21.4.2 (RSP^K22).
* `ActorOptions` is the JSON-Schema-checked ``options:`` of a ``pix-manager`` / ``pdq-supplier`` channel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema

from ihehub.actors.base import ActorContext
from ihehub.actors.events.config import LISTENER_SCHEMA, Listener, ListenerError, parse_listeners
from ihehub.channels.registry import did_you_mean
from ihehub.empi import (
    HD,
    Address,
    Domain,
    DomainType,
    Empi,
    EmpiConfig,
    EmpiError,
    Identifier,
    PatientRecord,
    PersonName,
)
from ihehub.hl7 import Header, escape, hl7_timestamp, new_control_id, unescape
from ihehub.hl7.ack import build_ack
from ihehub.hl7.errors import describe_error

# actor names whose channels need the hub's EMPI service (``Hub._start_actors`` creates it once).
EMPI_ACTORS = frozenset({"pix-manager", "pdq-supplier"})

_HD_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["namespace"],
    "properties": {
        "namespace": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[^^&~|\\\\]+$"},
        "universal_id": {"type": "string", "minLength": 1},
        "universal_id_type": {"type": "string", "minLength": 1},
    },
}

# a PIX Consumer of ITI-10 update notifications (ihehub/actors/iti10.py)
CONSUMER_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "url"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_.-]+$",
                 "description": "the destination name (queue <pix channel>-iti10/<name>)"},
        "url": {"type": "string", "minLength": 1, "description": "mllp://host:port or any destination URL"},
        "options": {"type": "object", "description": "the destination connector's options"},
        "domains": {"type": ["array", "null"], "items": {"type": "string", "minLength": 1},
                    "description": "namespaces (or OIDs) of the identifiers sent in PID-3; null: all"},
        "receiving_application": {"type": "string"},
        "receiving_facility": {"type": "string"},
    },
}


OPTIONS_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "domains": {
            "type": "array",
            "description": "identifier domains (assigning authorities) to register in the EMPI",
            "items": {**_HD_SCHEMA, "properties": {**_HD_SCHEMA["properties"],  # type: ignore[dict-item]
                                                   "type": {"enum": ["source", "national"]},
                                                   "description": {"type": "string"}}},
        },
        "facility_domains": {
            "type": "object",
            "description": "sending facility (MSH-4, namespace or the whole field) -> domain namespace used "
                           "for a PID-3 without assigning authority (PID-3.4)",
            "additionalProperties": {"type": "string", "minLength": 1},
        },
        "enterprise": {**_HD_SCHEMA, "description": "the EMPI's own identifier domain (read once per hub)"},
        "empi": {"type": "object", "description": "other EmpiConfig settings (profile, thresholds, ...)"},
        "national_id_type": {"type": "string", "minLength": 1,
                             "description": "type of the number in PID-19 (default CN-RIC)"},
        "sending_application": {"type": "string"},
        "sending_facility": {"type": "string"},
        "max_cursors": {"type": "integer", "minimum": 1},
        "cursor_ttl": {"type": "number", "exclusiveMinimum": 0},
        "consumers": {"type": "array", "items": CONSUMER_SCHEMA,
                      "description": "PIX consumers sent ITI-10 ADT^A31 update notifications (pix-manager)"},
        "listeners": {"type": "array", "items": LISTENER_SCHEMA,
                      "description": "patient-event listeners: webhook, soap, db, amqp, mllp (pix-manager; "
                                     "ihehub/actors/events)"},
    },
}


class OptionsError(ValueError):
    """The actor's ``options:`` do not fit `OPTIONS_SCHEMA`."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DomainOption:
    namespace: str
    universal_id: str | None = None
    universal_id_type: str | None = None
    type: DomainType = DomainType.SOURCE
    description: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PixConsumer:
    """One PIX Consumer subscribed to ITI-10 notifications (an entry of the ``consumers`` option)."""

    name: str
    url: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    domains: tuple[str, ...] | None = None
    receiving_application: str = ""
    receiving_facility: str = ""

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> PixConsumer:
        doms = raw.get("domains")
        return cls(name=raw["name"], url=raw["url"], options=dict(raw.get("options") or {}),
                   domains=None if doms is None else tuple(doms),
                   receiving_application=raw.get("receiving_application", ""),
                   receiving_facility=raw.get("receiving_facility", ""))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ActorOptions:
    domains: tuple[DomainOption, ...] = ()
    facility_domains: Mapping[str, str] = dataclasses.field(default_factory=dict)
    national_id_type: str = "CN-RIC"
    sending_application: str | None = None
    sending_facility: str | None = None
    max_cursors: int = 1000
    cursor_ttl: float = 600.0
    consumers: tuple[PixConsumer, ...] = ()
    listeners: tuple[Listener, ...] = ()

    @classmethod
    def parse(cls, actor: str, options: Mapping[str, Any]) -> ActorOptions:
        """Check ``options`` against `OPTIONS_SCHEMA`; the error names the key at fault."""
        props = OPTIONS_SCHEMA["properties"]
        for key in options:
            if key not in props:
                raise OptionsError(f"{actor} options: unknown option {key!r}{did_you_mean(key, props)}; "
                                   f"options are {', '.join(props)}")
        try:
            jsonschema.validate(dict(options), OPTIONS_SCHEMA)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            raise OptionsError(f"{actor} options: {where + ': ' if where else ''}{exc.message}") from None
        doms = tuple(DomainOption(namespace=d["namespace"], universal_id=d.get("universal_id"),
                                  universal_id_type=d.get("universal_id_type"),
                                  type=DomainType(d.get("type", "source")), description=d.get("description", ""))
                     for d in options.get("domains", ()))
        known = {d.namespace for d in doms}
        for fac, ns in options.get("facility_domains", {}).items():
            if ns not in known:
                raise OptionsError(f"{actor} options: facility_domains/{fac}: domain {ns!r} is not in domains "
                                   f"({', '.join(sorted(known)) or 'none'})")
        consumers = tuple(PixConsumer.parse(c) for c in options.get("consumers", ()))
        if consumers and actor != "pix-manager":
            raise OptionsError(f"{actor} options: consumers (ITI-10 notifications) belong to a pix-manager")
        names = [c.name for c in consumers]
        for name in names:
            if names.count(name) > 1:
                raise OptionsError(f"{actor} options: consumers: the name {name!r} is used twice")
        try:
            listeners = parse_listeners(options.get("listeners"))
        except ListenerError as exc:
            raise OptionsError(f"{actor} options: {exc}") from None
        if listeners and actor != "pix-manager":
            raise OptionsError(f"{actor} options: listeners (patient events) belong to a pix-manager")
        return cls(domains=doms, facility_domains=dict(options.get("facility_domains", {})),
                   national_id_type=options.get("national_id_type", "CN-RIC"),
                   sending_application=options.get("sending_application"),
                   sending_facility=options.get("sending_facility"),
                   max_cursors=options.get("max_cursors", 1000), cursor_ttl=options.get("cursor_ttl", 600.0),
                   consumers=consumers, listeners=listeners)


def empi_config(options: Mapping[str, Any]) -> EmpiConfig:
    """The `EmpiConfig` an actor channel's options ask for (``enterprise`` + ``empi`` settings)."""
    settings = dict(options.get("empi") or {})
    ent = options.get("enterprise") or {}
    if ent.get("namespace"):
        settings["enterprise_namespace"] = ent["namespace"]
    if ent.get("universal_id"):
        settings["enterprise_oid"] = ent["universal_id"]
    return EmpiConfig.from_mapping(settings)


# -- reading ----------------------------------------------------------------------------------------

class Segments:
    """The segments of one message split on the header's delimiters; values stay escaped until read."""

    def __init__(self, header: Header) -> None:
        self.header = header
        self.rows = [s.split(header.field_sep) for s in header.segments()]

    def all(self, name: str) -> list[list[str]]:
        return [r for r in self.rows if r[0] == name]

    def first(self, name: str) -> list[str] | None:
        return next((r for r in self.rows if r[0] == name), None)

    def field(self, seg: list[str] | None, n: int) -> str:
        """Field ``n`` (1-based, MSH counted as usual with MSH-1 the separator) as sent."""
        if seg is None:
            return ""
        idx = n - 1 if seg[0] == "MSH" else n
        return seg[idx] if idx < len(seg) else ""

    def reps(self, value: str) -> list[str]:
        return value.split(self.header.repetition_sep) if value else []

    def comps(self, value: str) -> list[str]:
        return value.split(self.header.component_sep)

    def subs(self, value: str) -> list[str]:
        return value.split(self.header.subcomponent_sep)

    def text(self, value: str) -> str:
        return unescape(value, self.header).strip()


def comp(parts: Sequence[str], n: int) -> str:
    """Component ``n`` (1-based) of a split value, "" when absent."""
    return parts[n - 1] if n - 1 < len(parts) else ""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CX:
    """A patient identifier as sent: CX-1 value and CX-4 assigning authority (HD), CX-5 type."""

    value: str
    authority: HD | None
    type_code: str = ""


def parse_hd(seg: Segments, text: str) -> HD | None:
    parts = [seg.text(p) for p in seg.subs(text)]
    ns, uid, typ = comp(parts, 1), comp(parts, 2), comp(parts, 3)
    if not ns and not uid:
        return None
    return HD(namespace=ns or None, universal_id=uid or None, universal_id_type=typ or None)


def parse_cx(seg: Segments, text: str) -> CX:
    parts = seg.comps(text)
    return CX(value=seg.text(comp(parts, 1)), authority=parse_hd(seg, comp(parts, 4)),
              type_code=seg.text(comp(parts, 5)))


def facility_key(seg: Segments) -> list[str]:
    """MSH-4 as keys of ``facility_domains``: the whole field and its namespace (HD-1)."""
    msh4 = seg.header.sending_facility
    keys = [seg.text(msh4)]
    first = seg.text(comp(seg.comps(msh4), 1))
    if first and first not in keys:
        keys.append(first)
    return keys


def pid_record(seg: Segments, pid: list[str], pv1: list[str] | None, *, pid_value: str,
               national_id_type: str, extra: Mapping[str, str]) -> PatientRecord:
    """PID (and PV1) of an ITI-8 feed as the EMPI's `PatientRecord` (IHE ITI TF-2a 3.8.4.1.2.3)."""
    names = []
    for rep in seg.reps(seg.field(pid, 5)):
        c = [seg.text(p) for p in seg.comps(rep)]
        family = seg.text(comp(seg.subs(comp(seg.comps(rep), 1)), 1))
        if family or comp(c, 2):
            names.append(PersonName(family=family, given=comp(c, 2), middle=comp(c, 3), suffix=comp(c, 4),
                                    prefix=comp(c, 5), use=comp(c, 7)))
    addresses = []
    for rep in seg.reps(seg.field(pid, 11)):
        c = [seg.text(p) for p in seg.comps(rep)]
        a = Address(line1=seg.text(comp(seg.subs(comp(seg.comps(rep), 1)), 1)), line2=comp(c, 2),
                    city=comp(c, 3), state=comp(c, 4), postcode=comp(c, 5), country=comp(c, 6), district=comp(c, 9))
        if any((a.line1, a.line2, a.city, a.state, a.postcode)):
            addresses.append(a)
    phones = []
    for f in (13, 14):
        for rep in seg.reps(seg.field(pid, f)):
            c = [seg.text(p) for p in seg.comps(rep)]
            number = comp(c, 1) or (comp(c, 6) + comp(c, 7)) or comp(c, 12)
            if sum(ch.isdigit() for ch in number) >= 5:
                phones.append(number)
    birth = seg.text(comp(seg.comps(seg.field(pid, 7)), 1))[:8]
    sex = seg.text(seg.field(pid, 8))
    national = seg.text(comp(seg.comps(seg.field(pid, 19)), 1))
    mother = seg.text(comp(seg.comps(seg.field(pid, 6)), 1))
    department = ""
    if pv1 is not None:
        department = seg.text(comp(seg.comps(seg.field(pv1, 10)), 1)) or seg.text(
            comp(seg.comps(seg.field(pv1, 3)), 1))
    return PatientRecord(pid=pid_value, names=tuple(names), birth_date=birth or None,
                         sex=sex if sex and sex != '""' else None, phones=tuple(phones),
                         addresses=tuple(addresses), national_id=national or None, national_id_type=national_id_type,
                         mother_maiden_name=mother or None, department=department or None, extra=dict(extra))


# -- writing ----------------------------------------------------------------------------------------

def esc(text: str | None, header: Header) -> str:
    return escape(text or "", header)


def hd_text(dom: Domain | None, header: Header, fallback: str = "") -> str:
    """An assigning authority as CX-4: ``namespace&universal id&type``."""
    if dom is None:
        return esc(fallback, header)
    sub = header.subcomponent_sep
    parts = [esc(dom.namespace, header)]
    if dom.universal_id:
        parts += [esc(dom.universal_id, header), esc(dom.universal_id_type or "ISO", header)]
    return sub.join(parts)


def cx_text(ident: Identifier, dom: Domain | None, header: Header) -> str:
    c = header.component_sep
    return c.join([esc(ident.value, header), "", "", hd_text(dom, header, ident.domain), "PI"])


def record_pid(seq: int, ids: str, record: PatientRecord | None, header: Header) -> str:
    """A PID segment: PID-1 set id, PID-3 the identifiers, and the demographics of ``record``.

    Without a record (ITI-9) PID-5 is the single "S" (pseudonym) name IHE ITI TF-2a 3.9.4.2.2.6 shows.
    """
    c, r, s = header.component_sep, header.repetition_sep, header.field_sep
    fields = ["PID", str(seq), "", ids]
    if record is None:
        fields += ["", r + c * 6 + "S"]
        return s.join(fields)
    names = r.join(c.join([esc(n.family, header), esc(n.given, header), esc(n.middle, header),
                           esc(n.suffix, header), esc(n.prefix, header), "", esc(n.use, header)]).rstrip(c)
                   for n in record.names)
    bd = record.birth_date
    birth = bd.strftime("%Y%m%d") if isinstance(bd, dt.date) else (bd or "")
    addrs = r.join(c.join([esc(a.line1, header), esc(a.line2, header), esc(a.city, header), esc(a.state, header),
                           esc(a.postcode, header), esc(a.country, header)]).rstrip(c) for a in record.addresses)
    phones = r.join(esc(p, header) for p in record.phones)
    fields += ["", names, esc(record.mother_maiden_name, header), esc(birth, header), esc(record.sex, header),
               "", "", addrs, "", phones, "", "", "", "", "", esc(record.national_id, header)]
    while fields[-1] == "":
        fields.pop()
    return s.join(fields)


def err_segment(header: Header, code: str, location: str | None, text: str | None) -> str:
    """ERR in the v2.5 layout (HL7 v2.5 section 2.15.5): ERR-2 location, ERR-3 code^text^HL70357, ERR-4 E."""
    c, s = header.component_sep, header.field_sep
    fields = ["ERR", "", (location or "").replace("^", c), c.join([code, describe_error(code), "HL70357"]), "E",
              "", "", esc(text, header)]
    while fields[-1] == "":
        fields.pop()
    return s.join(fields)


def build_rsp(header: Header, *, message_type: str, ack: str, qak: Sequence[str], qpd: list[str] | None,
              hits: Sequence[str] = (), error: tuple[str, str | None, str] | None = None,
              dsc: str | None = None, options: ActorOptions) -> bytes:
    """An RSP (HL7 v2.5 section 5.5.2): MSH, MSA, [ERR], QAK, QPD as received, hits, [DSC]; the query's codec.

    ``error`` is (table 0357 code, ERR-2 location, text).
    """
    s = header.field_sep
    msh = ["MSH", header.encoding_chars,
           options.sending_application if options.sending_application is not None else header.receiving_app,
           options.sending_facility if options.sending_facility is not None else header.receiving_facility,
           header.sending_app, header.sending_facility, hl7_timestamp(), "",
           message_type.replace("^", header.component_sep), new_control_id(), header.processing_id or "P", "2.5"]
    if header.charset_field:
        msh += ["", "", "", "", "", header.charset_field]
    segs = [s.join(msh), s.join(["MSA", ack, header.control_id])]
    if error is not None:
        segs.append(err_segment(header, error[0], error[1], error[2]))
    segs.append(s.join(["QAK", *qak]).rstrip(s))
    if qpd is not None:
        segs.append(s.join(qpd))
    segs += hits
    if dsc:
        segs.append(s.join(["DSC", dsc, "I"]))
    return ("\r".join(segs) + "\r").encode(header.charset, "replace")


def ack(header: Header, code: str, *, error_code: str | None = None, location: str | None = None,
        text: str | None = None, options: ActorOptions) -> bytes:
    """A general acknowledgment (HL7 v2.5 section 2.14.1), in the layout of the message's version."""
    return build_ack(header, code, text=text, error_code=error_code, error_location=location,
                     sending_app=options.sending_application, sending_facility=options.sending_facility)


class EmpiActor:
    """What the PIX Manager and PDQ Supplier share: options, the hub's EMPI service, domains, header parsing."""

    actor = "empi-actor"

    def __init__(self, *, name: str, options: dict[str, Any], context: ActorContext) -> None:
        self.name = name
        self.options = ActorOptions.parse(self.actor, options)
        empi_config(options)  # settings errors surface when the channel is built
        self.context = context
        self._empi: Empi | None = None
        self.log = logging.getLogger(f"ihehub.actors.{self.actor}")

    @property
    def empi(self) -> Empi:
        if self._empi is None:
            raise RuntimeError(f"{self.actor} {self.name!r} is not started")
        return self._empi

    async def start(self) -> None:
        empi = self.context.extras.get("empi")
        if not isinstance(empi, Empi):
            raise RuntimeError(f"{self.actor} needs the hub's EMPI service (services['empi']), which is missing")
        self._empi = empi

        def setup() -> None:
            empi.setup()
            for d in self.options.domains:
                empi.add_domain(d.namespace, universal_id=d.universal_id,
                                universal_id_type=d.universal_id_type or "ISO", type=d.type,
                                description=d.description)

        await asyncio.to_thread(setup)

    async def stop(self) -> None:
        self._empi = None

    def domain_or_none(self, key: str | HD) -> Domain | None:
        try:
            return self.empi.domain(key)
        except EmpiError:
            return None
