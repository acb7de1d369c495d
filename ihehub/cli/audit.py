"""``ihehub audit search|verify`` — the Audit Record Repository from the command line."""

from __future__ import annotations

import json
from typing import Any

import click

from ihehub.cli.common import config, fail, iso, parse_time


def _audit_store() -> Any:
    from ihehub.atna import AuditStore
    from ihehub.bus import schema
    from ihehub.bus.db import Writer, make_engine

    cfg = config()
    engine = make_engine(cfg.database, home=cfg.home)
    try:
        schema.upgrade(engine)
    except Exception as exc:
        fail(f"cannot open the database: {exc}")
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
    """Newest first.  Example: ihehub audit search --patient 12345 --since 7d"""
    from ihehub.atna import AuditQuery

    store, engine = _audit_store()
    try:
        page = store.search(AuditQuery(patient=patient, user=user, event_id=event_id, event_type=event_type,
                                       outcome=outcome, source=source, entity=entity,
                                       valid=False if invalid else None, since=parse_time(since),
                                       until=parse_time(until), limit=limit))
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
