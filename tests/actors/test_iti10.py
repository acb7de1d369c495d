"""ITI-10 PIX Update Notification on the wire: ITI-8 feeds in, ADT^A31 out to fake PIX consumers over MLLP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ihehub.actors.hl7v2 import ActorOptions, OptionsError
from ihehub.bus.store import MessageQuery
from ihehub.channels.mllp_wire import MLLPServer, mllp_send
from ihehub.channels.registry import Registry
from ihehub.config import load_channels, load_home
from ihehub.config.model import DeliveryConfig
from ihehub.hub import Hub
from tests.actors.support import CORPUS_HL7, OPTIONS, a01
from tests.api.api_support import LoopThread
from tests.conftest import free_port, loopback_config

SAME = "|||1 RENMIN RD^^BEIJING^^100000||13800138000"  # address and phone: enough evidence to link


class FakeConsumer:
    """A PIX Consumer: an MLLP listener that records every A31 and acknowledges it (MSA-2 = its MSH-10)."""

    def __init__(self, port: int = 0) -> None:
        self.received: list[str] = []
        self.server = MLLPServer(self.handle, "127.0.0.1", port, name="pix-consumer")

    async def handle(self, payload: bytes, peer: Any) -> bytes:
        text = payload.decode("utf-8")
        self.received.append(text)
        cid = text.split("\r", 1)[0].split("|")[9]
        return f"MSH|^~\\&|CONS|CF|IHEHUB||20261127||ACK^A31^ACK|R{cid}|P|2.5\rMSA|AA|{cid}\r".encode()


@dataclasses.dataclass
class Running:
    hub: Hub
    port: int
    loop: LoopThread

    def pix(self, *messages: bytes) -> list[bytes]:
        return asyncio.run(mllp_send("127.0.0.1", self.port, list(messages), timeout=20))


@contextmanager
def hub_with(tmp_path: Path, consumers: list[dict[str, Any]], loop: LoopThread | None = None) -> Iterator[Running]:
    """A hub with one pix-manager channel (``pix``) notifying ``consumers``, on ``loop`` (or its own)."""
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    port = free_port()
    opts = json.dumps({**OPTIONS, "consumers": consumers})
    (home / "channels" / "pix.yaml").write_text(
        f'source: {{url: "mllp://127.0.0.1:{port}"}}\nactor: {{name: pix-manager, options: {opts}}}\n',
        encoding="utf-8")
    cfg: Any = loopback_config(load_home(home),
                               delivery=DeliveryConfig(initial_backoff=0.2, multiplier=1.0, jitter=0.0))
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry, serve_http=False)
    own = loop is None
    thread = LoopThread() if loop is None else loop
    thread.run(hub.start())
    try:
        yield Running(hub=hub, port=port, loop=thread)
    finally:
        thread.run(hub.stop())
        if own:
            thread.close()


@contextmanager
def listening(*consumers: FakeConsumer) -> Iterator[LoopThread]:
    """A loop running ``consumers`` (bound before the hub starts, so their ports are known)."""
    loop = LoopThread()
    try:
        for c in consumers:
            loop.run(c.server.start())
        yield loop
    finally:
        for c in consumers:
            loop.run(c.server.stop())
        loop.close()


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def pid3(a31: str) -> list[str]:
    pid = next(s for s in a31.replace("\r\n", "\r").split("\r") if s.startswith("PID|"))
    return pid.split("|")[3].split("~")


def values(a31: str) -> set[str]:
    return {cx.split("^")[0] + "@" + cx.split("^")[3].split("&")[0] for cx in pid3(a31)}


def layout(a31: str) -> list[object]:
    """Segment names, MSH-9/MSH-12, EVN-1, the shape of each PID-3 CX, PID-5 and PV1-2 (for the corpus compare)."""
    segs = [s.split("|") for s in a31.replace("\r\n", "\r").split("\r") if s]
    by = {s[0]: s for s in segs}
    shapes = [[len(cx.split("^")), len(cx.split("^")[3].split("&")), cx.split("^")[4]] for cx in pid3(a31)]
    return [[s[0] for s in segs], [by["MSH"][8], by["MSH"][11], by["EVN"][1]], shapes[:1],
            [by["PID"][5], by["PV1"][2]]]


def test_link_and_merge_are_notified(tmp_path: Path) -> None:
    """A link sends every consumer the patient's ids in its domains; an A40 merge notifies the survivor."""
    everything, b_only = FakeConsumer(), FakeConsumer()
    with listening(everything, b_only) as loop:
        consumers: list[dict[str, Any]] = [
            {"name": "all", "url": f"mllp://127.0.0.1:{everything.server.port}", "receiving_application": "EHR",
             "receiving_facility": "CF"},
            {"name": "b-only", "url": f"mllp://127.0.0.1:{b_only.server.port}", "domains": ["HOSPB"]},
        ]
        with hub_with(tmp_path, consumers, loop) as hub:
            assert hub.hub.channel_status("pix") == "started", hub.hub.errors
            (g1,) = hub.pix(a01("G1", "A1^^^HOSPA", "ZHANG^SAN", "19800101", extra_pid=SAME))
            assert b"MSA|AA|G1" in g1
            wait_for(lambda: len(everything.received) == 1)
            assert values(everything.received[0]) >= {"A1@HOSPA"} and not b_only.received  # no HOSPB id yet
            (g3,) = hub.pix(a01("G3", "B1^^^HOSPB", "ZHANG^SAN", "19800101", facility="HB", extra_pid=SAME))
            assert b"MSA|AA|G3" in g3
            wait_for(lambda: bool(b_only.received) and any("B1^" in m for m in everything.received))
            linked = next(m for m in everything.received if "B1^" in m)
            ids = values(linked)
            assert {"A1@HOSPA", "B1@HOSPB"} <= ids and any(i.endswith("@IHEHUB") for i in ids)
            assert "B1^^^HOSPB&1.2.156.1.2&ISO^PI" in pid3(linked)
            assert all(values(m) == {"B1@HOSPB"} for m in b_only.received)  # the domain filter holds
            assert linked.split("\r")[0].split("|")[4:6] == ["EHR", "CF"]  # MSH-5/6 from the consumer's options

            # A2 is a second record of the same hospital; the A40 merges it into A1
            (g2,) = hub.pix(a01("G2", "A2^^^HOSPA", "LI^SI", "19700505"))
            wait_for(lambda: any("A2^" in m for m in everything.received))
            seen_b = len(b_only.received)
            n = len(everything.received)
            (g4,) = hub.pix(b"MSH|^~\\&|S|HA|HUB|HUB|20261127||ADT^A40^ADT_A39|G4|P|2.5\rEVN|A40\r"
                            b"PID|1||A1^^^HOSPA||ZHANG^SAN\rMRG|A2^^^HOSPA\r")
            assert b"MSA|AA|G2" in g2 and b"MSA|AA|G4" in g4
            wait_for(lambda: len(everything.received) > n and len(b_only.received) > seen_b)
            survivor = everything.received[n]
            assert {"A1@HOSPA", "B1@HOSPB"} <= values(survivor) and "A2^" not in survivor
            assert values(b_only.received[seen_b]) == {"B1@HOSPB"}

            # every A31 on the wire has the corpus sample's structure
            sample = (CORPUS_HL7 / "pixupdatenotification-adt-a31-2.hl7").read_bytes().decode("ascii")
            for m in everything.received + b_only.received:
                assert layout(m) == layout(sample), m
                assert m.split("\r")[0].split("|")[2] == "IHEHUB"  # MSH-3 default sending application

            # the bus keeps them: channel pix-iti10, one message per consumer and change, all delivered
            rows = hub.hub.store.search(MessageQuery(channel="pix-iti10", limit=100))
            assert len(rows) == len(everything.received) + len(b_only.received)
            assert {r["message_type"] for r in rows} == {"ADT^A31"}
            assert {r["content_type"] for r in rows} == {"application/hl7-v2"}
            wait_for(lambda: all(d["state"] == "sent" for r in rows for d in hub.hub.store.deliveries_of(r["id"])))
            assert sorted(d["destination"] for r in rows for d in hub.hub.store.deliveries_of(r["id"])) == sorted(
                ["all"] * len(everything.received) + ["b-only"] * len(b_only.received))


