"""From received bytes to a storable `AuditRecord`: RFC 5424 header, safe XML parse, validation,
and the fields search needs.  Nothing here raises on bad input: whatever arrives becomes a record,
flagged invalid with the reasons, so that the repository never drops a message (IHE ITI TF-2a
3.20.4.2: the Audit Record Repository stores what it receives)."""

from __future__ import annotations

import dataclasses
import time

from lxml import etree

from ihehub.atna.model import AuditMessage, AuditXMLError, parse_datetime, parse_xml
from ihehub.atna.syslog import BOM, IHE_MSGID, SyslogError, SyslogMessage, parse_syslog
from ihehub.atna.validate import Validator

__all__ = ["AuditRecord", "examine", "index_ids", "summarize"]

ID_KINDS = ("patient", "user", "study", "document", "object", "address")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AuditRecord:
    """A received audit message as the store writes it (the store adds ``seq`` and ``hash``)."""

    raw: bytes
    received_at: float
    transport: str  # tls, tcp, udp, local
    peer: str | None = None
    tls_subject: str | None = None
    syslog_host: str | None = None
    syslog_app: str | None = None
    syslog_procid: str | None = None
    syslog_msgid: str | None = None
    event_id: str | None = None
    event_type: str | None = None
    action: str | None = None
    outcome: int | None = None
    event_time: float | None = None
    source_id: str | None = None
    site_id: str | None = None
    ids: tuple[tuple[str, str], ...] = ()  # (kind, value): kind in ID_KINDS
    valid: bool = False
    errors: str | None = None
    body_at: int | None = None


def index_ids(msg: AuditMessage) -> tuple[tuple[str, str], ...]:
    """The search keys of a message (see `summarize`)."""
    ids = summarize(msg.to_element())["ids"]
    return ids  # type: ignore[return-value]


class _Keys:
    def __init__(self) -> None:
        self.out: dict[tuple[str, str], None] = {}

    def add(self, kind: str, value: str | None) -> None:
        if value:
            value = value.strip()
            if value:
                self.out[(kind, value)] = None

    def patient(self, cx: str | None) -> None:
        self.add("patient", cx)

    def result(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.out)


def summarize(root: etree._Element) -> dict[str, object]:
    """The stored fields of a parsed audit message, in one pass without building the model (this runs
    for every received message).  ``ids`` are the search keys: patient ids (type 1 role 1: the full
    CX), UserID and UserName of every participant, study UIDs (IDTypeCode 110180
    and StudyIDs of object descriptions), document ids (other type 2 role 3 objects), the ids of
    all other objects (queries, submission sets, alert subjects), NetworkAccessPointIDs."""
    if _local(root) != "AuditMessage":
        raise AuditXMLError(f"the root element is <{_local(root) or root.tag}>, not <AuditMessage>")
    fields: dict[str, object] = {}
    keys = _Keys()
    users: list[str] = []
    addresses: list[str] = []
    found_event = False
    for el in root:
        name = _local(el)
        if name == "ActiveParticipant":
            users.append(el.get("UserID") or "")
            users.append(el.get("UserName") or "")
            addresses.append(el.get("NetworkAccessPointID") or "")
        elif name == "ParticipantObjectIdentification":
            _object_keys(el, keys)
        elif name == "EventIdentification":
            found_event = True
            _event_fields(el, fields)
        elif name == "AuditSourceIdentification":
            fields["source_id"] = el.get("AuditSourceID") or None
            fields["site_id"] = el.get("AuditEnterpriseSiteID")
    if not found_event or not fields.get("event_id"):
        raise AuditXMLError("AuditMessage has no EventIdentification/EventID")
    ordered = _Keys()  # patients first, then users, objects, addresses (the order of index_ids)
    for (kind, value) in keys.out:
        if kind == "patient":
            ordered.out[(kind, value)] = None
    for u in users:
        ordered.add("user", u)
    for (kind, value) in keys.out:
        if kind != "patient":
            ordered.out[(kind, value)] = None
    for a in addresses:
        ordered.add("address", a)
    fields["ids"] = ordered.result()
    return fields


def _event_fields(el: etree._Element, fields: dict[str, object]) -> None:
    fields["action"] = el.get("EventActionCode")
    outcome = el.get("EventOutcomeIndicator")
    try:
        fields["outcome"] = int(outcome) if outcome is not None else None
    except ValueError:
        fields["outcome"] = None
    when = parse_datetime(el.get("EventDateTime"))
    fields["event_time"] = when.timestamp() if when is not None else None
    for c in el:
        name = _local(c)
        if name == "EventID":
            fields["event_id"] = _code(c) or None
        elif name == "EventTypeCode" and "event_type" not in fields:
            fields["event_type"] = _code(c) or None


def _object_keys(el: etree._Element, keys: _Keys) -> None:
    object_id = el.get("ParticipantObjectID")
    type_code, role = el.get("ParticipantObjectTypeCode"), el.get("ParticipantObjectTypeCodeRole")
    id_type = ""
    studies: list[str] = []
    for c in el:
        name = _local(c)
        if name == "ParticipantObjectIDTypeCode":
            id_type = _code(c)
        elif name == "ParticipantObjectDescription":
            for d in c.iter():
                if _local(d) == "StudyIDs":
                    studies.append(d.get("UID") or "")
    if type_code == "1" and role == "1":
        keys.patient(object_id)
    elif id_type == "110180":
        keys.add("study", object_id)
    elif type_code == "2" and role == "3":
        keys.add("document", object_id)
    else:
        keys.add("object", object_id)
    for uid in studies:
        keys.add("study", uid)


