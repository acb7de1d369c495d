"""mllps://: TLS >= 1.2 with required client certificates (IHE ITI-19), over loopback."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from ihehub.bus.message import Message
from ihehub.channels.base import DeliveryError
from ihehub.channels.mllp import MLLPDestination, mllp_send
from ihehub.channels.registry import ConnectorContext
from tests.channels.mllp_testkit import Recorder, adt, make_pki, msa, run, running_source


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_context(
    pki: dict[str, str], *, with_cert: bool, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    if with_cert:
        ctx.load_cert_chain(pki["client"], pki["client_key"])
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def tls_options(pki: dict[str, str], **extra: object) -> dict[str, object]:
    return {"tls": {"cert": pki["server"], "key": pki["server_key"], "ca": pki["ca"], **extra}}


async def rejected(port: int, ctx: ssl.SSLContext | None) -> BaseException | None:
    """Try one exchange; return the error it ended with (None if it got an answer)."""
    try:
        await mllp_send(
            "127.0.0.1", port, [adt("BAD").encode()], ssl=ctx, timeout=3, server_hostname="localhost"
        )
    except (OSError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError) as exc:
        return exc
    return None


def test_required_client_certificate(pki: dict[str, str]) -> None:
    events: list[tuple[str, str, str]] = []
    recorder = Recorder()

    async def main() -> None:
        async with running_source(
            recorder,
            tls_options(pki, require_client_cert=True),
            url="mllps://127.0.0.1:0",
            on_security_event=lambda *e: events.append(e),
        ) as src:
            good = client_context(pki, with_cert=True)
            [ack] = await mllp_send(
                "127.0.0.1", src.port, [adt("T1").encode()], ssl=good, server_hostname="localhost"
            )
            assert msa(ack)[1:3] == ["AA", "T1"]
            assert await rejected(src.port, client_context(pki, with_cert=False)) is not None
            for _ in range(50):  # the server notices the failed handshake shortly after the client
                if events:
                    break
                await asyncio.sleep(0.02)
            acks = await mllp_send(
                "127.0.0.1",
                src.port,
                [adt("T2").encode(), adt("T3").encode()],
                ssl=good,
                server_hostname="localhost",
            )
            assert [msa(a)[2] for a in acks] == ["T2", "T3"]  # still serving

    run(main())
    assert [m.control_id for m in recorder.messages] == ["T1", "T2", "T3"]
    assert recorder.messages[0].headers["mllp.tls.subject"] == "commonName=RIS-1"
    assert recorder.messages[0].headers["mllp.tls"] in ("TLSv1.2", "TLSv1.3")
    assert events and events[0][0] == "tls-handshake-failed"
    assert events[0][1].startswith("127.0.0.1:") and "certificate" in events[0][2].lower()


def test_plain_tcp_client_on_a_tls_port(pki: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    events: list[tuple[str, str, str]] = []

    async def main() -> None:
        async with running_source(
            options=tls_options(pki), url="mllps://127.0.0.1:0", on_security_event=lambda *e: events.append(e)
        ) as src:
            assert await rejected(src.port, None) is not None
            [ack] = await mllp_send(
                "127.0.0.1",
                src.port,
                [adt("P1").encode()],
                ssl=client_context(pki, with_cert=False),
                server_hostname="localhost",
            )
            assert msa(ack)[1:3] == ["AA", "P1"]  # optional client certificate: accepted without one

    run(main())
    assert [e[0] for e in events] == ["tls-handshake-failed"]
    assert any("TLS handshake with 127.0.0.1:" in r.getMessage() for r in caplog.records)


def test_min_version_13_refuses_tls12_clients(pki: dict[str, str]) -> None:
    async def main() -> None:
        async with running_source(
            options=tls_options(pki, min_version="1.3"), url="mllps://127.0.0.1:0"
        ) as src:
            old = client_context(pki, with_cert=True, max_version=ssl.TLSVersion.TLSv1_2)
            assert await rejected(src.port, old) is not None
            [ack] = await mllp_send(
                "127.0.0.1",
                src.port,
                [adt("V1").encode()],
                ssl=client_context(pki, with_cert=True),
                server_hostname="localhost",
            )
            assert msa(ack)[1] == "AA"

    run(main())


def test_destination_over_mutual_tls(pki: dict[str, str], tmp_path: Path) -> None:
    recorder = Recorder()

    async def main() -> None:
        async with running_source(
            recorder, tls_options(pki, require_client_cert=True), url="mllps://127.0.0.1:0"
        ) as src:
            # hub-wide TLS settings (context.tls) give the client certificate; the channel names the CA
            context = ConnectorContext(
                home=str(tmp_path), tls={"cert": pki["client"], "key": pki["client_key"]}
            )
            out = MLLPDestination(
                name="o",
                url=f"mllps://127.0.0.1:{src.port}",
                options={"tls": {"ca": pki["ca"], "server_hostname": "localhost"}},
                context=context,
            )
            try:
                raw = adt("M1").encode()
                response = await out.send(Message(channel="c", raw=raw, control_id="M1"))
                assert response.ok and msa(response.body)[2] == "M1"
            finally:
                await out.close()
            anonymous = MLLPDestination(
                name="o2",
                url=f"mllps://127.0.0.1:{src.port}",
                options={"tls": {"ca": pki["ca"]}},
                context=ConnectorContext(),
            )
            try:
                with pytest.raises(DeliveryError) as info:
                    await anonymous.send(Message(channel="c", raw=adt("M2").encode(), control_id="M2"))
                assert info.value.retryable
            finally:
                await anonymous.close()

    run(main())
    assert [m.control_id for m in recorder.messages] == ["M1"]


def test_destination_refuses_an_unknown_server_certificate(pki: dict[str, str], tmp_path: Path) -> None:
    other = make_pki(tmp_path)  # a different CA

    async def main() -> None:
        async with running_source(options=tls_options(pki), url="mllps://127.0.0.1:0") as src:
            strict = MLLPDestination(
                name="s",
                url=f"mllps://127.0.0.1:{src.port}",
                options={"tls": {"ca": other["ca"]}},
                context=ConnectorContext(),
            )
            lax = MLLPDestination(
                name="l",
                url=f"mllps://localhost:{src.port}",
                options={"tls": {"verify": False}},
                context=ConnectorContext(),
            )
            try:
                with pytest.raises(DeliveryError, match="cannot connect"):
                    await strict.send(Message(channel="c", raw=adt("U1").encode(), control_id="U1"))
                assert (await lax.send(Message(channel="c", raw=adt("U2").encode(), control_id="U2"))).ok
            finally:
                await strict.close()
                await lax.close()

    run(main())
