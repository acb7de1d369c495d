"""mllp:// source over real loopback sockets: ACK per message, charsets, framing faults, limits."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from pathlib import Path

import pytest

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, Outcome
from ihehub.channels.mllp import SPEC, MLLPServer, MLLPSource, frame, mllp_send, read_frame
from ihehub.channels.registry import ConnectorContext, Registry
from ihehub.hl7 import describe_error, parse_header
from tests.channels.mllp_testkit import (
    CORPUS,
    Recorder,
    adt,
    client,
    closed,
    err,
    exchange,
    msa,
    run,
    running_source,
)


def corpus() -> list[Path]:
    return sorted(CORPUS.glob("*.hl7"))


def test_every_corpus_message_is_acked_on_one_connection() -> None:
    recorder = Recorder()

    async def main() -> None:
        async with running_source(recorder) as source, client(source.port) as (reader, writer):
            local_port = writer.get_extra_info("sockname")[1]
            for path in corpus():
                raw = path.read_bytes()
                ack = await exchange(reader, writer, raw)
                control_id = raw.split(b"\r")[0].split(b"|")[9].decode()
                fields = msa(ack)
                assert fields[2] == control_id, path.name
                if path.name == "mllp-iti8-a40-iso-8859-1.hl7":  # Latin-1 bytes on an ASCII channel
                    assert fields[1] == "AE" and err(ack)[1].startswith("MSH^1^18^102&"), ack
                else:
                    assert fields[1] == "AA", (path.name, ack)
        assert len(recorder.messages) == len(corpus()) - 1
        first = recorder.messages[0]
        assert first.raw == (CORPUS / "camel-iti-10.hl7").read_bytes()  # bytes exactly as received
        assert first.channel == "test-in" and first.content_type == "application/hl7-v2"
        assert (first.control_id, first.message_type, first.charset) == ("205632", "ADT^A31", "ascii")
        assert first.source == f"127.0.0.1:{local_port}"
        assert first.headers["mllp.peer"] == first.source
        assert first.headers["hl7.version"] == "2.5" and first.headers["hl7.sending_facility"] == "ICW"

    run(main())


def test_latin1_message_on_a_latin1_channel() -> None:
    recorder = Recorder()

    async def main() -> None:
        async with running_source(recorder, {"default_charset": "8859/1"}) as source:
            raw = (CORPUS / "mllp-iti8-a40-iso-8859-1.hl7").read_bytes()
            [ack] = await mllp_send("127.0.0.1", source.port, [raw])
            assert msa(ack, "latin-1")[1:3] == ["AA", "_mpi_1dd16f73-c85c-4540-857d-8b922f1732de"]
            assert ack.decode("latin-1").split("|")[2] == "BLÄH"  # MSH-5 of the message is MSH-3 of its ACK

    run(main())
    [message] = recorder.messages
    assert message.charset == "iso-8859-1" and "|BLÄH|" in message.text()


@pytest.mark.parametrize(
    ("msh18", "codec", "name"), [("GB 18030-2000", "gb18030", "张^三"), ("UNICODE UTF-8", "utf-8", "李^四")]
)
def test_chinese_names_reach_the_handler_and_the_ack_uses_the_same_charset(
    msh18: str, codec: str, name: str
) -> None:
    async def reject(message: Message) -> Outcome:
        pid5 = message.text().split("\r")[2].split("|")[5]
        return Outcome(code="AE", error=f"患者 {pid5} 已合并", error_code="205")

    recorder = Recorder(reject)

    async def main() -> bytes:
        async with running_source(recorder) as source:
            [ack] = await mllp_send(
                "127.0.0.1", source.port, [adt("CN1", msh18=msh18, name=name).encode(codec)]
            )
            return ack

    ack = run(main())
    [message] = recorder.messages
    assert message.charset == codec and f"||{name}||" in message.text()
    text = ack.decode(codec)
    assert text.split("\r")[0].endswith(f"|2.5||||||{msh18}")
    assert msa(ack, codec)[1:3] == ["AE", "CN1"]
    assert msa(ack, codec)[3] == f"患者 {name.replace('^', chr(92) + 'S' + chr(92))} 已合并"
    assert err(ack, codec)[3] == "205^Duplicate key identifier^HL70357"


def test_pipelined_messages_in_one_segment_are_answered_in_order() -> None:
    async def main() -> None:
        async with running_source() as source, client(source.port) as (reader, writer):
            writer.write(b"".join(frame(adt(f"P{i}").encode()) for i in range(20)))
            await writer.drain()
            ids = [msa(await read_frame(reader))[2] for _ in range(20)]
            assert ids == [f"P{i}" for i in range(20)]

    run(main())


def test_ten_persistent_connections_times_one_hundred_messages() -> None:
    recorder = Recorder()

    async def one(port: int, n: int) -> None:
        async with client(port) as (reader, writer):
            for i in range(100):
                ack = await exchange(reader, writer, adt(f"C{n}-{i}").encode())
                assert msa(ack)[1:3] == ["AA", f"C{n}-{i}"]

    async def main() -> None:
        async with running_source(recorder) as source:
            await asyncio.gather(*(one(source.port, n) for n in range(10)))

    run(main())
    assert len(recorder.messages) == 1000
    for n in range(10):
        seen = [m.control_id for m in recorder.messages if m.control_id and m.control_id.startswith(f"C{n}-")]
        assert seen == [f"C{n}-{i}" for i in range(100)]
    assert len({m.source for m in recorder.messages}) == 10


def test_garbage_outside_frames_is_discarded(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with running_source() as source, client(source.port) as (reader, writer):
            writer.write(
                b"GET / HTTP/1.1\r\n\r\n"
                + frame(adt("G1").encode())
                + b"\n\n!!junk"
                + frame(adt("G2").encode())
            )
            await writer.drain()
            assert msa(await read_frame(reader))[2] == "G1"
            assert msa(await read_frame(reader))[2] == "G2"

    with caplog.at_level(logging.WARNING, logger="ihehub.mllp"):
        run(main())
    counts = [re.search(r"discarded (\d+) bytes outside MLLP frames", r.getMessage()) for r in caplog.records]
    assert sum(int(m.group(1)) for m in counts if m) == 18 + 8  # blank lines alone are not counted


def test_truncated_frame_then_a_good_frame_on_a_new_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with running_source() as source:
            async with client(source.port) as (_, writer):
                writer.write(b"\x0b" + adt("T1").encode()[:40])
                await writer.drain()
            [ack] = await mllp_send("127.0.0.1", source.port, [adt("T2").encode()])
            assert msa(ack)[1:3] == ["AA", "T2"]

    with caplog.at_level(logging.WARNING, logger="ihehub.mllp"):
        run(main())
    assert any("in the middle of a frame (40 bytes dropped)" in r.getMessage() for r in caplog.records)


def test_oversize_frame_then_a_good_frame_on_the_same_connection() -> None:
    recorder = Recorder()

    async def main() -> None:
        async with (
            running_source(recorder, {"max_frame_bytes": 2048}) as source,
            client(source.port) as (reader, writer),
        ):
            big = frame(adt("BIG", pad=100_000).encode())
            for i in range(0, len(big), 1000):  # arrives in many segments
                writer.write(big[i : i + 1000])
                await writer.drain()
            ack = await asyncio.wait_for(read_frame(reader), 5)
            assert msa(ack)[1:3] == ["AE", "BIG"]
            assert "exceeds the limit of 2048 bytes" in msa(ack)[3]
            assert err(ack)[3] == "207^Application internal error^HL70357"
            ack = await exchange(reader, writer, adt("SMALL").encode())
            assert msa(ack)[1:3] == ["AA", "SMALL"]

    run(main())
    assert [m.control_id for m in recorder.messages] == ["SMALL"]


def test_frame_without_msh_gets_a_nak_and_the_connection_stays() -> None:
    async def main() -> None:
        async with running_source() as source, client(source.port) as (reader, writer):
            ack = await exchange(reader, writer, b"PID|1||123\r")
            assert msa(ack)[1:3] == ["AE", ""]
            assert err(ack)[3] == "100^Segment sequence error^HL70357"
            assert msa(await exchange(reader, writer, adt("OK1").encode()))[1] == "AA"

    run(main())


@pytest.mark.parametrize(
    ("options", "message", "code", "location"),
    [
        ({}, adt("U1", msg_type="XYZ^A01"), "200", "MSH^1^9^1^1"),
        ({"message_types": ["ORM"]}, adt("U2"), "200", "MSH^1^9^1^1"),
        ({"message_types": ["ADT^A04"]}, adt("U3"), "201", "MSH^1^9^1^2"),
        ({}, adt("U4", msh18="KLINGON-8"), "103", "MSH^1^18"),
        ({}, adt("U5", version="9.9"), "203", "MSH^1^12"),
    ],
)
def test_header_problems_get_ae_with_err(
    options: dict[str, object], message: str, code: str, location: str
) -> None:
    recorder = Recorder()

    async def main() -> bytes:
        async with running_source(recorder, options) as source:
            [ack] = await mllp_send("127.0.0.1", source.port, [message.encode()])
            return ack

    ack = run(main())
    assert msa(ack)[1:3] == ["AE", message.split("|")[9]]
    assert err(ack)[2:5] == [location, f"{code}^{describe_error(code)}^HL70357", "E"]
    assert not recorder.messages


def test_handler_raising_gets_ar_207_and_the_connection_stays(caplog: pytest.LogCaptureFixture) -> None:
    async def explode(message: Message) -> Outcome:
        if message.control_id == "BOOM":
            raise RuntimeError("database is down")
        return Outcome()

    async def main() -> None:
        async with running_source(Recorder(explode)) as source, client(source.port) as (reader, writer):
            ack = await exchange(reader, writer, adt("BOOM").encode())
            assert msa(ack)[1:3] == ["AR", "BOOM"]
            assert err(ack)[3] == "207^Application internal error^HL70357"
            assert "database" not in ack.decode()  # internals stay in the log
            assert msa(await exchange(reader, writer, adt("AFTER").encode()))[1:3] == ["AA", "AFTER"]

    with caplog.at_level(logging.ERROR, logger="ihehub.mllp"):
        run(main())
    assert any("inbound failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_outcome_body_and_error_fields_are_rendered() -> None:
    async def decide(message: Message) -> Outcome:
        if message.control_id == "Q1":
            return Outcome(body=b"MSH|^~\\&|HUB||HIS||20240101||RSP^K22^RSP_K21|R1|P|2.5\rMSA|AA|Q1\r")
        return Outcome(
            code="AE", error="PID-3 domain unknown", error_code="204", error_location="PID^1^3^1^4"
        )

    async def main() -> None:
        async with running_source(Recorder(decide)) as source:
            rsp, ack = await mllp_send("127.0.0.1", source.port, [adt("Q1").encode(), adt("Q2").encode()])
            assert rsp.startswith(b"MSH|^~\\&|HUB||HIS||20240101||RSP^K22^RSP_K21|R1|")
            assert msa(ack)[1:4] == ["AE", "Q2", "PID-3 domain unknown"]
            assert err(ack)[2:4] == ["PID^1^3^1^4", "204^Unknown key identifier^HL70357"]

    run(main())


def test_idle_timeout_closes_the_connection() -> None:
    async def main() -> None:
        async with (
            running_source(options={"idle_timeout": 0.2}) as source,
            client(source.port) as (reader, writer),
        ):
            assert msa(await exchange(reader, writer, adt("I1").encode()))[1] == "AA"
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await closed(reader)
            assert 0.15 < loop.time() - started < 2

    run(main())


def test_half_closed_client_still_gets_its_acks() -> None:
    async def main() -> None:
        async with running_source() as source, client(source.port) as (reader, writer):
            writer.write(b"".join(frame(adt(f"H{i}").encode()) for i in range(3)))
            writer.write_eof()
            ids = [msa(await read_frame(reader))[2] for _ in range(3)]
            assert ids == ["H0", "H1", "H2"]
            assert await closed(reader)

    run(main())


def test_max_connections_refuses_extra_clients() -> None:
    events: list[tuple[str, str, str]] = []

    async def main() -> None:
        async with running_source(
            options={"max_connections": 2}, on_security_event=lambda *e: events.append(e)
        ) as src:
            async with client(src.port) as (r1, w1), client(src.port) as (r2, w2):
                assert msa(await exchange(r1, w1, adt("M1").encode()))[1] == "AA"
                assert msa(await exchange(r2, w2, adt("M2").encode()))[1] == "AA"
                async with client(src.port) as (r3, _):
                    assert await closed(r3)
            [ack] = await mllp_send("127.0.0.1", src.port, [adt("M4").encode()])  # a slot is free again
            assert msa(ack)[1] == "AA"

    run(main())
    assert [e[0] for e in events] == ["connection-limit"]


def test_stop_closes_connections_and_the_listener() -> None:
    async def main() -> None:
        source = MLLPSource(name="s", url="mllp://127.0.0.1:0", options={}, context=ConnectorContext())
        await source.start(Recorder())
        port = source.port
        assert port > 0
        async with client(port) as (reader, writer):
            assert msa(await exchange(reader, writer, adt("S1").encode()))[1] == "AA"
            await source.stop()
            assert await closed(reader)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await source.stop()  # twice is harmless

    run(main())


def test_stop_waits_for_the_message_in_progress() -> None:
    started = asyncio.Event()

    async def slow(message: Message) -> Outcome:
        started.set()
        await asyncio.sleep(0.2)
        return Outcome()

    async def main() -> None:
        source = MLLPSource(name="s", url="mllp://127.0.0.1:0", options={}, context=ConnectorContext())
        await source.start(Recorder(slow))
        async with client(source.port) as (reader, writer):
            writer.write(frame(adt("W1").encode()))
            await started.wait()
            await source.stop()
            assert msa(await read_frame(reader))[1:3] == ["AA", "W1"]

    run(main())


def test_bare_server_works_without_the_bus() -> None:
    async def echo(payload: bytes, peer: object) -> bytes:
        return payload.upper()

    async def main() -> None:
        async with MLLPServer(echo, "127.0.0.1", 0) as server:
            assert await mllp_send("127.0.0.1", server.port, [b"abc", b"def"]) == [b"ABC", b"DEF"]
            assert server.connection_count == 0 or server.connection_count == 1

    run(main())


def test_tcp_nodelay_is_set_on_accepted_sockets() -> None:
    seen: list[int] = []

    async def handler(payload: bytes, peer: object) -> bytes:
        return b"ok"

    async def main() -> None:
        server = MLLPServer(handler, "127.0.0.1", 0)
        await server.start()
        try:
            async with client(server.port) as (reader, writer):
                await exchange(reader, writer, b"x")
                for conn in list(server._connections):
                    sock = conn._transport.get_extra_info("socket")  # type: ignore[union-attr]
                    seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        finally:
            await server.stop()

    run(main())
    assert seen and all(seen)


@pytest.mark.parametrize(
    ("url", "options", "words"),
    [
        ("mllp://0.0.0.0:2575", {"max_frame_byte": 10}, "did you mean 'max_frame_bytes'"),
        (
            "mllp://0.0.0.0:2575",
            {"nak_policy": {"AE": "retry"}},
            "options.nak_policy applies to mllp destinations",
        ),
        ("mllp://0.0.0.0:2575", {"max_frame_bytes": "big"}, "options.max_frame_bytes: 'big' is not of type"),
        ("mllp://0.0.0.0:2575", {"tls": {"cert": "x.pem"}}, "needs the mllps:// scheme"),
        ("mllps://0.0.0.0:2575", {}, "needs tls.cert"),
        (
            "mllps://0.0.0.0:2575",
            {"tls": {"cert": "a", "verify": False}},
            "options.tls.verify applies to mllp dest",
        ),
        (
            "mllps://0.0.0.0:2575",
            {"tls": {"cert": "/no/c.pem", "key": "/no/k.pem"}},
            "/no/c.pem does not exist",
        ),
        (
            "mllps://0.0.0.0:2575",
            {"tls": {"cert": "c.pem", "key": "k.pem", "require_client_cert": True}},
            "require_client_cert needs tls.ca",
        ),
        ("mllp://0.0.0.0:2575", {"default_charset": "utf-16"}, "not ASCII-compatible"),
        ("mllp://0.0.0.0:2575", {"message_types": ["ADTT"]}, "must look like"),
        ("mllp://0.0.0.0:2575/path", {}, "just mllp://host:port"),
        ("mllp://0.0.0.0:99999", {}, "bad port"),
    ],
)
def test_bad_configuration_is_explained(url: str, options: dict[str, object], words: str) -> None:
    with pytest.raises(ConnectorError, match=re.escape(words)):
        MLLPSource(name="bad", url=url, options=options, context=ConnectorContext())


def test_registry_builds_the_source_and_spec_is_complete() -> None:
    registry = Registry({"mllp": "ihehub.channels.mllp", "mllps": "ihehub.channels.mllp"})
    source = registry.build_source(name="r", url="mllp://:0", options={}, context=ConnectorContext())
    assert isinstance(source, MLLPSource) and source.server.host == "0.0.0.0"
    assert registry.spec("mllps") is SPEC
    props = SPEC.options_schema["properties"]
    for key in (
        "max_frame_bytes",
        "idle_timeout",
        "default_charset",
        "message_types",
        "max_connections",
        "tls",
        "timeout",
        "ack_timeout",
        "keepalive",
        "nak_policy",
    ):
        assert key in props
    assert SPEC.options_schema["additionalProperties"] is False


def test_header_parse_of_received_raw_is_consistent() -> None:
    recorder = Recorder()

    async def main() -> None:
        async with running_source(recorder) as source:
            await mllp_send("127.0.0.1", source.port, [adt("R1").encode()])

    run(main())
    assert parse_header(recorder.messages[0].raw).control_id == "R1"
