"""``/api/channels``: list channels with their counts and queue depths; start and stop them.

Start and stop are persisted (``channel_state``), so every process of the node and the next start
follow them, exactly like ``ihehub channels start|stop``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request

from ihehub.api.auth import Principal, require
from ihehub.api.errors import ApiError
from ihehub.api.models import ERRORS, NOT_FOUND, Channel, ChannelAction, ChannelList, error_doc
from ihehub.bus.store import queue_name
from ihehub.channels.registry import did_you_mean
from ihehub.config.errors import redact
from ihehub.config.model import ChannelConfig

log = logging.getLogger("ihehub.api")

READ = ("readonly", "auditor")
OPERATE = ("operator",)


def _endpoint(url: str) -> dict[str, str]:
    return {"url": redact(url), "scheme": urlsplit(url).scheme.lower()}


def channel_config(hub: Any, name: str) -> ChannelConfig:
    cfg: ChannelConfig | None = hub.channel_configs.get(name)
    if cfg is None:
        known = sorted(hub.channel_configs)
        hint = did_you_mean(name, known)
        listing = ", ".join(known) or "none"
        raise ApiError(404, "unknown_channel", f"no channel {name!r}{hint}; channels: {listing}")
    return cfg


def _describe(
    hub: Any,
    ch: ChannelConfig,
    counts: Mapping[str, Mapping[str, int]],
    depths: Mapping[tuple[str, str], int],
    overrides: Mapping[str, bool],
) -> dict[str, Any]:
    destinations = []
    for d in ch.destinations:
        queue = queue_name(ch.name, d.name)
        depth = {state: n for (q, state), n in depths.items() if q == queue}
        destinations.append({"name": d.name, "queue": queue, "depth": depth, **_endpoint(d.url)})
    return {
        "name": ch.name,
        "description": ch.description,
        "enabled": overrides.get(ch.name, ch.enabled),
        "status": hub.channel_status(ch.name),
        "error": hub.errors.get(ch.name),
        "source": _endpoint(ch.source.url),
        "destinations": destinations,
        "counts": dict(counts.get(ch.name, {})),
        "fifo": ch.fifo,
        "dedup": ch.dedup,
        "file": str(ch.file) if ch.file is not None else None,
    }


def _snapshot(hub: Any) -> tuple[dict[str, dict[str, int]], dict[tuple[str, str], int], dict[str, bool]]:
    store = hub.store
    return store.channel_counts(), store.queue_depths(), store.channel_overrides()


async def list_channels(
    request: Request, _p: Annotated[Principal, Depends(require(*READ))]
) -> dict[str, Any]:
    """Every configured channel, in name order."""
    hub = request.app.state.hub
    counts, depths, overrides = await asyncio.to_thread(_snapshot, hub)
    configs = hub.channel_configs
    items = [_describe(hub, configs[n], counts, depths, overrides) for n in sorted(configs)]
    return {"items": items}


async def get_channel(
    name: str, request: Request, _p: Annotated[Principal, Depends(require(*READ))]
) -> dict[str, Any]:
    hub = request.app.state.hub
    ch = channel_config(hub, name)
    counts, depths, overrides = await asyncio.to_thread(_snapshot, hub)
    return _describe(hub, ch, counts, depths, overrides)


async def start_channel(
    name: str, request: Request, principal: Annotated[Principal, Depends(require(*OPERATE))]
) -> dict[str, Any]:
    """Start the channel's source (and remember that it should run)."""
    hub = request.app.state.hub
    channel_config(hub, name)
    try:
        await hub.start_channel(name, by=principal.name)
    except Exception as exc:
        reason = hub.errors.get(name) or f"{type(exc).__name__}: {exc}"
        raise ApiError(409, "channel_start_failed", f"channel {name!r} could not start: {reason}") from None
    log.info("channel %s started by %s", name, principal.name)
    return {"name": name, "status": hub.channel_status(name), "enabled": True}


async def stop_channel(
    name: str, request: Request, principal: Annotated[Principal, Depends(require(*OPERATE))]
) -> dict[str, Any]:
    """Stop the channel's source; queued deliveries of its messages continue."""
    hub = request.app.state.hub
    channel_config(hub, name)
    await hub.stop_channel(name, by=principal.name)
    log.info("channel %s stopped by %s", name, principal.name)
    return {"name": name, "status": hub.channel_status(name), "enabled": False}


def router() -> APIRouter:
    r = APIRouter(prefix="/api/channels", tags=["channels"], responses=ERRORS)
    r.add_api_route("", list_channels, methods=["GET"], response_model=ChannelList, summary="List channels")
    r.add_api_route("/{name}", get_channel, methods=["GET"], response_model=Channel, responses=NOT_FOUND,
                    summary="One channel")
    conflict = error_doc(409, "the channel could not start")
    r.add_api_route("/{name}/start", start_channel, methods=["POST"], response_model=ChannelAction,
                    responses={**NOT_FOUND, **conflict}, summary="Start a channel (operator)")
    r.add_api_route("/{name}/stop", stop_channel, methods=["POST"], response_model=ChannelAction,
                    responses=NOT_FOUND, summary="Stop a channel (operator)")
    return r
