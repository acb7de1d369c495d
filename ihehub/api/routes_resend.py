"""Resend: ``POST /api/messages/{id}/resend`` and ``POST /api/messages/resend`` (by filter).

A resent delivery starts again with a fresh attempt budget; its earlier attempts stay in the log.
A destination the message never had gets a new delivery; without destinations, a message goes again to
those it was routed to.  A message that never got a delivery — its transformer (mapping) failed, or a
filter dropped it — is run through its channel again as the channel is now (a fixed mapping, changed
filters): its row gets the new transformed body, status and deliveries.  Messages whose body was pruned
by retention cannot be resent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request

from ihehub.api.auth import Principal, require
from ihehub.api.errors import ApiError
from ihehub.api.models import ERRORS, NOT_FOUND, Queued, ResendByFilter, ResendOne, ResendSummary, error_doc
from ihehub.api.params import build_query, check_destinations, is_empty
from ihehub.api.routes_messages import not_found
from ihehub.bus.store import MessageQuery
from ihehub.channels.registry import did_you_mean
from ihehub.config.model import ChannelConfig

log = logging.getLogger("ihehub.api")

OPERATE = ("operator",)
MAX_RESEND = 100_000  # messages per request; the answer says when more matched
_CHUNK = 1000  # ids per store call, so that ingest commits interleave with a large resend


async def resend_one(
    message_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require(*OPERATE))],
    body: Annotated[ResendOne | None, Body()] = None,
) -> dict[str, Any]:
    """Queue one message again: to the given destinations, or to those it was routed to; a message that
    never got a delivery (its mapping failed, a filter dropped it) runs through its channel again."""
    hub = request.app.state.hub
    row = await asyncio.to_thread(hub.store.get_message, message_id, with_body=False)
    if row is None:
        raise not_found(message_id)
    # channel_destinations() also holds queues that actors declared (e.g. ITI-10 consumers of a PIX channel)
    known: list[str] | None = hub.channel_destinations().get(row["channel"])
    if known is None:
        raise ApiError(409, "unknown_channel",
                       f"message {message_id} came through channel {row['channel']!r}, which this hub no "
                       "longer has; it cannot be resent")
    if row.get("pruned_at") is not None:
        raise ApiError(409, "body_pruned",
                       f"the body of {message_id} was removed by retention; nothing to resend")
    channel = row["channel"]
    destinations = check_destinations(body.destinations if body else None, known, f"channel {channel!r}")
    if destinations is None and not known:
        raise ApiError(409, "no_destinations", f"channel {channel!r} has no destinations to resend to")
    queued, skipped = await asyncio.to_thread(hub.requeue, [message_id], destinations)
    if queued:
        hub.wake()
    elif message_id in skipped:
        raise ApiError(409, "not_queued", f"message {message_id} was not queued: {skipped[message_id]}")
    log.info("message %s resent to %s by %s", message_id, destinations or "all destinations", principal.name)
    return {"queued": queued}


def _channel(hub: Any, name: str) -> ChannelConfig:
    ch: ChannelConfig | None = hub.channel_configs.get(name)
    if ch is None:
        known = sorted(hub.channel_configs)
        raise ApiError(400, "unknown_channel", f"no channel {name!r}{did_you_mean(name, known)}; "
                       f"channels: {', '.join(known) or 'none'}")
    return ch


Plan = list[tuple[MessageQuery, list[str] | None]]


def _plan(hub: Any, query: MessageQuery, wanted: Sequence[str] | None) -> Plan:
    """(query, destinations) pairs: one per channel that has the wanted destinations."""
    channels = [_channel(hub, query.channel)] if query.channel else list(hub.channel_configs.values())
    if not wanted:
        return [(query, None)]
    known = sorted({d.name for ch in channels for d in ch.destinations})
    where = f"channel {query.channel!r}" if query.channel else "no channel of this hub"
    if query.channel:
        check_destinations(wanted, known, where)
    else:
        for name in wanted:
            if name not in known:
                raise ApiError(400, "unknown_destination",
                               f"{where} has a destination {name!r}{did_you_mean(name, known)}; "
                               f"destinations: {', '.join(known) or 'none'}")
    plan: Plan = []
    for ch in channels:
        mine = [n for n in dict.fromkeys(wanted) if any(d.name == n for d in ch.destinations)]
        if mine:
            plan.append((dataclasses.replace(query, channel=ch.name), mine))
    return plan


async def resend_by_filter(
    request: Request,
    principal: Annotated[Principal, Depends(require(*OPERATE))],
    body: ResendByFilter,
) -> dict[str, Any]:
    """Queue every message matching the filter again (``dry_run``: only count them)."""
    hub = request.app.state.hub
    query = build_query(channel=body.channel, status=body.status, destination=body.destination,
                        since=body.since, until=body.until, control_id=body.control_id,
                        message_type=body.type, text=body.q)
    if is_empty(query) and not body.all:
        raise ApiError(400, "empty_filter",
                       "no filter given: this would resend every message; add channel, status, destination, "
                       "since, until, control_id, type or q, or send \"all\": true if you mean it")
    matched = queued = 0
    truncated = False
    not_queued: dict[str, str] = {}
    for sub, destinations in _plan(hub, query, body.destinations):
        room = MAX_RESEND - matched
        if room <= 0:
            truncated = True
            break
        ids: list[str] = await asyncio.to_thread(hub.store.matching_ids, sub, cap=room)
        matched += len(ids)
        truncated = truncated or len(ids) == room
        if body.dry_run:
            continue
        for i in range(0, len(ids), _CHUNK):
            n, skipped = await asyncio.to_thread(hub.requeue, ids[i:i + _CHUNK], destinations)
            queued += n
            for mid, why in skipped.items():
                if len(not_queued) < 100:
                    not_queued[mid] = why
    if queued:
        hub.wake()
    if not body.dry_run:
        log.info("%d messages resent (%d deliveries) by %s", matched, queued, principal.name)
    return {"matched": matched, "queued": queued, "dry_run": body.dry_run, "truncated": truncated,
            "not_queued": not_queued}


def router() -> APIRouter:
    r = APIRouter(prefix="/api/messages", tags=["resend"], responses=ERRORS)
    r.add_api_route("/resend", resend_by_filter, methods=["POST"], response_model=ResendSummary,
                    summary="Resend the messages matching a filter (operator)")
    conflict = error_doc(409, "the message cannot be resent")
    r.add_api_route("/{message_id}/resend", resend_one, methods=["POST"], response_model=Queued,
                    responses={**NOT_FOUND, **conflict}, summary="Resend one message (operator)")
    return r
