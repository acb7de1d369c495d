"""MLLP on the wire: frame decoder, asyncio server and a small client, without the bus.

HL7 v2 Minimal Lower Layer Protocol (HL7 v2.5 Implementation Guide appendix C; MLLP release 1):
a message travels as ``<VT=0x0B> payload <FS=0x1C><CR=0x0D>`` over a TCP connection that carries
many messages, each answered in order with one framed acknowledgment.

`MLLPServer` is the bare server: it calls ``handler(payload, peer)`` for each frame and writes the
returned bytes back as one frame, in order, on the same connection.  The ``mllp://`` source
connector (:mod:`ihehub.channels.mllp`) wraps it; benchmarks use it alone as the baseline.
It never drops a connection because of what a frame contains: an oversize frame or a handler
error gets a negative acknowledgment built by ``error_reply`` (HL7 by default).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import socket
from collections.abc import Awaitable, Callable
from ssl import SSLContext, SSLError
from typing import Any, NamedTuple, cast

from ihehub.hl7 import Header, HL7Error, build_ack, build_nak_without_header, parse_header

log = logging.getLogger("ihehub.mllp")

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
_START, _END = 0x0B, 0x1C
DEFAULT_MAX_FRAME = 1 << 20
_PREFIX = 4096  # bytes of an oversize frame kept to read its MSH for the NAK
_QUEUE_HIGH, _QUEUE_LOW = 256, 32  # frames waiting on one connection: pause / resume reading


def frame(payload: bytes) -> bytes:
    """``payload`` wrapped in MLLP start and end blocks."""
    return VT + payload + FS + CR


class Oversize(NamedTuple):
    """A frame longer than the limit: its first bytes (to read MSH from) and the size seen so far."""

    prefix: bytes
    size: int


class FrameDecoder:
    """Incremental MLLP framing: feed it bytes as they arrive, get whole payloads back.

    Bytes outside frames are counted in ``garbage`` (blank CR/LF between frames excepted) and
    dropped.  A frame longer than ``max_frame_bytes`` is reported as `Oversize` as soon as the
    limit is passed; the rest of it is dropped without buffering until the next start block.
    An end block not followed by CR is accepted; a second start block inside a frame restarts it.
    """

    __slots__ = ("_buf", "_discarding", "_in_frame", "_scan", "_skip_cr", "garbage", "garbage_sample",
                 "max_frame_bytes", "restarted")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()  # the payload of the unfinished frame, without the start block
        self._in_frame = False
        self._scan = 0
        self._discarding = False
        self._skip_cr = False
        self.garbage = 0
        self.garbage_sample = b""
        self.restarted = 0

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame (0 between frames)."""
        return len(self._buf) if self._in_frame else 0

    def _outside(self, buf: bytes | bytearray, start: int, end: int) -> None:
        if self._discarding:
            return
        chunk = buf[start:end]
        if chunk.strip(b" \r\n\t"):
            if not self.garbage:
                self.garbage_sample = bytes(chunk[:24])
            self.garbage += end - start

    def feed(self, data: bytes) -> list[bytes | Oversize]:
        out: list[bytes | Oversize] = []
        buf: bytes | bytearray
        if self._in_frame:
            self._buf += data
            buf = self._buf
        else:
            buf = data
        n = len(buf)
        pos = 0
        if self._skip_cr and n:
            self._skip_cr = False
            if buf[0] == 0x0D:
                pos = 1
        start = 0
        while pos < n:
            if self._in_frame:
                start, scan = 0, self._scan  # continuing the stored frame: buf holds its payload
            else:
                s = buf.find(VT, pos)
                if s < 0:
                    self._outside(buf, pos, n)
                    pos = n
                    break
                if s > pos:
                    self._outside(buf, pos, s)
                self._discarding = False
                self._in_frame = True
                start = scan = s + 1
            e = buf.find(FS, scan)
            if e < 0:
                if n - start > self.max_frame_bytes:
                    out.append(Oversize(bytes(buf[start : start + _PREFIX]), n - start))
                    self._in_frame = False
                    self._discarding = True
                    pos = n
                    break
                if buf is not self._buf or start:
                    self._buf = bytearray(buf[start:])
                self._scan = n - start
                return out
            restart = buf.rfind(VT, start, e)
            if restart >= 0:
                self.restarted += 1
                start = restart + 1
            if e - start > self.max_frame_bytes:
                out.append(Oversize(bytes(buf[start : start + _PREFIX]), e - start))
            else:
                out.append(bytes(buf[start:e]))
            self._in_frame = False
            pos = e + 1
            if pos < n:
                if buf[pos] == 0x0D:
                    pos += 1
            else:
                self._skip_cr = True
        if self._buf:
            self._buf = bytearray()
        self._scan = 0
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end: ``address`` as ``ip:port``, and for TLS the protocol and subject."""

    address: str
    tls_version: str | None = None
    tls_subject: str | None = None


Handler = Callable[[bytes, Peer], Awaitable[bytes]]
SecurityHook = Callable[[str, str, str], None]
# (frame or its first bytes, MSA-1 code, text, HL7 table 0357 code) -> reply payload
ErrorReply = Callable[[bytes, str, str, str], bytes]


def hl7_error_reply(
    payload: bytes, code: str, text: str, error_code: str, default_charset: str = "ascii"
) -> bytes:
    """A NAK for ``payload``: echoes its MSH when one can be read, else the header-less NAK."""
    header: Header | None
    try:
        header = parse_header(payload, default_charset)
    except HL7Error as err:
        header = err.header
    except (ValueError, LookupError):  # a broken default charset must not stop the NAK
        header = None
    if header is None:
        return build_nak_without_header(code, text, error_code)
    return build_ack(header, code, text=text, error_code=error_code)


def format_address(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr or "unknown")


def _subject(cert: dict[str, Any] | None) -> str | None:
    if not cert:
        return None
    parts = [f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ",".join(parts) or None


class _Connection(asyncio.Protocol):
    """One client connection: decode frames, answer them one at a time, in order."""

    def __init__(self, server: MLLPServer) -> None:
        self._server = server
        self._loop = server.loop
        self._decoder = FrameDecoder(server.max_frame_bytes)
        self._queue: collections.deque[bytes | Oversize] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self.worker: asyncio.Task[None] | None = None
        self._handshaking = False
        self._reading_paused = False
        self._write_ready: asyncio.Future[None] | None = None
        self._closing = False
        self._eof = False
        self._last_activity = 0.0
        self._idle: asyncio.TimerHandle | None = None
        self.address = "unknown"
        self.peer = Peer("unknown")
        self.frames = 0

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, base: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, base)
        self.address = format_address(transport.get_extra_info("peername"))
        self.peer = Peer(self.address)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self._server.admit(self):
            log.warning("%s: refusing %s: %d connections open (max_connections)",
                        self._server.name, self.address, self._server.max_connections)
            self._server.security_event("connection-limit", self.address, "max_connections reached")
            transport.abort()
            return
        log.debug("%s: connection from %s", self._server.name, self.address)
        self._last_activity = self._loop.time()
        self._idle = self._loop.call_later(self._server.idle_timeout, self._check_idle)
        if self._server.ssl_context is not None:
            self._handshaking = True
            transport.pause_reading()
            self.worker = self._loop.create_task(self._handshake())

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        items = self._decoder.feed(data)
        dec = self._decoder
        if dec.garbage:
            log.warning("%s: discarded %d bytes outside MLLP frames from %s (starting %r)",
                        self._server.name, dec.garbage, self.address, dec.garbage_sample)
            dec.garbage = 0
        if dec.restarted:
            log.warning("%s: %s started a new frame before ending the previous one; the unfinished "
                        "frame was dropped", self._server.name, self.address)
            dec.restarted = 0
        if not items or self._closing:
            return
        self._queue.extend(items)
        if len(self._queue) > _QUEUE_HIGH and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()
        if (self.worker is None or self.worker.done()) and not self._handshaking:
            self.worker = self._loop.create_task(self._work())

    def eof_received(self) -> bool:
        self._eof = True
        # The peer half-closed: keep the transport to write the pending replies, then close.  With
        # nothing pending, or over TLS (which cannot half-close), let the transport close now.
        return self.worker is not None and not self.worker.done() and self._server.ssl_context is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._idle is not None:
            self._idle.cancel()
        if self._decoder.pending:
            log.warning("%s: %s closed the connection in the middle of a frame (%d bytes dropped)",
                        self._server.name, self.address, self._decoder.pending)
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)
        self._server.forget(self)
        log.debug("%s: %s disconnected after %d frames", self._server.name, self.address, self.frames)

    def pause_writing(self) -> None:
        if self._write_ready is None or self._write_ready.done():
            self._write_ready = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)

    # -- work ------------------------------------------------------------------------------
    async def _handshake(self) -> None:
        transport = self._transport
        ctx = self._server.ssl_context
        if transport is None or ctx is None:
            return
        try:
            tls = await self._loop.start_tls(
                transport, self, ctx, server_side=True,
                ssl_handshake_timeout=self._server.handshake_timeout,
            )
        except (OSError, TimeoutError, SSLError) as exc:
            detail = str(exc) or f"{type(exc).__name__} (the client gave up)"
            log.warning("%s: TLS handshake with %s failed: %s", self._server.name, self.address, detail)
            self._server.security_event("tls-handshake-failed", self.address, detail)
            transport.abort()
            return
        if tls is None:
            return
        self._transport = tls
        ssl_object = tls.get_extra_info("ssl_object")
        version = ssl_object.version() if ssl_object is not None else None
        self.peer = Peer(self.address, version, _subject(tls.get_extra_info("peercert")))
        self._handshaking = False
        log.debug("%s: %s negotiated %s (client %s)", self._server.name, self.address, version,
                  self.peer.tls_subject or "without certificate")
        if self._queue:
            await self._work()

    async def _work(self) -> None:
        try:
            await self._answer_queued()
        except Exception:  # a bug here must not leave the peer waiting forever
            log.exception("%s: connection to %s failed; closing it", self._server.name, self.address)
            self.abort()

    async def _answer_queued(self) -> None:
        handler = self._server.handler
        queue = self._queue
        while queue and not self._closing:
            item = queue.popleft()
            if isinstance(item, Oversize):
                reply = self._reply_error(
                    item.prefix, "AE",
                    f"frame of {item.size}+ bytes exceeds the limit of {self._decoder.max_frame_bytes} bytes "
                    "(max_frame_bytes); message not accepted",
                )
                log.warning("%s: %s sent a frame over %d bytes; answered AE", self._server.name,
                            self.address, self._decoder.max_frame_bytes)
            else:
                try:
                    reply = await handler(item, self.peer)
                except Exception:
                    log.exception("%s: handler failed on a frame from %s", self._server.name, self.address)
                    reply = self._reply_error(item, "AR", "application internal error; see the hub's log")
            self.frames += 1
            transport = self._transport
            if transport is None or transport.is_closing():
                break
            transport.write(VT + reply + FS + CR)
            self._last_activity = self._loop.time()
            if self._write_ready is not None and not self._write_ready.done():
                await self._write_ready
            if self._reading_paused and len(queue) < _QUEUE_LOW and not self._closing:
                self._reading_paused = False
                transport.resume_reading()
        if (self._eof or self._server.stopping) and self._transport is not None:
            self._transport.close()

    def _reply_error(self, payload: bytes, code: str, text: str) -> bytes:
        try:
            return self._server.error_reply(payload, code, text, "207")
        except Exception:
            log.exception("%s: building the error reply failed", self._server.name)
            return build_nak_without_header(code, text, "207")

    def _check_idle(self) -> None:
        if self._closing or self._transport is None:
            return
        idle = self._server.idle_timeout
        elapsed = self._loop.time() - self._last_activity
        busy = self.worker is not None and not self.worker.done()
        if elapsed >= idle and not busy:
            log.info("%s: closing %s after %.1f s idle (idle_timeout)", self._server.name, self.address,
                     elapsed)
            self._transport.close()
            return
        self._idle = self._loop.call_later(max(idle - elapsed, 0.05), self._check_idle)

    def shutdown(self) -> None:
        """Stop after the frame in progress; close now when idle (or still in the TLS handshake)."""
        self._queue.clear()
        if self._handshaking:
            self.abort()
        elif (self.worker is None or self.worker.done()) and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()


class MLLPServer:
    """An MLLP listener: persistent connections, pipelining, limits, optional TLS.

    ``handler(payload, peer)`` returns the reply payload for each frame; frames of one connection
    are handled one at a time and answered in order, connections run concurrently.
    ``on_security_event(kind, peer, detail)`` is notified of refused TLS handshakes
    (``"tls-handshake-failed"``) and refused connections (``"connection-limit"``); its errors
    are logged, never raised.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: SSLContext | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME,
        idle_timeout: float = 300.0,
        max_connections: int = 200,
        handshake_timeout: float = 30.0,
        on_security_event: SecurityHook | None = None,
        error_reply: ErrorReply | None = None,
        name: str = "mllp",
    ) -> None:
        self.handler = handler
        self.host = host
        self._port = port
        self.ssl_context = ssl_context
        self.max_frame_bytes = max_frame_bytes
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.handshake_timeout = min(handshake_timeout, idle_timeout)
        self.on_security_event = on_security_event
        self.error_reply: ErrorReply = error_reply or hl7_error_reply
        self.name = name
        self.stopping = False
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the server is not started")
        return self._loop

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when created with port 0, once started)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.stopping = False
        self._server = await self._loop.create_server(
            lambda: _Connection(self), self.host, self._port, reuse_address=True, backlog=512
        )
        log.info("%s: listening on %s:%d%s", self.name, self.host, self.port,
                 " (TLS)" if self.ssl_context is not None else "")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop listening; finish the frame each connection is handling (up to ``grace`` s); close."""
        server, self._server = self._server, None
        if server is None:
            return
        self.stopping = True
        server.close()
        for conn in list(self._connections):
            conn.shutdown()
        busy = [c.worker for c in self._connections if c.worker is not None and not c.worker.done()]
        if busy:
            await asyncio.wait(busy, timeout=grace)
        for conn in list(self._connections):
            conn.abort()
        await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run
        log.info("%s: stopped", self.name)

    async def __aenter__(self) -> MLLPServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def admit(self, conn: _Connection) -> bool:
        if self.stopping or len(self._connections) >= self.max_connections:
            return False
        self._connections.add(conn)
        return True

    def forget(self, conn: _Connection) -> None:
        self._connections.discard(conn)

    def security_event(self, kind: str, peer: str, detail: str) -> None:
        if self.on_security_event is None:
            return
        try:
            self.on_security_event(kind, peer, detail)
        except Exception:
            log.exception("%s: on_security_event hook failed", self.name)


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The next frame's payload from ``reader`` (bytes before the start block are skipped)."""
    await reader.readuntil(VT)
    data = await reader.readuntil(FS)
    return data[:-1]


async def mllp_send(
    host: str,
    port: int,
    payloads: list[bytes],
    ssl: SSLContext | None = None,
    *,
    timeout: float = 30.0,
    server_hostname: str | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME,
) -> list[bytes]:
    """Send each payload on one connection and return the replies, in order (one at a time)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            host, port, ssl=ssl, server_hostname=server_hostname if ssl else None, limit=max_frame_bytes + 16
        ),
        timeout,
    )
    try:
        replies = []
        for payload in payloads:
            writer.write(frame(payload))
            await asyncio.wait_for(writer.drain(), timeout)
            replies.append(await asyncio.wait_for(read_frame(reader), timeout))
        return replies
    finally:
        writer.close()
        with contextlib.suppress(OSError, SSLError):
            await writer.wait_closed()
