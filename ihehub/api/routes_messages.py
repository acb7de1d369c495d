"""The message browser: ``GET /api/messages``, ``/api/messages/{id}`` and ``/api/messages/{id}/raw``.

The list never carries bodies; the detail carries the body decoded with the charset it was
received in (HL7 v2 MSH-18, HTTP ``charset``), every delivery and its attempt log.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ihehub.api.auth import Principal, require
from ihehub.api.errors import ApiError
from ihehub.api.models import ERRORS, NOT_FOUND, MessageDetail, MessagePage, error_doc
from ihehub.api.params import DEFAULT_LIMIT, MAX_LIMIT, STATUSES, build_query, headers_of, iso, text_fields

READ = ("readonly", "auditor")


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """A message row as the list shows it (no body, times in ISO 8601 UTC)."""
    return {
        "id": row["id"],
        "channel": row["channel"],
        "received_at": iso(row["received_at"]),
        "status": row["status"],
        "control_id": row.get("control_id"),
        "message_type": row.get("message_type"),
        "content_type": row.get("content_type"),
        "charset": row.get("charset"),
        "correlation_id": row.get("correlation_id"),
        "source": row.get("source"),
        "size": row["size"],
        "error": row.get("error"),
        "pruned_at": iso(row.get("pruned_at")),
        "destinations": row.get("destinations", {}),
    }


async def list_messages(
    request: Request,
    _p: Annotated[Principal, Depends(require(*READ))],
    channel: Annotated[str | None, Query(description="channel name")] = None,
    status: Annotated[str | None, Query(description=f"one of {', '.join(STATUSES)}")] = None,
    destination: Annotated[str | None, Query(description="with a delivery to this destination")] = None,
    since: Annotated[str | None, Query(description="received at or after: ISO 8601 or epoch seconds")] = None,
    until: Annotated[str | None, Query(description="received before: ISO 8601 or epoch seconds")] = None,
    control_id: Annotated[str | None, Query(description="sender's message id (HL7 MSH-10)")] = None,
    type: Annotated[str | None, Query(description="message type, * as wildcard: ADT^A0*")] = None,
    q: Annotated[str | None, Query(description="text in the body, e.g. an MRN or a patient name")] = None,
    limit: Annotated[int, Query(description=f"page size, 1 to {MAX_LIMIT}")] = DEFAULT_LIMIT,
    offset: Annotated[int, Query(description="rows to skip")] = 0,
) -> dict[str, Any]:
    """Messages, newest first, with each destination's delivery state."""
    query = build_query(channel=channel, status=status, destination=destination, since=since, until=until,
                        control_id=control_id, message_type=type, text=q, limit=limit, offset=offset)
    # One row more than asked tells whether there is a next page (the store caps a page at MAX_LIMIT).
    probe = dataclasses.replace(query, limit=min(limit + 1, MAX_LIMIT))
    rows = await asyncio.to_thread(request.app.state.hub.store.search, probe)
    more = len(rows) > limit or (limit == MAX_LIMIT and len(rows) == MAX_LIMIT)
    rows = rows[:limit]
    return {
        "items": [summary(r) for r in rows],
        "limit": limit,
        "offset": offset,
        "next_offset": offset + len(rows) if more else None,
    }


def _load(hub: Any, message_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    row = hub.store.get_message(message_id)
    if row is None:
        return None
    return row, hub.store.deliveries_of(message_id)


def not_found(message_id: str) -> ApiError:
    return ApiError(404, "unknown_message", f"no message with id {message_id!r}")


def _attempt(a: dict[str, Any], charsets: tuple[str | None, ...]) -> dict[str, Any]:
    duration = max(0.0, (a["finished_at"] or 0.0) - (a["started_at"] or 0.0))
    return {
        "number": a["number"],
        "started_at": iso(a["started_at"]),
        "finished_at": iso(a["finished_at"]),
        "duration_ms": round(duration * 1000, 3),
        "ok": bool(a["ok"]),
        "status": a.get("status"),
        **text_fields(a.get("response"), charsets, "response"),
        "error": a.get("error"),
        "worker": a.get("worker"),
    }


def _delivery(d: dict[str, Any], charsets: tuple[str | None, ...]) -> dict[str, Any]:
    pending = d["state"] in ("queued", "error")
    return {
        "destination": d["destination"],
        "queue": d["queue"],
        "state": d["state"],
        "attempts": d["attempts"],
        "next_attempt_at": iso(d["next_attempt_at"]) if pending else None,
        "last_status": d.get("response_status"),
        **text_fields(d.get("response"), charsets, "last_response"),
        "last_error": d.get("error"),
        "created_at": iso(d["created_at"]),
        "updated_at": iso(d["updated_at"]),
        "attempt_log": [_attempt(a, charsets) for a in d.get("attempt_log", [])],
    }


async def get_message(
    message_id: str, request: Request, _p: Annotated[Principal, Depends(require(*READ))]
) -> dict[str, Any]:
    """Metadata, headers, body, transformed body and every delivery with its attempts."""
    loaded = await asyncio.to_thread(_load, request.app.state.hub, message_id)
    if loaded is None:
        raise not_found(message_id)
    row, deliveries = loaded
    charset = row.get("charset")
    # Replies are usually in the message's own charset (an HL7 ACK echoes MSH-18); UTF-8 is tried first.
    reply_charsets = ("utf-8", charset)
    out = summary(row | {"destinations": {d["destination"]: d["state"] for d in deliveries}})
    out["headers"] = headers_of(row.get("headers"))
    out.update(text_fields(row.get("raw"), (charset,), "body"))
    out.update(text_fields(row.get("transformed"), (charset,), "transformed"))
    out["deliveries"] = [_delivery(d, reply_charsets) for d in deliveries]
    return out


async def get_raw(
    message_id: str,
    request: Request,
    _p: Annotated[Principal, Depends(require(*READ))],
    transformed: Annotated[bool, Query(description="the transformer's output instead of the received bytes")]
    = False,
) -> Response:
    """The body exactly as received (or as transformed), with its content type and charset."""
    row = await asyncio.to_thread(request.app.state.hub.store.get_message, message_id)
    if row is None:
        raise not_found(message_id)
    if row.get("pruned_at") is not None:
        raise ApiError(410, "body_pruned",
                       f"the body of {message_id} was removed by retention at {iso(row['pruned_at'])}")
    body = row.get("transformed") if transformed else row.get("raw")
    if body is None:
        what = "no transformed body (the transformer passed it through)" if transformed else "no body"
        raise ApiError(404, "no_body", f"message {message_id} has {what}")
    content_type = row.get("content_type") or "application/octet-stream"
    if row.get("charset") and "charset=" not in content_type.lower():
        content_type += f"; charset={row['charset']}"
    return Response(content=body, headers={"content-type": content_type,
                                           "content-disposition": f'inline; filename="{message_id}"'})


def router() -> APIRouter:
    r = APIRouter(prefix="/api/messages", tags=["messages"], responses=ERRORS)
    r.add_api_route("", list_messages, methods=["GET"], response_model=MessagePage, summary="Search messages")
    r.add_api_route("/{message_id}", get_message, methods=["GET"], response_model=MessageDetail,
                    responses=NOT_FOUND, summary="One message with its deliveries")
    gone = error_doc(410, "the body was pruned by retention")
    r.add_api_route("/{message_id}/raw", get_raw, methods=["GET"], response_class=Response,
                    responses={**NOT_FOUND, **gone,
                               200: {"content": {"application/octet-stream": {}}, "description": "the body"}},
                    summary="The body as received")
    return r
