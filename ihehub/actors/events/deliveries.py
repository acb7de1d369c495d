"""Patient-event deliveries per listener, and resending them: what ``ihehub empi events|resend`` and
``/api/empi/events`` show and do, on the bus store (channel ``empi-events``, control id = event id).

A resend puts an event again to the listeners it went to (a listener's event-type filter holds), or to the
one listener named; ``failed`` picks every event with a delivery in ``error`` or ``dead`` and resends those
deliveries only.  Each delivery starts a fresh attempt budget; its attempt log is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ihehub.actors.events.config import CHANNEL
from ihehub.bus.store import MessageQuery, MessageStore

STATES = ("queued", "sending", "sent", "error", "dead", "failed")  # failed = error or dead
FAILED = ("error", "dead")


class NoSuchEvent(LookupError):
    """The event id has no message on ``empi-events`` (before listeners existed, or no listener took it)."""

    def __init__(self, event_id: int) -> None:
        super().__init__(f"no patient event {event_id} on the bus (events from before the listeners were "
                         "configured, or of types no listener takes, are not there)")
        self.event_id = event_id


def _states(state: str | None) -> tuple[str | None, ...]:
    return FAILED if state == "failed" else (state,)


def _messages(store: MessageStore, listener: str | None, state: str | None, event_type: str | None,
              limit: int) -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for st in _states(state):
        q = MessageQuery(channel=CHANNEL, status=st, destination=listener, limit=limit,
                         message_type=f"patient-{event_type}" if event_type else None)
        for r in store.search(q):
            if r["status"] != "duplicate":
                found.setdefault(r["id"], r)
    return sorted(found.values(), key=lambda r: int(r["control_id"] or 0), reverse=True)[:limit]


def event_deliveries(store: MessageStore, *, listener: str | None = None, state: str | None = None,
                     event_type: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Newest event first: ``{event, type, message_id, at, listeners: [{listener, state, attempts,
    last_error, updated_at}]}`` — the deliveries matching ``listener`` and ``state``."""
    out = []
    for r in _messages(store, listener, state, event_type, limit):
        want = _states(state)
        dels = [d for d in store.deliveries_of(r["id"])
                if (listener is None or d["destination"] == listener) and (state is None or d["state"] in want)]
        out.append({"event": int(r["control_id"]), "type": (r["message_type"] or "").removeprefix("patient-"),
                    "message_id": r["id"], "at": r["received_at"],
                    "listeners": [{"listener": d["destination"], "state": d["state"], "attempts": d["attempts"],
                                   "last_error": d["error"], "updated_at": d["updated_at"]} for d in dels]})
    return out


def message_of(store: MessageStore, event_id: int) -> str:
    rows = [r for r in store.search(MessageQuery(channel=CHANNEL, control_id=str(event_id), limit=10))
            if r["status"] != "duplicate"]
    if not rows:
        raise NoSuchEvent(event_id)
    return str(rows[0]["id"])


def resend_events(store: MessageStore, event_ids: Sequence[int], *, listeners: Sequence[str],
                  listener: str | None = None, failed: bool = False) -> tuple[int, int]:
    """Queue events again; returns (events, deliveries queued).  `NoSuchEvent` for an unknown event id."""
    ids = [message_of(store, ev) for ev in event_ids]
    explicit = set(ids)
    if failed:
        ids += [r["id"] for r in _messages(store, listener, "failed", None, 100_000) if r["id"] not in explicit]
    queued = 0
    for mid in ids:
        dests = [d["destination"] for d in store.deliveries_of(mid)
                 if (listener is None or d["destination"] == listener)
                 and (mid in explicit or d["state"] in FAILED)]
        if listener is not None and not dests and mid in explicit:
            dests = [listener]  # asked for by name: a listener the event never went to gets it now
        if dests:
            queued += store.resend([mid], dests, channel_destinations={CHANNEL: list(listeners)})
    return len(ids), queued
