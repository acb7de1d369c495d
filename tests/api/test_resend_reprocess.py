"""Resend after a fix: a message whose mapping failed runs through its channel again (the fixed mapping, the
destination filters), on its own row; a routed message goes again only where it was routed.  Over the wire:
MLLP in, HTTP out, the API and the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from ihehub.api.auth import create_token
from ihehub.cli import main
from tests.api.api_support import LoopThread, Receiver, Running, build_hub, wait_for

CHANNEL = """\
description: ADT mapped to JSON, routed by sex
source:
  url: mllp://127.0.0.1:0
mapping: mappings/adt.yaml
destinations:
  - name: men
    url: http://127.0.0.1:{port}/ok
    filter: 'json.sex == "male"'
  - name: women
    url: http://127.0.0.1:{port}/reject
    filter: 'json.sex == "female"'
"""
MAPPING = """\
input: {kind: hl7}
output: {kind: json}
tables:
  sex: {values: {M: male, F: female%s}, unmapped: error}
rules:
  - id <- PID-3.1
  - name <- PID-5.1
  - sex <- table("sex", PID-8)
"""


def adt(control_id: str, sex: str, name: str = "王") -> bytes:
    return (f"MSH|^~\\&|HIS|H1|HUB|X|20260110083000||ADT^A01|{control_id}|P|2.5|||||CHN|UNICODE UTF-8\r"
            f"PID|1||{control_id}-MRN^^^H1||{name}^小明||19800101|{sex}\r").encode()


@pytest.fixture
def hub(tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> Iterator[Running]:
    import httpx

    from ihehub.config import init_home

    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    (home / "mappings").mkdir()
    (home / "channels" / "adt.yaml").write_text(CHANNEL.format(port=receiver.port), encoding="utf-8")
    (home / "mappings" / "adt.yaml").write_text(MAPPING % "", encoding="utf-8")
    init_home(home)
    monkeypatch.setenv("IHEHUB_HOME", str(home))
    h = build_hub(home)
    loop = LoopThread()
    try:
        loop.run(h.start())
        tokens = {"admin": create_token(h.store, role="admin", name="t"),
                  "operator": create_token(h.store, role="operator", name="o")}
        with httpx.Client(timeout=10) as client:
            yield Running(hub=h, loop=loop, receiver=receiver, client=client, tokens=tokens)
    finally:
        try:
            loop.run(h.stop())
        finally:
            loop.close()


def _send(running: Running, raw: bytes) -> tuple[str, bytes]:
    import asyncio

    from ihehub.bus.store import MessageQuery
    from ihehub.channels.mllp import mllp_send

    source = running.hub.runtimes["adt"].source
    ack = asyncio.run(mllp_send("127.0.0.1", source.port, [raw], timeout=10))[0]  # type: ignore[attr-defined]
    control_id = raw.split(b"\r", 1)[0].split(b"|")[9].decode()
    (row,) = running.hub.store.search(MessageQuery(control_id=control_id, limit=1))
    return str(row["id"]), ack


def _fix_mapping(home: Path) -> None:
    path = home / "mappings" / "adt.yaml"
    path.write_text(MAPPING % ", X: male", encoding="utf-8")
    time.sleep(1.1)  # the mapping set looks at its files at most once a second


def test_a_failed_mapping_is_fixed_and_the_message_resent(hub: Running) -> None:
    mid, ack = _send(hub, adt("R1", "X"))
    assert b"MSA|AE|" in ack and b"'X' is not in code table 'sex'" in ack
    row = hub.hub.store.get_message(mid)
    assert row is not None and row["status"] == "error" and row["transformed"] is None

    # resent before the fix: run through the channel again, fails again, and says so
    r = hub.post(f"/api/messages/{mid}/resend", role="operator")
    assert r.status_code == 409 and r.json()["error"] == "not_queued", r.text
    assert "error again: transformer:" in r.json()["detail"] and "'X'" in r.json()["detail"]
    assert hub.hub.store.deliveries_of(mid) == []

    _fix_mapping(hub.hub.cfg.home)
    r = hub.post(f"/api/messages/{mid}/resend", role="operator")
    assert r.status_code == 200 and r.json() == {"queued": 1}, r.text
    wait_for(lambda: hub.receiver.count("/ok", b"R1-MRN") == 1, what="the mapped message at the destination")
    sent = next(b for p, b in hub.receiver.received if p == "/ok" and b"R1-MRN" in b)
    assert json.loads(sent) == {"id": "R1-MRN", "name": "王", "sex": "male"}  # the fixed mapping's output
    row = hub.hub.store.get_message(mid)
    assert row is not None and row["error"] is None and json.loads(row["transformed"])["sex"] == "male"
    assert hub.wait_settled(mid) == {"men": "sent"}  # the destination filters chose again: not women
    headers = json.loads(row["headers"])
    assert headers.get("mapping") == "mappings/adt.yaml" and headers.get("mapping_version")


def test_a_routed_message_goes_again_only_where_it_was_routed(hub: Running) -> None:
    mid, ack = _send(hub, adt("R2", "F"))
    assert b"MSA|AA|" in ack
    assert hub.wait_settled(mid) == {"women": "dead"}
    r = hub.post(f"/api/messages/{mid}/resend", role="operator")
    assert r.status_code == 200 and r.json() == {"queued": 1}
    wait_for(lambda: sum(len(d["attempt_log"]) for d in hub.hub.store.deliveries_of(mid)) == 2,
             what="women tried again")
    assert hub.wait_settled(mid) == {"women": "dead"}  # men never got it: its filter said no
    assert hub.receiver.count("/ok", b"R2-MRN") == 0
    # by filter: the error message is run through again, the routed one re-queued
    bad, _ = _send(hub, adt("R3", "Y"))
    r = hub.post("/api/messages/resend", role="operator", json={"control_id": "R3"})
    assert r.status_code == 200 and r.json()["queued"] == 0 and "error again" in r.json()["not_queued"][bad]


def test_the_cli_runs_a_failed_message_through_the_fixed_mapping(hub: Running) -> None:
    mid, _ = _send(hub, adt("R4", "X", name="曾"))
    home = hub.hub.cfg.home
    hub.loop.run(hub.hub.stop_channel("adt", persist=False))  # deliveries still run; the CLI works on the store
    _fix_mapping(home)
    r = CliRunner().invoke(main, ["messages", "resend", mid])
    assert r.exit_code == 0, r.output
    assert "1 delivery queued, 1 run through their channel again" in r.output
    wait_for(lambda: hub.receiver.count("/ok", b"R4-MRN") == 1, what="the message the CLI queued")
    row = hub.hub.store.get_message(mid)
    assert row is not None and json.loads(row["transformed"]) == {"id": "R4-MRN", "name": "曾", "sex": "male"}
