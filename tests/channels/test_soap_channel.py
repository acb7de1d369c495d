"""A soap:// channel in an in-process hub: SOAP in on the hub's HTTP port, SOAP out to a hospital service.

The source is served by the hub's API application (its URL names the hub's HTTP port); the destination calls
`SoapService` (a real aiohttp server with its own WS-Security digest check), is retried after HTTP 503 and
dead-lettered at once on an env:Sender fault.  Requests are raw httpx posts: no SOAP library involved.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
from lxml import etree

from ihehub.channels.registry import Registry
from ihehub.config import HttpConfig, load_channels, load_home
from ihehub.hub import Hub
from tests.api.api_support import LoopThread, wait_for
from tests.channels.soap_kit import HIS, S12, WSA, WSSE, SoapService, info
from tests.channels.test_soap_connector import digest_security, envelope12
from tests.conftest import free_port, loopback_config

ACTION = "urn:example:his:AddPatient"
CT = f'application/soap+xml; charset=utf-8; action="{ACTION}"'


def test_soap_in_soap_out_with_retry_dead_letter_and_authentication(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    (home / "ihehub.yaml").write_text(
        "database: sqlite:///db/ihehub.sqlite\n"
        "delivery: {max_attempts: 5, initial_backoff: 0.05, max_backoff: 0.2, jitter: 0, lease_seconds: 5}\n",
        encoding="utf-8")
    port = free_port()
    service_loop = LoopThread()
    svc = SoapService(username="hub", password="emr-密码")
    service_loop.run(svc.start())
    (home / "channels" / "his.yaml").write_text(f"""
source:
  url: soap://127.0.0.1:{port}/ws/his
  options: {{username: his, password: "${{HIS_WS_PASSWORD}}", password_type: digest}}
destinations:
  - name: emr
    url: {svc.url()}
    options: {{username: hub, password: "emr-密码", timestamp_ttl: 60}}
""", encoding="utf-8")
    cfg = loopback_config(load_home(home, environ={"HIS_WS_PASSWORD": "门诊pw"}))
    cfg = dataclasses.replace(cfg, http=HttpConfig(host="127.0.0.1", port=port))  # type: ignore[type-var]
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg, environ={"HIS_WS_PASSWORD": "门诊pw"}),  # type: ignore[arg-type]
              registry=registry)
    loop = LoopThread()
    loop.run(hub.start())
    try:
        url = f"http://127.0.0.1:{hub.http_port}/ws/his"
        assert hub.http_port == port

        def post(pid: str, test: str, nonce: bytes, password: str = "门诊pw") -> httpx.Response:
            payload = f'<his:Patient xmlns:his="{HIS}" id="{pid}" test="{test}"><his:Name>王五</his:Name></his:Patient>'
            body = envelope12(payload, headers=digest_security("his", password, nonce=nonce), message_id=f"urn:{pid}")
            return httpx.post(url, content=body.encode("gb18030").replace(b"<env:Envelope", (
                b'<?xml version="1.0" encoding="GB18030"?><env:Envelope'), 1), headers={"Content-Type": CT}, timeout=10)

        ok = post("P1", "503x2", b"n1")
        assert ok.status_code == 200, ok.text
        ok_id = ok.headers["x-ihehub-message-id"]
        reply = etree.fromstring(ok.content)
        assert reply.findtext(f"{{{S12}}}Header/{{{WSA}}}RelatesTo") == "urn:P1"
        bad = post("P2", "sender", b"n2")
        assert bad.status_code == 200
        bad_id = bad.headers["x-ihehub-message-id"]
        refused = post("P3", "", b"n3", password="guess")
        assert refused.status_code == 400 and b"FailedAuthentication" in refused.content

        def settled(message_id: str) -> dict[str, object] | None:
            (d,) = hub.store.deliveries_of(message_id)
            return d if d["state"] in ("sent", "dead") else None

        sent = wait_for(lambda: settled(ok_id), 20, "the retried delivery")
        dead = wait_for(lambda: settled(bad_id), 20, "the dead-lettered delivery")
        assert sent["state"] == "sent" and len(sent["attempt_log"]) == 3
        assert svc.tries["P1"] == 3 and svc.auth_failures == 0
        assert dead["state"] == "dead" and len(dead["attempt_log"]) == 1
        assert "Sender/UnknownPatient" in str(dead["attempt_log"][-1]["error"])
        last = svc.seen[-1]
        assert info(last)["action"] == ACTION  # the request's action travelled with the message
        assert last.payload.findtext(f"{{{HIS}}}Name") == "王五"
        assert last.header(WSSE, "Security") is not None
        stored = hub.store.load_message(ok_id)
        assert stored is not None and b"Security" not in stored.raw and "王五" in stored.raw.decode("utf-8")
    finally:
        loop.run(hub.stop())
        loop.close()
        service_loop.run(svc.stop())
        service_loop.close()
