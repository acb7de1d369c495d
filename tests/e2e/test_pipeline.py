"""The embedded hub end to end, in process: MLLP in, filter, transformer, HTTP out, retry, FIFO, dedup."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ihehub.bus.store import MessageQuery
from ihehub.channels.mllp_wire import mllp_send
from ihehub.channels.registry import Registry
from ihehub.config import load_channels, load_home
from ihehub.hub import Hub
from tests.api.api_support import LoopThread, wait_for
from tests.conftest import free_port, loopback_config
from tests.helpers.receiver import Receiver


def adt(control_id: str, *, name: str = "Zhang^San", trigger: str = "A01", msg_type: str = "ADT",
        processing: str = "P") -> bytes:
    return (f"MSH|^~\\&|HIS|H1|IHEHUB|HUB|20261127101010||{msg_type}^{trigger}|{control_id}|{processing}|2.5\r"
            f"EVN|{trigger}|20261127101010\rPID|1||MRN-{control_id}^^^H1^MR||{name}||19800101|M\r").encode()


def ack_code(ack: bytes) -> str:
    seg = next(s for s in ack.split(b"\r") if s.startswith(b"MSA"))
    return seg.split(b"|")[1].decode()


@dataclasses.dataclass
class Env:
    hub: Hub
    loop: LoopThread
    rx: Receiver
    ports: dict[str, int]

    def send(self, channel: str, *payloads: bytes) -> list[bytes]:
        return asyncio.run(mllp_send("127.0.0.1", self.ports[channel], list(payloads), timeout=10))


def _failing_first(n: int) -> object:
    """Receiver policy: the first n requests of each control id get 500."""
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def status(req: dict[str, object]) -> int:
        cid = str(req["headers"].get("x-control-id"))  # type: ignore[union-attr]
        with lock:
            seen[cid] = seen.get(cid, 0) + 1
            return 500 if seen[cid] <= n and cid.startswith("RETRY") else 200

    return status


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    """The same hub on the embedded default (SQLite) and on the machine's PostgreSQL."""
    database = "sqlite:///db/ihehub.sqlite"
    if request.param == "postgresql":
        database = request.getfixturevalue("pg_database")[1]
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    ports = {name: free_port() for name in ("adt", "fifo", "dedup", "xform", "broken")}
    (home / "ihehub.yaml").write_text(
        f"database: {database}\n"
        "delivery: {max_attempts: 5, initial_backoff: 0.05, max_backoff: 0.2, jitter: 0, lease_seconds: 5}\n"
        "retention: {body_days: 0}\n", encoding="utf-8")
    with Receiver(_failing_first(2)) as rx:  # type: ignore[arg-type]
        channels = {
            "adt": f"""
source: {{url: "mllp://127.0.0.1:{ports['adt']}"}}
filter: 'MSH-9.1 == "ADT"'
destinations:
  - {{name: ris, url: "{rx.url}/ris"}}
  - {{name: a08-only, url: "{rx.url}/a08", filter: 'MSH-9.2 == "A08"'}}
""",
            "fifo": f"""
source: {{url: "mllp://127.0.0.1:{ports['fifo']}"}}
fifo: true
destinations:
  - {{name: ris, url: "{rx.url}/fifo", retry: {{max_attempts: 50, initial_backoff: 0.05, max_backoff: 0.1}}}}
""",
            "dedup": f"""
source: {{url: "mllp://127.0.0.1:{ports['dedup']}"}}
dedup: true
destinations:
  - {{name: ris, url: "{rx.url}/dedup"}}
""",
            "xform": f"""
source: {{url: "mllp://127.0.0.1:{ports['xform']}"}}
transformer: tests.e2e.transformers:upper_names
destinations:
  - {{name: ris, url: "{rx.url}/xform"}}
""",
            "broken": f"""
source: {{url: "mllp://127.0.0.1:{ports['broken']}"}}
transformer: tests.e2e.transformers:explode
destinations:
  - {{name: ris, url: "{rx.url}/broken"}}
""",
        }
        for name, text in channels.items():
            (home / "channels" / f"{name}.yaml").write_text(text, encoding="utf-8")
        cfg = load_home(home)
        cfg = loopback_config(cfg)  # type: ignore[assignment]
        registry = Registry()
        hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)
        loop = LoopThread()
        loop.run(hub.start())
        try:
            yield Env(hub=hub, loop=loop, rx=rx, ports=ports)
        finally:
            loop.run(hub.stop())
            loop.close()


def bodies(rx: Receiver, path: str) -> list[bytes]:
    with rx.lock:
        return [r["body"] for r in rx.requests if r["path"] == path and r["status"] == 200]  # type: ignore[misc]


