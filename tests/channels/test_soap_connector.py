"""soap:// and soaps:// connectors over real loopback sockets.

The destination calls `SoapService` (tests/channels/soap_kit.py), an aiohttp web service that checks the
WS-Security digest on its own; the source runs on its own uvicorn listener and is called with raw httpx
requests (no SOAP library), including broken XML, an XXE attempt, a wrong password and mustUnderstand.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from lxml import etree

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, DeliveryError, Outcome
from ihehub.channels.registry import ConnectorContext, Registry
from ihehub.channels.soap import SPEC, SoapDestination, SoapSource, parse_fault
from ihehub.soap.fault import SoapFault
from ihehub.soap.wssecurity import Credentials, NonceCache, security_header, verify_security
from tests.channels.soap_kit import HIS, S11, S12, WSA, WSSE, WSU, SoapService, fault11, fault12, info

CTX = ConnectorContext()
ZH_PAYLOAD = (f'<his:Patient xmlns:his="{HIS}" id="P1"><his:Name>张三</his:Name><his:Dept>放射科</his:Dept>'
              "</his:Patient>")
ACTION = "urn:example:his:AddPatient"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, 30)

    return asyncio.run(bounded())


def xml_message(xml: str, *, encoding: str = "utf-8", declare: bool = True, **changes: Any) -> Message:
    text = f'<?xml version="1.0" encoding="{encoding.upper()}"?>{xml}' if declare else xml
    return Message(channel="his", raw=text.encode(encoding), content_type="application/xml", charset=encoding,
                   **changes)


def patient(test: str = "", pid: str = "P1") -> Message:
    return xml_message(f'<his:Patient xmlns:his="{HIS}" id="{pid}" test="{test}"><his:Name>李四</his:Name>'
                       "</his:Patient>")


# --------------------------------------------------------------------------- destination


def test_destination_soap12_with_addressing_digest_token_and_timestamp_in_gb18030() -> None:
    async def scenario() -> None:
        async with SoapService(username="hub", password="s3cret-密码") as svc:
            dest = SoapDestination(name="his.emr", url=svc.url(), context=CTX, options={
                "action": ACTION, "username": "hub", "password": "s3cret-密码", "password_type": "digest",
                "timestamp_ttl": 120})
            try:
                declared = await dest.send(xml_message(ZH_PAYLOAD, encoding="gb18030"))
                undeclared = await dest.send(xml_message(ZH_PAYLOAD, encoding="gb18030", declare=False))
            finally:
                await dest.close()
        assert svc.auth_failures == 0
        for resp in (declared, undeclared):
            assert resp.ok and resp.status == "200"
            result = etree.fromstring(resp.body)
            assert etree.QName(result).localname == "Result" and result.text == "OK 张三放射科"
        first, second = svc.seen
        assert etree.QName(first.root).namespace == S12
        assert first.headers["content-type"].startswith(f'application/soap+xml; action="{ACTION}"')
        addressing = info(first)
        assert addressing["action"] == ACTION and addressing["to"] == svc.url("http")
        assert addressing["reply_to"] == "http://www.w3.org/2005/08/addressing/anonymous"
        assert addressing["message_id"].startswith("urn:uuid:")
        assert addressing["message_id"] != info(second)["message_id"]
        security = first.header(WSSE, "Security")
        assert security is not None and security.get(f"{{{S12}}}mustUnderstand") == "true"
        created = security.findtext(f"{{{WSU}}}Timestamp/{{{WSU}}}Created")
        expires = security.findtext(f"{{{WSU}}}Timestamp/{{{WSU}}}Expires")
        assert created and expires
        span = dt.datetime.fromisoformat(expires) - dt.datetime.fromisoformat(created)
        assert span == dt.timedelta(seconds=120)
        nonces = {s.header(WSSE, "Security").findtext(f"{{{WSSE}}}UsernameToken/{{{WSSE}}}Nonce")  # type: ignore[union-attr]
                  for s in svc.seen}
        assert len(nonces) == 2  # a fresh nonce per request
        assert first.payload.findtext(f"{{{HIS}}}Name") == "张三"

    run(scenario())


def test_destination_soap11_sends_soapaction_and_password_text_and_action_from_the_message() -> None:
    async def scenario() -> None:
        async with SoapService(username="hub", password="pw") as svc:
            dest = SoapDestination(name="his.emr", url=svc.url(), context=CTX, options={
                "version": "1.1", "username": "hub", "password": "pw", "password_type": "text"})
            try:
                resp = await dest.send(patient().evolve(headers={"soap.action": "urn:from-the-message"}))
            finally:
                await dest.close()
        assert resp.ok, resp
        (seen,) = svc.seen
        assert etree.QName(seen.root).namespace == S11
        assert seen.headers["soapaction"] == '"urn:from-the-message"'
        assert seen.headers["content-type"].startswith("text/xml")
        assert info(seen)["action"] == "urn:from-the-message"
        assert seen.header(WSSE, "Security").get(f"{{{S11}}}mustUnderstand") == "1"  # type: ignore[union-attr]

    run(scenario())


def test_destination_maps_faults_and_statuses_to_retry_or_dead_letter() -> None:
    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with SoapService(username="hub", password="pw") as svc:
            good = SoapDestination(name="emr", url=svc.url(), context=CTX,
                                   options={"action": ACTION, "username": "hub", "password": "pw"})
            wrong = SoapDestination(name="emr", url=svc.url(), context=CTX,
                                    options={"action": ACTION, "username": "hub", "password": "nope"})
            try:
                for mode in ("sender", "receiver", "client11"):
                    with pytest.raises(DeliveryError) as caught:
                        await good.send(patient(mode, pid=mode))
                    out[mode] = caught.value
                out["503"] = await good.send(patient("503x1", pid="busy"))
                out["503-again"] = await good.send(patient("503x1", pid="busy"))
                with pytest.raises(DeliveryError) as caught:
                    await wrong.send(patient())
                out["auth"] = caught.value
                with pytest.raises(DeliveryError) as caught:
                    await good.send(Message(channel="his", raw=b"MSH|^~\\&|not xml"))
                out["not-xml"] = caught.value
            finally:
                await good.close()
                await wrong.close()
        # the service is gone now: connection refused
        dead_end = SoapDestination(name="emr", url=svc.url(), context=CTX, options={"action": ACTION})
        try:
            with pytest.raises(DeliveryError) as caught:
                await dead_end.send(patient())
            out["refused"] = caught.value
        finally:
            await dead_end.close()
        return out

    out = run(scenario())
    sender = out["sender"]
    assert not sender.retryable
    assert "SOAP fault Sender/UnknownPatient: patient id unknown (HTTP 400)" in str(sender)
    assert sender.response and b"UnknownPatient" in sender.response
    assert out["receiver"].retryable and "Receiver: database locked" in str(out["receiver"])
    assert not out["client11"].retryable and "SOAP fault Client: bad request" in str(out["client11"])
    busy = out["503"]
    assert not busy.ok and busy.retryable and busy.status == "503"
    assert out["503-again"].ok
    assert not out["auth"].retryable and "FailedAuthentication" in str(out["auth"])
    assert not out["not-xml"].retryable and "is not XML" in str(out["not-xml"])
    assert out["refused"].retryable and "cannot reach" in str(out["refused"])


def _wsdl(address: str, *, soap12: bool) -> bytes:
    b = "http://schemas.xmlsoap.org/wsdl/soap12/" if soap12 else "http://schemas.xmlsoap.org/wsdl/soap/"
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<wsdl:definitions xmlns:wsdl="http://schemas.xmlsoap.org/wsdl/" xmlns:soap="{b}" xmlns:tns="{HIS}"
    xmlns:wsam="http://www.w3.org/2007/05/addressing/metadata" targetNamespace="{HIS}">
  <wsdl:message name="PatientIn"/><wsdl:message name="PatientOut"/>
  <wsdl:portType name="PatientPort">
    <wsdl:operation name="AddPatient">
      <wsdl:input message="tns:PatientIn"{' wsam:Action="urn:wsam:AddPatient"' if soap12 else ''}/>
      <wsdl:output message="tns:PatientOut"/>
    </wsdl:operation>
    <wsdl:operation name="MergePatient"><wsdl:input message="tns:PatientIn"/></wsdl:operation>
  </wsdl:portType>
  <wsdl:binding name="PatientBinding" type="tns:PatientPort">
    <soap:binding transport="http://schemas.xmlsoap.org/soap/http"/>
    <wsdl:operation name="AddPatient"><soap:operation soapAction="urn:soapAction:AddPatient"/></wsdl:operation>
    <wsdl:operation name="MergePatient"><soap:operation soapAction="urn:soapAction:MergePatient"/></wsdl:operation>
  </wsdl:binding>
  <wsdl:service name="PatientService">
    <wsdl:port name="PatientPort" binding="tns:PatientBinding"><soap:address location="{address}"/></wsdl:port>
  </wsdl:service>
</wsdl:definitions>""".encode()


