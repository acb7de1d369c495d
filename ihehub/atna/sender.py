"""Sending audit messages to an Audit Record Repository (IHE ITI-20): RFC 5424 messages framed for
RFC 5425 (TLS, octet counting, mutual TLS with a client certificate in the SSL context) or sent as
RFC 5426 UDP datagrams.

This is the wire part only.  The persistent queue with retry that makes emission never block or
lose a message (ITI TF-2a 3.20.4.1.1) is `ihehub.atna.forward`, built on `SyslogTlsClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Iterable

from ihehub.atna.model import AuditMessage
from ihehub.atna.syslog import format_syslog, octet_frame

__all__ = ["SyslogTlsClient", "send_tls", "send_udp", "syslog_message"]


def syslog_message(msg: AuditMessage, *, hostname: str | None = None, app_name: str = "ihehub") -> bytes:
    """The RFC 5424 message of an audit message: MSGID IHE+RFC-3881, severity 5 (4 for a failure), BOM."""
    return format_syslog(msg.to_xml(), hostname=hostname or socket.gethostname(), app_name=app_name,
                         procid=str(os.getpid()), severity=5 if msg.event.outcome == 0 else 4)


class SyslogTlsClient:
    """One connection to a repository over TLS (or plain TCP when ``ssl_context`` is None).

    ``ssl_context`` is a client context (`ihehub.tls.client_ssl_context`): it verifies the
    repository and presents this node's certificate (mutual TLS, ITI-19).
    """

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None,
                 server_hostname: str | None = None, timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self.sent = 0

    @property
    def connected(self) -> bool:
        """Open, and the repository has not closed its side (a repository never sends data, so EOF
        on the read side means it went away: writing now would only fill a dead socket's buffer)."""
        return (self._writer is not None and not self._writer.is_closing()
                and self._reader is not None and not self._reader.at_eof())

    async def connect(self) -> None:
        if self.connected:
            return
        if self._writer is not None:  # half-closed by the peer: drop it before opening a new one
            await self.close()
        hostname = (self.server_hostname or self.host) if self.ssl_context is not None else None
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.ssl_context, server_hostname=hostname),
            self.timeout)

    async def send(self, messages: Iterable[bytes]) -> None:
        """Frame (octet counting) and send RFC 5424 messages; raises OSError/TimeoutError on failure."""
        await self.connect()
        writer = self._writer
        if writer is None:
            raise ConnectionError("not connected")
        for m in messages:
            writer.write(octet_frame(m))
            self.sent += 1
            if writer.transport.get_write_buffer_size() > 256 * 1024:
                await asyncio.wait_for(writer.drain(), self.timeout)
        await asyncio.wait_for(writer.drain(), self.timeout)

    async def close(self) -> None:
        """Graceful close: flush, TLS close_notify, wait for the peer to close."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(writer.drain(), self.timeout)
        writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), self.timeout)

    async def __aenter__(self) -> SyslogTlsClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def send_tls(host: str, port: int, messages: Iterable[bytes], *, ssl_context: ssl.SSLContext | None,
                   server_hostname: str | None = None, timeout: float = 10.0) -> int:
    """Send RFC 5424 messages on one connection (RFC 5425 framing); returns how many were sent."""
    client = SyslogTlsClient(host, port, ssl_context=ssl_context, server_hostname=server_hostname, timeout=timeout)
    try:
        await client.send(messages)
    finally:
        await client.close()
    return client.sent


async def send_udp(host: str, port: int, messages: Iterable[bytes]) -> int:
    """Send each RFC 5424 message as one datagram (RFC 5426); returns how many were sent."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=(host, port))
    count = 0
    try:
        for m in messages:
            transport.sendto(m)
            count += 1
            if count % 64 == 0:
                await asyncio.sleep(0)  # let the socket drain (UDP has no flow control)
    finally:
        transport.close()
    return count
