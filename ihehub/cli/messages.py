"""``ihehub messages list|show|resend`` — the message browser on the command line."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ihehub.bus.store import DELIVERY_STATES, MESSAGE_STATUSES
from ihehub.cli.common import config, fail, iso, open_store, parse_time

STATUSES = tuple(dict.fromkeys((*MESSAGE_STATUSES, *DELIVERY_STATES)))


def _filter_options(fn: Any) -> Any:
    opts = [
        click.option("--channel", "-c", help="Channel name."),
        click.option("--status", "-s", type=click.Choice(STATUSES),
                     help="A delivery state (queued, sending, sent, error, dead) or an ingest status (stored, "
                          "filtered, duplicate, received/processed for actor channels; error also matches "
                          "transformer and actor errors)."),
        click.option("--destination", "-d", "destination_filter",
                     help="Only messages with a delivery to this destination."),
        click.option("--since", help="From this time: ISO 8601, epoch seconds, or 15m/2h/7d ago."),
        click.option("--until", help="Before this time (same formats)."),
        click.option("--control-id", help="Exact control id (MSH-10)."),
        click.option("--type", "message_type", help="Message type, e.g. ADT^A01 or ADT* ."),
        click.option("--text", "-q", help="Free text in the body, e.g. an MRN or a name (UTF-8 and GB18030 bodies)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _query(kw: dict[str, Any], limit: int = 50, offset: int = 0) -> Any:
    from ihehub.bus.store import MessageQuery

    return MessageQuery(
        channel=kw.get("channel"), status=kw.get("status"), destination=kw.get("destination_filter"),
        since=parse_time(kw.get("since")), until=parse_time(kw.get("until")), control_id=kw.get("control_id"),
        message_type=kw.get("message_type"), text=kw.get("text"), limit=limit, offset=offset,
    )


@click.group()
def messages() -> None:
    """Search, view and resend messages."""


@messages.command("list")
@_filter_options
@click.option("--limit", "-n", default=50, show_default=True)
@click.option("--offset", default=0)
@click.option("--json", "as_json", is_flag=True)
def list_(limit: int, offset: int, as_json: bool, **kw: Any) -> None:
    """Newest first.  Example: ihehub messages list -c hl7-inbound -s dead --since 2h"""
    with open_store() as store:
        rows = store.search(_query(kw, limit, offset))
    if as_json:
        for r in rows:
            r["received_at"] = iso(r["received_at"])
            r["pruned_at"] = iso(r["pruned_at"])
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not rows:
        click.echo("no messages match")
        return
    click.echo(f"{'ID':32}  {'RECEIVED':24} {'CHANNEL':16} {'TYPE':10} {'CONTROL ID':20} STATUS / DESTINATIONS")
    for r in rows:
        dests = " ".join(f"{d}={s}" for d, s in r["destinations"].items())
        click.echo(f"{r['id']:32}  {iso(r['received_at']):24} {r['channel'][:16]:16} "
                   f"{(r['message_type'] or '')[:10]:10} {(r['control_id'] or '')[:20]:20} {r['status']} {dests}")


@messages.command("show")
@click.argument("message_id")
@click.option("--raw", is_flag=True, help="Write only the raw body bytes to stdout.")
def show(message_id: str, raw: bool) -> None:
    """One message: metadata, body, and every delivery with its attempts and responses."""
    with open_store() as store:
        row = store.get_message(message_id)
        if row is None:
            fail(f"no message {message_id}")
        if raw:
            sys.stdout.buffer.write(row["raw"] or b"")
            return
        dels = store.deliveries_of(message_id)
    charset = row["charset"] or "utf-8"
    click.echo(f"id:           {row['id']}\nchannel:      {row['channel']}\nreceived:     {iso(row['received_at'])}")
    click.echo(f"type:         {row['message_type'] or ''}\ncontrol id:   {row['control_id'] or ''}")
    click.echo(f"source:       {row['source'] or ''}\ncontent type: {row['content_type']} (charset {charset})")
    click.echo(f"status:       {row['status']}{' — ' + row['error'] if row['error'] else ''}")
    if row["headers"]:
        click.echo(f"headers:      {row['headers']}")
    click.echo("body:" if row["raw"] is not None else f"body:         pruned {iso(row['pruned_at'])}")
    if row["raw"] is not None:
        click.echo(_text(row["raw"], charset))
    if row["transformed"] is not None:
        click.echo("transformed:")
        click.echo(_text(row["transformed"], charset))
    for d in dels:
        click.echo(f"\n-> {d['destination']}: {d['state']}  attempts {d['attempts']}"
                   + (f"  next {iso(d['next_attempt_at'])}" if d["state"] == "error" else ""))
        for a in d["attempt_log"]:
            resp = _text(a["response"], charset)[:200].replace("\r", "\\r") if a["response"] else ""
            click.echo(f"   #{a['number']} {iso(a['started_at'])} {'ok' if a['ok'] else 'FAILED'} {a['status'] or ''} "
                       f"{a['error'] or ''} {resp}")


def _text(body: bytes, charset: str) -> str:
    try:
        return body.decode(charset).replace("\r", "\n")
    except (UnicodeDecodeError, LookupError):
        return body.decode("utf-8", errors="replace").replace("\r", "\n")


@messages.command("resend")
@click.argument("message_ids", nargs=-1)
@click.option("--to", "destinations", multiple=True,
              help="Destination name (repeatable). Default: those the message was routed to.")
@_filter_options
@click.option("--all", "all_", is_flag=True, help="Allow a resend by filter with no filter at all.")
@click.option("--dry-run", is_flag=True, help="Only count what would be resent.")
def resend(message_ids: tuple[str, ...], destinations: tuple[str, ...], all_: bool, dry_run: bool, **kw: Any) -> None:
    """Queue messages again: by id (ihehub messages resend ID ...) or every message matching a filter
    (ihehub messages resend -c adt -s dead --since 1d).  A message goes again to the destinations it was
    routed to (or --to); one that never got a delivery (its mapping failed, a filter dropped it) is run
    through its channel again as configured now, e.g. after a mapping fix.  The running hub delivers."""
    from ihehub.channels.registry import did_you_mean
    from ihehub.config import load_channels

    has_filter = any(v for v in kw.values())
    if not message_ids and not has_filter and not all_:
        fail("give message ids, or a filter (--channel, --status, --since, ...), or --all to resend everything")
    cfg = config()
    chans = load_channels(cfg.home, hub=cfg)
    from ihehub.hub import actor_declared_queues

    per_channel = {c.name: [d.name for d in c.destinations] for c in chans}
    with open_store(cfg) as store:
        per_channel |= actor_declared_queues(chans, cfg, store)  # e.g. a PIX channel's ITI-10 consumers
        known = {d for ds in per_channel.values() for d in ds}
        for d in destinations:
            if d not in known:
                fail(f"no destination {d!r}{did_you_mean(d, known)}")
        ids = list(message_ids) if message_ids else store.matching_ids(_query(kw))
        if message_ids:
            missing = [i for i in ids if store.get_message(i, with_body=False) is None]
            if missing:
                fail(f"no such message: {', '.join(missing)}")
        if dry_run:
            click.echo(f"{len(ids)} message(s) match; nothing queued (dry run)")
            return
        # a message that never got a delivery (its mapping failed, a filter dropped it) runs through its
        # channel again, as the channel is configured now; the others go again where they were routed
        fresh = store.undelivered(ids)
        again = [i for i in ids if i not in fresh]
        n = store.resend(again, list(destinations) or None, channel_destinations=per_channel) if again else 0
        skipped: dict[str, str] = {}
        if fresh:
            from ihehub.engine.pipeline import ChannelPrep, reprocess
            from ihehub.mappings import MappingSet

            mappings = MappingSet(cfg.home)
            preps = {}
            for ch in chans:
                try:
                    preps[ch.name] = ChannelPrep.from_config(ch, cfg.home, mappings)
                except Exception as exc:
                    click.echo(f"channel {ch.name}: cannot run messages through it again: {exc}", err=True)
            queued, skipped = reprocess(store, [i for i in ids if i in fresh], preps, only=list(destinations) or None)
            n += queued
    for mid, why in list(skipped.items())[:20]:
        click.echo(f"{mid}: not queued: {why}", err=True)
    if len(skipped) > 20:
        click.echo(f"... and {len(skipped) - 20} more not queued", err=True)
    click.echo(f"{len(ids)} message(s) matched, {n} deliver{'y' if n == 1 else 'ies'} queued"
               + (f", {len(fresh)} run through their channel again" if fresh else ""))
