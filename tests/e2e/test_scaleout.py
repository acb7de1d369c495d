"""Scale-out end to end with real processes: `ihehub serve` + 2 `ihehub worker` on the machine's
PostgreSQL and RabbitMQ.  MLLP in, HTTP out; a worker is killed with -9 mid-stream; every message that
got AA is delivered, and the message browser shows it as sent."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.hubproc import HubProcess, adt, ihehub, mllp_exchange, msa_code, write_home
from tests.helpers.receiver import Receiver

pytestmark = pytest.mark.scaleout

CHANNEL = """\
name: adt-scale
source:
  url: mllp://127.0.0.1:{port}
fifo: {fifo}
destinations:
  - name: receiver
    url: {url}/{path}
"""


async def send_all(port: int, ids: list[str], clients: int = 5) -> set[str]:
    acked: set[str] = set()

    async def one(chunk: list[str]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for cid in chunk:  # control ids look like S000042 (see adt())
                ack = await mllp_exchange(reader, writer, adt(int(cid[1:]), prefix=cid[0]))
                if msa_code(ack) == "AA":
                    acked.add(cid)
        finally:
            writer.close()

    await asyncio.gather(*(one(ids[i::clients]) for i in range(clients)))
    return acked


def test_serve_and_two_workers_kill9_a_worker(tmp_path: Path, pg_database: tuple[str, str], broker_url: str) -> None:
    scale_db, db_url = pg_database
    home = tmp_path / "home"
    port = free_port()
    total = 1500
    with Receiver() as rx:
        channel = CHANNEL.format(port=port, fifo="false", url=rx.url, path="adt")
        http_port = write_home(home, channels={"adt-scale": channel},
                               database=db_url,
                               broker=broker_url, extra=f"queue_prefix: t{scale_db}")
        serve = HubProcess(home, http_port).start(wait_for_port=port)
        workers = [HubProcess(home, http_port, role="worker", log_name=f"worker{i}.log").start() for i in range(2)]
        try:
            ids = [f"S{i:06d}" for i in range(total)]
            first = asyncio.run(send_all(port, ids[: total // 2]))
            deadline = time.monotonic() + 30
            while len(rx.control_ids()) < 100 and time.monotonic() < deadline:
                time.sleep(0.05)
            workers[0].kill9()  # mid-stream: its unacked broker messages go to the other worker
            second = asyncio.run(send_all(port, ids[total // 2:]))
            acked = first | second
            assert len(acked) == total
            deadline = time.monotonic() + 90
            while not acked <= set(rx.control_ids()) and time.monotonic() < deadline:
                time.sleep(0.2)
            received = rx.control_ids()
            missing = acked - set(received)
            assert not missing, f"{len(missing)} never delivered, e.g. {sorted(missing)[:5]} " + \
                (home / "worker1.log").read_text(errors="replace")[-2000:]
            assert set(received) <= acked
            tok = ihehub(home, "token", "create", "--role", "readonly").stdout.strip()
            import httpx

            r = httpx.get(f"http://127.0.0.1:{http_port}/api/messages",
                          params={"channel": "adt-scale", "status": "sent", "limit": 1000},
                          headers={"Authorization": f"Bearer {tok}"}, timeout=30)
            assert r.status_code == 200 and len(r.json()["items"]) == 1000
            lst = ihehub(home, "channels", "list")
            assert "adt-scale" in lst.stdout
        finally:
            for w in workers:
                w.stop()
            assert serve.stop() == 0
            import kombu

            with kombu.Connection(broker_url) as conn:  # durable queues outlive the test: remove ours
                conn.default_channel.queue_delete(f"t{scale_db}.adt-scale.receiver")
