"""A hospital web service for the soap:// tests: a real aiohttp server on a free loopback port.

It checks what a strict SOAP stack checks, written independently of ihehub.soap: the Content-Type and the
action (SOAP 1.2 ``action`` parameter = wsa:Action, SOAP 1.1 ``SOAPAction``), WS-Addressing headers, and
WS-Security (UsernameToken Profile 1.1: PasswordText or Base64(SHA-1(nonce + created + password)), plus the
Timestamp).  The payload's ``test`` attribute scripts the answer: ``503x2`` (503 for the first two tries of
that payload id), ``sender`` (env:Sender fault), ``receiver`` (env:Receiver fault), ``client11`` (SOAP 1.1
Client fault); otherwise an echo response whose payload repeats the request payload's text.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from typing import Any

from aiohttp import web
from lxml import etree

S12 = "http://www.w3.org/2003/05/soap-envelope"
S11 = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
DIGEST = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordDigest"
TEXT = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0#PasswordText"
HIS = "urn:example:his"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


def fault12(code: str, reason: str, subcode: tuple[str, str] | None = None) -> bytes:
    sub = ""
    if subcode is not None:
        sub = f'<env:Subcode><env:Value xmlns:s="{subcode[0]}">s:{subcode[1]}</env:Value></env:Subcode>'
    return (f'<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="{S12}"><env:Body><env:Fault>'
            f"<env:Code><env:Value>env:{code}</env:Value>{sub}</env:Code>"
            f'<env:Reason><env:Text xml:lang="zh">原因</env:Text><env:Text xml:lang="en">{reason}</env:Text>'
            "</env:Reason></env:Fault></env:Body></env:Envelope>").encode()


def fault11(code: str, reason: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="{S11}"><s:Body><s:Fault>'
            f"<faultcode>s:{code}</faultcode><faultstring>{reason}</faultstring>"
            "</s:Fault></s:Body></s:Envelope>").encode()


@dataclasses.dataclass
class Seen:
    headers: dict[str, str]
    body: bytes
    root: etree._Element

    def header(self, ns: str, local: str) -> etree._Element | None:
        soap = etree.QName(self.root).namespace
        return self.root.find(f"{{{soap}}}Header/{{{ns}}}{local}")

    @property
    def payload(self) -> etree._Element:
        soap = etree.QName(self.root).namespace
        return self.root.find(f"{{{soap}}}Body")[0]


class SoapService:
    """``async with SoapService(username=..., password=...) as svc``: ``svc.url`` is the endpoint."""

    def __init__(self, *, username: str | None = None, password: str = "", wsdl: bytes | None = None) -> None:
        self.username = username
        self.password = password
        self.wsdl = wsdl
        self.seen: list[Seen] = []
        self.tries: dict[str, int] = {}
        self.auth_failures = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    def url(self, scheme: str = "soap", path: str = "/ws/emr") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def start(self) -> SoapService:
        app = web.Application()
        app.router.add_post("/ws/emr", self._handle)
        app.router.add_get("/ws/emr", self._wsdl)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> SoapService:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _wsdl(self, request: web.Request) -> web.Response:
        if self.wsdl is None or "wsdl" not in request.query:
            return web.Response(status=404)
        return web.Response(body=self.wsdl, content_type="text/xml")

    def _security_error(self, seen: Seen) -> str | None:
        sec = seen.header(WSSE, "Security")
        if sec is None:
            return "no wsse:Security"
        ts = sec.find(f"{{{WSU}}}Timestamp")
        if ts is not None and (ts.findtext(f"{{{WSU}}}Created") is None or ts.findtext(f"{{{WSU}}}Expires") is None):
            return "incomplete wsu:Timestamp"
        token = sec.find(f"{{{WSSE}}}UsernameToken")
        if token is None:
            return "no UsernameToken"
        pw = token.find(f"{{{WSSE}}}Password")
        assert pw is not None
        if pw.get("Type") == DIGEST:
            nonce = base64.b64decode(token.findtext(f"{{{WSSE}}}Nonce") or "")
            created = token.findtext(f"{{{WSU}}}Created") or ""
            want = base64.b64encode(hashlib.sha1(nonce + created.encode() + self.password.encode()).digest()).decode()
        elif pw.get("Type") == TEXT:
            want = self.password
        else:
            return f"password type {pw.get('Type')}"
        if token.findtext(f"{{{WSSE}}}Username") != self.username or pw.text != want:
            return "wrong user name or password"
        return None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        root = etree.fromstring(body, _PARSER)
        seen = Seen(headers={k.lower(): v for k, v in request.headers.items()}, body=body, root=root)
        self.seen.append(seen)
        soap = etree.QName(root).namespace
        ctype = seen.headers.get("content-type", "")
        if soap == S12:
            assert ctype.startswith("application/soap+xml"), ctype
        else:
            assert ctype.startswith("text/xml"), ctype
            assert "soapaction" in seen.headers
        is12 = soap == S12
        if self.username is not None:
            problem = self._security_error(seen)
            if problem is not None:
                self.auth_failures += 1
                if is12:
                    return web.Response(status=400, body=fault12("Sender", problem, (WSSE, "FailedAuthentication")),
                                        content_type="application/soap+xml")
                return web.Response(status=500, body=fault11("Client", problem), content_type="text/xml")
        payload = seen.payload
        mode = payload.get("test", "")
        key = payload.get("id", "")
        self.tries[key] = self.tries.get(key, 0) + 1
        if mode.startswith("503x") and self.tries[key] <= int(mode[4:]):
            return web.Response(status=503, text="busy")
        if mode == "sender":
            return web.Response(status=400, body=fault12("Sender", "patient id unknown", (HIS, "UnknownPatient")),
                                content_type="application/soap+xml")
        if mode == "receiver":
            return web.Response(status=500, body=fault12("Receiver", "database locked"),
                                content_type="application/soap+xml")
        if mode == "client11":
            return web.Response(status=500, body=fault11("Client", "bad request"), content_type="text/xml")
        text = "".join(payload.itertext())
        msg_id = seen.header(WSA, "MessageID")
        relates = f"<wsa:RelatesTo>{msg_id.text}</wsa:RelatesTo>" if msg_id is not None else ""
        env = "env"
        reply = (f'<?xml version="1.0" encoding="UTF-8"?><{env}:Envelope xmlns:{env}="{soap}" xmlns:wsa="{WSA}">'
                 f"<{env}:Header>{relates}</{env}:Header><{env}:Body>"
                 f'<r:Result xmlns:r="{HIS}" id="{key}">OK {text}</r:Result></{env}:Body></{env}:Envelope>')
        return web.Response(body=reply.encode("utf-8"), content_type="application/soap+xml" if is12 else "text/xml")


def info(seen: Seen) -> dict[str, Any]:
    """The WS-Addressing values of a recorded request."""
    header = seen.root.find(f"{{{etree.QName(seen.root).namespace}}}Header")
    if header is None:
        return {}
    return {"action": header.findtext(f"{{{WSA}}}Action"), "message_id": header.findtext(f"{{{WSA}}}MessageID"),
            "to": header.findtext(f"{{{WSA}}}To"), "reply_to": header.findtext(f"{{{WSA}}}ReplyTo/{{{WSA}}}Address")}
