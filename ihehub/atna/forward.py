"""The persistent audit sender (IHE ITI-20, ITI TF-2a 3.20.4.1.1): every audit message this node emits is
first written to the database (table ``atna_outbox``, one row per configured repository), then sent to
each repository in batches over one kept-open connection; a row is deleted only after its batch went
out.  A repository that is down or refuses the connection keeps its rows, and they are sent when it
is back — after a hub restart too, since the rows are committed by the bus `Writer` (group commit,
``synchronous=FULL`` on SQLite).

    forwarder = AuditForwarder(engine, writer, [RemoteRepository.from_url("arr", "syslog+tls://arr:6514",
                                                                   ssl_context=ctx)])
    await forwarder.start()
    audit = AuditContext(source_id="ihehub-1", sinks=(local_repository.sink, forwarder.sink))
    ...
    await forwarder.stop()  # sends what it can within ``close_timeout``, then closes (TLS close_notify)

Transports (the URL scheme): ``syslog+tls://host:port`` — RFC 5425, octet counting over TLS, with
this node's certificate for mutual TLS (ITI-19); ``syslog+tcp://host:port`` — the same framing
without TLS (RFC 6587 octet counting; what rsyslog's ``imtcp`` reads); ``syslog+udp://host:port`` —
RFC 5426, one datagram per message.

Delivery is at least once: a batch that fails half-way is sent again whole.  Syslog has no
application acknowledgement, so bytes the kernel accepted just before the connection died are lost
with it (as for every RFC 5425 sender); the sender drops a connection the repository closed before
writing to it, which covers a repository that restarts between batches.  UDP (RFC 5426) cannot
tell whether anybody listens: use it only where loss is acceptable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from ihehub.atna.model import AuditMessage
from ihehub.atna.sender import SyslogTlsClient, send_udp, syslog_message
from ihehub.atna.tables import atna_outbox
from ihehub.bus.db import Writer, is_sqlite

__all__ = ["FORWARD_SCHEMES", "AuditForwarder", "RemoteRepository", "repositories_from_config"]

log = logging.getLogger("ihehub.atna.forward")

FORWARD_SCHEMES = ("syslog+tls", "syslog+tcp", "syslog+udp")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RemoteRepository:
    """One Audit Record RemoteRepository this node sends to."""

    name: str
    transport: str  # tls, tcp, udp
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None

    @classmethod
    def from_url(cls, name: str, url: str, *, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> RemoteRepository:
        """``syslog+tls://host:port`` (needs ``ssl_context``), ``syslog+tcp://...``, ``syslog+udp://...``."""
        parts = urlsplit(url)
        if parts.scheme not in FORWARD_SCHEMES:
            raise ValueError(f"audit repository {name!r}: {url!r} must start with one of "
                             f"{', '.join(s + '://' for s in FORWARD_SCHEMES)}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or not port:
            raise ValueError(f"audit repository {name!r}: {url!r} needs a host and a port")
        transport = parts.scheme.partition("+")[2]
        if transport == "tls" and ssl_context is None:
            raise ValueError(f"audit repository {name!r}: syslog+tls needs a TLS client context")
        if not 0 < len(name) <= 64:
            raise ValueError(f"audit repository name {name!r} must have 1 to 64 characters")
        return cls(name=name, transport=transport, host=parts.hostname, port=port,
                   ssl_context=ssl_context if transport == "tls" else None, server_hostname=server_hostname)

    @property
    def url(self) -> str:
        return f"syslog+{self.transport}://{self.host}:{self.port}"


def repositories_from_config(items: Sequence[Mapping[str, Any]], *, home: Path, ca: Path, cert: Path,
                             key: Path) -> list[RemoteRepository]:
    """The ``atna.repositories`` entries of ``ihehub.yaml``: ``{url, name?, ca?, cert?, key?,
    server_hostname?}``; TLS files relative to the home; by default the node's CA verifies the
    repository and the node's certificate (which carries clientAuth) is presented (mutual TLS)."""
    from ihehub.tls import client_ssl_context

    out: list[RemoteRepository] = []
    for i, item in enumerate(items):
        url = str(item["url"])
        name = str(item.get("name") or urlsplit(url).netloc or f"repository-{i + 1}")
        ctx = None
        if url.startswith("syslog+tls:"):
            def path(value: Any, default: Path) -> Path:
                return default if value is None else (home / str(value))

            given_cert = item.get("cert")
            if given_cert is False:  # no client certificate
                my_cert, my_key = None, None
            elif given_cert is None:  # this node's own (it carries clientAuth)
                my_cert, my_key = cert, key
            else:  # another certificate; its key beside it, or inside the certificate file
                my_cert = path(given_cert, cert)
                my_key = path(item["key"], key) if item.get("key") else None
            ctx = client_ssl_context(path(item.get("ca"), ca), my_cert, my_key,
                                     check_hostname=bool(item.get("check_hostname", True)))
        repo = RemoteRepository.from_url(name, url, ssl_context=ctx, server_hostname=item.get("server_hostname"))
        if any(r.name == repo.name for r in out):
            raise ValueError(f"audit repository name {repo.name!r} is used twice; give each a distinct name:")
        out.append(repo)
    return out


class AuditForwarder:
    """The audit sender: `sink` for an `AuditContext`, one sending task per repository."""

    def __init__(
        self,
        engine: Engine,
        writer: Writer,
        repositories: Sequence[RemoteRepository],
        *,
        hostname: str | None = None,
        app_name: str = "ihehub",
        batch: int = 500,
        lease_seconds: float = 60.0,
        timeout: float = 10.0,
        first_backoff: float = 0.5,
        max_backoff: float = 30.0,
        close_timeout: float = 5.0,
        owner: str | None = None,
    ) -> None:
        self.engine = engine
        self.writer = writer
        self.repositories = list(repositories)
        self.hostname = hostname or socket.gethostname()
        self.app_name = app_name
        self.batch = batch
        self.lease_seconds = lease_seconds
        self.timeout = timeout
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.close_timeout = close_timeout
        self.owner = (owner or f"{socket.gethostname()}-{os.getpid()}")[:64]
        self.sqlite = is_sqlite(engine)
        self.stats: dict[str, dict[str, Any]] = {
            r.name: {"sent": 0, "failures": 0, "last_error": None, "last_sent_at": None} for r in repositories}
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._stop = asyncio.Event()
        self._pending: set[Any] = set()  # writes submitted and not yet committed
        self._clients: dict[str, SyslogTlsClient] = {}

    # -- emitting -------------------------------------------------------------------------------
    def sink(self, msg: AuditMessage) -> None:
        """An `AuditContext` sink: queue ``msg`` for every repository (never blocks; the write commits
        with the writer's next group)."""
        self.enqueue(syslog_message(msg, hostname=self.hostname, app_name=self.app_name))

    def enqueue(self, payload: bytes) -> None:
        """Queue one RFC 5424 message for every repository."""
        if not self.repositories:
            return
        now = time.time()
        rows = [{"repository": r.name, "created_at": now, "attempts": 0, "payload": payload}
                for r in self.repositories]

        def op(conn: Connection) -> None:
            conn.execute(insert(atna_outbox), rows)

        fut = self.writer.submit(op)
        self._pending.add(fut)
        fut.add_done_callback(self._written)

    def _written(self, fut: Any) -> None:
        self._pending.discard(fut)
        exc = fut.exception()
        if exc is not None:
            log.error("audit sender: could not queue an audit message: %s", exc)
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        for event in self._wake.values():
            event.set()

    # -- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start one sending task per repository; what earlier runs left in the queue goes first."""
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._stop = asyncio.Event()
        for repo in self.repositories:
            self._wake[repo.name] = asyncio.Event()
            self._wake[repo.name].set()
            self._tasks.append(asyncio.create_task(self._run(repo), name=f"atna-forward:{repo.name}"))

    async def stop(self) -> None:
        """Graceful close: wait for queued writes, send what the repositories take within
        ``close_timeout`` seconds, close the connections.  Anything left stays queued for the next start."""
        pending = list(self._pending)
        if pending:
            await asyncio.to_thread(_wait_all, pending, self.close_timeout)
        self._closing = True
        self._stop.set()
        self._wake_all()
        if self._tasks:
            _done, not_done = await asyncio.wait(self._tasks, timeout=self.close_timeout + self.timeout)
            for t in not_done:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        self._tasks.clear()
        self._loop = None

    def connected(self, name: str) -> bool:
        """Whether the kept-open connection to repository ``name`` is up (UDP: never)."""
        client = self._clients.get(name)
        return client is not None and client.connected

    def depth(self) -> dict[str, int]:
        """Messages waiting per repository."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(atna_outbox.c.repository, func.count())
                                .group_by(atna_outbox.c.repository)).all()
        counts = {str(r[0]): int(r[1]) for r in rows}
        return {r.name: counts.get(r.name, 0) for r in self.repositories}

    def collect(self) -> Iterator[Any]:
        """Prometheus metric families (a custom collector's ``collect``): queue depth, sent, failures."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        depth = GaugeMetricFamily("ihehub_audit_outbox_depth", "Audit messages waiting for a repository",
                                  labels=["repository"])
        try:
            depths = self.depth()
        except Exception:  # the database is down: report nothing rather than fail the scrape
            depths = {}
        for name, n in depths.items():
            depth.add_metric([name], n)
        yield depth
        sent = CounterMetricFamily("ihehub_audit_forwarded", "Audit messages sent to a repository",
                                   labels=["repository"])
        failed = CounterMetricFamily("ihehub_audit_forward_failures", "Failed sends (connection or batch)",
                                     labels=["repository"])
        for name, st in self.stats.items():
            sent.add_metric([name], st["sent"])
            failed.add_metric([name], st["failures"])
        yield sent
        yield failed

    # -- sending --------------------------------------------------------------------------------
    async def _run(self, repo: RemoteRepository) -> None:
        client = (SyslogTlsClient(repo.host, repo.port, ssl_context=repo.ssl_context,
                                  server_hostname=repo.server_hostname, timeout=self.timeout)
                  if repo.transport != "udp" else None)
        if client is not None:
            self._clients[repo.name] = client
        wake = self._wake[repo.name]
        backoff = self.first_backoff
        deadline: float | None = None
        try:
            while True:
                if self._closing and deadline is None:
                    deadline = time.monotonic() + self.close_timeout
                wake.clear()
                try:
                    sent = await self._send_batch(repo, client)
                except Exception as exc:  # the repository is down or the database is: keep the rows, retry
                    stats = self.stats[repo.name]
                    stats["failures"] += 1
                    stats["last_error"] = f"{type(exc).__name__}: {exc}"
                    log.warning("audit sender: %s (%s) failed: %s; retrying in %.1f s", repo.name, repo.url,
                                stats["last_error"], backoff)
                    if client is not None:
                        await client.close()
                    if deadline is not None:
                        return
                    await _sleep(self._stop, backoff * random.uniform(0.8, 1.2))  # new audits do not end it
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
                backoff = self.first_backoff
                if sent:
                    if deadline is not None and time.monotonic() > deadline:
                        return
                    continue  # maybe more waiting
                if deadline is not None:
                    return
                await _sleep(wake, 5.0)  # the timeout also picks up rows other processes queued
        finally:
            if client is not None:
                await client.close()

    async def _send_batch(self, repo: RemoteRepository, client: SyslogTlsClient | None) -> int:
        if client is not None:
            await client.connect()  # before claiming: a down repository costs no database writes
        claimed = await self.writer.arun(self._claim_op(repo.name))
        if not claimed:
            return 0
        ids = [row[0] for row in claimed]
        payloads = [bytes(row[1]) for row in claimed]
        try:
            if client is not None:
                await client.send(payloads)
            else:
                await send_udp(repo.host, repo.port, payloads)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self.writer.arun(self._release_op(ids, f"{type(exc).__name__}: {exc}"))
            raise
        await self.writer.arun(self._done_op(ids))
        stats = self.stats[repo.name]
        stats["sent"] += len(ids)
        stats["last_sent_at"] = time.time()
        return len(ids)

    def _claim_op(self, repository: str) -> Any:
        owner, limit, lease = self.owner, self.batch, self.lease_seconds
        sqlite = self.sqlite

        def op(conn: Connection) -> list[tuple[int, bytes]]:
            now = time.time()
            o = atna_outbox.c
            sel = (select(o.id)
                   .where(o.repository == repository, (o.lease_expires.is_(None)) | (o.lease_expires < now))
                   .order_by(o.id).limit(limit))
            if not sqlite:
                sel = sel.with_for_update(skip_locked=True)
            stmt = (update(atna_outbox).where(o.id.in_(sel.scalar_subquery()))
                    .values(lease_owner=owner, lease_expires=now + lease, attempts=o.attempts + 1)
                    .returning(o.id, o.payload))
            return sorted(((int(r[0]), r[1]) for r in conn.execute(stmt).all()), key=lambda r: r[0])

        return op

    def _done_op(self, ids: list[int]) -> Any:
        owner = self.owner

        def op(conn: Connection) -> None:
            o = atna_outbox.c
            conn.execute(delete(atna_outbox).where(o.id.in_(ids), o.lease_owner == owner))

        return op

    def _release_op(self, ids: list[int], error: str) -> Any:
        owner = self.owner

        def op(conn: Connection) -> None:
            o = atna_outbox.c
            conn.execute(update(atna_outbox).where(o.id.in_(ids), o.lease_owner == owner)
                         .values(lease_owner=None, lease_expires=None, last_error=error[:2000]))

        return op


async def _sleep(event: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``event`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=seconds)


def _wait_all(futures: list[Any], timeout: float) -> None:
    import concurrent.futures

    concurrent.futures.wait(futures, timeout=timeout)
