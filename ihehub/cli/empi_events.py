"""``ihehub empi events`` and ``ihehub empi resend``: patient-event deliveries per listener, and resending them.

Each EMPI patient event is one message on the bus channel ``empi-events`` whose control id is the event id,
with one delivery per listener (``ihehub/actors/events``).  These commands are the EMPI-shaped view of
``ihehub messages list|resend --channel empi-events``: the same store, the same resend (but a resend keeps
each listener's event-type filter).  ``/api/empi/events`` does the same over HTTP.
"""

from __future__ import annotations

import json
from typing import Any

import click

from ihehub.cli.common import config, fail, iso, open_store

CHANNEL = "empi-events"
STATES = ("queued", "sending", "sent", "error", "dead", "failed")


def _listeners(cfg: Any, store: Any) -> list[str]:
    from ihehub.config import load_channels
    from ihehub.hub import actor_declared_queues

    return list(actor_declared_queues(load_channels(cfg.home, hub=cfg), cfg, store).get(CHANNEL, []))


def _check_listener(listener: str | None, known: list[str]) -> None:
    from ihehub.channels.registry import did_you_mean

    if listener is not None and listener not in known:
        fail(f"no listener {listener!r}{did_you_mean(listener, known)}; configured: {', '.join(known) or 'none'}")


@click.command("events")
@click.option("--listener", "-l", help="Only deliveries to this listener.")
@click.option("--state", "-s", type=click.Choice(STATES),
              help="Delivery state; failed = error (waiting for a retry) or dead.")
@click.option("--type", "event_type", help="Event type: registered, updated, merged, unmerged, linked, unlinked, "
                                           "deleted.")
@click.option("--limit", "-n", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def events(listener: str | None, state: str | None, event_type: str | None, limit: int, as_json: bool) -> None:
    """Patient events and their delivery to each listener: state, attempts, last error.
    Example: ihehub empi events --listener crm --state failed"""
    from ihehub.actors.events.deliveries import event_deliveries

    cfg = config()
    with open_store(cfg) as store:
        _check_listener(listener, _listeners(cfg, store))
        out = event_deliveries(store, listener=listener, state=state, event_type=event_type, limit=limit)
    for e in out:
        e["at"] = iso(e["at"])
        for d in e["listeners"]:
            d["updated_at"] = iso(d["updated_at"])
    if as_json:
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    if not out:
        click.echo("no patient events match")
        return
    click.echo(f"{'EVENT':>8} {'TYPE':10} {'LISTENER':20} {'STATE':8} {'TRIES':>5}  LAST ERROR")
    for e in out:
        for d in e["listeners"]:
            click.echo(f"{e['event']:>8} {e['type'][:10]:10} {d['listener'][:20]:20} {d['state']:8} "
                       f"{d['attempts']:>5}  {(d['last_error'] or '')[:100]}")


@click.command("resend")
@click.argument("event_ids", nargs=-1, type=int)
@click.option("--listener", "-l", help="Only to this listener (default: every listener the event went to).")
@click.option("--failed", is_flag=True, help="Every event whose delivery failed (error or dead).")
def resend(event_ids: tuple[int, ...], listener: str | None, failed: bool) -> None:
    """Queue patient events again: ihehub empi resend 1042 1043 --listener crm, or --failed.
    The running hub delivers them (each listener's attempt log is kept)."""
    from ihehub.actors.events.deliveries import NoSuchEvent, resend_events

    if not event_ids and not failed:
        fail("give event ids, or --failed to resend every failed delivery")
    cfg = config()
    with open_store(cfg) as store:
        known = _listeners(cfg, store)
        _check_listener(listener, known)
        try:
            n_events, queued = resend_events(store, event_ids, listeners=known, listener=listener, failed=failed)
        except NoSuchEvent as exc:
            fail(str(exc))
    if not n_events:
        click.echo("no failed patient-event deliveries")
        return
    click.echo(f"{n_events} event(s), {queued} deliver{'y' if queued == 1 else 'ies'} queued")
