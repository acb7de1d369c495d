"""Request and response bodies of the admin API (they are also its OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. not_found, unauthorized, bad_time")
    detail: Any = Field(description="what went wrong and what to do about it")


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "invalid request"},
    401: {"model": ErrorBody, "description": "missing, malformed, unknown or revoked token"},
    403: {"model": ErrorBody, "description": "the token's role may not do this"},
    503: {"model": ErrorBody, "description": "the message store cannot be read"},
}


def error_doc(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    """An OpenAPI ``responses`` entry for an error answer."""
    return {status: {"model": ErrorBody, "description": description}}


NOT_FOUND = error_doc(404, "no such resource")


# --------------------------------------------------------------------------- health


class Health(BaseModel):
    status: str = Field(description="ok, or degraded when a check or a channel failed")
    node: str
    worker_id: str
    version: str
    uptime_s: float
    database: str = Field(description="ok, or why the message store cannot be read")
    checks: dict[str, str] = Field(description="every health check: ok or the reason it failed")
    channels: dict[str, str] = Field(description="channel -> started, stopped or error")
    errors: dict[str, str] = Field(default_factory=dict, description="channel -> why it is not running")
    time: dict[str, Any] = Field(default_factory=dict, description=(
        "Consistent Time (ITI-1): status (ok, the problem, or 'not configured'), server, offset_s, delay_s, "
        "jitter_s, last_success (epoch s), last_error, threshold_s"))
    audit_outbox: dict[str, Any] = Field(default_factory=dict, description=(
        "the audit sender's queue per repository (atna.repositories): queued, dead, sent (kept), oldest_age "
        "(seconds, queued), connected, last_error"))
    dicom_patients: dict[str, int] = Field(default_factory=dict, description=(
        "with the image manager linked to the EMPI: patients of the DICOM index per link state (linked, "
        "merged, unknown, no-domain, error, pending)"))


# --------------------------------------------------------------------------- channels


class Endpoint(BaseModel):
    url: str = Field(description="connector URL, password hidden")
    scheme: str


class ChannelDestination(Endpoint):
    name: str
    queue: str
    depth: dict[str, int] = Field(description="unfinished deliveries by state (queued, sending, error)")


class Channel(BaseModel):
    name: str
    description: str
    enabled: bool = Field(description="whether the channel should run (file setting or the last start/stop)")
    status: str = Field(description="started, stopped or error")
    error: str | None = None
    source: Endpoint
    destinations: list[ChannelDestination]
    counts: dict[str, int] = Field(
        description="messages by ingest status plus received and delivery_<state> totals")
    fifo: bool
    dedup: bool
    file: str | None = None


class ChannelList(BaseModel):
    items: list[Channel]


class ChannelAction(BaseModel):
    name: str
    status: str
    enabled: bool


# --------------------------------------------------------------------------- messages


class MessageSummary(BaseModel):
    id: str
    channel: str
    received_at: str | None
    status: str = Field(description="ingest status: queued, stored, filtered, duplicate or error")
    control_id: str | None = None
    message_type: str | None = None
    content_type: str | None = None
    charset: str | None = None
    correlation_id: str | None = None
    source: str | None = None
    size: int
    error: str | None = None
    pruned_at: str | None = Field(None, description="when retention removed the body")
    destinations: dict[str, str] = Field(default_factory=dict, description="destination -> delivery state")


class MessagePage(BaseModel):
    items: list[MessageSummary]
    limit: int
    offset: int
    next_offset: int | None = Field(description="offset of the next page, null on the last page")


class Attempt(BaseModel):
    number: int
    started_at: str | None
    finished_at: str | None
    duration_ms: float
    ok: bool
    status: str | None = None
    response: str | None = None
    response_base64: str | None = None
    error: str | None = None
    worker: str | None = None


class Delivery(BaseModel):
    destination: str
    queue: str
    state: str = Field(description="queued, sending, sent, error (will retry) or dead")
    attempts: int
    next_attempt_at: str | None = Field(description="when the next attempt is due (queued/error only)")
    last_status: str | None = None
    last_response: str | None = None
    last_response_base64: str | None = None
    last_error: str | None = None
    created_at: str | None
    updated_at: str | None
    attempt_log: list[Attempt]


class MessageDetail(MessageSummary):
    headers: dict[str, Any]
    body: str | None = Field(description="the body decoded with its charset; null when pruned")
    body_base64: str | None = Field(None, description="the exact bytes, when the body is not decodable")
    transformed: str | None = None
    transformed_base64: str | None = None
    deliveries: list[Delivery]


# --------------------------------------------------------------------------- resend


class ResendOne(BaseModel):
    model_config = ConfigDict(extra="forbid")

    destinations: list[str] | None = Field(
        None, description="destination names; default: every destination of the message's channel")


class Queued(BaseModel):
    queued: int


class ResendByFilter(BaseModel):
    """The message-list filter, plus what to resend and whether to only count."""

    model_config = ConfigDict(extra="forbid")

    channel: str | None = None
    status: str | None = None
    destination: str | None = None
    since: str | float | None = Field(None, description="ISO 8601 or epoch seconds")
    until: str | float | None = Field(None, description="ISO 8601 or epoch seconds")
    control_id: str | None = None
    type: str | None = Field(None, description="message type, * as wildcard (ADT^A0*)")
    q: str | None = Field(None, description="free text found in the body (e.g. an MRN or a name)")
    destinations: list[str] | None = None
    dry_run: bool = False
    all: bool = Field(False, description="must be true to resend every message (empty filter)")


class ResendSummary(BaseModel):
    matched: int
    queued: int
    dry_run: bool = False
    truncated: bool = Field(False, description="more messages matched than one request resends")
    not_queued: dict[str, str] = Field(default_factory=dict, description=(
        "message id -> why nothing was queued for it (e.g. run through its channel again, its mapping failed "
        "again); at most 100 listed"))