def test_destination_resolves_the_operation_from_a_wsdl_file_or_url(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with SoapService() as svc:
            (tmp_path / "his.wsdl").write_bytes(_wsdl(svc.url("http"), soap12=False))
            svc.wsdl = _wsdl(svc.url("http"), soap12=True)
            ctx = ConnectorContext(home=str(tmp_path))
            from_file = SoapDestination(name="emr", url="soap:///", context=ctx,
                                        options={"wsdl": "his.wsdl", "operation": "MergePatient"})
            from_url = SoapDestination(name="emr", url=svc.url(), context=ctx,
                                       options={"wsdl": svc.url("http") + "?wsdl", "operation": "AddPatient"})
            missing = SoapDestination(name="emr", url=svc.url(), context=ctx,
                                      options={"wsdl": svc.url("http") + "?wsdl", "operation": "Nope"})
            try:
                assert (await from_file.send(patient())).ok
                assert (await from_url.send(patient())).ok
                with pytest.raises(DeliveryError) as caught:
                    await missing.send(patient())
                assert not caught.value.retryable
                assert "no SOAP operation 'Nope' (operations: AddPatient, MergePatient)" in str(caught.value)
            finally:
                for d in (from_file, from_url, missing):
                    await d.close()
        soap11, soap12 = svc.seen
        assert etree.QName(soap11.root).namespace == S11
        assert soap11.headers["soapaction"] == '"urn:soapAction:MergePatient"'
        assert etree.QName(soap12.root).namespace == S12
        assert info(soap12)["action"] == "urn:wsam:AddPatient"  # WS-Addressing Metadata wins over soapAction

    run(scenario())
    with pytest.raises(ConnectorError, match="no SOAP operation 'Typo'"):
        SoapDestination(name="emr", url="soap:///", context=ConnectorContext(home=str(tmp_path)),
                        options={"wsdl": "his.wsdl", "operation": "Typo"})


def test_destination_sends_a_ready_envelope_adding_the_security_header() -> None:
    envelope = (f'<e:Envelope xmlns:e="{S12}" xmlns:wsa="{WSA}"><e:Header><wsa:Action>urn:own</wsa:Action>'
                f'</e:Header><e:Body>{ZH_PAYLOAD}</e:Body></e:Envelope>')

    async def scenario() -> None:
        async with SoapService(username="hub", password="pw") as svc:
            dest = SoapDestination(name="emr", url=svc.url(), context=CTX,
                                   options={"username": "hub", "password": "pw"})
            try:
                resp = await dest.send(xml_message(envelope))
            finally:
                await dest.close()
        assert resp.ok, resp
        (seen,) = svc.seen
        assert 'action="urn:own"' in seen.headers["content-type"]
        assert seen.header(WSSE, "Security") is not None and info(seen)["message_id"] is None

    run(scenario())


def test_parse_fault_reads_both_versions() -> None:
    f12 = parse_fault(fault12("Sender", "bad", (WSSE, "FailedAuthentication")))
    assert f12 is not None and f12.permanent and f12.reason == "bad"
    assert f12.describe() == "SOAP fault Sender/FailedAuthentication: bad"
    f11 = parse_fault(fault11("Server", "later"))
    assert f11 is not None and not f11.permanent
    assert parse_fault(b"<ok/>") is None and parse_fault(b"not xml") is None and parse_fault(b"") is None


# --------------------------------------------------------------------------- WS-Security building blocks


def test_username_token_digest_round_trip_replay_and_expiry() -> None:
    creds = Credentials("hub", "pw")
    now = time.time()
    header = etree.Element(f"{{{S12}}}Header")
    header.append(security_header(soap_ns=S12, username="hub", password="pw", digest=True, timestamp_ttl=60,
                                  now=now, nonce=b"0123456789abcdef"))
    token = header.find(f"{{{WSSE}}}Security/{{{WSSE}}}UsernameToken")
    assert token is not None
    created = token.findtext(f"{{{WSU}}}Created") or ""
    expected = base64.b64encode(hashlib.sha1(b"0123456789abcdef" + created.encode() + b"pw").digest()).decode()
    assert token.findtext(f"{{{WSSE}}}Password") == expected
    nonces = NonceCache(300)
    assert verify_security(header, credentials=creds, nonces=nonces, now=now).username == "hub"
    with pytest.raises(SoapFault, match="used before"):
        verify_security(header, credentials=creds, nonces=nonces, now=now + 1)
    with pytest.raises(SoapFault) as caught:
        verify_security(header, credentials=creds, now=now + 200)
    assert caught.value.subcode == (WSSE, "MessageExpired")
    with pytest.raises(SoapFault) as caught:
        verify_security(header, credentials=Credentials("hub", "other"), now=now)
    assert caught.value.subcode == (WSSE, "FailedAuthentication")
    with pytest.raises(SoapFault, match="PasswordText only"):
        verify_security(header, credentials=Credentials("hub", "pw", "text"), now=now)
    with pytest.raises(SoapFault, match="required"):
        verify_security(None, credentials=creds)


# --------------------------------------------------------------------------- source


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
async def endpoint(hub: Hub, context: ConnectorContext = CTX, **options: Any) -> AsyncIterator[str]:
    source = SoapSource(name="his-ws", url="soap://127.0.0.1:0/ws/his", options=options, context=context)
    await source.start(hub)
    try:
        yield f"http://127.0.0.1:{source.port}/ws/his"
    finally:
        await source.stop()


def envelope12(payload: str, *, headers: str = "", action: str = ACTION, message_id: str = "urn:uuid:1") -> str:
    return (f'<env:Envelope xmlns:env="{S12}" xmlns:wsa="{WSA}"><env:Header>'
            f'<wsa:Action env:mustUnderstand="true">{action}</wsa:Action><wsa:MessageID>{message_id}</wsa:MessageID>'
            f"{headers}</env:Header><env:Body>{payload}</env:Body></env:Envelope>")


def digest_security(username: str, password: str, *, nonce: bytes = b"nonce-0123456789") -> str:
    created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    digest = base64.b64encode(hashlib.sha1(nonce + created.encode() + password.encode()).digest()).decode()
    pw_type = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordDigest"
    return (f'<wsse:Security xmlns:wsse="{WSSE}" xmlns:wsu="{WSU}" env:mustUnderstand="true">'
            f"<wsu:Timestamp><wsu:Created>{created}</wsu:Created></wsu:Timestamp>"
            f"<wsse:UsernameToken><wsse:Username>{username}</wsse:Username>"
            f'<wsse:Password Type="{pw_type}">{digest}</wsse:Password>'
            f"<wsse:Nonce>{base64.b64encode(nonce).decode()}</wsse:Nonce><wsu:Created>{created}</wsu:Created>"
            "</wsse:UsernameToken></wsse:Security>")


SOAP12_CT = f'application/soap+xml; charset=utf-8; action="{ACTION}"'


def fault_of(reply: httpx.Response) -> tuple[str, str, str]:
    root = etree.fromstring(reply.content)
    ns = {"env": S12}
    return (root.findtext("env:Body/env:Fault/env:Code/env:Value", namespaces=ns) or "",
            root.findtext("env:Body/env:Fault/env:Code/env:Subcode/env:Value", namespaces=ns) or "",
            root.findtext("env:Body/env:Fault/env:Reason/env:Text", namespaces=ns) or "")


def test_source_takes_the_body_payload_checks_the_digest_and_acknowledges_after_commit() -> None:
    events: list[tuple[str, str, str]] = []
    ctx = ConnectorContext(on_security_event=lambda *e: events.append(e))

    async def scenario() -> None:
        hub = Hub()
        async with endpoint(hub, ctx, username="his", password="门诊-pw") as url, httpx.AsyncClient() as client:
            body = envelope12(ZH_PAYLOAD, headers=digest_security("his", "门诊-pw")).encode()
            ok = await client.post(url, content=body, headers={"Content-Type": SOAP12_CT})
            replay = await client.post(url, content=body, headers={"Content-Type": SOAP12_CT})
        assert ok.status_code == 200, ok.text
        assert ok.headers["content-type"].startswith("application/soap+xml; charset=utf-8")
        assert f'action="{ACTION}Response"' in ok.headers["content-type"]
        (message,) = hub.messages
        assert message.raw.startswith(b"<?xml") and "张三" in message.raw.decode("utf-8")
        assert etree.QName(etree.fromstring(message.raw)).text == f"{{{HIS}}}Patient"
        assert b"Security" not in message.raw and message.content_type == "application/xml"
        assert message.charset == "utf-8" and message.control_id == "urn:uuid:1"
        assert message.message_type == "Patient"
        assert message.headers["soap.action"] == ACTION and message.headers["soap.version"] == "1.2"
        assert message.headers["wsse.username"] == "his"
        reply = etree.fromstring(ok.content)
        assert reply.findtext(f"{{{S12}}}Header/{{{WSA}}}RelatesTo") == "urn:uuid:1"
        assert reply.findtext(f"{{{S12}}}Header/{{{WSA}}}Action") == ACTION + "Response"
        ack = reply.find(f"{{{S12}}}Body/{{urn:ihehub:soap:1}}Acknowledgement")
        assert ack is not None and ack.get("messageId") == message.id == ok.headers["x-ihehub-message-id"]
        assert replay.status_code == 400 and fault_of(replay)[1].endswith(":FailedAuthentication")
        assert "used before" in fault_of(replay)[2] and len(hub.messages) == 1
        assert events and events[0][0] == "soap-authentication" and events[0][1].startswith("127.0.0.1:")

    run(scenario())


def test_source_refuses_bad_xml_xxe_wrong_password_and_unknown_must_understand_headers(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-PATIENT-LIST")
    xxe = (f'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file://{secret}">]>'
           + envelope12(f'<his:Patient xmlns:his="{HIS}">&x;</his:Patient>'))
    must = envelope12(ZH_PAYLOAD, headers='<x:Routing xmlns:x="urn:x" env:mustUnderstand="true">a</x:Routing>')
    events: list[tuple[str, str, str]] = []
    ctx = ConnectorContext(on_security_event=lambda *e: events.append(e))

    async def scenario() -> dict[str, httpx.Response]:
        hub = Hub()
        out = {}
        async with endpoint(hub, ctx, username="his", password="pw") as url, httpx.AsyncClient() as client:
            async def post(body: str | bytes, ctype: str = SOAP12_CT) -> httpx.Response:
                data = body.encode() if isinstance(body, str) else body
                return await client.post(url, content=data, headers={"Content-Type": ctype})
            good = digest_security("his", "pw", nonce=b"n2")
            out["bad-xml"] = await post("<env:Envelope xmlns:env='x'><unclosed>")
            out["xxe"] = await post(xxe)
            out["wrong"] = await post(envelope12(ZH_PAYLOAD, headers=digest_security("his", "guess")))
            out["none"] = await post(envelope12(ZH_PAYLOAD))
            out["must"] = await post(must.replace("</env:Header>", good + "</env:Header>"))
            out["json"] = await post('{"a": 1}', "application/json")
            out["get"] = await client.get(url)
            soap11 = (f'<s:Envelope xmlns:s="{S11}"><s:Body><his:P xmlns:his="{HIS}"/></s:Body></s:Envelope>')
            out["soap11-no-auth"] = await post(soap11, "text/xml; charset=utf-8")
        assert hub.messages == []
        async with endpoint(hub, understood=["{urn:x}Routing"]) as url, httpx.AsyncClient() as client:
            out["understood"] = await client.post(url, content=must.encode(), headers={"Content-Type": SOAP12_CT})
        return out

    out = run(scenario())
    assert out["bad-xml"].status_code == 400 and "not well-formed" in fault_of(out["bad-xml"])[2]
    assert out["xxe"].status_code == 400 and "DTD" in fault_of(out["xxe"])[2]
    assert b"TOP-SECRET" not in out["xxe"].content
    for key in ("wrong", "none"):
        assert out[key].status_code == 400
        code, sub, _reason = fault_of(out[key])
        assert code == "env:Sender" and sub.endswith(":FailedAuthentication"), (code, sub)
    assert "wrong" in fault_of(out["wrong"])[2] and "guess" not in out["wrong"].text
    assert len(events) == 3 and all(e[0] == "soap-authentication" for e in events)  # wrong, none, soap11
    assert out["must"].status_code == 500 and fault_of(out["must"])[0] == "env:MustUnderstand"
    assert b"NotUnderstood" in out["must"].content and b"Routing" in out["must"].content
    assert out["json"].status_code == 400 and "unsupported Content-Type" in fault_of(out["json"])[2]
    assert out["get"].status_code == 405 and out["get"].headers["allow"] == "POST"
    soap11 = out["soap11-no-auth"]
    assert soap11.status_code == 500 and soap11.headers["content-type"].startswith("text/xml")
    assert etree.fromstring(soap11.content).findtext(".//faultcode") == "wsse:FailedAuthentication"
    parsed = parse_fault(soap11.content)
    assert parsed is not None and parsed.permanent and parsed.describe().startswith("SOAP fault FailedAuthentication")
    assert out["understood"].status_code == 200


def test_source_reads_gb18030_envelopes_and_keeps_the_whole_envelope_on_request() -> None:
    body = envelope12(ZH_PAYLOAD, headers=digest_security("his", "pw"))

    async def scenario() -> tuple[Hub, list[httpx.Response]]:
        hub = Hub()
        async with endpoint(hub, username="his", password="pw", message="envelope") as url, \
                httpx.AsyncClient() as client:
            declared = ('<?xml version="1.0" encoding="GB18030"?>' + body).encode("gb18030")
            by_header = body.replace("nonce-0123456789", "x").encode("gb18030")
            replies = [
                await client.post(url, content=declared, headers={"Content-Type": SOAP12_CT}),
                await client.post(url, content=envelope12(ZH_PAYLOAD, headers=digest_security(
                    "his", "pw", nonce=b"other")).encode("gb18030"),
                    headers={"Content-Type": 'application/soap+xml; charset="GB18030"'}),
                await client.post(url, content=by_header[:-20] + b"\xff\xfe garbage",
                                  headers={"Content-Type": "application/soap+xml; charset=x-klingon"}),
            ]
        return hub, replies

    hub, replies = run(scenario())
    assert [r.status_code for r in replies] == [200, 200, 400]
    assert "unknown charset" in fault_of(replies[2])[2]
    for message in hub.messages:
        assert message.content_type == "application/soap+xml" and message.charset == "utf-8"
        root = etree.fromstring(message.raw)
        assert root.find(f"{{{S12}}}Header/{{{WSSE}}}Security") is None  # the password digest is not stored
        assert root.find(f"{{{S12}}}Header/{{{WSA}}}Action") is not None
        assert root.findtext(f".//{{{HIS}}}Name") == "张三"


def test_source_maps_the_hubs_outcome_to_response_or_fault() -> None:
    def answer(message: Message) -> Outcome:
        kind = etree.fromstring(message.raw).get("test")
        if kind == "ae":
            return Outcome(code="AE", message_id=message.id, error="PID-3 missing")
        if kind == "ar":
            return Outcome(code="AR", error="message store unavailable")
        if kind == "actor":
            return Outcome(code="AA", message_id=message.id, body=f'<r:Done xmlns:r="{HIS}">完成</r:Done>'.encode())
        return Outcome(code="AA", message_id=message.id)

    async def scenario() -> dict[str, httpx.Response]:
        out = {}
        async with endpoint(Hub(answer), ack='<a:Ok xmlns:a="urn:a" id="{message_id}"/>') as url, \
                httpx.AsyncClient() as client:
            for kind in ("ae", "ar", "actor", "aa"):
                payload = f'<his:P xmlns:his="{HIS}" test="{kind}"/>'
                out[kind] = await client.post(url, content=envelope12(payload).encode(),
                                              headers={"Content-Type": SOAP12_CT})
        async with endpoint(Hub(RuntimeError("db down"))) as url, httpx.AsyncClient() as client:
            out["crash"] = await client.post(url, content=envelope12("<p/>").encode(),
                                             headers={"Content-Type": SOAP12_CT})
        return out

    out = run(scenario())
    assert out["ae"].status_code == 400
    assert fault_of(out["ae"]) == ("env:Sender", "sub:MessageRejected", "PID-3 missing")
    assert out["ar"].status_code == 500 and out["ar"].headers["retry-after"] == "5"
    assert fault_of(out["ar"])[:2] == ("env:Receiver", "sub:Unavailable")
    assert etree.fromstring(out["actor"].content).findtext(f".//{{{HIS}}}Done") == "完成"
    ok = etree.fromstring(out["aa"].content).find(".//{urn:a}Ok")
    assert ok is not None and ok.get("id") == out["aa"].headers["x-ihehub-message-id"]
    assert out["crash"].status_code == 500 and "retry later" in fault_of(out["crash"])[2]


def test_destination_to_source_round_trip_with_digest_and_soap11() -> None:
    async def scenario() -> tuple[Hub, list[Any]]:
        hub = Hub()
        async with endpoint(hub, username="u", password="p", password_type="digest", require_timestamp=True) as url:
            target = url.replace("http://", "soap://")
            results: list[Any] = []
            for version in ("1.2", "1.1"):
                dest = SoapDestination(name="x", url=target, context=CTX, options={
                    "action": ACTION, "version": version, "username": "u", "password": "p", "timestamp_ttl": 60})
                try:
                    results.append(await dest.send(xml_message(ZH_PAYLOAD)))
                finally:
                    await dest.close()
            wrong = SoapDestination(name="x", url=target, context=CTX, options={
                "action": ACTION, "username": "u", "password": "bad", "timestamp_ttl": 60})
            try:
                with pytest.raises(DeliveryError) as caught:
                    await wrong.send(xml_message(ZH_PAYLOAD))
                results.append(caught.value)
            finally:
                await wrong.close()
        return hub, results

    hub, (r12, r11, refused) = run(scenario())
    assert r12.ok and r11.ok
    assert [m.headers["soap.version"] for m in hub.messages] == ["1.2", "1.1"]
    assert all("张三" in m.raw.decode() for m in hub.messages)
    assert etree.QName(etree.fromstring(r12.body)).localname == "Acknowledgement"
    assert not refused.retryable and "FailedAuthentication" in str(refused)


# --------------------------------------------------------------------------- options and registry


@pytest.mark.parametrize(("role", "url", "options", "error"), [
    ("destination", "soap://h/x", {"usrname": "a"}, "did you mean 'username'"),
    ("destination", "soap://h/x", {"username": "a"}, "password"),
    ("destination", "soap:///", {}, "has no host"),
    ("destination", "soap://h/x", {"operation": "A"}, "wsdl"),
    ("destination", "soap://h/x", {"version": "1.3"}, "options.version"),
    ("destination", "soap://h/x", {"tls": {"ca": "x.pem"}}, "https:// URL"),
    ("source", "soap://0.0.0.0:1/x", {"ack": "<unclosed"}, "options.ack is not XML"),
    ("source", "soap://0.0.0.0:1/x", {"tls": {"cert": "a"}}, "soaps:// URL"),
    ("source", "soap://0.0.0.0:1/x?q=1", {}, "no '?'"),
    ("source", "soap://0.0.0.0:1/x", {"understood": ["Routing"]}, "options.understood[0]"),
])
def test_bad_options_get_a_clear_answer(role: str, url: str, options: dict[str, Any], error: str) -> None:
    cls = SoapSource if role == "source" else SoapDestination
    with pytest.raises(ConnectorError, match=error.replace("?", r"\?").replace("[", r"\[")):
        cls(name="c", url=url, options=options, context=CTX)


def test_spec_is_a_valid_schema_and_the_registry_builds_both_roles() -> None:
    jsonschema.Draft202012Validator.check_schema(SPEC.options_schema)
    validator = jsonschema.Draft202012Validator(SPEC.options_schema)
    assert validator.is_valid({"password_type": "any", "username": "u", "password": "p", "wsdl": "a.wsdl"})
    assert not validator.is_valid({"password_type": "md5"})
    registry = Registry()
    assert {"soap", "soaps"} <= set(registry.schemes)
    source = registry.build_source(name="a", url="soap://0.0.0.0:9/ws", options={}, context=CTX)
    dest = registry.build_destination(name="b", url="soaps://emr.example.org/ws", options={"action": "x"},
                                      context=CTX)
    assert isinstance(source, SoapSource) and isinstance(dest, SoapDestination)
    assert dest.endpoint == "https://emr.example.org/ws"


def test_source_puts_mtom_attachments_back_into_the_payload() -> None:
    pdf = b"%PDF-1.4 report \x00\xff binary"
    root = envelope12(f'<his:Report xmlns:his="{HIS}"><his:Doc><xop:Include '
                      'xmlns:xop="http://www.w3.org/2004/08/xop/include" href="cid:doc1%40his"/></his:Doc>'
                      "</his:Report>")
    body = (b"--B\r\nContent-Type: application/xop+xml; charset=UTF-8; type=\"application/soap+xml\"\r\n"
            b"Content-ID: <root@his>\r\n\r\n" + root.encode() + b"\r\n--B\r\nContent-Type: application/pdf\r\n"
            b"Content-ID: <doc1@his>\r\n\r\n" + pdf + b"\r\n--B--\r\n")
    ctype = ('multipart/related; boundary=B; type="application/xop+xml"; start="<root@his>"; '
             'start-info="application/soap+xml"')

    async def scenario() -> tuple[Hub, httpx.Response]:
        hub = Hub()
        async with endpoint(hub) as url, httpx.AsyncClient() as client:
            return hub, await client.post(url, content=body, headers={"Content-Type": ctype})

    hub, reply = run(scenario())
    assert reply.status_code == 200, reply.text
    (message,) = hub.messages
    doc = etree.fromstring(message.raw).find(f"{{{HIS}}}Doc")
    assert doc is not None and len(doc) == 0 and base64.b64decode(doc.text or "") == pdf


def test_soaps_source_and_destination_with_client_certificates(tmp_path: Path) -> None:
    from tests.channels.test_http_connector import _write_pki

    _write_pki(tmp_path)
    context = ConnectorContext(home=str(tmp_path))  # relative TLS paths resolve against the hub home
    server_tls = {"cert": "server.pem", "key": "server.key", "ca": "ca.pem", "require_client_cert": True}

    async def scenario() -> tuple[Hub, Any, Any]:
        hub = Hub()
        source = SoapSource(name="centre", url="soaps://127.0.0.1:0/ws", options={"tls": server_tls},
                            context=context)
        await source.start(hub)
        results: list[Any] = []
        try:
            for tls in ({"ca": "ca.pem", "cert": "client.pem", "key": "client.key"}, {"ca": "ca.pem"}):
                dest = SoapDestination(name="edge", url=f"soaps://127.0.0.1:{source.port}/ws", context=context,
                                       options={"action": ACTION, "tls": tls})
                try:
                    results.append(await dest.send(xml_message(ZH_PAYLOAD)))
                except DeliveryError as exc:
                    results.append(exc)
                finally:
                    await dest.close()
        finally:
            await source.stop()
        return hub, results[0], results[1]

    hub, mutual, anonymous = run(scenario())
    assert mutual.ok and len(hub.messages) == 1
    assert isinstance(anonymous, DeliveryError) and anonymous.retryable


def test_source_serves_its_wsdl_and_a_destination_calls_it_through_the_wsdl(tmp_path: Path) -> None:
    (tmp_path / "his.wsdl").write_bytes(_wsdl("{{LOCATION}}", soap12=True))
    context = ConnectorContext(home=str(tmp_path))

    async def scenario() -> tuple[Hub, httpx.Response, httpx.Response, Any]:
        hub = Hub()
        async with endpoint(hub, context, wsdl="his.wsdl") as url, httpx.AsyncClient() as client:
            wsdl = await client.get(url + "?wsdl")
            other = await client.get(url)
            dest = SoapDestination(name="x", url="soap:///", context=context,
                                   options={"wsdl": url + "?wsdl", "operation": "AddPatient"})
            try:
                return hub, wsdl, other, await dest.send(xml_message(ZH_PAYLOAD))
            finally:
                await dest.close()

    hub, wsdl, other, sent = run(scenario())
    assert wsdl.status_code == 200 and wsdl.headers["content-type"].startswith("text/xml")
    assert b"{{LOCATION}}" not in wsdl.content and b'location="http://127.0.0.1:' in wsdl.content
    assert other.status_code == 405
    assert sent.ok and hub.messages[0].headers["soap.action"] == "urn:wsam:AddPatient"


def test_destination_url_credentials_go_to_basic_auth_not_into_the_envelope() -> None:
    async def scenario() -> SoapService:
        async with SoapService() as svc:
            url = svc.url().replace("soap://", "soap://app:s%40fe@")
            dest = SoapDestination(name="emr", url=url, context=CTX, options={"action": ACTION})
            try:
                assert (await dest.send(patient())).ok
                assert "s%40fe" not in dest.shown_url
            finally:
                await dest.close()
        return svc

    (seen,) = run(scenario()).seen
    assert seen.headers["authorization"] == "Basic " + base64.b64encode(b"app:s@fe").decode()
    assert info(seen)["to"] == f"http://{seen.headers['host']}/ws/emr"
    assert b"s%40fe" not in seen.body and b"app:" not in seen.body