def test_filter_routing_and_retry_until_sent(env: Env) -> None:
    acks = env.send("adt", adt("RETRY1"), adt("OK2", trigger="A08"), adt("ORU3", msg_type="ORU", trigger="R01"))
    assert [ack_code(a) for a in acks] == ["AA", "AA", "AA"]
    wait_for(lambda: len(bodies(env.rx, "/ris")) == 2 and len(bodies(env.rx, "/a08")) == 1, 10, "deliveries")
    store = env.hub.store
    # the receiver answers before the hub records the outcome: wait for the deliveries to settle too
    in_flight = ("queued", "sending", "error")
    wait_for(lambda: not any(store.search(MessageQuery(channel="adt", status=s)) for s in in_flight),
             10, "deliveries to settle")
    (retry,) = store.search(MessageQuery(control_id="RETRY1"))
    d = store.deliveries_of(retry["id"])
    assert [x["state"] for x in d] == ["sent"] and d[0]["attempts"] == 3
    assert [a["ok"] for a in d[0]["attempt_log"]] == [False, False, True]
    assert "HTTP 500" in (d[0]["attempt_log"][0]["error"] or "")
    (oru,) = store.search(MessageQuery(control_id="ORU3"))
    assert oru["status"] == "filtered" and oru["destinations"] == {}
    (a08,) = store.search(MessageQuery(control_id="OK2"))
    assert a08["destinations"] == {"ris": "sent", "a08-only": "sent"}


def test_fifo_keeps_order_through_retries(env: Env) -> None:
    ids = ["RETRYF0"] + [f"F{i}" for i in range(1, 15)]
    acks = env.send("fifo", *(adt(c) for c in ids))
    assert all(ack_code(a) == "AA" for a in acks)
    wait_for(lambda: len(bodies(env.rx, "/fifo")) == len(ids), 15, "fifo deliveries")
    got = [b.split(b"|")[9].decode() for b in bodies(env.rx, "/fifo")]
    assert got == ids  # the head was retried twice; nothing overtook it
    with env.rx.lock:
        attempts = [r["headers"]["x-control-id"] for r in env.rx.requests if r["path"] == "/fifo"]  # type: ignore[index]
    assert attempts[:3] == ["RETRYF0"] * 3


def test_dedup_acks_but_delivers_once(env: Env) -> None:
    acks = env.send("dedup", adt("D1"), adt("D1"), adt("D2"))
    assert [ack_code(a) for a in acks] == ["AA", "AA", "AA"]
    wait_for(lambda: len(bodies(env.rx, "/dedup")) == 2, 10, "dedup deliveries")
    time.sleep(0.3)
    assert len(bodies(env.rx, "/dedup")) == 2
    assert len(env.hub.store.search(MessageQuery(channel="dedup", status="duplicate"))) == 1


def test_transformer_output_is_delivered_and_stored(env: Env) -> None:
    env.send("xform", adt("X1", name="Li^Si"))
    wait_for(lambda: bodies(env.rx, "/xform"), 10, "transformed delivery")
    assert b"LI^SI" in bodies(env.rx, "/xform")[0]
    (row,) = env.hub.store.search(MessageQuery(control_id="X1"))
    full = env.hub.store.get_message(row["id"])
    assert full is not None and b"Li^Si" in full["raw"] and b"LI^SI" in full["transformed"]


def test_transformer_error_is_an_AE_and_stored(env: Env) -> None:
    (ack,) = env.send("broken", adt("B1"))
    assert ack_code(ack) == "AE"
    assert b"mapping table for ward" in ack and b"ERR|" in ack
    (row,) = env.hub.store.search(MessageQuery(control_id="B1"))
    assert row["status"] == "error" and "mapping table" in row["error"]


def test_gb18030_passes_through_byte_for_byte(env: Env) -> None:
    raw = ("MSH|^~\\&|HIS|医院|IHEHUB|HUB|20261127||ADT^A01|GB18030-1|P|2.5|||||CHN|GB 18030-2000\r"
           "PID|1||MRN9^^^H1||欧阳^娜娜||19800101|F\r").encode("gb18030")
    (ack,) = env.send("adt", raw)
    assert ack_code(ack) == "AA"
    wait_for(lambda: raw in bodies(env.rx, "/ris"), 10, "GB18030 delivery")
    with env.rx.lock:
        req = next(r for r in env.rx.requests if r["body"] == raw)
    assert "gb18030" in str(req["headers"]["content-type"]).lower()  # type: ignore[index]
    assert env.hub.store.search(MessageQuery(text="欧阳"))[0]["control_id"] == "GB18030-1"


def test_channel_stop_and_start_from_another_process(env: Env) -> None:
    """`ihehub channels stop` writes channel_state; the running hub applies it within about a second."""
    env.hub.store.set_channel_enabled("dedup", False, "cli")
    wait_for(lambda: env.hub.channel_status("dedup") == "stopped", 5, "channel stopped")
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", env.ports["dedup"]), timeout=1):
        pass
    env.hub.store.set_channel_enabled("dedup", True, "cli")
    wait_for(lambda: env.hub.channel_status("dedup") == "started", 5, "channel started")
    assert ack_code(env.send("dedup", adt("AFTER"))[0]) == "AA"
