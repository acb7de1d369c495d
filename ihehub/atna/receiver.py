"""The Audit Record Repository's listeners (IHE ITI-20 Record Audit Event, ITI TF-2a 3.20).

* TLS (RFC 5425, default port 6514): octet-counting framing; client certificates optional or
  required by the SSL context (`ihehub.tls.server_ssl_context`); a failed handshake is logged and
  reported to ``on_security_event`` (for the 110113 Security Alert audit).
* UDP (RFC 5426, default port 514/5140): one message per datagram.
* plain TCP (RFC 6587): octet counting or non-transparent (LF) framing, per frame.

Every frame becomes a stored record (`ihehub.atna.ingest.examine`): invalid ones flagged with the
reasons, never dropped.  What is not a frame (garbage, a wrong octet count) is logged and skipped
up to the next frame; an oversize frame is skipped whole; a frame cut by the end of the
connection is stored as invalid.  A connection's problems never reach the listener or the other
connections.  When the store falls behind (``high_water`` records waiting, e.g. the database is
down), stream connections stop reading until it catches up, so TCP flow control slows the senders
instead of the repository dropping their messages.

With ``workers`` > 0 the frames received from the network are examined (parsed, validated,
summarised) in that many worker processes (`ihehub.atna.pool.ParallelExaminer`), which lets ingest
use every core; records are still stored in arrival order, every one validated.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

from ihehub.atna.ingest import AuditRecord, examine
from ihehub.atna.model import AuditMessage
from ihehub.atna.pool import ParallelExaminer
from ihehub.atna.store import AuditStore
from ihehub.atna.syslog import (
    DEFAULT_MAX_FRAME,
    FrameError,
    OctetCountingDecoder,
    Oversize,
    StreamDecoder,
    format_syslog,
)
from ihehub.atna.validate import Validator

__all__ = ["AuditRepository", "SecurityHook"]

log = logging.getLogger("ihehub.atna")

SecurityHook = Callable[[str, str, str], None]  # (kind, peer address, detail)


def _address(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr or "unknown")


_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
                "localityName": "L", "stateOrProvinceName": "ST", "domainComponent": "DC", "userId": "UID"}


def _subject(cert: dict[str, Any] | None) -> str | None:
    """The client certificate's subject as an RFC 4514 string (``CN=sender,O=hospital``)."""
    if not cert:
        return None
    parts = [f"{_SHORT_NAMES.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ",".join(reversed(parts)) or None


class AuditRepository:
    """Receives audit messages over TLS, UDP and TCP, validates and stores them.

    ``await repo.start(tls_port=6514, udp_port=5140, ssl_context=ctx)`` (port 0 = any free port; see
    `tls_port`, `udp_port`, `tcp_port`), ``await repo.stop()``.  `sink` stores this node's own
    audit messages without a network hop.
    """

    def __init__(
        self,
        store: AuditStore,
        validator: Validator | None,
        *,
        host: str = "0.0.0.0",
        max_frame: int = DEFAULT_MAX_FRAME,
        idle_timeout: float = 600.0,
        handshake_timeout: float = 30.0,
        max_connections: int = 1000,
        high_water: int = 20_000,
        on_security_event: SecurityHook | None = None,
        hostname: str | None = None,
        name: str = "atna",
        workers: int = 0,
    ) -> None:
        self.store = store
        self.validator = validator
        self.host = host
        self.max_frame = max_frame
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.high_water = high_water
        self.low_water = high_water // 2
        self.on_security_event = on_security_event
        self.hostname = hostname or socket.gethostname()
        self.name = name
        self.stats: dict[str, int] = dict.fromkeys(
            ("frames", "invalid", "oversize", "framing_errors", "truncated", "udp_dropped", "connections",
             "refused", "tls_failures", "paused"), 0)
        self._servers: dict[str, asyncio.base_events.Server] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._connections: set[_Stream] = set()
        self._paused: set[_Stream] = set()
        self._resumer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self.stopping = False
        self.workers = workers
        self.examiner: ParallelExaminer | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(
        self,
        tls_port: int | None = None,
        udp_port: int | None = None,
        tcp_port: int | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Open the listeners asked for (None: not opened).  TLS needs ``ssl_context``."""
        if tls_port is not None and ssl_context is None:
            raise ValueError("a TLS listener needs ssl_context (ihehub.tls.server_ssl_context)")
        self._loop = loop = asyncio.get_running_loop()
        self.stopping = False
        self.ssl_context = ssl_context
        try:
            if self.workers > 0 and self.examiner is None:
                self.examiner = ParallelExaminer(self.validator, self._examined, workers=self.workers)
                await self.examiner.start()
            if tls_port is not None:
                self._servers["tls"] = await loop.create_server(
                    lambda: _Stream(self, "tls"), self.host, tls_port, reuse_address=True, backlog=512)
            if tcp_port is not None:
                self._servers["tcp"] = await loop.create_server(
                    lambda: _Stream(self, "tcp"), self.host, tcp_port, reuse_address=True, backlog=512)
            if udp_port is not None:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Datagrams(self), local_addr=(self.host, udp_port))
                self._udp = transport
                sock = transport.get_extra_info("socket")
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        except BaseException:
            await self.stop()
            raise
        log.info("%s: audit record repository listening on %s (tls %s, udp %s, tcp %s)", self.name, self.host,
                 self.tls_port, self.udp_port, self.tcp_port)

    async def stop(self, grace: float = 5.0) -> None:
        """Close the listeners and connections; wait (up to ``grace`` s) for what was received to be stored."""
        self.stopping = True
        servers, self._servers = self._servers, {}
        for server in servers.values():
            server.close()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        for conn in list(self._connections):
            conn.close()
        for server in servers.values():
            await server.wait_closed()
        if self._resumer is not None:
            self._resumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resumer
            self._resumer = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        examiner, self.examiner = self.examiner, None
        if examiner is not None:
            await examiner.close(grace)
        while self.store.backlog and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if servers:
            log.info("%s: audit record repository stopped", self.name)

    async def __aenter__(self) -> AuditRepository:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _port(self, kind: str) -> int | None:
        server = self._servers.get(kind)
        if server is None or not server.sockets:
            return None
        return int(server.sockets[0].getsockname()[1])

    @property
    def tls_port(self) -> int | None:
        return self._port("tls")

    @property
    def tcp_port(self) -> int | None:
        return self._port("tcp")

    @property
    def udp_port(self) -> int | None:
        if self._udp is None:
            return None
        return int(self._udp.get_extra_info("sockname")[1])

    @property
    def backlog(self) -> int:
        """Frames received and not stored yet (being examined or waiting for their group commit)."""
        examiner = self.examiner
        return self.store.backlog + (examiner.pending if examiner is not None else 0)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # -- ingest ------------------------------------------------------------------------------------
    def ingest(self, raw: bytes, *, transport: str, peer: str | None = None, tls_subject: str | None = None,
               syslog: bool = True) -> concurrent.futures.Future[int]:
        """Validate and store one message; the future gives its seq once committed."""
        return self.store.add(self._examine(raw, transport, peer, tls_subject, syslog))

    def _take(self, raw: bytes, transport: str, peer: str | None, tls_subject: str | None = None) -> None:
        """What the listeners call for every frame (on the event loop): validate and queue it for storage."""
        if self.examiner is not None:
            self.stats["frames"] += 1
            self.examiner.take(raw, transport, peer, tls_subject)
            return
        self.store.add_nowait(self._examine(raw, transport, peer, tls_subject, True))

    def _examined(self, rows: list[dict[str, Any]]) -> None:
        """Records examined by the worker processes (their store rows): count and store them."""
        invalid = [row for row in rows if not row["valid"]]
        self.stats["invalid"] += len(invalid)
        for row in invalid:
            log.debug("%s: invalid audit message from %s: %s", self.name, row["peer"], row["errors"])
        self.store.add_prepared(rows)

    def _examine(self, raw: bytes, transport: str, peer: str | None, tls_subject: str | None,
                 syslog: bool) -> AuditRecord:
        record = examine(raw, validator=self.validator, transport=transport, peer=peer, tls_subject=tls_subject,
                         syslog=syslog)
        self.stats["frames"] += 1
        self._invalid(record)
        return record

    def _invalid(self, record: AuditRecord) -> None:
        if not record.valid:
            self.stats["invalid"] += 1
            log.debug("%s: invalid audit message from %s: %s", self.name, record.peer, record.errors)

    def sink(self, msg: AuditMessage) -> None:
        """An `AuditContext` sink: store this node's own audit message here, as if received."""
        severity = 5 if msg.event.outcome == 0 else 4
        raw = format_syslog(msg.to_xml(), hostname=self.hostname, procid=str(os.getpid()), severity=severity)
        self.store.add_nowait(self._examine(raw, "local", None, None, True))  # any thread: not through the pool

    def security_event(self, kind: str, peer: str, detail: str) -> None:
        if self.on_security_event is None:
            return
        try:
            self.on_security_event(kind, peer, detail)
        except Exception:
            log.exception("%s: on_security_event hook failed", self.name)

    # -- flow control -------------------------------------------------------------------------------
    def admit(self, conn: _Stream) -> bool:
        if self.stopping or len(self._connections) >= self.max_connections:
            return False
        self._connections.add(conn)
        self.stats["connections"] += 1
        return True

    def forget(self, conn: _Stream) -> None:
        self._connections.discard(conn)
        self._paused.discard(conn)

    def throttle(self, conn: _Stream) -> None:
        """Pause ``conn`` while the store is behind; one task resumes everybody when it caught up."""
        if self.backlog < self.high_water:
            return
        if conn.pause():
            self._paused.add(conn)
            self.stats["paused"] += 1
        if self._resumer is None or self._resumer.done():
            self._resumer = asyncio.get_running_loop().create_task(self._resume_when_drained())

    async def _resume_when_drained(self) -> None:
        while self._paused:
            await asyncio.sleep(0.005)
            if self.backlog <= self.low_water:
                paused, self._paused = self._paused, set()
                for conn in paused:
                    conn.resume()


class _Stream(asyncio.Protocol):
    """One TLS or TCP connection."""

    def __init__(self, repo: AuditRepository, kind: str) -> None:
        self.repo = repo
        self.kind = kind
        self.decoder: OctetCountingDecoder = (
            OctetCountingDecoder(repo.max_frame) if kind == "tls" else StreamDecoder(repo.max_frame))
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self.tls_subject: str | None = None
        self._handshaking = False
        self._paused = False
        self._closed = False
        self._idle: asyncio.TimerHandle | None = None
        self._handshake_task: asyncio.Task[None] | None = None
        self._early: list[bytes] = []
        self._active = 0.0
        self.frames = 0

    # asyncio.Protocol
    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)
        self.transport = transport
        self.peer = _address(transport.get_extra_info("peername"))
        if not self.repo.admit(self):
            self.repo.stats["refused"] += 1
            log.warning("%s: refusing %s: %d connections open (max_connections)", self.repo.name, self.peer,
                        self.repo.max_connections)
            self.repo.security_event("connection-limit", self.peer, "max_connections reached")
            transport.abort()
            return
        loop = asyncio.get_running_loop()
        self._active = loop.time()
        self._idle = loop.call_later(self.repo.idle_timeout, self._check_idle)
        if self.kind == "tls":
            self._handshaking = True
            transport.pause_reading()
            self._handshake_task = loop.create_task(self._handshake(transport))

    async def _handshake(self, transport: asyncio.Transport) -> None:
        repo = self.repo
        ctx = repo.ssl_context
        if ctx is None:
            transport.abort()
            return
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(transport, self, ctx, server_side=True,
                                       ssl_handshake_timeout=repo.handshake_timeout)
        except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as exc:
            detail = str(exc) or f"{type(exc).__name__} (the client gave up)"
            repo.stats["tls_failures"] += 1
            log.warning("%s: TLS handshake with %s failed: %s", repo.name, self.peer, detail)
            repo.security_event("tls-handshake-failed", self.peer, detail)
            transport.abort()
            return
        if tls is None:
            return
        self.transport = tls
        self.tls_subject = _subject(tls.get_extra_info("peercert"))
        self._handshaking = False
        if self._closed:
            tls.abort()
            return
        early, self._early = self._early, []
        for data in early:  # decrypted in the same read as the end of the handshake
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        repo = self.repo
        if self._closed:
            return
        if self._handshaking:  # start_tls has not returned the TLS transport (and peer certificate) yet
            self._early.append(data)
            return
        self._active = asyncio.get_running_loop().time()
        for item in self.decoder.feed(data):
            if isinstance(item, bytes):
                self.frames += 1
                try:
                    repo._take(item, self.kind, self.peer, self.tls_subject)
                except Exception:  # a bug must not cost the connection
                    log.exception("%s: failed to take a frame from %s", repo.name, self.peer)
            elif isinstance(item, Oversize):
                repo.stats["oversize"] += 1
                log.warning("%s: %s sent a frame of %d bytes, over the limit of %d (max_frame); skipped it "
                            "(starts %r)", repo.name, self.peer, item.size, repo.max_frame, item.prefix[:60])
            elif isinstance(item, FrameError):
                repo.stats["framing_errors"] += 1
                log.warning("%s: framing error from %s: %s", repo.name, self.peer, item)
        repo.throttle(self)

    def eof_received(self) -> bool:
        return False  # close (TLS cannot half-close anyway)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._idle is not None:
            self._idle.cancel()
        rest = self.decoder.finish()
        if rest:
            self.repo.stats["truncated"] += 1
            expected = self.decoder.expected()
            log.warning("%s: %s closed the connection inside a frame (%d bytes%s); stored as invalid",
                        self.repo.name, self.peer, len(rest), f" of {expected}" if expected else "")
            with contextlib.suppress(Exception):
                self.repo._take(rest, self.kind, self.peer, self.tls_subject)
        self.repo.forget(self)

    # flow control and closing
    def pause(self) -> bool:
        if self._paused or self._closed or self.transport is None:
            return False
        self._paused = True
        self.transport.pause_reading()
        return True

    def resume(self) -> None:
        if self._paused and not self._closed and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    def _check_idle(self) -> None:
        if self._closed or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._active
        if idle >= self.repo.idle_timeout and not self._paused:
            log.info("%s: closing %s after %.0f s idle", self.repo.name, self.peer, idle)
            self.transport.close()
            return
        self._idle = loop.call_later(max(self.repo.idle_timeout - idle, 0.05), self._check_idle)


class _Datagrams(asyncio.DatagramProtocol):
    """RFC 5426: each datagram is one message."""

    def __init__(self, repo: AuditRepository) -> None:
        self.repo = repo

    def datagram_received(self, data: bytes, addr: Any) -> None:
        repo = self.repo
        if repo.backlog >= repo.high_water * 4:  # UDP has no flow control; protect memory
            repo.stats["udp_dropped"] += 1
            if repo.stats["udp_dropped"] % 1000 == 1:
                log.warning("%s: the audit store is behind; dropping UDP messages (%d so far)", repo.name,
                            repo.stats["udp_dropped"])
            return
        try:
            repo._take(data, "udp", _address(addr))
        except Exception:
            log.exception("%s: failed to take a datagram from %s", repo.name, _address(addr))

    def error_received(self, exc: Exception) -> None:
        log.warning("%s: UDP receive error: %s", self.repo.name, exc)
