"""http:// and https:// connectors over real loopback sockets (free ports), plus the API mount path.

The source is exercised on its own uvicorn listener and through a `RouteTable` mounted in a FastAPI
app (httpx ``ASGITransport``).  The destination talks to a scripted HTTP/1.1 receiver written on
``asyncio.start_server`` so every status code and byte on the wire is under the test's control.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, DeliveryError, Outcome
from ihehub.channels.http import SPEC, HTTPDestination, HTTPSource, RouteTable, StatusSet
from ihehub.channels.registry import ConnectorContext, Registry

CORPUS = (Path(__file__).parents[2] / "../shared/corpus/ipf/hl7v2").resolve()
A40 = CORPUS / "mllp-iti8-a40.hl7"  # MSH-10 "_mpi_1dd16f73-...", ADT^A40, \r\n between segments
CTX = ConnectorContext()

# An HL7 v2.5 ADT^A01 in GB18030 whose patient is 张三 (ZHANG San); MSH-18 names the charset.
GB_HL7 = (
    "MSH|^~\\&|HIS|H1|HUB|H0|20240101120000||ADT^A01^ADT_A01|GB-0001|P|2.5|||||CHN|GB 18030-2000\r"
    "PID|1||P001^^^H1||张三^^^^^^L||19800101|M\r"
).encode("gb18030")


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(bounded())


class Hub:
    """A stand-in for the bus: records messages and answers with a scripted outcome."""

    def __init__(self, answer: Outcome | Callable[[Message], Outcome] | Exception | None = None) -> None:
        self.answer = answer
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> Outcome:
        self.messages.append(message)
        if isinstance(self.answer, Exception):
            raise self.answer
        if callable(self.answer):
            return self.answer(message)
        return self.answer or Outcome(code="AA", message_id=message.id)


@contextlib.asynccontextmanager
async def listening(hub: Hub, path: str = "/hl7/in", **options: Any) -> AsyncIterator[HTTPSource]:
    source = HTTPSource(name="his-adt", url=f"http://127.0.0.1:0{path}", options=options, context=CTX)
    await source.start(hub)
    try:
        yield source
    finally:
        await source.stop()


# --------------------------------------------------------------------------- source, own listener


def test_source_accepts_hl7_and_labels_it_from_msh() -> None:
    body = A40.read_bytes()

    async def scenario() -> None:
        hub = Hub()
        async with listening(hub) as source, httpx.AsyncClient() as client:
            reply = await client.post(
                f"http://127.0.0.1:{source.port}/hl7/in?site=a",
                content=body,
                headers={"Content-Type": "application/hl7-v2", "X-Correlation-Id": "corr-1"},
            )
        assert reply.status_code == 200
        (message,) = hub.messages
        assert reply.json() == {"id": message.id, "status": "accepted"}
        assert reply.headers["x-ihehub-message-id"] == message.id
        assert message.channel == "his-adt"
        assert message.raw == body
        assert message.content_type == "application/hl7-v2"
        assert message.control_id == "_mpi_1dd16f73-c85c-4540-857d-8b922f1732de"
        assert message.message_type == "ADT^A40"
        assert message.correlation_id == "corr-1"
        assert message.source is not None and message.source.startswith("127.0.0.1:")
        assert message.headers["http.method"] == "POST"
        assert message.headers["http.path"] == "/hl7/in"
        assert message.headers["http.query"] == "site=a"
        assert message.headers["user-agent"].startswith("python-httpx")

    run(scenario())


def test_source_sniffs_hl7_sent_as_text_and_keeps_other_bodies_as_sent() -> None:
    async def scenario() -> None:
        hub = Hub()
        async with listening(hub, "/in/") as source, httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{source.port}/in"
            hl7 = await client.post(url, content=A40.read_bytes(), headers={"Content-Type": "text/plain"})
            other = await client.post(
                url + "/",
                content=b'{"a": 1}',
                headers={
                    b"Content-Type": b"application/json",
                    b"X-Control-Id": "检查-9".encode(),  # UTF-8 ids arrive intact
                    b"Authorization": b"Bearer s",
                },
            )
        assert (hl7.status_code, other.status_code) == (200, 200)
        first, second = hub.messages
        assert first.content_type == "application/hl7-v2"  # text/plain body starting with MSH|
        assert first.message_type == "ADT^A40"
        assert second.content_type == "application/json"
        assert (second.control_id, second.message_type, second.charset) == ("检查-9", None, None)
        assert "authorization" not in second.headers  # credentials are not stored with messages

    run(scenario())


def test_source_charset_from_content_type_and_from_msh18() -> None:
    no_msh18 = GB_HL7.replace(b"|||||CHN|GB 18030-2000\r", b"\r")
    sent = [
        (no_msh18, "x-application/hl7-v2+er7; charset=GB18030"),  # only the header names it
        (GB_HL7, "application/hl7-v2"),  # only MSH-18 names it
        (GB_HL7, "application/hl7-v2; charset=utf-8"),  # both: MSH-18 describes the message, it wins
        ("张三".encode("gb18030"), 'text/plain; charset="gb18030"'),  # not HL7 at all
    ]

    async def scenario() -> None:
        hub = Hub()
        async with listening(hub) as source, httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{source.port}/hl7/in"
            for body, content_type in sent:
                reply = await client.post(url, content=body, headers={"Content-Type": content_type})
                assert reply.status_code == 200
            bogus = await client.post(
                url, content=GB_HL7, headers={"Content-Type": "text/plain; charset=klingon"}
            )
        assert bogus.status_code == 415
        assert bogus.json()["code"] == "unsupported_charset"
        assert [m.charset for m in hub.messages] == ["gb18030"] * 4
        assert all("张三" in m.text() for m in hub.messages)
        assert [m.control_id for m in hub.messages] == ["GB-0001"] * 3 + [None]
        assert [m.content_type for m in hub.messages] == [
            "x-application/hl7-v2+er7",
            "application/hl7-v2",
            "application/hl7-v2",
            "text/plain",
        ]

    run(scenario())


def test_source_refuses_wrong_method_and_oversized_bodies_before_the_hub_sees_them() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"x" * 400

    async def scenario() -> None:
        hub = Hub()
        async with listening(hub, max_body_bytes=1000) as source, httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{source.port}/hl7/in"
            wrong = await client.put(url, content=b"MSH|")
            declared = await client.post(url, content=b"y" * 1001)
            streamed = await client.post(url, content=chunks())  # chunked: no Content-Length
            exact = await client.post(url, content=b"z" * 1000)
        assert wrong.status_code == 405
        assert wrong.headers["allow"] == "POST"
        assert wrong.json()["code"] == "method_not_allowed"
        assert declared.status_code == 413 and declared.json()["code"] == "payload_too_large"
        assert streamed.status_code == 413
        assert exact.status_code == 200
        assert [m.raw for m in hub.messages] == [b"z" * 1000]

    run(scenario())


def test_source_maps_outcomes_to_status_codes() -> None:
    ack = b"MSH|^~\\&|HUB|H0|HIS|H1|20240101||ACK^A01|A1|P|2.5\rMSA|AE|GB-0001\r"
    answers: dict[str, Outcome | Exception] = {
        "/ae": Outcome(code="AE", error="PID-3 is empty", error_code="101", error_location="PID^1^3"),
        "/ar": Outcome(code="AR", error="database is down"),
        "/boom": RuntimeError("bus exploded"),
        "/ack": Outcome(code="AE", body=ack, content_type="application/hl7-v2"),
    }

    async def scenario() -> dict[str, httpx.Response]:
        replies = {}
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(httpx.AsyncClient())
            for path, answer in answers.items():
                source = await stack.enter_async_context(listening(Hub(answer), path, retry_after=7))
                replies[path] = await client.post(f"http://127.0.0.1:{source.port}{path}", content=GB_HL7)
        return replies

    replies = run(scenario())
    ae = replies["/ae"]
    assert ae.status_code == 400
    assert ae.json()["error"] == "PID-3 is empty"
    assert (ae.json()["code"], ae.json()["location"], ae.json()["status"]) == ("101", "PID^1^3", "error")
    ar = replies["/ar"]
    assert (ar.status_code, ar.headers["retry-after"], ar.json()["status"]) == (503, "7", "rejected")
    boom = replies["/boom"]
    assert (boom.status_code, boom.json()["code"], boom.headers["retry-after"]) == (503, "unavailable", "7")
    assert "exploded" not in boom.text  # internals stay in the log
    body = replies["/ack"]
    assert (body.status_code, body.content, body.headers["content-type"]) == (400, ack, "application/hl7-v2")


def test_source_answers_unknown_paths_with_404_json() -> None:
    async def scenario() -> httpx.Response:
        async with listening(Hub()) as source, httpx.AsyncClient() as client:
            return await client.post(f"http://127.0.0.1:{source.port}/elsewhere", content=b"x")

    reply = run(scenario())
    assert reply.status_code == 404
    assert reply.json() == {"error": "no channel listens on /elsewhere", "code": "not_found"}


def test_source_reports_a_busy_port_clearly() -> None:
    async def scenario() -> None:
        with socket.create_server(("127.0.0.1", 0)) as busy:
            port = busy.getsockname()[1]
            source = HTTPSource(name="x", url=f"http://127.0.0.1:{port}/in", options={}, context=CTX)
            with pytest.raises(ConnectorError, match=f"cannot listen on 127.0.0.1:{port}"):
                await source.start(Hub())

    run(scenario())


# --------------------------------------------------------------------------- source on the API app


def test_sources_on_the_main_port_register_in_the_api_route_table() -> None:
    table = RouteTable(port=8080)
    app = FastAPI()

    @app.get("/api/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.router.default = table.asgi_app
    context = ConnectorContext(http_routes=table)

    async def scenario() -> None:
        source = HTTPSource(name="ris", url="http://0.0.0.0:8080/ris/orders", options={}, context=context)
        hub = Hub()
        await source.start(hub)
        assert table.paths == ["/ris/orders"]
        twin = HTTPSource(name="twin", url="http://0.0.0.0:8080/ris/orders/", options={}, context=context)
        with pytest.raises(ConnectorError, match="already served by channel 'ris'"):
            await twin.start(Hub())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
            assert (await client.get("/api/health")).json() == {"status": "ok"}
            taken = await client.post("/ris/orders", content=A40.read_bytes())
            missing = await client.post("/ris/other", content=b"x")
            await source.stop()
            gone = await client.post("/ris/orders", content=b"x")
        assert taken.status_code == 200 and taken.json()["id"] == hub.messages[0].id
        assert hub.messages[0].control_id == "_mpi_1dd16f73-c85c-4540-857d-8b922f1732de"
        assert (missing.status_code, gone.status_code) == (404, 404)
        assert len(table) == 0

    run(scenario())


def test_main_port_sources_cannot_bring_their_own_tls() -> None:
    context = ConnectorContext(http_routes=RouteTable(port=8443))
    with pytest.raises(ConnectorError, match="main HTTP port"):
        HTTPSource(name="x", url="https://0.0.0.0:8443/in", options={"tls": {"cert": "c"}}, context=context)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("role", "url", "options", "error"),
    [
        ("source", "http://0.0.0.0:0/in", {"max_body_byte": 5}, "did you mean 'max_body_bytes'"),
        ("source", "http://0.0.0.0:0/in", {"timeout": 5}, "unknown option 'timeout'"),
        ("source", "http://0.0.0.0:0/in", {"methods": ["FETCH"]}, r"options\.methods\[0\]"),
        ("source", "http://0.0.0.0:0/in", {"tls": {"cert": "c.pem"}}, "needs an https:// URL"),
        ("source", "https://0.0.0.0:0/in", {}, "needs tls.cert and tls.key"),
        ("source", "https://0.0.0.0:0/in", {"tls": {"cert": "/nope.pem", "key": "/nope.key"}}, "cannot load"),
        ("source", "http://0.0.0.0:port/in", {}, "bad port"),
        ("source", "http://0.0.0.0:80/in?x=1", {}, "no '\\?' or '#'"),
        ("destination", "http:///in", {}, "needs a host"),
        ("destination", "http://ris/in", {"success_status": ["299-200"]}, "is empty"),
        ("destination", "http://ris/in", {"retry_status": ["5XX"]}, r"options\.retry_status\[0\]"),
        ("destination", "http://ris/in", {"tls": {"verify": False}}, "needs an https:// URL"),
        ("destination", "https://ris/in", {"tls": {"ca": "/nope.pem"}}, "cannot load TLS files"),
        ("destination", "ftp://ris/in", {}, "not an http"),
    ],
)
def test_bad_options_get_a_clear_answer(role: str, url: str, options: dict[str, Any], error: str) -> None:
    cls = HTTPSource if role == "source" else HTTPDestination
    with pytest.raises(ConnectorError, match=error):
        cls(name="x", url=url, options=options, context=CTX)


def test_spec_is_a_valid_schema_and_the_registry_builds_both_roles() -> None:
    jsonschema.Draft202012Validator.check_schema(SPEC.options_schema)
    assert set(SPEC.options_schema["properties"]["tls"]["properties"]) == {
        "cert",
        "key",
        "ca",
        "require_client_cert",
        "verify",
        "min_version",
    }
    registry = Registry()
    assert registry.spec("https") is SPEC
    source = registry.build_source(name="s", url="http://127.0.0.1:0/in", options={}, context=CTX)
    dest = registry.build_destination(name="d", url="https://ris.example.org/in", options={}, context=CTX)
    assert isinstance(source, HTTPSource) and isinstance(dest, HTTPDestination)
    run(dest.close())


def test_status_sets() -> None:
    statuses = StatusSet.parse([200, "202-204", "3xx"])
    assert [s for s in (199, 200, 201, 202, 204, 205, 300, 399, 400) if s in statuses] == [
        200,
        202,
        204,
        300,
        399,
    ]


# --------------------------------------------------------------------------- destination


class Receiver:
    """A scripted HTTP/1.1 server on a free loopback port (keep-alive, Content-Length bodies only).

    ``statuses`` are answered in turn (the last one repeats); ``None`` means never answer.
    """

    def __init__(self, *statuses: int | None) -> None:
        self.statuses = list(statuses) or [200]
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    def url(self, path: str = "/in") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _ = head[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((method, target, headers, body))
                status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
                if status is None:
                    await asyncio.sleep(30)
                    continue
                reply = b"" if status in (204, 304) else f"status {status}".encode()  # RFC 9110: no body
                writer.write(
                    f"HTTP/1.1 {status} Scripted\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {len(reply)}\r\n\r\n".encode()
                    + reply
                )
                await writer.drain()


def gb_message(**changes: Any) -> Message:
    fields: dict[str, Any] = {
        "channel": "his-adt",
        "raw": GB_HL7,
        "content_type": "application/hl7-v2",
        "charset": "gb18030",
        "control_id": "GB-0001",
        "correlation_id": "corr-7",
    }
    fields.update(changes)
    return Message(**fields)


def test_destination_posts_the_raw_bytes_with_charset_and_tracing_headers_on_one_connection() -> None:
    async def scenario() -> None:
        async with Receiver(200) as peer:
            dest = HTTPDestination(
                name="ris",
                url=peer.url("/hl7?x=1"),
                options={"headers": {"Authorization": "Bearer t0ken"}},
                context=CTX,
            )
            message = gb_message()
            first = await dest.send(message)
            second = await dest.send(gb_message(control_id=None, correlation_id=None, charset=None))
            await dest.send(gb_message(control_id="检查-7\r\nX-Evil: 1"))
            await dest.close()
        assert (first.ok, first.status, first.body, first.error) == (True, "200", b"status 200", None)
        assert second.ok
        method, target, headers, body = peer.requests[0]
        assert (method, target, body) == ("POST", "/hl7?x=1", GB_HL7)
        assert headers["content-type"] == "application/hl7-v2; charset=gb18030"
        assert headers["x-ihehub-message-id"] == message.id
        assert (headers["x-control-id"], headers["x-correlation-id"]) == ("GB-0001", "corr-7")
        assert headers["authorization"] == "Bearer t0ken"
        assert body.decode(headers["content-type"].split("charset=")[1]).count("张三") == 1
        _, _, plain, _ = peer.requests[1]
        _, _, hanzi, _ = peer.requests[2]
        # UTF-8 on the wire; CR/LF flattened so an id cannot inject a header
        assert hanzi["x-control-id"] == "检查-7  X-Evil: 1".encode().decode("latin-1")
        assert "x-evil" not in hanzi
        assert plain["content-type"] == "application/hl7-v2"
        assert "x-control-id" not in plain and "x-correlation-id" not in plain
        assert peer.connections == 1  # keep-alive

    run(scenario())


@pytest.mark.parametrize(
    ("status", "options", "ok", "retryable"),
    [
        (200, {}, True, True),
        (204, {}, True, True),
        (500, {}, False, True),
        (503, {}, False, True),
        (429, {}, False, True),
        (408, {}, False, True),
        (404, {}, False, False),
        (400, {}, False, False),
        (302, {}, False, False),
        (202, {"success_status": [200]}, False, False),
        (409, {"retry_status": [409]}, False, True),
    ],
)
def test_destination_classifies_status_codes(
    status: int, options: dict[str, Any], ok: bool, retryable: bool
) -> None:
    async def scenario() -> Any:
        async with Receiver(status) as peer:
            dest = HTTPDestination(name="ris", url=peer.url(), options=options, context=CTX)
            try:
                return await dest.send(gb_message())
            finally:
                await dest.close()

    response = run(scenario())
    assert (response.ok, response.status) == (ok, str(status))
    if not ok:
        assert response.retryable is retryable
        assert response.error.endswith(f"/in answered HTTP {status} Scripted: status {status}")


def test_destination_raises_retryable_delivery_errors_for_refused_connections_and_timeouts() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed_port = probe.getsockname()[1]

    async def scenario() -> None:
        url = f"http://hub:s3cret@127.0.0.1:{closed_port}/in"
        refused = HTTPDestination(name="ris", url=url, options={}, context=CTX)
        with pytest.raises(DeliveryError, match=r"cannot reach http://hub:\*\*\*@127\.0\.0\.1") as caught:
            await refused.send(gb_message())
        assert caught.value.retryable
        assert "s3cret" not in str(caught.value)  # passwords in URLs stay out of error texts
        await refused.close()
        async with Receiver(None) as silent:
            slow = HTTPDestination(name="ris", url=silent.url(), options={"timeout": 0.3}, context=CTX)
            with pytest.raises(DeliveryError, match="timed out") as caught:
                await slow.send(gb_message())
            assert caught.value.retryable
            await slow.close()

    run(scenario())


def test_destination_to_source_round_trip_keeps_charset_and_outcome_semantics() -> None:
    verdicts = iter([Outcome(code="AA"), Outcome(code="AE", error="bad PID"), Outcome(code="AR")])

    async def scenario() -> list[Any]:
        hub = Hub(lambda m: next(verdicts))
        async with listening(hub) as source:
            dest = HTTPDestination(
                name="fwd", url=f"http://127.0.0.1:{source.port}/hl7/in", options={}, context=CTX
            )
            try:
                results = [await dest.send(gb_message()) for _ in range(3)]
            finally:
                await dest.close()
        received = hub.messages[0]
        assert (received.charset, received.control_id, received.correlation_id) == (
            "gb18030",
            "GB-0001",
            "corr-7",
        )
        assert "张三" in received.text()
        assert received.headers["x-ihehub-message-id"]  # the upstream hub's id travels along
        return results

    accepted, refused, rejected = run(scenario())
    assert accepted.ok and json.loads(accepted.body)["status"] == "accepted"
    assert (refused.ok, refused.status, refused.retryable) == (False, "400", False)
    assert (rejected.ok, rejected.status, rejected.retryable) == (False, "503", True)


# --------------------------------------------------------------------------- TLS


def _write_pki(folder: Path) -> dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    now = dt.datetime.now(dt.UTC)

    def issue(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name | None,
        issuer_key: ec.EllipticCurvePrivateKey | None,
        *,
        ca: bool = False,
        ip: bool = False,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ip:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        if ca:
            usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
            builder = builder.add_extension(usage, critical=True)
            builder = builder.add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        else:
            assert issuer_key is not None
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
            builder = builder.add_extension(aki, critical=False)
        return builder.sign(issuer_key or key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = issue("ihehub test CA", ca_key, None, None, ca=True)
    paths: dict[str, str] = {}
    for label, ip in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(f"ihehub test {label}", key, ca_cert.subject, ca_key, ip=ip)
        (folder / f"{label}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{label}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        paths[label], paths[f"{label}_key"] = str(folder / f"{label}.pem"), str(folder / f"{label}.key")
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["ca"] = str(folder / "ca.pem")
    return paths


def test_https_source_with_client_certificates_and_https_destination(tmp_path: Path) -> None:
    pki = _write_pki(tmp_path)
    # Relative paths resolve against the hub home.
    context = ConnectorContext(home=str(tmp_path))
    server_tls = {
        "cert": "server.pem",
        "key": "server.key",
        "ca": "ca.pem",
        "require_client_cert": True,
        "min_version": "1.3",
    }

    async def attempt(url: str, tls: dict[str, Any]) -> Any:
        dest = HTTPDestination(name="edge", url=url, options={"tls": tls}, context=context)
        try:
            return await dest.send(gb_message())
        except DeliveryError as exc:
            return exc
        finally:
            await dest.close()

    async def scenario() -> list[Any]:
        hub = Hub()
        source = HTTPSource(
            name="centre", url="https://127.0.0.1:0/hl7/in", options={"tls": server_tls}, context=context
        )
        await source.start(hub)
        try:
            url = f"https://127.0.0.1:{source.port}/hl7/in"
            return [
                await attempt(url, {"ca": pki["ca"], "cert": pki["client"], "key": pki["client_key"]}),
                await attempt(url, {"ca": "ca.pem"}),  # no client certificate
                await attempt(url, {"cert": "client.pem", "key": "client.key"}),  # CA not trusted
                len(hub.messages),
            ]
        finally:
            await source.stop()

    mutual, anonymous, untrusted, received = run(scenario())
    assert mutual.ok and mutual.status == "200"
    assert isinstance(anonymous, DeliveryError) and anonymous.retryable
    assert isinstance(untrusted, DeliveryError) and untrusted.retryable
    assert received == 1
