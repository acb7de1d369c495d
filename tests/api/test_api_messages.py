"""The message browser: list with filters (incl. a GB18030 Chinese name), detail with attempt log, raw."""

from __future__ import annotations

import base64
import time

import pytest

from ihehub.bus.message import Message
from tests.api.api_support import CN_ADT, Running


def ids_of(running: Running, **params: object) -> list[str]:
    r = running.get("/api/messages", params=params)
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["items"]]


def test_list_is_newest_first_without_bodies(seeded: tuple[Running, dict[str, str]]) -> None:
    running, ids = seeded
    r = running.get("/api/messages", role="readonly")
    page = r.json()
    assert [m["id"] for m in page["items"]] == [ids["lab"], ids["cn"], ids["iti8"]]
    assert page["limit"] == 50 and page["offset"] == 0 and page["next_offset"] is None
    cn = page["items"][1]
    assert cn["destinations"] == {"ris": "sent", "pacs": "dead"}
    assert cn["control_id"] == "CN0001" and cn["message_type"] == "ADT^A01" and cn["charset"] == "gb18030"
    assert cn["received_at"].endswith("Z") and cn["status"] == "queued"
    assert not any(key in m for m in page["items"] for key in ("body", "raw", "headers"))


def test_filters(seeded: tuple[Running, dict[str, str]]) -> None:
    running, ids = seeded
    assert ids_of(running, channel="lab") == [ids["lab"]]
    assert ids_of(running, status="dead") == [ids["cn"], ids["iti8"]]
    assert ids_of(running, status="sent", destination="archive") == [ids["lab"]]
    assert ids_of(running, destination="pacs") == [ids["cn"], ids["iti8"]]
    assert ids_of(running, status="queued") == []  # nothing waiting any more
    assert ids_of(running, control_id="CN0001") == [ids["cn"]]
    assert ids_of(running, type="ADT*") == [ids["cn"], ids["iti8"]]
    assert ids_of(running, type="ADT^A01") == [ids["cn"]]
    assert ids_of(running, q="张三") == [ids["cn"]]  # stored as GB 18030 bytes, searched with a UTF-8 query
    assert ids_of(running, q="MRN778899") == [ids["lab"], ids["cn"]]
    assert ids_of(running, q="PDQ113XX35") == [ids["iti8"]]
    assert ids_of(running, since="2000-01-01") == [ids["lab"], ids["cn"], ids["iti8"]]
    assert ids_of(running, since=str(int(time.time()) - 3600), until="2999-01-01T00:00:00+08:00") == [
        ids["lab"], ids["cn"], ids["iti8"]]
    assert ids_of(running, since="2999-01-01T00:00:00Z") == []


def test_pages(seeded: tuple[Running, dict[str, str]]) -> None:
    running, ids = seeded
    first = running.get("/api/messages", params={"limit": 2}).json()
    assert [m["id"] for m in first["items"]] == [ids["lab"], ids["cn"]] and first["next_offset"] == 2
    rest = running.get("/api/messages", params={"limit": 2, "offset": 2}).json()
    assert [m["id"] for m in rest["items"]] == [ids["iti8"]] and rest["next_offset"] is None


@pytest.mark.parametrize(
    ("params", "error", "detail"),
    [
        ({"since": "yesterday"}, "bad_time", "use ISO 8601"),
        ({"until": "2024-13-45"}, "bad_time", "or epoch seconds"),
        ({"since": "2024-05-02", "until": "2024-05-01"}, "bad_time", "must be after since"),
        ({"status": "snet"}, "bad_status", "(did you mean 'sent'?)"),
        ({"limit": 0}, "bad_limit", "between 1 and 1000"),
        ({"limit": 1001}, "bad_limit", "between 1 and 1000"),
        ({"offset": -1}, "bad_offset", "0 or more"),
    ],
)
def test_bad_list_parameters_are_400_json(shared: Running, params: dict[str, object], error: str,
                                          detail: str) -> None:
    r = shared.get("/api/messages", params=params)
    assert r.status_code == 400
    assert r.json()["error"] == error
    assert detail in r.json()["detail"]


def test_detail_has_body_in_its_charset_and_the_attempt_log(seeded: tuple[Running, dict[str, str]]) -> None:
    running, ids = seeded
    r = running.get(f"/api/messages/{ids['cn']}", role="auditor")
    assert r.status_code == 200, r.text
    m = r.json()
    assert "PID|1||MRN778899^^^H1^MR||张三^^^^^^L" in m["body"]
    assert m["body_base64"] is None and m["transformed"] is None
    assert m["headers"]["hl7.sending_application"] == "HIS" and m["headers"]["hl7.version"] == "2.5"
    ris, pacs = m["deliveries"]
    assert (ris["destination"], ris["state"], ris["attempts"]) == ("ris", "sent", 1)
    assert ris["last_status"] == "200"
    assert ris["last_response"] == "ACK 已收到" and ris["next_attempt_at"] is None
    assert [(a["number"], a["ok"], a["status"], a["response"]) for a in ris["attempt_log"]] == [
        (1, True, "200", "ACK 已收到")]
    assert (pacs["state"], pacs["attempts"], pacs["last_status"]) == ("dead", 1, "400")
    assert "answered HTTP 400" in pacs["last_error"]
    attempt = pacs["attempt_log"][0]
    assert attempt["ok"] is False and attempt["response"] == "patient unknown"
    assert "answered HTTP 400" in attempt["error"]
    assert attempt["started_at"] <= attempt["finished_at"] and attempt["duration_ms"] >= 0


def test_raw_returns_the_exact_bytes_with_charset(seeded: tuple[Running, dict[str, str]]) -> None:
    running, ids = seeded
    r = running.get(f"/api/messages/{ids['cn']}/raw")
    assert r.status_code == 200
    assert r.content == CN_ADT
    assert r.headers["content-type"] == "application/hl7-v2; charset=gb18030"
    r = running.get(f"/api/messages/{ids['cn']}/raw", params={"transformed": "true"})
    assert r.status_code == 404 and r.json()["error"] == "no_body"


def test_unknown_message_is_404_json(shared: Running) -> None:
    for path in ("/api/messages/0123", "/api/messages/0123/raw"):
        r = shared.get(path)
        assert r.status_code == 404
        assert r.json() == {"error": "unknown_message", "detail": "no message with id '0123'"}


def test_undecodable_body_comes_with_base64(running: Running) -> None:
    raw = b"MSH|^~\\&|X\r\xff\xfe broken \x81"
    msg = Message(channel="lab", raw=raw, charset="utf-8", content_type="application/hl7-v2")
    running.hub.store.append_sync(msg)  # no destinations: status stored
    m = running.get(f"/api/messages/{msg.id}").json()
    assert m["status"] == "stored" and m["deliveries"] == []
    assert base64.b64decode(m["body_base64"]) == raw
    assert m["body"].startswith("MSH|^~\\&|X\r\ufffd")


def test_pruned_body(running: Running) -> None:
    msg = Message(channel="adt", raw=b"MSH|^~\\&|OLD\r", content_type="application/hl7-v2")
    running.hub.store.append_sync(msg)
    time.sleep(0.01)
    assert running.hub.store.prune_bodies(0) >= 1
    m = running.get(f"/api/messages/{msg.id}").json()
    assert m["body"] is None and m["pruned_at"] is not None
    r = running.get(f"/api/messages/{msg.id}/raw")
    assert r.status_code == 410 and r.json()["error"] == "body_pruned"
    r = running.post(f"/api/messages/{msg.id}/resend")
    assert r.status_code == 409 and r.json()["error"] == "body_pruned"