def _code(el: etree._Element) -> str:
    code = el.get("csd-code")
    return code if code is not None else el.get("code", "")


def _local(el: etree._Element) -> str:
    tag = el.tag
    if not isinstance(tag, str):
        return ""
    return tag.rpartition("}")[2] if tag[0] == "{" else tag


def _find_xml(raw: bytes) -> int | None:
    for marker in (b"<?xml", b"<AuditMessage", b"<"):
        at = raw.find(marker)
        if at >= 0 and (marker != b"<" or raw[at + 1:at + 2].isalpha()):
            return at
    return None


# the fields `inspect` gives, in order (what a worker process sends back; the caller adds raw,
# received_at, transport, peer and tls_subject, which it knows)
RESULT_FIELDS = ("syslog_host", "syslog_app", "syslog_procid", "syslog_msgid", "event_id", "event_type", "action",
                 "outcome", "event_time", "source_id", "site_id", "ids", "valid", "errors", "body_at")
Result = tuple[object, ...]


def examine(
    raw: bytes,
    *,
    validator: Validator | None,
    transport: str,
    peer: str | None = None,
    tls_subject: str | None = None,
    received_at: float | None = None,
    syslog: bool = True,
) -> AuditRecord:
    """Parse and validate one received message (``syslog``: ``raw`` is an RFC 5424 message; False:
    ``raw`` is the audit XML itself).  Never raises."""
    return record_from(raw, inspect(raw, validator, syslog=syslog), transport=transport, peer=peer,
                       tls_subject=tls_subject, received_at=received_at)


def record_from(raw: bytes, result: Result, *, transport: str, peer: str | None = None,
                tls_subject: str | None = None, received_at: float | None = None) -> AuditRecord:
    """The `AuditRecord` of ``raw`` from what `inspect` found (possibly in another process)."""
    return AuditRecord(raw=raw, received_at=received_at if received_at is not None else time.time(),
                       transport=transport, peer=peer, tls_subject=tls_subject,
                       **dict(zip(RESULT_FIELDS, result, strict=True)))  # type: ignore[arg-type]


def inspect(raw: bytes, validator: Validator | None, *, syslog: bool = True) -> Result:
    """The `RESULT_FIELDS` of one received message: header, validation (the XML is parsed once and
    the same tree is validated and summarised), search fields.  Never raises."""
    errors: list[str] = []
    warnings: list[str] = []
    header, body_at = _header(raw, syslog, errors, warnings)
    fields: dict[str, object] = {}
    if body_at is None or body_at >= len(raw):
        errors.append("no audit message in the syslog MSG")
        body_at = None
    else:
        body = raw[body_at:]
        if body.startswith(BOM):
            body_at += len(BOM)
            body = body[len(BOM):]
        try:
            root = parse_xml(body)
        except AuditXMLError as exc:
            errors.append(f"xml: {exc}")
        else:
            if validator is not None:
                result = validator.validate(root)
                errors.extend(result.errors)
                warnings.extend(result.warnings)
            try:
                fields = summarize(root)
            except AuditXMLError as exc:
                errors.append(f"xml: {exc}")
    return _result(header, fields, errors, warnings, body_at)


def unexamined(raw: bytes, why: str, *, syslog: bool = True) -> Result:
    """The `inspect` result of a message that could not be examined (its validator process died on
    it): the syslog header only, flagged invalid with ``why``, so that it is still stored."""
    errors = [f"validation: {why}"]
    header, body_at = _header(raw, syslog, errors, [])
    if body_at is not None and raw.startswith(BOM, body_at):
        body_at += len(BOM)
    return _result(header, {}, errors, [], body_at if body_at is not None and body_at < len(raw) else None)


def _header(raw: bytes, syslog: bool, errors: list[str],
            warnings: list[str]) -> tuple[SyslogMessage | None, int | None]:
    """The RFC 5424 header (None when ``raw`` is not syslog or is unreadable) and where the MSG starts."""
    if not syslog:
        return None, 0
    try:
        header = parse_syslog(raw)
    except SyslogError as exc:
        errors.append(f"syslog: {exc}")
        return None, _find_xml(raw)
    if header.msgid != IHE_MSGID:
        warnings.append(f"syslog: MSGID is {header.msgid or '-'!r}; IHE ITI-20 uses {IHE_MSGID!r}")
    return header, len(raw) - len(header.msg)


def _result(header: SyslogMessage | None, fields: dict[str, object], errors: list[str], warnings: list[str],
            body_at: int | None) -> Result:
    lines = [*errors, *(f"warning: {w}" for w in warnings)]
    get = fields.get
    return (
        header.hostname if header else None, header.app_name if header else None,
        header.procid if header else None, header.msgid if header else None,
        get("event_id"), get("event_type"), get("action"), get("outcome"), get("event_time"), get("source_id"),
        get("site_id"), get("ids", ()), not errors, "\n".join(lines) if lines else None, body_at,
    )
