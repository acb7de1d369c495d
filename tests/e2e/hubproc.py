"""Run ``ihehub serve`` / ``ihehub worker`` as real processes on a temporary home, and an MLLP client."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def write_home(home: Path, *, channels: dict[str, str], database: str | None = None, broker: str | None = None,
               extra: str = "") -> int:
    """A home with its own ports; returns the HTTP port."""
    http_port = free_port()
    (home / "channels").mkdir(parents=True, exist_ok=True)
    lines = [
        "node_id: test-hub",
        f"http: {{host: 127.0.0.1, port: {http_port}}}",
        f"database: {database or 'sqlite:///db/ihehub.sqlite'}",
        f"broker: {broker or 'null'}",
        "delivery: {max_attempts: 50, initial_backoff: 0.2, max_backoff: 2.0, multiplier: 2.0, jitter: 0.1, "
        "lease_seconds: 3}",
        "retention: {body_days: 0}",
        "log_level: warning",
        f"actors: {{syslog: {{tls_port: {free_port()}, udp_port: {free_port()}}}, dicom: {{enabled: false}}}}",
        extra,
    ]
    (home / "ihehub.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, text in channels.items():
        (home / "channels" / f"{name}.yaml").write_text(text, encoding="utf-8")
    return http_port


def ihehub(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ihehub", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ | {"PYTHONUNBUFFERED": "1"})


class HubProcess:
    def __init__(self, home: Path, http_port: int, role: str = "serve", log_name: str = "serve.log") -> None:
        self.home = home
        self.http_port = http_port
        self.role = role
        self.log_path = home / log_name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_for_port: int | None = None) -> HubProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ihehub", "--home", str(self.home), self.role],
                                     stdout=log, stderr=subprocess.STDOUT)
        if self.role == "serve":
            self.wait_http()
            if wait_for_port:
                wait_port(wait_for_port)
        return self

    def wait_http(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ihehub {self.role} exited: {self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1).status_code in (200, 503):
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(f"ihehub serve did not answer /healthz: {self.log_path.read_text(errors='replace')[-3000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def adt(i: int, prefix: str = "CRASH") -> bytes:
    return (f"MSH|^~\\&|HIS|H1|IHEHUB|HUB|20261127101010||ADT^A01^ADT_A01|{prefix}{i:06d}|P|2.5\r"
            f"EVN|A01|20261127101010\rPID|1||MRN{i:06d}^^^H1^MR||Zhang^San{i}||19800101|M\rPV1|1|I\r").encode()


async def mllp_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes,
                        timeout: float = 10) -> bytes:
    writer.write(VT + payload + FS + CR)
    await writer.drain()
    data = await asyncio.wait_for(reader.readuntil(FS + CR), timeout)
    return data[data.index(VT) + 1: -2]


def msa_code(ack: bytes) -> str:
    for seg in ack.split(b"\r"):
        if seg.startswith(b"MSA"):
            return seg.split(b"|")[1].decode()
    return ""
