"""``/api/empi/events``: patient-event deliveries per listener (state, attempts, last error) and resend.

* ``GET /api/empi/events?listener=&state=&type=&limit=`` — newest event first, each with its deliveries
  (``state`` failed = error or dead).
* ``POST /api/empi/events/{event_id}/resend`` body ``{"listener": "crm"}`` (optional) — the event again to
  the listeners it went to, or to the one named.
* ``POST /api/empi/events/resend`` body ``{"failed": true, "listener": "crm"}`` — every failed delivery again.

The events are the messages of the bus channel ``empi-events`` (``ihehub/actors/events``); the generic
``/api/messages/{id}/resend`` works on them too.  Reading needs the readonly role, resending the operator role.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request

from ihehub.actors.events.config import ALL_EVENTS, CHANNEL
from ihehub.actors.events.deliveries import STATES, NoSuchEvent, event_deliveries, resend_events
from ihehub.api.auth import Principal, require
from ihehub.api.errors import ApiError
from ihehub.channels.registry import did_you_mean

READ = ("readonly", "auditor")
OPERATE = ("operator",)


def _listeners(request: Request, listener: str | None) -> list[str]:
    known: list[str] = list(request.app.state.hub.channel_destinations().get(CHANNEL, []))
    if listener is not None and listener not in known:
        raise ApiError(404, "not_found", f"no listener {listener!r}{did_you_mean(listener, known)}; configured: "
                                         f"{', '.join(known) or 'none'}")
    return known


def _body_listener(body: dict[str, Any] | None) -> str | None:
    value = (body or {}).get("listener")
    if value is not None and not isinstance(value, str):
        raise ApiError(400, "invalid", "listener must be a listener name (a string)")
    return value


async def _resend(request: Request, event_ids: list[int], listener: str | None, failed: bool) -> dict[str, Any]:
    hub = request.app.state.hub
    known = _listeners(request, listener)
    try:
        n, queued = await asyncio.to_thread(resend_events, hub.store, event_ids, listeners=known, listener=listener,
                                            failed=failed)
    except NoSuchEvent as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    if queued:
        hub.wake()
    return {"events": n, "queued": queued}


def router() -> APIRouter:
    r = APIRouter(prefix="/api/empi/events", tags=["empi"])

    @r.get("", summary="Patient events and their delivery to each listener (state, attempts, last error)")
    async def events(request: Request, _: Annotated[Principal, Depends(require(*READ))],
                     listener: str | None = None,
                     state: str | None = Query(None, pattern="^(" + "|".join(STATES) + ")$"),
                     type: str | None = Query(None, pattern="^(" + "|".join(ALL_EVENTS) + ")$"),
                     limit: int = Query(50, ge=1, le=1000)) -> list[dict[str, Any]]:
        _listeners(request, listener)
        return await asyncio.to_thread(event_deliveries, request.app.state.hub.store, listener=listener,
                                       state=state, event_type=type, limit=limit)

    @r.post("/resend", summary="Resend every failed delivery (optionally of one listener)")
    async def resend_failed(request: Request, _: Annotated[Principal, Depends(require(*OPERATE))],
                            body: Annotated[dict[str, Any] | None, Body()] = None) -> dict[str, Any]:
        if not (body or {}).get("failed"):
            raise ApiError(400, "invalid", 'give {"failed": true} to resend every failed delivery, or resend one '
                                           "event at /api/empi/events/{event_id}/resend")
        return await _resend(request, [], _body_listener(body), True)

    @r.post("/{event_id}/resend", summary="Resend one event to its listeners, or to the one named")
    async def resend_one(event_id: int, request: Request, _: Annotated[Principal, Depends(require(*OPERATE))],
                         body: Annotated[dict[str, Any] | None, Body()] = None) -> dict[str, Any]:
        return await _resend(request, [event_id], _body_listener(body), False)

    return r
