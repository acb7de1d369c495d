"""/healthz, /metrics, OpenAPI, the JSON error shape and the HTTP-source fallback of the app."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ihehub.api import HealthCheck, create_app
from ihehub.bus import schema
from ihehub.bus.message import Message
from ihehub.channels.base import Outcome
from ihehub.channels.http import Route, RouteTable
from ihehub.config import AuthConfig
from ihehub.hub import Hub
from tests.api.api_support import CHANNELS, Running, asgi_client, build_hub, corpus_message, make_home, run


def test_healthz_reports_node_database_and_channels(running: Running) -> None:
    r = running.client.get(running.base + "/healthz")  # no token: load balancers have none
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["node"] == "ihehub-1"
    assert body["database"] == "ok"
    assert body["checks"] == {"database": "ok"}
    assert body["channels"] == {"adt": "started", "blocked": "stopped", "lab": "started"}
    assert 0 <= body["uptime_s"] < 60


def test_metrics_is_prometheus_text_with_received_counter(running: Running) -> None:
    running.send_hl7("adt", corpus_message("camel-iti-8.hl7"))
    r = running.client.get(running.base + "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'ihehub_messages_received_total{channel="adt",code="AA"} 1.0' in r.text
    assert "ihehub_queue_depth" in r.text


def _hub_without_schema(tmp_path: Path) -> Hub:
    home = make_home(tmp_path, 9)  # destinations are never contacted: the hub is not started
    return build_hub(home)


def test_healthz_is_503_when_the_database_cannot_be_read(tmp_path: Path) -> None:
    hub = _hub_without_schema(tmp_path)  # never migrated: the messages table does not exist
    try:
        async def go() -> None:
            async with asgi_client(create_app(hub)) as client:
                r = await client.get("/healthz")
                assert r.status_code == 503
                body = r.json()
                assert body["status"] == "degraded"
                assert "no such table: messages" in body["database"]
                assert body["channels"] == {"adt": "stopped", "blocked": "stopped", "lab": "stopped"}

        run(go())
    finally:
        hub.engine.dispose()


def test_api_answers_503_json_when_the_database_cannot_be_read(tmp_path: Path) -> None:
    hub = _hub_without_schema(tmp_path)
    try:
        async def go() -> None:
            async with asgi_client(create_app(hub)) as client:
                r = await client.get("/api/messages", headers={"Authorization": "Bearer ihh_" + "x" * 43})
                assert r.status_code == 503
                assert r.json()["error"] == "database_unavailable"
                assert "no such table" in r.json()["detail"] and "SELECT" not in r.json()["detail"]
                assert r.headers["retry-after"] == "5"

        run(go())
    finally:
        hub.engine.dispose()


def test_extra_health_checks_degrade_without_503(tmp_path: Path) -> None:
    hub = _hub_without_schema(tmp_path)
    schema.upgrade(hub.engine)
    ntp = HealthCheck(name="time", run=lambda _hub: "clock is 3.2 s ahead of ntp.example.org")
    broken = HealthCheck(name="broken", run=lambda _hub: str(1 / 0))
    try:
        async def go() -> None:
            async with asgi_client(create_app(hub, health_checks=[ntp, broken])) as client:
                r = await client.get("/healthz")
                assert r.status_code == 200
                body = r.json()
                assert body["status"] == "degraded"
                assert body["database"] == "ok"
                assert body["checks"]["time"] == "clock is 3.2 s ahead of ntp.example.org"
                assert body["checks"]["broken"] == "ZeroDivisionError: division by zero"

        run(go())
    finally:
        hub.engine.dispose()


def test_openapi_and_docs(running: Running) -> None:
    spec = running.client.get(running.base + "/openapi.json").json()
    for path in ("/healthz", "/metrics", "/api/channels", "/api/channels/{name}/start", "/api/messages",
                 "/api/messages/{message_id}", "/api/messages/{message_id}/raw",
                 "/api/messages/{message_id}/resend", "/api/messages/resend"):
        assert path in spec["paths"], path
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert not [p for p, ops in spec["paths"].items() for op in ops.values() if "422" in op["responses"]]
    assert "400" in spec["paths"]["/api/messages"]["get"]["responses"]
    docs = running.client.get(running.base + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_errors_are_json_with_error_and_detail(running: Running) -> None:
    r = running.get("/no/such/path")
    assert r.status_code == 404
    assert r.json() == {"error": "not_found", "detail": "no API endpoint or channel at /no/such/path"}
    r = running.client.delete(running.base + "/api/channels", headers=running.auth())
    assert r.status_code == 405
    assert r.json()["error"] == "method_not_allowed"
    r = running.get("/api/messages", params={"limit": "many"})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_request"
    assert "limit" in r.json()["detail"]


def test_unknown_paths_fall_through_to_http_source_routes(tmp_path: Path) -> None:
    hub = _hub_without_schema(tmp_path)
    got: list[Message] = []

    async def inbound(message: Message) -> Outcome:
        got.append(message)
        return Outcome(code="AA", message_id=message.id)

    table = RouteTable()
    table.add(Route(channel="orders", path="/hl7/orders", inbound=inbound))
    hub.routes = table
    try:
        async def go() -> None:
            async with asgi_client(create_app(hub)) as client:
                r = await client.post("/hl7/orders", content=corpus_message("camel-iti-8.hl7"))
                assert r.status_code == 200, r.text
                assert r.json()["status"] == "accepted"
                r = await client.post("/hl7/other", content=b"x")
                assert r.status_code == 404
                assert r.json()["error"] == "not_found"

        run(go())
    finally:
        hub.engine.dispose()
    assert len(got) == 1 and got[0].control_id == "128856" and got[0].channel == "orders"


def test_auth_can_be_turned_off_for_development(tmp_path: Path) -> None:
    hub = _hub_without_schema(tmp_path)
    hub.cfg = dataclasses.replace(hub.cfg, auth=AuthConfig(required=False))
    schema.upgrade(hub.engine)
    try:
        async def go() -> None:
            async with asgi_client(create_app(hub)) as client:
                r = await client.get("/api/channels")
                assert r.status_code == 200
                assert [c["name"] for c in r.json()["items"]] == sorted(n[:-5] for n in CHANNELS)

        run(go())
    finally:
        hub.engine.dispose()


def test_public_api_is_complete() -> None:
    import ihehub.api as api

    assert sorted(api.__all__) == sorted(set(api.__all__))
    assert all(hasattr(api, name) for name in api.__all__)
    assert {"create_app", "create_token", "list_tokens", "revoke_token", "require", "HealthCheck"} <= set(
        api.__all__)
