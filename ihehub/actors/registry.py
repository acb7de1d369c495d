"""Actors by name, imported lazily (the same pattern as the connector registry)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ihehub.actors.base import Actor, ActorContext
from ihehub.channels.registry import did_you_mean, import_ref

# name -> "package.module:Class"; each IHE actor issue adds its entry (pix-manager, pdq-supplier, ...).
ACTORS: Mapping[str, str] = {
    "pix-manager": "ihehub.actors.pix:PixManager",
    "pdq-supplier": "ihehub.actors.pdq:PdqSupplier",
    "modality-worklist": "ihehub.actors.mwl:WorklistFeed",
}


class ActorError(Exception):
    """The actor named by a channel cannot be found or built."""


def build_actor(ref: str, *, channel: str, options: Mapping[str, Any], context: ActorContext,
                actors: Mapping[str, str] | None = None) -> Actor:
    actor: Actor = resolve_actor(ref, actors)(name=channel, options=dict(options), context=context)
    return actor


def resolve_actor(ref: str, actors: Mapping[str, str] | None = None) -> Any:
    """The actor class a channel's ``actor:`` names; `ActorError` says what is wrong."""
    table = ACTORS if actors is None else actors
    target = table.get(ref)
    if target is None:
        if ":" not in ref:
            known = ", ".join(sorted(table)) or "none registered yet"
            raise ActorError(f"unknown actor {ref!r}{did_you_mean(ref, table)}; known: {known}; "
                             "or give \"package.module:Class\"")
        target = ref
    try:
        return import_ref(target)
    except ValueError as exc:
        raise ActorError(f"actor {ref!r}: cannot load {target!r}: {exc}") from None
