"""The Audit Record Repository's listeners over real loopback sockets: mutual TLS (RFC 5425), UDP (RFC 5426),
plain TCP (RFC 6587), the WUSTL sender test messages, util-linux `logger`, broken and hostile input."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ihehub.atna import (
    AuditContext,
    AuditQuery,
    AuditRepository,
    AuditStore,
    Endpoint,
    SyslogTlsClient,
    Validator,
    octet_frame,
    send_tls,
    send_udp,
    syslog_message,
)
from ihehub.tls import client_ssl_context, server_ssl_context


@contextlib.asynccontextmanager
async def running(store: AuditStore, validator: Validator | None, *, ssl_context: ssl.SSLContext | None = None,
                  **kw: Any) -> AsyncIterator[AuditRepository]:
    repo = AuditRepository(store, validator, host="127.0.0.1", **kw)
    await repo.start(tls_port=0 if ssl_context else None, udp_port=0, tcp_port=0, ssl_context=ssl_context)
    try:
        yield repo
    finally:
        await repo.stop()


async def stored(store: AuditStore, n: int, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while store.stored < n:
        if loop.time() > deadline:
            raise AssertionError(f"only {store.stored} of {n} messages were stored")
        await asyncio.sleep(0.01)


def server_ctx(pki: dict[str, str], require: bool | None = True) -> ssl.SSLContext:
    return server_ssl_context(pki["cert"], pki["key"], pki["ca"], require)


def client_ctx(pki: dict[str, str], *, with_cert: bool = True) -> ssl.SSLContext:
    if with_cert:
        return client_ssl_context(pki["ca"], pki["client"], pki["client_key"])
    return client_ssl_context(pki["ca"])


async def send_raw(port: int, data: bytes, ctx: ssl.SSLContext | None = None, *, pause: float = 0.0) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="localhost" if ctx else None)
    writer.write(data)
    await writer.drain()
    if pause:
        await asyncio.sleep(pause)
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


def messages(audit: AuditContext, peer: Endpoint, n: int, start: int = 0) -> list[bytes]:
    return [syslog_message(audit.transaction("ITI-9", source=peer, destination=audit.me("HUB|B"),
                                             patients=[f"P{i}^^^A&1.2&ISO"], query=b"QBP %d" % i,
                                             message_id=f"Q{i}"), hostname="his")
            for i in range(start, start + n)]


def test_wustl_sender_messages_over_mutual_tls(corpus: Path, store: AuditStore, validator: Validator,
                                               pki: dict[str, str]) -> None:
    files = sorted((corpus / "wustl" / "syslog-sender-messages").iterdir())
    assert len(files) >= 9

    async def main() -> None:
        async with running(store, validator, ssl_context=server_ctx(pki)) as repo:
            assert repo.tls_port
            sent = await send_tls("127.0.0.1", repo.tls_port, [f.read_bytes() for f in files],
                                  ssl_context=client_ctx(pki), server_hostname="localhost")
            assert sent == len(files)
            await stored(store, len(files))

    asyncio.run(main())
    records = sorted(store.search(AuditQuery(limit=100), with_raw=True).records, key=lambda r: r.seq)
    assert [r.raw for r in records] == [f.read_bytes() for f in files]  # stored undamaged, in order
    by_name = {f.name: r for f, r in zip(files, records, strict=True)}
    for r in records:
        assert r.transport == "tls" and r.tls_subject is not None and "CN=audit-sender" in r.tls_subject
    bom = by_name["BOMtest.txt"]
    assert (bom.syslog_host, bom.syslog_msgid, bom.event_id, bom.event_type) == ("cabig-h1", "IHE+RFC-3881",
                                                                                  "110100", "110120")
    assert not bom.valid and bom.errors is not None and "csd-code" in bom.errors  # RFC 3881 spelling: not 2017c
    assert by_name["vitera.txt"].values("patient") == ["0000093000^HMC-HIE^2.16.840.1.113883.3.405.1.1.1"]
    assert "MSGID is 'IHEA'" in (by_name["vitera.txt"].errors or "")
    assert by_name["msg.xml"].errors is not None and by_name["msg.xml"].errors.startswith("syslog:")
    assert by_name["test.xml"].event_id == "110106"  # not syslog, but the audit XML in it is still indexed
    assert store.verify().ok


def test_a_client_without_certificate_is_refused_and_reported(store: AuditStore, validator: Validator,
                                                              pki: dict[str, str], audit: AuditContext,
                                                              peer: Endpoint) -> None:
    events: list[tuple[str, str, str]] = []

    async def main() -> None:
        async with running(store, validator, ssl_context=server_ctx(pki), handshake_timeout=5,
                           on_security_event=lambda *e: events.append(e)) as repo:
            port = repo.tls_port
            assert port
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                client = SyslogTlsClient("127.0.0.1", port, ssl_context=client_ctx(pki, with_cert=False),
                                         server_hostname="localhost")
                await client.send(messages(audit, peer, 3))
                await asyncio.sleep(0.2)
                await client.send(messages(audit, peer, 3))
                await client.close()
            await send_raw(port, b"\x16\x03\x01 this is not a TLS client hello" * 10)
            for _ in range(100):
                if len(events) >= 2:
                    break
                await asyncio.sleep(0.02)
            await send_tls("127.0.0.1", port, messages(audit, peer, 2), ssl_context=client_ctx(pki),
                           server_hostname="localhost")
            await stored(store, 2)
            assert repo.stats["tls_failures"] == 2

    asyncio.run(main())
    assert [e[0] for e in events] == ["tls-handshake-failed", "tls-handshake-failed"]
    assert all(e[1].startswith("127.0.0.1:") for e in events)
    assert store.count(AuditQuery()) == 2


def test_client_certificate_optional(store: AuditStore, validator: Validator, pki: dict[str, str],
                                     audit: AuditContext, peer: Endpoint) -> None:
    async def main() -> None:
        async with running(store, validator, ssl_context=server_ctx(pki, require=None)) as repo:
            assert repo.tls_port
            await send_tls("127.0.0.1", repo.tls_port, messages(audit, peer, 3),
                           ssl_context=client_ctx(pki, with_cert=False), server_hostname="localhost")
            await stored(store, 3)

    asyncio.run(main())
    records = store.search(AuditQuery()).records
    assert len(records) == 3 and all(r.valid and r.tls_subject is None for r in records)


def test_udp_and_plain_tcp_with_both_framings(store: AuditStore, validator: Validator, audit: AuditContext,
                                              peer: Endpoint) -> None:
    msgs = messages(audit, peer, 12)

    async def main() -> None:
        async with running(store, validator) as repo:
            assert repo.udp_port and repo.tcp_port and repo.tls_port is None
            assert await send_udp("127.0.0.1", repo.udp_port, msgs[:4]) == 4
            await stored(store, 4)
            mixed = b"".join([octet_frame(msgs[4]), msgs[5] + b"\n", octet_frame(msgs[6]), msgs[7] + b"\r\n",
                              msgs[8] + b"\x00", octet_frame(msgs[9])])
            await send_raw(repo.tcp_port, mixed)
            await send_tls("127.0.0.1", repo.tcp_port, msgs[10:], ssl_context=None)
            await stored(store, 12)

    asyncio.run(main())
    records = sorted(store.search(AuditQuery(limit=50), with_raw=True).records, key=lambda r: r.seq)
    assert [r.raw for r in records] == msgs
    assert [r.transport for r in records] == ["udp"] * 4 + ["tcp"] * 8
    assert all(r.valid for r in records), [r.errors for r in records if not r.valid]


def test_util_linux_logger_interoperates(store: AuditStore, validator: Validator, audit: AuditContext,
                                         peer: Endpoint) -> None:
    logger = shutil.which("logger")
    if logger is None:
        pytest.fail("`logger` (util-linux / bsdutils) is needed: apt-get install bsdutils")
    xml = [audit.transaction("ITI-9", source=peer, destination=audit.me("HUB|B"), patients=[f"L{i}^^^A&1.2&ISO"],
                             query=b"QBP", message_id=f"L{i}").to_xml().decode() for i in range(3)]

    def run(*args: str) -> None:
        subprocess.run([logger, "--rfc5424", "--size", "65536", "--msgid", "IHE+RFC-3881", "-p", "authpriv.notice",
                        "-t", "ihehub-test", "-n", "127.0.0.1", *args], check=True, timeout=20)

    async def main() -> None:
        async with running(store, validator) as repo:
            assert repo.tcp_port and repo.udp_port
            await asyncio.to_thread(run, "--tcp", "--octet-count", "-P", str(repo.tcp_port), xml[0])
            await asyncio.to_thread(run, "--tcp", "-P", str(repo.tcp_port), xml[1])  # RFC 6587 non-transparent
            await asyncio.to_thread(run, "--udp", "-P", str(repo.udp_port), xml[2])
            await stored(store, 3)

    asyncio.run(main())
    records = sorted(store.search(AuditQuery(limit=10)).records, key=lambda r: r.seq)
    assert sorted(r.transport for r in records) == ["tcp", "tcp", "udp"]
    for i, r in enumerate(sorted(records, key=lambda r: r.values("patient"))):
        assert r.valid, r.errors
        assert (r.syslog_app, r.syslog_msgid, r.event_type) == ("ihehub-test", "IHE+RFC-3881", "ITI-9")
        assert r.values("patient") == [f"L{i}^^^A&1.2&ISO"]


def test_many_concurrent_senders(store: AuditStore, validator: Validator, pki: dict[str, str],
                                 audit: AuditContext, peer: Endpoint) -> None:
    async def main() -> None:
        async with running(store, validator, ssl_context=server_ctx(pki)) as repo:
            port = repo.tls_port
            assert port
            batches = [messages(audit, peer, 25, start=100 * k) for k in range(16)]
            sent = await asyncio.gather(*(send_tls("127.0.0.1", port, b, ssl_context=client_ctx(pki),
                                                   server_hostname="localhost") for b in batches))
            assert sum(sent) == 400
            await stored(store, 400)
            assert repo.stats["connections"] == 16

    asyncio.run(main())
    assert store.count(AuditQuery(valid=True)) == 400
    assert store.verify().ok


def test_broken_input_never_kills_the_receiver(store: AuditStore, validator: Validator, pki: dict[str, str],
                                               audit: AuditContext, peer: Endpoint) -> None:
    good = messages(audit, peer, 4)
    xxe = (b'<85>1 - evil app - IHE+RFC-3881 - <?xml version="1.0"?><!DOCTYPE AuditMessage ['
           b'<!ENTITY xxe SYSTEM "file:///etc/passwd">]><AuditMessage>&xxe;</AuditMessage>')
    bomb = (b'<85>1 - evil app - IHE+RFC-3881 - <!DOCTYPE a [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><a>&c;</a>')
    not_xml = b"<85>1 - host app - IHE+RFC-3881 - \xef\xbb\xbfthis is no XML <AuditMessage"

    async def main() -> None:
        async with running(store, validator, ssl_context=server_ctx(pki), max_frame=8192) as repo:
            tls, tcp = repo.tls_port, repo.tcp_port
            assert tls and tcp
            ctx = client_ctx(pki)
            stream = b"".join([
                octet_frame(good[0]),
                b"\x00\xff garbage that is not a frame \r\n",  # skipped with a log line
                b"%d " % (len(xxe) - 10) + xxe,  # a count too short: the cut frame is stored invalid
                octet_frame(bomb),
                octet_frame(not_xml),
                octet_frame(b"<85>1 - h a - IHE+RFC-3881 - " + b"<x>" * 5000),  # over max_frame: skipped
                octet_frame(good[1]),
            ])
            await send_raw(tls, stream, ctx, pause=0.3)
            await send_raw(tls, b"500 " + good[2][:100], ctx, pause=0.3)  # closes inside a frame
            await send_raw(tcp, b"\xde\xad\xbe\xef" * 1000)  # nothing usable at all
            await send_raw(tls, octet_frame(good[3]), ctx, pause=0.3)  # the receiver is still fine
            await stored(store, 7)
            assert repo.stats["oversize"] == 1
            assert repo.stats["framing_errors"] >= 2
            assert repo.stats["truncated"] == 1
            assert repo.connection_count == 0

    asyncio.run(main())
    records = sorted(store.search(AuditQuery(limit=20), with_raw=True).records, key=lambda r: r.seq)
    valid = [r for r in records if r.valid]
    assert [r.raw for r in valid] == [good[0], good[1], good[3]]
    errors = [r.errors or "" for r in records if not r.valid]
    assert any("document type declarations" in e for e in errors)  # XXE and the entity bomb: refused
    assert sum("document type declarations" in e for e in errors) == 2
    assert any("not well-formed" in e for e in errors)
    assert any(r.raw == good[2][:100] for r in records)  # the cut frame is kept, flagged
    assert b"root:" not in b"".join(r.raw or b"" for r in records)
    assert store.verify().ok


def test_flow_control_pauses_and_resumes(store: AuditStore, validator: Validator, audit: AuditContext,
                                         peer: Endpoint) -> None:
    msgs = messages(audit, peer, 300)

    async def main() -> None:
        async with running(store, validator, high_water=4) as repo:
            assert repo.tcp_port
            await send_raw(repo.tcp_port, b"".join(octet_frame(m) for m in msgs))
            await stored(store, 300)
            assert repo.stats["paused"] >= 1

    asyncio.run(main())
    assert store.count(AuditQuery()) == 300


def test_limits_and_stop(store: AuditStore, validator: Validator, pki: dict[str, str]) -> None:
    events: list[tuple[str, str, str]] = []

    async def main() -> None:
        async with running(store, validator, ssl_context=server_ctx(pki), max_connections=2,
                           on_security_event=lambda *e: events.append(e)) as repo:
            assert repo.tcp_port
            held = [await asyncio.open_connection("127.0.0.1", repo.tcp_port) for _ in range(2)]
            await asyncio.sleep(0.05)
            _r, w = await asyncio.open_connection("127.0.0.1", repo.tcp_port)
            await asyncio.sleep(0.1)
            assert repo.connection_count == 2 and repo.stats["refused"] == 1
            w.close()
            await repo.stop()  # closes the held connections; stopping twice is harmless
            for reader, writer in held:
                assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()

    asyncio.run(main())
    assert events and events[0][0] == "connection-limit"


def test_the_repository_stores_this_nodes_own_audits(store: AuditStore, validator: Validator) -> None:
    async def main() -> None:
        async with running(store, validator) as repo:
            audit = AuditContext(source_id="ihehub-1", host="127.0.0.1", sinks=(repo.sink,))
            audit.emit("APP-START", user=Endpoint(user_id="root"))
            audit.emit("LOGIN", user=Endpoint(user_id="alice", host="10.1.1.1"), outcome=4)
            await stored(store, 2)

    asyncio.run(main())
    records = sorted(store.search(AuditQuery()).records, key=lambda r: r.seq)
    assert [(r.transport, r.event_type, r.valid) for r in records] == [("local", "110120", True),
                                                                       ("local", "110122", True)]
    assert records[1].outcome == 4 and records[1].values("user")[0] == "alice"


def test_tls_listener_needs_a_context(store: AuditStore) -> None:
    async def main() -> None:
        repo = AuditRepository(store, None)
        with pytest.raises(ValueError, match="ssl_context"):
            await repo.start(tls_port=0)

    asyncio.run(main())
