"""The persistent audit sender (IHE ITI-20, ITI TF-2a 3.20.4.1.1): every audit message this node emits is
first written to the database (table ``atna_outbox``, one row per configured repository), then sent to
each repository in batches over one kept-open connection; a row leaves the queue only after its batch
went out.  A repository that is down or refuses the connection keeps its rows, and they are sent when it
is back — after a hub restart too, since the rows are committed by the bus `Writer` (group commit,
``synchronous=FULL`` on SQLite).  Reconnecting backs off exponentially with jitter, from
``first_backoff`` up to ``max_backoff``.

Row states: ``queued`` -> ``sent`` (kept ``keep_sent`` seconds for the record, then purged; 0: deleted at
once) or -> ``dead`` when it was not delivered within ``expire_after`` seconds of entering the queue (0:
never given up).  Dead rows are never deleted by the sender: ``outbox_rows`` lists them and
``resend_op`` queues them again (``ihehub audit outbox --dead``, ``ihehub audit resend``,
``/api/audit/outbox``); ``outbox_summary`` gives queued / dead / sent counts and the oldest queued age
(``/metrics``, ``/healthz``).

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

from sqlalchemy import ColumnElement, Connection, Engine, delete, func, insert, select, update

from ihehub.atna.model import AuditMessage
from ihehub.atna.sender import SyslogTlsClient, send_udp, syslog_message
from ihehub.atna.tables import atna_outbox
from ihehub.bus.db import Writer, is_sqlite

__all__ = ["FORWARD_SCHEMES", "AuditForwarder", "OutboxSummary", "RemoteRepository", "outbox_rows",
           "outbox_summary", "repositories_from_config", "resend_op"]

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
        max_backoff: float = 60.0,
        expire_after: float = 7 * 86400.0,
        keep_sent: float = 86400.0,
        maintenance_interval: float | None = None,
        close_timeout: float = 5.0,
        owner: str | None = None,
    ) -> None:
        if first_backoff <= 0 or max_backoff < first_backoff:
            raise ValueError(f"audit sender: need 0 < first_backoff <= max_backoff, got {first_backoff} and "
                             f"{max_backoff}")
        if expire_after < 0 or keep_sent < 0 or (maintenance_interval is not None and maintenance_interval <= 0):
            raise ValueError("audit sender: expire_after and keep_sent must be >= 0, maintenance_interval > 0")
        if maintenance_interval is None:  # a tenth of the shortest period, at most a minute
            maintenance_interval = min([60.0, *(max(0.1, p / 10) for p in (expire_after, keep_sent) if p > 0)])
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
        self.expire_after = expire_after
        self.keep_sent = keep_sent
        self.maintenance_interval = maintenance_interval
        self.close_timeout = close_timeout
        self.owner = (owner or f"{socket.gethostname()}-{os.getpid()}")[:64]
        self.sqlite = is_sqlite(engine)
        self.stats: dict[str, dict[str, Any]] = {
            r.name: {"sent": 0, "failures": 0, "last_error": None, "last_sent_at": None, "expired": 0,
                     "purged": 0} for r in repositories}
        self._wake: dict[str, asyncio.Event] = {}  # new rows: send now, unless backing off
        self._kick: dict[str, asyncio.Event] = {}  # an operator resent rows, or stop: end the backoff too
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
        rows = [{"repository": r.name, "created_at": now, "queued_at": now, "state": "queued", "attempts": 0,
                 "payload": payload} for r in self.repositories]

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

    def wake(self) -> None:
        """Try every repository now, even one being backed off from (after an operator resent rows);
        safe from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._kick_all)

    def _kick_all(self) -> None:
        for event in (*self._wake.values(), *self._kick.values()):
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
            self._kick[repo.name] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._run(repo), name=f"atna-forward:{repo.name}"))

    async def stop(self) -> None:
        """Graceful close: wait for queued writes, send what the repositories take within
        ``close_timeout`` seconds, close the connections.  Anything left stays queued for the next start."""
        pending = list(self._pending)
        if pending:
            await asyncio.to_thread(_wait_all, pending, self.close_timeout)
        self._closing = True
        self._stop.set()
        self._kick_all()
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
        """Messages waiting (queued) per repository."""
        return {name: s.queued for name, s in self.summary().items()}

    def summary(self) -> dict[str, OutboxSummary]:
        """Queued, dead and kept sent rows and the oldest queued age, per configured repository."""
        return outbox_summary(self.engine, [r.name for r in self.repositories])

    def health(self, alert_after: float) -> str:
        """``ok``, or why not: dead audits, or a queued audit older than ``alert_after`` seconds."""
        problems = []
        for name, s in self.summary().items():
            if s.dead:
                problems.append(f"{name}: {s.dead} audit message(s) given up (ihehub audit outbox --dead)")
            if s.oldest_age is not None and s.oldest_age > alert_after:
                err = self.stats.get(name, {}).get("last_error")
                problems.append(f"{name}: {s.queued} queued, the oldest for {s.oldest_age:.0f} s"
                                + (f" ({err})" if err else ""))
        return "; ".join(problems) or "ok"

    def collect(self) -> Iterator[Any]:
        """Prometheus metric families (a custom collector's ``collect``): queued, dead, oldest age, sent,
        failures, expired."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        depth = GaugeMetricFamily("ihehub_audit_outbox_depth", "Audit messages waiting for a repository",
                                  labels=["repository"])
        dead = GaugeMetricFamily("ihehub_audit_outbox_dead", "Audit messages given up (dead), waiting for an "
                                 "operator to resend them", labels=["repository"])
        oldest = GaugeMetricFamily("ihehub_audit_outbox_oldest_seconds", "Age of the oldest queued audit message "
                                   "(0 when none is queued)", labels=["repository"])
        try:
            summary = self.summary()
        except Exception:  # the database is down: report nothing rather than fail the scrape
            summary = {}
        for name, s in summary.items():
            depth.add_metric([name], s.queued)
            dead.add_metric([name], s.dead)
            oldest.add_metric([name], s.oldest_age or 0.0)
        yield depth
        yield dead
        yield oldest
        expired = CounterMetricFamily("ihehub_audit_outbox_expired", "Audit messages moved to dead (not "
                                      "delivered within expire_after)", labels=["repository"])
        for name, st in self.stats.items():
            expired.add_metric([name], st["expired"])
        yield expired
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
        wake, kick = self._wake[repo.name], self._kick[repo.name]
        backoff = self.first_backoff
        deadline: float | None = None
        next_maintenance = 0.0  # expiry and purge, every maintenance_interval
        retry_at = 0.0  # after a failure: no attempt before this (exponential backoff, capped, jitter)
        try:
            while True:
                if self._closing and deadline is None:
                    deadline = time.monotonic() + self.close_timeout
                if deadline is None and time.monotonic() >= next_maintenance:
                    next_maintenance = time.monotonic() + self.maintenance_interval
                    await self._maintain(repo)
                if deadline is None and time.monotonic() < retry_at:  # backing off; new audits do not end it
                    await _sleep(kick, min(retry_at, next_maintenance) - time.monotonic())
                    if kick.is_set():
                        kick.clear()
                        retry_at = 0.0
                    continue
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
                    retry_at = time.monotonic() + backoff * random.uniform(0.8, 1.2)
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
                backoff = self.first_backoff
                if sent:
                    if deadline is not None and time.monotonic() > deadline:
                        return
                    continue  # maybe more waiting
                if deadline is not None:
                    return
                # the timeout also picks up rows other processes queued (or an operator resent)
                await _sleep(wake, max(0.01, min(5.0, next_maintenance - time.monotonic())))
        finally:
            if client is not None:
                await client.close()

    async def _maintain(self, repo: RemoteRepository) -> None:
        """Move expired queued rows to dead, purge sent rows past their retention."""
        stats = self.stats[repo.name]
        try:
            expired, purged = await self.writer.arun(self._maintain_op(repo.name, stats["last_error"]))
        except Exception as exc:  # the database is down: the next round tries again
            log.warning("audit sender: %s: queue maintenance failed: %s", repo.name, exc)
            return
        stats["expired"] += expired
        stats["purged"] += purged
        if expired:
            log.error("audit sender: %s (%s): %d audit message(s) not delivered within %.0f s moved to dead; "
                      "list them with 'ihehub audit outbox --dead', send again with 'ihehub audit resend'",
                      repo.name, repo.url, expired, self.expire_after)

    def _maintain_op(self, repository: str, last_error: str | None) -> Any:
        expire_after, keep_sent = self.expire_after, self.keep_sent

        def op(conn: Connection) -> tuple[int, int]:
            now = time.time()
            o = atna_outbox.c
            expired = 0
            if expire_after > 0:
                why = f"expired: not delivered within {expire_after:g} s"
                if last_error:
                    why += f"; last error: {last_error}"
                expired = conn.execute(
                    update(atna_outbox)
                    .where(o.repository == repository, o.state == "queued",
                           func.coalesce(o.queued_at, o.created_at) < now - expire_after,
                           o.lease_expires.is_(None) | (o.lease_expires < now))
                    .values(state="dead", dead_at=now, lease_owner=None, lease_expires=None,
                            last_error=why[:2000])).rowcount or 0
            purged = 0
            if keep_sent > 0:
                purged = conn.execute(delete(atna_outbox).where(
                    o.repository == repository, o.state == "sent", o.sent_at < now - keep_sent)).rowcount or 0
            return int(expired), int(purged)

        return op

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
                   .where(o.repository == repository, o.state == "queued",
                          (o.lease_expires.is_(None)) | (o.lease_expires < now))
                   .order_by(o.id).limit(limit))
            if not sqlite:
                sel = sel.with_for_update(skip_locked=True)
            stmt = (update(atna_outbox).where(o.id.in_(sel.scalar_subquery()))
                    .values(lease_owner=owner, lease_expires=now + lease, attempts=o.attempts + 1)
                    .returning(o.id, o.payload))
            return sorted(((int(r[0]), r[1]) for r in conn.execute(stmt).all()), key=lambda r: r[0])

        return op

    def _done_op(self, ids: list[int]) -> Any:
        owner, keep = self.owner, self.keep_sent > 0

        def op(conn: Connection) -> None:
            o = atna_outbox.c
            mine = (o.id.in_(ids), o.lease_owner == owner)
            if keep:
                conn.execute(update(atna_outbox).where(*mine).values(
                    state="sent", sent_at=time.time(), lease_owner=None, lease_expires=None))
            else:
                conn.execute(delete(atna_outbox).where(*mine))

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


# -- the queue seen by operators (CLI, HTTP API, metrics): no running sender needed ---------------------
@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OutboxSummary:
    queued: int = 0
    dead: int = 0
    sent: int = 0  # delivered and still kept (``keep_sent``)
    oldest_age: float | None = None  # seconds since the oldest queued row entered the queue

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def outbox_summary(engine: Engine, names: Sequence[str] = ()) -> dict[str, OutboxSummary]:
    """Per repository (every one with rows, and every one of ``names``): counts per state, oldest age."""
    o = atna_outbox.c
    counts: dict[str, dict[str, int]] = {}
    oldest: dict[str, float] = {}
    with engine.connect() as conn:
        for repo, state, n in conn.execute(select(o.repository, o.state, func.count())
                                           .group_by(o.repository, o.state)).all():
            counts.setdefault(str(repo), {})[str(state)] = int(n)
        for repo, first in conn.execute(select(o.repository, func.min(func.coalesce(o.queued_at, o.created_at)))
                                        .where(o.state == "queued").group_by(o.repository)).all():
            if first is not None:
                oldest[str(repo)] = float(first)
    now = time.time()
    out = {}
    for name in [*names, *sorted(n for n in counts if n not in names)]:
        c = counts.get(name, {})
        out[name] = OutboxSummary(queued=c.get("queued", 0), dead=c.get("dead", 0), sent=c.get("sent", 0),
                                  oldest_age=round(max(0.0, now - oldest[name]), 3) if name in oldest else None)
    return out


def outbox_rows(engine: Engine, *, state: str | None = None, repository: str | None = None, limit: int = 100,
                before: int | None = None) -> list[dict[str, Any]]:
    """Rows of the queue, newest first (without the payload; ``size`` is its length in bytes)."""
    from ihehub.atna.tables import OUTBOX_STATES

    if state is not None and state not in OUTBOX_STATES:
        raise ValueError(f"audit outbox state {state!r}: expected one of {', '.join(OUTBOX_STATES)}")
    if not 1 <= limit <= 10_000:
        raise ValueError(f"limit {limit}: expected 1 to 10000")
    o = atna_outbox.c
    stmt = select(o.id, o.repository, o.state, o.created_at, o.queued_at, o.attempts, o.sent_at, o.dead_at,
                  o.last_error, o.lease_owner, func.length(o.payload).label("size"))
    if state is not None:
        stmt = stmt.where(o.state == state)
    if repository is not None:
        stmt = stmt.where(o.repository == repository)
    if before is not None:
        stmt = stmt.where(o.id < before)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt.order_by(o.id.desc()).limit(limit)).all()]


def resend_op(ids: Sequence[int] = (), *, all_dead: bool = False, repository: str | None = None) -> Any:
    """An operation for ``Writer.run``/``engine.begin``: queue the given dead (or kept sent) rows — or,
    with ``all_dead``, every dead row (of ``repository``) — again, as if new: attempts 0, the expiry
    clock restarted.  Returns the number of rows queued; queued rows are left as they are."""
    if not ids and not all_dead:
        raise ValueError("name the outbox rows to resend, or all dead ones")
    o = atna_outbox.c

    def op(conn: Connection) -> int:
        cond: list[ColumnElement[bool]] = (
            [o.state == "dead"] if all_dead else [o.id.in_(list(ids)), o.state.in_(("dead", "sent"))])
        if repository is not None:
            cond.append(o.repository == repository)
        return int(conn.execute(update(atna_outbox).where(*cond).values(
            state="queued", queued_at=time.time(), attempts=0, sent_at=None, dead_at=None, lease_owner=None,
            lease_expires=None)).rowcount or 0)

    return op
