"""mllp:// destination against a real mllp:// source (and scripted bare servers) on loopback."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, DeliveryError, Outcome
from ihehub.channels.mllp import MLLPDestination, MLLPServer, Peer
from ihehub.channels.registry import ConnectorContext, Registry
from ihehub.hl7 import build_ack, parse_header
from tests.channels.mllp_testkit import CORPUS, Recorder, adt, msa, run, running_source


def destination(port: int, **options: Any) -> MLLPDestination:
    return MLLPDestination(
        name="out", url=f"mllp://127.0.0.1:{port}", options=options, context=ConnectorContext()
    )


def message(control_id: str, **kw: Any) -> Message:
    raw = adt(control_id, **kw).encode()
    return Message(channel="c", raw=raw, control_id=control_id, content_type="application/hl7-v2")


def answer_with(codes: dict[str, str]) -> Recorder:
    async def decide(m: Message) -> Outcome:
        code = codes.get(m.control_id or "", "AA")
        return Outcome(code=code, error=None if code == "AA" else f"said {code}", error_code="204")

    return Recorder(decide)


def test_aa_is_ok_and_the_connection_is_kept() -> None:
    recorder = Recorder()

    async def main() -> None:
        async with running_source(recorder) as source:
            out = destination(source.port)
            try:
                for i in range(5):
                    response = await out.send(message(f"D{i}"))
                    assert response.ok and response.status == "AA"
                    assert msa(response.body)[1:3] == ["AA", f"D{i}"]
            finally:
                await out.close()

    run(main())
    assert len({m.source for m in recorder.messages}) == 1  # one persistent connection


def test_corpus_message_round_trip() -> None:
    recorder = Recorder()
    raw = (CORPUS / "pixfeed-PIX_FEED_REG_Maximal_Request.hl7").read_bytes()

    async def main() -> None:
        async with running_source(recorder) as source:
            out = destination(source.port)
            try:
                response = await out.send(Message(channel="c", raw=raw))  # control id read from MSH-10
                assert response.ok
            finally:
                await out.close()

    run(main())
    assert recorder.messages[0].raw == raw


@pytest.mark.parametrize(
    ("code", "policy", "ok", "retryable"),
    [
        ("AE", None, False, False),
        ("AR", None, False, True),
        ("AE", {"AE": "retry"}, False, True),
        ("AE", {"AE": "accept"}, True, True),
        ("AR", {"AR": "dead"}, False, False),
        ("AR", {"AR": "accept"}, True, True),
    ],
)
def test_nak_policy(code: str, policy: dict[str, str] | None, ok: bool, retryable: bool) -> None:
    async def main() -> None:
        async with running_source(answer_with({"N1": code})) as source:
            out = destination(source.port, **({"nak_policy": policy} if policy else {}))
            try:
                response = await out.send(message("N1"))
                assert (response.ok, response.retryable, response.status) == (ok, retryable, code)
                assert response.error == f"{code} 204: said {code}"
                assert (await out.send(message("N2"))).ok  # the connection is still usable
            finally:
                await out.close()

    run(main())


def test_reconnects_after_the_server_restarts() -> None:
    recorder = Recorder()

    async def main() -> None:
        async with running_source(recorder) as first:
            port = first.port
            out = destination(port, timeout=2)
            assert (await out.send(message("R1"))).ok
        try:
            with pytest.raises(DeliveryError) as info:
                await out.send(message("R2"))  # nobody listens
            assert info.value.retryable and "cannot connect" in str(info.value)
            async with running_source(recorder, url=f"mllp://127.0.0.1:{port}"):
                assert (await out.send(message("R3"))).ok
        finally:
            await out.close()

    run(main())
    assert [m.control_id for m in recorder.messages] == ["R1", "R3"]
    assert recorder.messages[0].source != recorder.messages[1].source


def test_stale_kept_connection_is_replaced_transparently() -> None:
    recorder = Recorder()

    async def main() -> None:
        async with running_source(recorder, {"idle_timeout": 0.1}) as source:
            out = destination(source.port)
            try:
                assert (await out.send(message("S1"))).ok
                await asyncio.sleep(0.4)  # the server closes the idle connection
                assert (await out.send(message("S2"))).ok
            finally:
                await out.close()

    run(main())
    assert [m.control_id for m in recorder.messages] == ["S1", "S2"]


def test_connection_refused_is_retryable() -> None:
    async def main() -> None:
        async with running_source() as source:
            port = source.port
        out = destination(port, timeout=1)
        with pytest.raises(DeliveryError) as info:
            await out.send(message("X"))
        assert info.value.retryable
        await out.close()

    run(main())


def test_ack_timeout_then_recovery() -> None:
    release = asyncio.Event()

    async def slow(payload: bytes, peer: Peer) -> bytes:
        header = parse_header(payload)
        if header.control_id == "SLOW":
            await release.wait()
        return build_ack(header, "AA")

    async def main() -> None:
        server = MLLPServer(slow, "127.0.0.1", 0)
        await server.start()
        out = destination(server.port, ack_timeout=0.2)
        try:
            with pytest.raises(DeliveryError) as info:
                await out.send(message("SLOW"))
            assert info.value.retryable and "no ACK" in str(info.value) and "0.2 s" in str(info.value)
            release.set()
            response = await out.send(message("FAST"))  # a new connection: no stale ACK is read
            assert response.ok and msa(response.body)[2] == "FAST"
        finally:
            await out.close()
            await server.stop()

    run(main())


def test_keepalive_false_uses_a_connection_per_message() -> None:
    recorder = Recorder()

    async def main() -> None:
        async with running_source(recorder) as source:
            out = destination(source.port, keepalive=False)
            for i in range(3):
                assert (await out.send(message(f"K{i}"))).ok
            await out.close()

    run(main())
    assert len({m.source for m in recorder.messages}) == 3


@pytest.mark.parametrize(
    ("reply", "retryable", "words"),
    [
        (b"MSH|^~\\&|A|B|C|D|20240101||ACK^A01^ACK|1|P|2.5\rMSA|AA|SOMEONE-ELSE\r", True, "not 'W1'"),
        (b"HTTP/1.1 400 Bad Request", False, "no readable acknowledgment"),
        (b"MSH|^~\\&|A|B|C|D|20240101||ACK^A01^ACK|1|P|2.5\r", False, "no MSA"),
    ],
)
def test_replies_that_are_not_our_ack(reply: bytes, retryable: bool, words: str) -> None:
    async def canned(payload: bytes, peer: Peer) -> bytes:
        return reply

    async def main() -> None:
        async with MLLPServer(canned, "127.0.0.1", 0) as server:
            out = destination(server.port)
            try:
                with pytest.raises(DeliveryError) as info:
                    await out.send(message("W1"))
                assert info.value.retryable is retryable and info.value.response == reply
                assert re.search(words, str(info.value))
            finally:
                await out.close()

    run(main())


def test_concurrent_sends_are_serialised_on_one_connection() -> None:
    recorder = Recorder()

    async def main() -> None:
        async with running_source(recorder) as source:
            out = destination(source.port)
            try:
                responses = await asyncio.gather(*(out.send(message(f"G{i}")) for i in range(30)))
                assert [msa(r.body)[2] for r in responses] == [f"G{i}" for i in range(30)]
            finally:
                await out.close()

    run(main())
    assert len({m.source for m in recorder.messages}) == 1


def test_reply_larger_than_the_limit() -> None:
    async def huge(payload: bytes, peer: Peer) -> bytes:
        return build_ack(parse_header(payload), "AA", text="z" * 5000)

    async def main() -> None:
        async with MLLPServer(huge, "127.0.0.1", 0) as server:
            out = destination(server.port, max_frame_bytes=1024)
            try:
                with pytest.raises(DeliveryError) as info:
                    await out.send(message("L1"))
                assert not info.value.retryable and "max_frame_bytes" in str(info.value)
            finally:
                await out.close()

    run(main())


@pytest.mark.parametrize(
    ("url", "options", "words"),
    [
        ("mllp://:2575", {}, "needs a host"),
        ("mllp://ris:2575", {"idle_timeout": 3}, "options.idle_timeout applies to mllp sources only"),
        ("mllp://ris:2575", {"nak_policy": {"AE": "drop"}}, "options.nak_policy.AE: 'drop' is not one of"),
        ("mllp://ris:2575", {"keepalive": "yes"}, "options.keepalive: 'yes' is not of type 'boolean'"),
        ("mllps://ris:2575", {"tls": {"require_client_cert": True}}, "applies to mllp sources only"),
        ("mllps://ris:2575", {"tls": {"ca": "/no/ca.pem"}}, "/no/ca.pem does not exist"),
    ],
)
def test_bad_destination_configuration(url: str, options: dict[str, Any], words: str) -> None:
    with pytest.raises(ConnectorError, match=re.escape(words)):
        MLLPDestination(name="bad", url=url, options=options, context=ConnectorContext())


def test_registry_builds_the_destination() -> None:
    registry = Registry({"mllp": "ihehub.channels.mllp"})
    dest = registry.build_destination(
        name="d", url="mllp://ris.example:2600", options={}, context=ConnectorContext()
    )
    assert isinstance(dest, MLLPDestination) and (dest.host, dest.port) == ("ris.example", 2600)
    assert dest.nak_policy == {"AE": "dead", "AR": "retry"} and dest.timeout == 30 and dest.ack_timeout == 30