def test_consumer_down_then_up_is_retried_and_resendable(tmp_path: Path) -> None:
    """A consumer that is down is retried with the hub's backoff until it answers; resend sends it again."""
    port = free_port()
    consumer = FakeConsumer(port)
    with hub_with(tmp_path, [{"name": "late", "url": f"mllp://127.0.0.1:{port}"}]) as hub:
        (ack,) = hub.pix(a01("D1", "A9^^^HOSPA", "WANG^WU", "19900909"))
        assert b"MSA|AA|D1" in ack
        store = hub.hub.store
        wait_for(lambda: len(store.search(MessageQuery(channel="pix-iti10"))) == 1)
        msg_id = store.search(MessageQuery(channel="pix-iti10"))[0]["id"]

        def attempts() -> int:
            return int(store.deliveries_of(msg_id)[0]["attempts"])

        # two refused connections, both settled (a claimed attempt counts before it fails: wait for "error")
        wait_for(lambda: attempts() >= 2 and store.deliveries_of(msg_id)[0]["state"] == "error")
        assert store.deliveries_of(msg_id)[0]["state"] != "sent"
        hub.loop.run(consumer.server.start())
        try:
            wait_for(lambda: len(consumer.received) == 1)
            assert values(consumer.received[0]) >= {"A9@HOSPA"}
            wait_for(lambda: store.deliveries_of(msg_id)[0]["state"] == "sent")
            first = store.deliveries_of(msg_id)[0]
            assert first["destination"] == "late" and first["attempts"] >= 3

            assert hub.hub.resend([msg_id]) == 1  # the actor's destinations count as the channel's
            hub.hub.wake()
            wait_for(lambda: len(consumer.received) == 2)
            assert consumer.received[1] == consumer.received[0]

            # every attempt is audited as ITI-10 (ITI TF-2a 3.10.5.1): refused ones as failures, then successes
            from ihehub.atna import AuditQuery

            audits = hub.hub.audit_store
            wait_for(lambda: len(audits.search(AuditQuery(event_type="ITI-10", outcome=0)).records) >= 2)
            assert audits.search(AuditQuery(event_type="ITI-10", outcome=8)).records  # the refused attempts
            assert audits.search(AuditQuery(event_type="ITI-10", patient="A9")).records
        finally:
            hub.loop.run(consumer.server.stop())


