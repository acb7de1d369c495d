"""``ihehub audit search|verify|outbox|resend`` — the Audit Record Repository and the audit sender's queue
from the command line."""

from __future__ import annotations

import json
from typing import Any

import click

from ihehub.cli.common import config, fail, iso, parse_time


def _audit_store() -> Any:
    from ihehub.atna import AuditStore
    from ihehub.bus.db import Writer

    engine = _engine()
    return AuditStore(engine, Writer(engine, name="ihehub-cli-audit")), engine


@click.group()
def audit() -> None:
    """Search the audit log and verify its hash chain (ATNA Audit Record Repository)."""


@audit.command("search")
@click.option("--patient", help="Patient id (full CX or its ID component).")
@click.option("--user", help="UserID or user name of any participant.")
@click.option("--event-id", help="EventID code, e.g. 110112 (Query).")
@click.option("--event-type", help="EventTypeCode, e.g. ITI-9.")
@click.option("--outcome", type=int, help="0 success, 4 minor, 8 serious, 12 major failure.")
@click.option("--source", help="AuditSourceID.")
@click.option("--entity", help="Any participant object id (document, study, query...).")
@click.option("--invalid", is_flag=True, help="Only records that failed schema/Schematron validation.")
@click.option("--since", help="ISO 8601, epoch seconds, or 15m/2h/7d ago.")
@click.option("--until", help="Same formats.")
@click.option("--limit", "-n", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def search(patient: str | None, user: str | None, event_id: str | None, event_type: str | None,
           outcome: int | None, source: str | None, entity: str | None, invalid: bool, since: str | None,
           until: str | None, limit: int, as_json: bool) -> None:
    """Newest first (with --since/--until: newest event first).  Example: ihehub audit search --patient 12345
    --since 7d"""
    from ihehub.atna import AuditQuery

    store, engine = _audit_store()
    try:
        t0, t1 = parse_time(since), parse_time(until)
        page = store.search(AuditQuery(patient=patient, user=user, event_id=event_id, event_type=event_type,
                                       outcome=outcome, source=source, entity=entity,
                                       valid=False if invalid else None, since=t0, until=t1, limit=limit,
                                       by_time=t0 is not None or t1 is not None))  # newest event first
    finally:
        store.writer.close()
        engine.dispose()
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in page.records], indent=2, ensure_ascii=False))
        return
    if not page.records:
        click.echo("no audit records match")
        return
    click.echo(f"{'SEQ':>8}  {'EVENT TIME':24} {'EVENT':7} {'TYPE':10} {'OUT':>3} {'VALID':5} "
               "SOURCE / PATIENTS / USERS")
    for r in page.records:
        patients = ",".join(r.values("patient"))
        users = ",".join(r.values("user"))
        click.echo(f"{r.seq:>8}  {iso(r.event_time):24} {r.event_id or '':7} {(r.event_type or '')[:10]:10} "
                   f"{r.outcome if r.outcome is not None else '':>3} {'yes' if r.valid else 'NO':5} "
                   f"{r.source_id or ''} / {patients} / {users}")


@audit.command("verify")
def verify() -> None:
    """Walk the hash chain; exit status 1 and the first bad record when any was edited or deleted."""
    store, engine = _audit_store()
    try:
        report = store.verify()
    finally:
        store.writer.close()
        engine.dispose()
    if report.ok:
        click.echo(f"ok: {report.checked} audit record(s), chain intact")
        return
    fail(f"TAMPERED: record {report.first_bad}: {report.problem} ({report.checked} checked)")


def _engine() -> Any:
    from ihehub.bus import schema
    from ihehub.bus.db import make_engine

    cfg = config()
    engine = make_engine(cfg.database, home=cfg.home)
    try:
        schema.upgrade(engine)
    except Exception as exc:
        fail(f"cannot open the database: {exc}")
    return engine


@audit.command("outbox")
@click.option("--dead", is_flag=True, help="Only audits given up (not delivered in time).")
@click.option("--state", type=click.Choice(["queued", "sent", "dead"]), help="Only rows in this state.")
@click.option("--repository", help="Only rows for this repository (its name in atna.repositories).")
@click.option("--limit", "-n", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
def outbox(dead: bool, state: str | None, repository: str | None, limit: int, as_json: bool) -> None:
    """The audit sender's queue (atna.repositories): counts per repository, then rows, newest first."""
    from ihehub.atna.forward import outbox_rows, outbox_summary

    if dead and state not in (None, "dead"):
        fail("--dead and --state disagree; give one")
    engine = _engine()
    try:
        summary = outbox_summary(engine)
        rows = outbox_rows(engine, state="dead" if dead else state, repository=repository, limit=limit)
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps({"repositories": {n: s.to_dict() for n, s in summary.items()}, "items": rows},
                              indent=2, ensure_ascii=False))
        return
    if not summary:
        click.echo("the audit outbox is empty")
        return
    for name, s in summary.items():
        oldest = f", oldest queued {s.oldest_age:.0f} s ago" if s.oldest_age is not None else ""
        click.echo(f"{name}: {s.queued} queued, {s.dead} dead, {s.sent} sent (kept){oldest}")
    if not rows:
        return
    click.echo(f"{'ID':>8}  {'REPOSITORY':16} {'STATE':6} {'CREATED':24} {'TRIES':>5} {'BYTES':>6}  LAST ERROR")
    for r in rows:
        click.echo(f"{r['id']:>8}  {r['repository'][:16]:16} {r['state']:6} {iso(r['created_at']):24} "
                   f"{r['attempts']:>5} {r['size'] or 0:>6}  {(r['last_error'] or '')[:100]}")


@audit.command("resend")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all-dead", is_flag=True, help="Every dead audit (of --repository, if given).")
@click.option("--repository", help="Only rows for this repository.")
def resend(ids: tuple[int, ...], all_dead: bool, repository: str | None) -> None:
    """Queue audits of the sender's outbox again (dead ones, or sent ones a repository lost); the running
    hub picks them up within seconds.  Example: ihehub audit resend --all-dead"""
    from ihehub.atna.forward import resend_op

    if bool(ids) == all_dead:
        fail("give outbox row ids (ihehub audit outbox --dead) or --all-dead")
    engine = _engine()
    try:
        with engine.begin() as conn:
            queued = resend_op(ids, all_dead=all_dead, repository=repository)(conn)
    finally:
        engine.dispose()
    click.echo(f"{queued} audit message(s) queued again")
    if ids and queued < len(ids):
        click.echo(f"{len(ids) - queued} of the given id(s) were not dead or sent (or do not exist)", err=True)
