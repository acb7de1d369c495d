"""Resend one message and resend by filter: validation, dry run, delivery actually happening again."""

from __future__ import annotations

import pytest

from tests.api.api_support import Running, seed, wait_for


def attempts(running: Running, message_id: str, destination: str) -> int:
    m = running.get(f"/api/messages/{message_id}").json()
    return sum(len(d["attempt_log"]) for d in m["deliveries"] if d["destination"] == destination)


def test_resend_one_to_a_destination(running: Running) -> None:
    ids = seed(running)
    before = running.receiver.count("/ok", b"CN0001")
    r = running.post(f"/api/messages/{ids['cn']}/resend", role="operator", json={"destinations": ["ris"]})
    assert r.status_code == 200 and r.json() == {"queued": 1}
    wait_for(lambda: running.receiver.count("/ok", b"CN0001") == before + 1, what="the resent message")
    wait_for(lambda: attempts(running, ids["cn"], "ris") == 2, what="the second attempt in the log")
    assert running.wait_settled(ids["cn"]) == {"ris": "sent", "pacs": "dead"}


def test_resend_one_to_all_destinations_without_a_body(running: Running) -> None:
    ids = seed(running)
    r = running.post(f"/api/messages/{ids['iti8']}/resend")
    assert r.status_code == 200 and r.json() == {"queued": 2}
    wait_for(lambda: attempts(running, ids["iti8"], "pacs") == 2, what="pacs tried again")


@pytest.mark.parametrize(
    ("body", "status", "error", "detail"),
    [
        ({"destinations": ["riss"]}, 400, "unknown_destination", "'riss' (did you mean 'ris'?)"),
        ({"destinations": ["archive"]}, 400, "unknown_destination", "it has: ris, pacs"),
        ({"destination": ["ris"]}, 400, "invalid_request", "destination: Extra inputs are not permitted"),
        ({"destinations": "ris"}, 400, "invalid_request", "destinations"),
    ],
)
def test_resend_one_refuses_bad_input(seeded: tuple[Running, dict[str, str]], body: object, status: int,
                                      error: str, detail: str) -> None:
    running, ids = seeded
    r = running.post(f"/api/messages/{ids['cn']}/resend", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error
    assert detail in r.json()["detail"]


def test_resend_unknown_message_is_404(shared: Running) -> None:
    r = shared.post("/api/messages/feedbeef/resend")
    assert r.status_code == 404 and r.json()["error"] == "unknown_message"


def test_resend_by_filter(running: Running) -> None:
    ids = seed(running)
    r = running.post("/api/messages/resend", json={"channel": "adt", "status": "dead", "dry_run": True})
    assert r.json() == {"matched": 2, "queued": 0, "dry_run": True, "truncated": False, "not_queued": {}}
    assert attempts(running, ids["cn"], "pacs") == 1  # dry run: nothing queued
    r = running.post("/api/messages/resend", role="operator", json={"control_id": "CN0001"})
    assert r.status_code == 200 and r.json()["matched"] == 1 and r.json()["queued"] == 2
    wait_for(lambda: attempts(running, ids["cn"], "pacs") == 2, what="CN0001 to pacs again")
    r = running.post("/api/messages/resend", json={"q": "MRN778899", "destinations": ["archive"]})
    assert r.json()["matched"] == 1 and r.json()["queued"] == 1  # archive belongs to lab only
    wait_for(lambda: attempts(running, ids["lab"], "archive") == 2, what="LAB42 to archive again")
    r = running.post("/api/messages/resend", json={"all": True, "destinations": ["ris"], "dry_run": True})
    assert r.json()["matched"] == 2  # the adt messages: only their channel has ris


@pytest.mark.parametrize(
    ("body", "error", "detail"),
    [
        ({}, "empty_filter", 'send "all": true if you mean it'),
        ({"destinations": ["ris"]}, "empty_filter", "would resend every message"),
        ({"all": True, "destinations": ["archiv"]}, "unknown_destination", "(did you mean 'archive'?)"),
        ({"channel": "lab", "destinations": ["ris"]}, "unknown_destination", "'lab' has no destination"),
        ({"channel": "adtt"}, "unknown_channel", "no channel 'adtt' (did you mean 'adt'?)"),
        ({"since": "yesterday"}, "bad_time", "epoch seconds"),
        ({"status": "lost"}, "bad_status", "use one of"),
        ({"chanel": "adt"}, "invalid_request", "chanel: Extra inputs are not permitted"),
    ],
)
def test_resend_by_filter_refuses_bad_input(shared: Running, body: object, error: str, detail: str) -> None:
    r = shared.post("/api/messages/resend", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == error
    assert detail in r.json()["detail"]
