"""``ihehub serve``, ``ihehub worker`` and ``ihehub init``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import click

from ihehub.cli.common import config, fail, home
from ihehub.config import ConfigError, HubConfig, init_home, load_channels

log = logging.getLogger("ihehub")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _prepare(*, write_home: bool) -> HubConfig:
    h = home()
    if write_home:
        try:
            created = init_home(h)
        except ConfigError as exc:
            fail(str(exc), 2)
        if created:
            click.echo(f"ihehub: wrote a default home in {h.absolute()} ({len(created)} files and folders)", err=True)
    elif not h.is_dir():
        fail(f"no home folder at {h.absolute()}: run 'ihehub init' or 'ihehub serve' first", 2)
    cfg = config()
    if write_home:
        from ihehub.tls import ensure_tls

        written = ensure_tls(cfg)
        if written:
            click.echo(f"ihehub: created a private CA and server certificate in {cfg.tls.ca.parent}", err=True)
    return cfg


def _run(cfg: HubConfig, role: str, worker_id: str | None) -> None:
    from ihehub.hub import Hub

    try:
        channels = load_channels(cfg.home, hub=cfg)
    except ConfigError as exc:
        fail(f"configuration errors in {cfg.home}:\n{exc}", 2)
    setup_logging(cfg.log_level)

    async def main() -> None:
        hub = Hub(cfg, channels, role=role, worker_id=worker_id)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, hub.request_stop)
        try:
            await hub.start()
        except Exception as exc:
            await hub.stop()
            fail(f"ihehub {role} could not start: {exc}")
        if role == "serve":
            listening = ", ".join(
                f"{name} ({rt.source.__class__.__name__} {cfg_url})"
                for name, rt in hub.runtimes.items()
                for cfg_url in [hub.channel_configs[name].source.url]
            )
            click.echo(f"ihehub serving: API http://{cfg.http.host}:{getattr(hub, 'http_port', cfg.http.port)} "
                       f"| channels: {listening or 'none'} | Ctrl-C to stop", err=True)
        await hub.run_until_stopped()
        await hub.stop()

    asyncio.run(main())


@click.command()
@click.option("--no-init", is_flag=True, help="Do not write a default home when none exists.")
def serve(no_init: bool) -> None:
    """Start every listener in one process: channels (MLLP, HTTP, file), the HTTP API on :8080, and —
    in the embedded default — delivery of every destination queue.

    On first start it writes a default home (ihehub.yaml, channels/, a private CA in tls/).
    Stop with Ctrl-C or SIGTERM: listeners close, in-flight deliveries finish.
    """
    cfg = _prepare(write_home=not no_init)
    _run(cfg, "serve", None)


@click.command()
@click.option("--id", "worker_id", default=None, help="Worker id shown on deliveries (default worker-HOST-PID).")
def worker(worker_id: str | None) -> None:
    """Consume destination queues from RabbitMQ and deliver (scale-out mode).

    Needs ``broker: amqp://...`` in ihehub.yaml (or $IHEHUB_BROKER) and a shared ``database:``
    (PostgreSQL).  Run as many as you like beside one or more ``ihehub serve``.
    """
    cfg = _prepare(write_home=False)
    if cfg.broker is None:
        fail("ihehub worker needs a broker: set 'broker: amqp://guest:guest@127.0.0.1:5672//' in ihehub.yaml "
             "or IHEHUB_BROKER (in the embedded default, 'ihehub serve' delivers by itself)", 2)
    _run(cfg, "worker", worker_id)


@click.command()
def init() -> None:
    """Write a default home (never overwrites a file) and create the private CA if missing."""
    h = home()
    try:
        created = init_home(h)
    except ConfigError as exc:
        fail(str(exc), 2)
    cfg = config()
    from ihehub.tls import ensure_tls

    created += ensure_tls(cfg)
    for p in created:
        click.echo(f"created {p}")
    if not created:
        click.echo(f"{h.absolute()} is already initialised; nothing written")
