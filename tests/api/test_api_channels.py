"""/api/channels: listing with counts and queue depths, start and stop over the API."""

from __future__ import annotations

import httpx
import pytest

from tests.api.api_support import Running, corpus_message, seed


def test_list_channels_with_counts(running: Running) -> None:
    seed(running)
    r = running.get("/api/channels", role="readonly")
    assert r.status_code == 200
    items = {c["name"]: c for c in r.json()["items"]}
    assert list(items) == ["adt", "blocked", "lab"]
    adt = items["adt"]
    assert (adt["status"], adt["enabled"], adt["description"]) == ("started", True, "ADT feed from the HIS")
    assert adt["source"] == {"url": "mllp://127.0.0.1:0", "scheme": "mllp"}
    assert items["lab"]["source"] == {"url": "http://127.0.0.1:0/lab", "scheme": "http"}
    assert [(d["name"], d["queue"], d["depth"]) for d in adt["destinations"]] == [
        ("ris", "adt/ris", {}), ("pacs", "adt/pacs", {})]
    assert adt["counts"] == {"queued": 2, "received": 2, "delivery_sent": 2, "delivery_dead": 2}
    assert (items["blocked"]["status"], items["blocked"]["enabled"]) == ("stopped", False)
    assert running.get("/api/channels/lab").json()["counts"]["received"] == 1


def test_unknown_channel_is_404_with_a_suggestion(shared: Running) -> None:
    for method, path in (("GET", "/api/channels/ad"), ("POST", "/api/channels/ad/start"),
                         ("POST", "/api/channels/ad/stop")):
        r = shared.client.request(method, shared.base + path, headers=shared.auth())
        assert r.status_code == 404
        assert r.json()["error"] == "unknown_channel"
        assert r.json()["detail"] == "no channel 'ad' (did you mean 'adt'?); channels: adt, blocked, lab"


def test_stop_and_start(running: Running) -> None:
    old_url = running.source_url("lab")
    r = running.post("/api/channels/lab/stop", role="operator")
    assert r.status_code == 200 and r.json() == {"name": "lab", "status": "stopped", "enabled": False}
    with pytest.raises(httpx.ConnectError):
        running.client.post(old_url, content=b"MSH|^~\\&|X\r")
    lab = running.get("/api/channels/lab").json()
    assert (lab["status"], lab["enabled"]) == ("stopped", False)
    assert running.client.get(running.base + "/healthz").json()["channels"]["lab"] == "stopped"
    assert running.hub.store.channel_overrides()["lab"] is False  # persisted for other processes

    r = running.post("/api/channels/lab/start", role="operator")
    assert r.status_code == 200 and r.json() == {"name": "lab", "status": "started", "enabled": True}
    assert running.send_hl7("lab", corpus_message("camel-iti-8.hl7"))
    assert running.post("/api/channels/lab/start").json()["status"] == "started"  # idempotent


def test_a_channel_that_cannot_start_is_409_and_shows_as_error(running: Running) -> None:
    r = running.post("/api/channels/blocked/start")
    assert r.status_code == 409
    body = r.json()
    assert body["error"] == "channel_start_failed"
    assert body["detail"].startswith("channel 'blocked' could not start: ConnectorError: cannot listen on")
    health = running.client.get(running.base + "/healthz").json()
    assert health["channels"]["blocked"] == "error" and health["status"] == "degraded"
    assert "cannot listen" in health["errors"]["blocked"]
    assert running.get("/api/channels/blocked").json()["error"].startswith("ConnectorError")
