"""Helpers of the API tests: a real hub on a temp home, running in a loop thread, with real sockets.

* ``receiver`` — an HTTP server on a free loopback port standing in for a RIS/PACS:
  ``/ok`` answers 200 with a UTF-8 ACK, ``/reject`` answers 400 (a dead letter at once).
* ``running`` — a started `Hub` (HTTP on port 0) with channels ``adt`` (``mllp://127.0.0.1:0``
  source; destinations ``ris`` → /ok and ``pacs`` → /reject) and ``lab`` (``http://127.0.0.1:0``
  source; destination ``archive`` → /ok), a disabled ``blocked`` channel whose port is taken, plus one
  token per role.
* ``store`` — a migrated message store without a hub, for token and ASGI tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.server
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from ihehub.api import create_token
from ihehub.bus.store import MessageQuery
from ihehub.channels.mllp import MLLPSource
from ihehub.channels.mllp_wire import mllp_send
from ihehub.channels.registry import Registry
from ihehub.config import init_home, load_channels, load_home
from ihehub.hub import Hub
from tests.conftest import loopback_config

T = TypeVar("T")

CORPUS = (Path(__file__).parents[2] / "../shared/corpus/ipf/hl7v2").resolve()
ROLES = ("admin", "operator", "auditor", "readonly")


def corpus_message(name: str) -> bytes:
    """A public HL7 fixture with the segment separator HL7 v2 requires (CR), not the file's CRLF."""
    return (CORPUS / name).read_bytes().replace(b"\r\n", b"\r").rstrip(b"\r") + b"\r"


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class LoopThread:
    """An asyncio loop in a daemon thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hub-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class _ReceiverHandler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.record(self.path, body)
        if self.path == "/ok":
            status, reply = 200, "ACK 已收到".encode()
        else:
            status, reply = 400, b"patient unknown"
        self.send_response(status)
        self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        return None


class Receiver(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.port: int = self.server_address[1]
        self._lock = threading.Lock()
        self.received: list[tuple[str, bytes]] = []
        self._thread = threading.Thread(target=self.serve_forever, name="receiver", daemon=True)
        self._thread.start()

    def record(self, path: str, body: bytes) -> None:
        with self._lock:
            self.received.append((path, body))

    def count(self, path: str, needle: bytes = b"") -> int:
        with self._lock:
            return sum(1 for p, b in self.received if p == path and needle in b)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


CHANNELS = {
    "adt.yaml": """\
description: ADT feed from the HIS
source:
  url: mllp://127.0.0.1:0
destinations:
  - name: ris
    url: http://127.0.0.1:{port}/ok
  - name: pacs
    url: http://127.0.0.1:{port}/reject
""",
    "lab.yaml": """\
description: Lab results
source:
  url: http://127.0.0.1:0/lab
destinations:
  - name: archive
    url: http://127.0.0.1:{port}/ok
""",
    # Disabled; its source port is the receiver's, so starting it fails (409).
    "blocked.yaml": """\
description: Listens on a port that is taken
enabled: false
source:
  url: http://127.0.0.1:{port}/blocked
