"""``ihehub channels``, ``ihehub token``, ``ihehub db`` and ``ihehub tls``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ihehub.api.auth import ROLES
from ihehub.cli.common import config, fail, home, open_store


# -- channels -------------------------------------------------------------------------------------
@click.group()
def channels() -> None:
    """List, check, start and stop channels (channels/*.yaml in the home)."""


def _load_channels() -> tuple[Any, list[Any]]:
    from ihehub.config import ConfigError, load_channels

    cfg = config()
    try:
        return cfg, load_channels(cfg.home, hub=cfg)
    except ConfigError as exc:
        fail(f"configuration errors in {cfg.home}:\n{exc}", 2)
        raise


@channels.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def channels_list(as_json: bool) -> None:
    """Channels with their source, destinations, desired state and message counts."""
    cfg, chans = _load_channels()
    with open_store(cfg) as store:
        overrides = store.channel_overrides()
        counts = store.channel_counts()
        depths = store.queue_depths()
    rows = []
    for c in chans:
        enabled = overrides.get(c.name, c.enabled)
        pending = sum(n for (q, _), n in depths.items() if q.split("/", 1)[0] == c.name)
        rows.append({
            "name": c.name, "enabled": enabled, "source": c.source.url,
            "destinations": [d.name for d in c.destinations], "counts": counts.get(c.name, {}),
            "pending": pending,
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not rows:
        click.echo(f"no channels in {cfg.channels_dir}")
        return
    click.echo(f"{'NAME':24} {'STATE':8} {'RECEIVED':>9} {'PENDING':>8}  SOURCE -> DESTINATIONS")
    for r in rows:
        state = "enabled" if r["enabled"] else "stopped"
        click.echo(f"{r['name']:24} {state:8} {r['counts'].get('received', 0):>9} {r['pending']:>8}  "
                   f"{r['source']} -> {', '.join(r['destinations']) or '(store only)'}")


@channels.command("check")
def channels_check() -> None:
    """Validate ihehub.yaml and every channel file; print each problem as file:line: field: message.

    Also compiles filter expressions and imports transformers and actors.  Exit status 0 when all is well, 2 otherwise.
    """
    from ihehub.actors import ActorError, resolve_actor
    from ihehub.config import ConfigError, load_channels, validate_home
    from ihehub.engine.expr import ExpressionError, Filter
    from ihehub.engine.pipeline import load_callable

    h = home()
    problems = [str(p) for p in validate_home(h)]
    if not problems:
        try:
            chans = load_channels(h)
        except ConfigError as exc:
            problems = [str(p) for p in exc.problems]
            chans = []
        for c in chans:
            where = str(c.file.relative_to(h)) if c.file else c.name
            try:
                Filter.compile(list(c.filter))
                for d in c.destinations:
                    Filter.compile(list(d.filter))
            except ExpressionError as exc:
                problems.append(f"{where}: filter: {exc}")
            if c.transformer:
                try:
                    load_callable(c.transformer)
                except ValueError as exc:
                    problems.append(f"{where}: transformer: {exc}")
            if c.mapping:
                from ihehub.mappings import check_mapping

                problems += [str(p) for p in check_mapping(h / c.mapping)]
            if c.actor:
                try:
                    resolve_actor(c.actor)
                except ActorError as exc:
                    problems.append(f"{where}: actor: {exc}")
        if not problems:
            click.echo(f"ok: {h}/ihehub.yaml and {len(chans)} channel file(s) are valid")
            return
    for p in problems:
        click.secho(p, fg="red", err=True)
    raise SystemExit(2)


def _set_enabled(name: str, enabled: bool) -> None:
    from ihehub.channels.registry import did_you_mean

    cfg, chans = _load_channels()
    names = [c.name for c in chans]
    if name not in names:
        fail(f"no channel {name!r}{did_you_mean(name, names)}; channels: {', '.join(names) or 'none'}")
    with open_store(cfg) as store:
        store.set_channel_enabled(name, enabled, "cli")
    click.echo(f"channel {name} {'started' if enabled else 'stopped'} (a running 'ihehub serve' applies it within 1 s)")


@channels.command("start")
@click.argument("name")
def channels_start(name: str) -> None:
    """Start channel NAME's source (kept across restarts until 'stop')."""
    _set_enabled(name, True)


@channels.command("stop")
@click.argument("name")
def channels_stop(name: str) -> None:
    """Stop channel NAME's source; queued deliveries still go out."""
    _set_enabled(name, False)


# -- tokens ---------------------------------------------------------------------------------------
@click.group()
def token() -> None:
    """Bearer tokens for the HTTP API (roles: admin, operator, auditor, readonly)."""


@token.command("create")
@click.option("--role", type=click.Choice(ROLES), required=True, help="What the token may do.")
@click.option("--name", default="", help="Who or what uses the token (shown by 'token list').")
def token_create(role: str, name: str) -> None:
    """Create a token and print it ONCE (only its hash is stored)."""
    from ihehub.api.auth import create_token

    with open_store() as store:
        tok = create_token(store, role=role, name=name or role)
    click.echo(tok)
    click.echo(f"(role {role}; use it as 'Authorization: Bearer <token>'; it is not shown again)", err=True)


@token.command("list")
def token_list() -> None:
    """Tokens: id, name, role, created, last used, revoked."""
    from ihehub.api.auth import list_tokens
    from ihehub.cli.common import iso

    with open_store() as store:
        rows = list_tokens(store)
    if not rows:
        click.echo("no tokens; create one with: ihehub token create --role admin")
    for r in rows:
        click.echo(f"{r.id:16} {r.role:9} {r.name:24} created {iso(r.created_at)} "
                   f"used {iso(r.last_used_at) or '-'}{' REVOKED' if r.revoked_at else ''}")


@token.command("revoke")
@click.argument("token_id")
def token_revoke(token_id: str) -> None:
    """Revoke the token with id TOKEN_ID (see 'token list')."""
    from ihehub.api.auth import revoke_token

    with open_store() as store:
        if not revoke_token(store, token_id):
            fail(f"no token with id {token_id!r}")
    click.echo(f"revoked {token_id}")


# -- database -------------------------------------------------------------------------------------
@click.group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="heads", show_default=True,
              help="Target revision (default: the newest of every branch).")
def db_upgrade(revision: str) -> None:
    """Bring the database to the newest schema (safe to run at any time)."""
    from ihehub.bus import schema
    from ihehub.bus.db import make_engine
    from ihehub.config.errors import redact

    cfg = config()
    engine = make_engine(cfg.database, home=cfg.home)
    try:
        before = schema.current_revision(engine)
        after = schema.upgrade(engine, revision)
    except Exception as exc:
        fail(f"db upgrade failed on {redact(cfg.database)}: {exc}")
    finally:
        engine.dispose()
    click.echo(f"database {redact(cfg.database)}: {before or 'empty'} -> {after}")


@db.command("current")
def db_current() -> None:
    """Show the database's schema revision and the newest one this version knows."""
    from ihehub.bus import schema
    from ihehub.bus.db import make_engine

    cfg = config()
    engine = make_engine(cfg.database, home=cfg.home)
    try:
        click.echo(f"current: {schema.current_revision(engine) or 'empty'}  head: {schema.head_revision(engine)}")
    finally:
        engine.dispose()


# -- TLS ------------------------------------------------------------------------------------------
@click.group()
def tls() -> None:
    """The node's private CA: issue client certificates for MLLP/HTTP/syslog peers."""


@tls.command("client")
@click.argument("name")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for NAME.pem and NAME-key.pem (default: <home>/tls/clients).")
@click.option("--days", default=825, show_default=True, help="Validity in days.")
def tls_client(name: str, out_dir: Path | None, days: int) -> None:
    """Issue a client certificate for NAME signed by the hub's CA."""
    from ihehub.tls import ensure_tls, issue_client_cert

    cfg = config()
    ensure_tls(cfg)
    cert, key = issue_client_cert(cfg, name, out_dir=out_dir, days=days)
    click.echo(f"certificate: {cert}\nprivate key: {key}\nCA to trust: {cfg.tls.ca}")