@pytest.mark.parametrize(("consumers", "message"), [
    ([{"name": "x"}], "'url' is a required property"),
    ([{"name": "x", "url": "mllp://h:1"}, {"name": "x", "url": "mllp://h:2"}], "'x' is used twice"),
    ([{"name": "x", "url": "mllp://h:1", "domain": ["A"]}], "consumers/0: Additional properties"),
    ([{"name": "x y", "url": "mllp://h:1"}], "consumers/0/name"),
])
def test_consumer_option_errors(consumers: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(OptionsError, match=message.replace("(", r"\(")):
        ActorOptions.parse("pix-manager", {"consumers": consumers})
    with pytest.raises(OptionsError, match="belong to a pix-manager"):
        ActorOptions.parse("pdq-supplier", {"consumers": [{"name": "x", "url": "mllp://h:1"}]})


@pytest.mark.parametrize(("consumer", "message"), [
    ({"name": "c", "url": "mllp://127.0.0.1:9", "domains": ["NOPE"]}, "consumers/c: unknown domain 'NOPE'"),
    ({"name": "c", "url": "mlp://127.0.0.1:9"}, "mlp"),
])
def test_bad_consumer_keeps_the_channel_down(tmp_path: Path, consumer: dict[str, Any], message: str) -> None:
    with hub_with(tmp_path, [consumer]) as hub:
        assert hub.hub.channel_status("pix") == "error"
        assert message in hub.hub.errors["pix"]