""",
}


def make_home(root: Path, receiver_port: int, *, auth_required: bool = True) -> Path:
    """A home with our channels only (``channels/`` exists first, so no example channels)."""
    home = root / "home"
    (home / "channels").mkdir(parents=True)
    for name, text in CHANNELS.items():
        (home / "channels" / name).write_text(text.format(port=receiver_port), encoding="utf-8")
    if not auth_required:
        (home / "ihehub.yaml").write_text("auth:\n  required: false\n", encoding="utf-8")
    init_home(home)
    return home


def build_hub(home: Path) -> Hub:
    cfg = load_home(home, environ={"IHEHUB_HTTP_PORT": "0"})
    cfg = loopback_config(cfg)  # type: ignore[assignment]
    registry = Registry()
    return Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)


@dataclasses.dataclass
class Running:
    hub: Hub
    loop: LoopThread
    receiver: Receiver
    client: httpx.Client
    tokens: dict[str, str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.hub.http_port}"

    def source_url(self, channel: str) -> str:
        source: Any = self.hub.runtimes[channel].source
        return f"http://127.0.0.1:{source.port}{source.path}"

    def auth(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def get(self, path: str, role: str = "admin", **kw: Any) -> httpx.Response:
        return self.client.get(self.base + path, headers=self.auth(role), **kw)

    def post(self, path: str, role: str = "admin", **kw: Any) -> httpx.Response:
        return self.client.post(self.base + path, headers=self.auth(role), **kw)

    def send_hl7(self, channel: str, raw: bytes) -> str:
        """Send over the channel's own source (MLLP or HTTP); the hub's message id once it is stored."""
        source: Any = self.hub.runtimes[channel].source
        if isinstance(source, MLLPSource):
            ack = asyncio.run(mllp_send("127.0.0.1", source.port, [raw], timeout=10))[0]
            assert b"MSA|AA|" in ack, ack
            control_id = raw.split(b"\r", 1)[0].split(b"|")[9].decode()
            rows = self.hub.store.search(MessageQuery(control_id=control_id, limit=1))
            return str(rows[0]["id"])
        hl7 = {"content-type": "application/hl7-v2"}
        r = self.client.post(self.source_url(channel), content=raw, headers=hl7)
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    def delivery_states(self, message_id: str) -> dict[str, str]:
        return {d["destination"]: d["state"] for d in self.hub.store.deliveries_of(message_id)}

    def wait_settled(self, message_id: str, timeout: float = 10.0) -> dict[str, str]:
        def settled() -> dict[str, str] | None:
            states = self.delivery_states(message_id)
            return states if states and all(s in ("sent", "dead") for s in states.values()) else None

        result: dict[str, str] = wait_for(settled, timeout, f"deliveries of {message_id} to settle")
        return result




@contextlib.contextmanager
def start_hub(root: Path, receiver: Receiver) -> Iterator[Running]:
    """A started hub on a new home under ``root``; stopped on exit."""
    hub = build_hub(make_home(root, receiver.port))
    loop = LoopThread()
    try:
        loop.run(hub.start())
        tokens = {role: create_token(hub.store, role=role, name=f"test-{role}") for role in ROLES}
        with httpx.Client(timeout=10) as client:
            yield Running(hub=hub, loop=loop, receiver=receiver, client=client, tokens=tokens)
    finally:
        try:
            loop.run(hub.stop())
        finally:
            loop.close()


def asgi_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub.test")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# ITI-8 admit of 张三 in GB 18030 (MSH-18), MRN MRN778899.
CN_ADT = (
    "MSH|^~\\&|HIS|H1|RIS|R1|20240501083000||ADT^A01^ADT_A01|CN0001|P|2.5|||||CHN|GB 18030-2000\r"
    "EVN|A01|20240501083000\r"
    "PID|1||MRN778899^^^H1^MR||张三^^^^^^L||19800101|M\r"
).encode("gb18030")
LAB_ORU = (
    b"MSH|^~\\&|LIS|H1|RIS|R1|20240501090000||ORU^R01^ORU_R01|LAB42|P|2.5\r"
    b"PID|1||MRN778899^^^H1^MR\rOBR|1||LAB42|GLU\r"
)


def seed(running: Running) -> dict[str, str]:
    """Three messages over the wire, all deliveries settled: adt→ris sent, adt→pacs dead, lab→archive sent."""
    ids = {}
    for key, channel, raw in (("iti8", "adt", corpus_message("camel-iti-8.hl7")),
                              ("cn", "adt", CN_ADT), ("lab", "lab", LAB_ORU)):
        ids[key] = running.send_hl7(channel, raw)
        running.wait_settled(ids[key])
        time.sleep(0.002)  # distinct received_at: the list is newest first
    return ids
