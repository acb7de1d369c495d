"""Consistent Time (ITI-1) client against a real SNTP responder on loopback (RFC 4330 server written here,
with a configurable clock offset): offset, delay, jitter, last success; the over-threshold alert (logged,
audited as a Security Alert, once per excursion); and the hub's ``/healthz`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ihehub.atna import AuditQuery
from ihehub.atna.timeclient import TimeClient, parse_ntp_server
from ihehub.channels.registry import Registry
from ihehub.config import AtnaConfig, init_home, load_channels, load_home
from ihehub.config.model import TimeConfig
from ihehub.hub import Hub
from tests.api.api_support import LoopThread, wait_for
from tests.conftest import CORPUS, free_port, loopback_config

NTP_EPOCH = 2208988800  # 1900-01-01 to 1970-01-01


def _ts(t: float) -> int:
    return (int(t) + NTP_EPOCH) << 32 | int((t % 1) * 2**32)


class SntpServer:
    """A tiny SNTP server (RFC 4330 4): answers every mode-3 request with its clock plus ``offset``."""

    def __init__(self, offset: float = 0.0, stratum: int = 1) -> None:
        self.offset = offset
        self.stratum = stratum
        self.requests = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            received = time.time() + self.offset
            if len(data) < 48 or data[0] & 0x7 != 3:
                continue  # not a client request
            self.requests += 1
            origin = data[40:48]
            header = struct.pack("!BBbbII4s", (0 << 6) | (3 << 3) | 4, self.stratum, data[2], -20, 0, 0, b"LOCL")
            reply = (header + struct.pack("!Q", _ts(received - 10)) + origin
                     + struct.pack("!QQ", _ts(received), _ts(time.time() + self.offset)))
            self.sock.sendto(reply, addr)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _offset_in(text: str) -> float:
    """The signed offset in 'clock offset +2.500 s ...'."""
    found = re.search(r"clock offset ([+-][0-9.]+) s", text)
    assert found, text
    return float(found.group(1))


@pytest.fixture
def sntp() -> Iterator[SntpServer]:
    server = SntpServer()
    yield server
    server.close()


def test_offset_delay_jitter_and_one_alert_per_excursion(sntp: SntpServer) -> None:
    alerts: list[tuple[str, bool]] = []
    client = TimeClient([sntp.address], threshold=1.0, samples=4, timeout=2.0,
                        on_alert=lambda text, recovered: alerts.append((text, recovered)))
    assert client.health() == "no NTP answer yet"
    sample = asyncio.run(client.poll())
    assert sample is not None and abs(sample.offset) < 0.2 and 0 <= sample.delay < 1.0
    assert client.health() == "ok" and client.jitter is None and alerts == []

    sntp.offset = 2.5  # the node's clock is now 2.5 s behind the time server
    sample = asyncio.run(client.poll())
    assert sample is not None and abs(sample.offset - 2.5) < 0.2
    assert len(alerts) == 1 and not alerts[0][1] and "beyond the 1 s threshold" in alerts[0][0]
    assert abs(_offset_in(alerts[0][0]) - 2.5) < 0.2 and sntp.address in alerts[0][0]
    assert abs(_offset_in(client.health()) - 2.5) < 0.2 and client.jitter is not None
    assert abs(client.jitter - 2.5) < 0.3  # RFC 5905 jitter: RMS of (newest - older) offsets
    asyncio.run(client.poll())
    assert len(alerts) == 1  # still beyond: no second alert

    sntp.offset = 0.0
    asyncio.run(client.poll())
    assert len(alerts) == 2 and alerts[1][1] and "back within" in alerts[1][0]
    st = client.status()
    assert st["status"] == "ok" and st["server"] == sntp.address and st["last_error"] is None
    assert abs(st["offset_s"]) < 0.2 and st["last_success"] > time.time() - 30
    assert sntp.requests == 4


def test_no_answer_and_unsynchronised_servers(sntp: SntpServer) -> None:
    silent = f"127.0.0.1:{free_port()}"
    client = TimeClient([silent], timeout=0.3)
    assert asyncio.run(client.poll()) is None
    assert client.last_error and silent in client.last_error and client.health().startswith("no NTP answer yet")
    sntp.stratum = 0  # kiss-o'-death / unsynchronised
    client = TimeClient([sntp.address], timeout=1.0)
    assert asyncio.run(client.poll()) is None and "not synchronised" in (client.last_error or "")
    # with a good and a silent server, the good answer is used
    sntp.stratum = 2
    client = TimeClient([silent, sntp.address], timeout=0.3)
    sample = asyncio.run(client.poll())
    assert sample is not None and sample.server == sntp.address


@pytest.mark.parametrize(("text", "expected"), [
    ("pool.ntp.org", ("pool.ntp.org", 123)), ("127.0.0.1:1123", ("127.0.0.1", 1123)),
    ("[::1]:124", ("::1", 124)), ("[::1]", ("::1", 123)),
])
def test_parse_server(text: str, expected: tuple[str, int]) -> None:
    assert parse_ntp_server(text) == expected


@pytest.mark.parametrize("bad", ["", "host:", "host:99999", "host:abc"])
def test_bad_server_is_refused_with_its_name(bad: str) -> None:
    with pytest.raises(ValueError, match="NTP server"):
        TimeClient([bad])


def _hub(home: Path, time_cfg: TimeConfig | None) -> Hub:
    atna = AtnaConfig(schema=CORPUS / "ipf/audit/dicom2017c.xsd", schematron=CORPUS / "wustl/atna-schematron")
    changes: dict[str, object] = {"atna": atna}
    if time_cfg is not None:
        changes["time"] = time_cfg
    cfg = loopback_config(load_home(home), **changes)
    registry = Registry()
    return Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)  # type: ignore[arg-type]


def test_hub_healthz_metrics_and_audit_of_a_clock_beyond_threshold(tmp_path: Path, sntp: SntpServer) -> None:
    home = tmp_path / "home"
    init_home(home)
    sntp.offset = 3.0
    loop = LoopThread()
    hub = _hub(home, TimeConfig(servers=(sntp.address,), interval=0.3, threshold=1.0))
    loop.run(hub.start(), timeout=60)
    try:
        base = f"http://127.0.0.1:{hub.http_port}"
        wait_for(lambda: hub.time_client.last is not None, 10, "a first NTP answer")
        body = httpx.get(f"{base}/healthz").json()
        assert body["status"] == "degraded" and "beyond the 1 s threshold" in body["checks"]["time"]
        assert abs(_offset_in(body["checks"]["time"]) - 3.0) < 0.3
        assert body["time"]["server"] == sntp.address and abs(body["time"]["offset_s"] - 3.0) < 0.3
        assert body["time"]["last_success"] and body["time"]["threshold_s"] == 1.0
        text = httpx.get(f"{base}/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("ihehub_time_offset_seconds{"))
        assert f'server="{sntp.address}"' in line and abs(float(line.split()[-1]) - 3.0) < 0.3
        assert any(x.startswith("ihehub_time_last_sync_timestamp{") for x in text.splitlines())
        # audited once as a Security Alert (110113), type Security Configuration (110129), with the detail
        store = hub.audit_store
        wait_for(lambda: store.count(AuditQuery(event_id="110113")) >= 1, 10, "the time alert audit")
        wait_for(lambda: sntp.requests >= 3, 10, "more polls")
        recs = store.search(AuditQuery(event_id="110113", limit=10), with_raw=True).records
        assert len(recs) == 1 and recs[0].event_type == "110129" and recs[0].valid, recs
        details = [base64.b64decode(v) for v in re.findall(rb'value="([A-Za-z0-9+/=]+)"', recs[0].raw or b"")]
        assert any(b"beyond the 1 s threshold" in d for d in details), details
        sntp.offset = 0.0
        wait_for(lambda: httpx.get(f"{base}/healthz").json()["checks"]["time"] == "ok", 10, "back in time")
        assert store.count(AuditQuery(event_id="110113")) == 1
    finally:
        loop.run(hub.stop(), timeout=60)
        loop.close()


def test_healthz_says_not_configured_without_servers(tmp_path: Path) -> None:
    home = tmp_path / "home"
    init_home(home)
    loop = LoopThread()
    hub = _hub(home, None)
    loop.run(hub.start(), timeout=60)
    try:
        body = httpx.get(f"http://127.0.0.1:{hub.http_port}/healthz").json()
        assert body["time"] == {"status": "not configured"} and "time" not in body["checks"]
        assert body["status"] == "ok"
    finally:
        loop.run(hub.stop(), timeout=60)
        loop.close()
