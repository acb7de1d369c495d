"""The actor hook: a channel's actor answers each stored message; only accepted ones reach destinations."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ihehub.actors.registry import ActorError, build_actor
from ihehub.bus.store import MessageQuery
from ihehub.channels.mllp_wire import mllp_send
from ihehub.channels.registry import Registry
from ihehub.config import load_channels, load_home
from ihehub.hub import Hub
from tests.api.api_support import LoopThread, wait_for
from tests.conftest import free_port, loopback_config
from tests.helpers.receiver import Receiver


def qbp(cid: str, key: str) -> bytes:
    return (f"MSH|^~\\&|HIS|H1|HUB|H|20261127||QBP^Q23^QBP_Q21|{cid}|P|2.5\r"
            f"QPD|IHE PIX Query|Q1|{key}^^^H1\rRCP|I\r").encode()


def test_actor_answers_and_gates_deliveries(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    port = free_port()
    with Receiver() as rx:
        (home / "channels" / "pix.yaml").write_text(
            f'source: {{url: "mllp://127.0.0.1:{port}"}}\n'
            "actor: {name: 'tests.e2e.actors:Responder', options: {prefix: ZZZ}}\n"
            f'destinations:\n  - {{name: copy, url: "{rx.url}/copy"}}\n', encoding="utf-8")
        cfg = loopback_config(load_home(home), node_id="hub-7")
        registry = Registry()
        hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)
        loop = LoopThread()
        loop.run(hub.start())
        try:
            acks = asyncio.run(mllp_send("127.0.0.1", port, [qbp("Q1", "MRN1"), qbp("Q2", "UNKNOWN"),
                                                              qbp("Q3", "CRASH")], timeout=10))
            assert b"RSP^K23" in acks[0] and b"ZZZ|hub-7" in acks[0] and b"MSA|AA|Q1" in acks[0]
            assert b"MSA|AE|Q2" in acks[1] and b"ERR||QPD^1^3|204" in acks[1]
            assert b"MSA|AE|Q3" in acks[2] and b"index corrupted" in acks[2]
            wait_for(lambda: rx.control_ids().get("Q1") == 1, 10, "the accepted message's delivery")
            store = hub.store
            status = {r["control_id"]: (r["status"], r["error"]) for r in store.search(MessageQuery(channel="pix"))}
            assert status["Q1"] == ("queued", None)
            assert status["Q2"] == ("error", "unknown key identifier")
            assert status["Q3"][0] == "error" and "index corrupted" in status["Q3"][1]
            assert set(rx.control_ids()) == {"Q1"}  # rejected ones never reach destinations
            assert hub.actors["pix"].started  # type: ignore[attr-defined]
        finally:
            loop.run(hub.stop())
            loop.close()


def test_unknown_actor_names_the_problem() -> None:
    with pytest.raises(ActorError, match="unknown actor 'pix-manger'"):
        build_actor("pix-manger", channel="c", options={}, context=None, actors={"pix-manager": "x:Y"})  # type: ignore[arg-type]
    with pytest.raises(ActorError, match="did you mean 'pix-manager'"):
        build_actor("pix-manger", channel="c", options={}, context=None, actors={"pix-manager": "x:Y"})  # type: ignore[arg-type]
    with pytest.raises(ActorError, match="cannot load"):
        build_actor("nowhere.module:Actor", channel="c", options={}, context=None)  # type: ignore[arg-type]


def test_channel_with_a_broken_actor_stays_down_and_says_why(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    port, ok_port = free_port(), free_port()
    (home / "channels" / "pix.yaml").write_text(
        f'source: {{url: "mllp://127.0.0.1:{port}"}}\nactor: "tests.e2e.actors:Missing"\n', encoding="utf-8")
    (home / "channels" / "ok.yaml").write_text(f'source: {{url: "mllp://127.0.0.1:{ok_port}"}}\n', encoding="utf-8")
    cfg = loopback_config(load_home(home))
    hub = Hub(cfg, load_channels(home, Registry(), hub=cfg))
    loop = LoopThread()
    loop.run(hub.start())
    try:
        assert hub.channel_status("pix") == "error" and "Missing" in hub.errors["pix"]
        assert hub.channel_status("ok") == "started"
    finally:
        loop.run(hub.stop())
        loop.close()
