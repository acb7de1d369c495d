"""Helpers shared by the CLI commands: the home option, loading the configuration, opening the store."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from ihehub.config import ConfigError, HubConfig, home_from_env, load_home

F = TypeVar("F", bound=Callable[..., Any])


def _set_home(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        os.environ["IHEHUB_HOME"] = value
    return value


def home_option(fn: F) -> F:
    return click.option(
        "--home", metavar="DIR", expose_value=False, is_eager=True, callback=_set_home,
        help="Home folder (ihehub.yaml, channels/, db/, data/, tls/). Default: $IHEHUB_HOME or ./var",
    )(fn)


def home() -> Path:
    return home_from_env()


def fail(message: str, code: int = 1) -> NoReturn:
    click.secho(message, fg="red", err=True)
    sys.exit(code)


def config() -> HubConfig:
    h = home()
    try:
        return load_home(h)
    except ConfigError as exc:
        fail(f"configuration errors in {h}:\n{exc}", 2)


@contextlib.contextmanager
def open_store(cfg: HubConfig | None = None, *, migrate: bool = True) -> Iterator[Any]:
    """A MessageStore on the configured database (schema upgraded unless ``migrate`` is False)."""
    from ihehub.bus import schema
    from ihehub.bus.db import Writer, make_engine
    from ihehub.bus.store import MessageStore

    cfg = cfg or config()
    engine = make_engine(cfg.database, home=cfg.home)
    writer = Writer(engine, name="ihehub-cli-writer")
    try:
        try:
            if migrate:
                schema.upgrade(engine)
        except Exception as exc:
            fail(f"cannot open the database {_redact(cfg.database)}: {exc}")
        yield MessageStore(engine, writer, worker_id=f"cli-{os.getpid()}")
    finally:
        writer.close()
        engine.dispose()


def _redact(url: str) -> str:
    from ihehub.config.errors import redact

    return redact(url)


_REL = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")


def parse_time(value: str | None) -> float | None:
    """ISO 8601 (``2026-11-27``, ``2026-11-27T10:00:00+08:00``), epoch seconds, or relative (``15m``, ``7d``)."""
    if value is None or value == "":
        return None
    v = value.strip()
    m = _REL.match(v)
    if m:
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return dt.datetime.now(dt.UTC).timestamp() - float(m.group(1)) * mult
    try:
        return float(v)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a time: use ISO 8601 (2026-11-27T10:00:00Z), epoch seconds, or 15m/2h/7d ago"
        ) from None
    if t.tzinfo is None:
        t = t.astimezone()  # local time, as a person types it
    return t.timestamp()


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
