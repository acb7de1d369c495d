"""kill -9 in the middle of a stream: every message that got AA reaches the destination.

10 MLLP clients stream 5,000 ADT messages to a channel whose destination is an HTTP receiver in this
test.  The serve process is killed with SIGKILL mid-stream and restarted; the clients behave like real
senders (a message without an AA is sent again after reconnecting).  Afterwards every control id that
was acknowledged with AA has reached the receiver (duplicates only with the same control id), and the
message browser (the HTTP API) lists each one.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.hubproc import HubProcess, adt, ihehub, mllp_exchange, msa_code, write_home
from tests.helpers.receiver import Receiver

CLIENTS = 10
TOTAL = 5000

CHANNEL = """\
name: adt-crash
source:
  url: mllp://127.0.0.1:{port}
destinations:
  - name: receiver
    url: {url}/adt
    options: {{timeout: 10}}
"""


async def stream(port: int, ids: list[int], acked: set[str], lock: threading.Lock, stop_at: float) -> None:
    pending = list(ids)
    while pending and time.monotonic() < stop_at:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1)
            continue
        try:
            while pending:
                i = pending[0]
                ack = await mllp_exchange(reader, writer, adt(i))
                if msa_code(ack) == "AA":
                    with lock:
                        acked.add(f"CRASH{i:06d}")
                    pending.pop(0)
                else:
                    await asyncio.sleep(0.05)  # AR: hub not ready, resend
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            await asyncio.sleep(0.1)  # connection died (kill -9): reconnect and resend the unacknowledged one
        finally:
            writer.close()


@pytest.mark.slow
def test_kill9_mid_stream_loses_nothing_acknowledged(tmp_path: Path) -> None:
    home = tmp_path / "home"
    mllp_port = free_port()
    acked: set[str] = set()
    lock = threading.Lock()
    with Receiver() as rx:
        http_port = write_home(home, channels={"adt-crash": CHANNEL.format(port=mllp_port, url=rx.url)})
        hub = HubProcess(home, http_port).start(wait_for_port=mllp_port)

        async def clients() -> None:
            per = [list(range(c, TOTAL, CLIENTS)) for c in range(CLIENTS)]
            await asyncio.gather(*(stream(mllp_port, ids, acked, lock, time.monotonic() + 240) for ids in per))

        t = threading.Thread(target=asyncio.run, args=(clients(),))
        t.start()
        deadline = time.monotonic() + 120
        while len(acked) < TOTAL // 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        acked_before_kill = len(acked)
        hub.kill9()
        assert 0 < acked_before_kill < TOTAL, "the kill must land mid-stream"
        time.sleep(0.5)
        hub = HubProcess(home, http_port).start(wait_for_port=mllp_port)
        t.join(300)
        assert not t.is_alive()
        assert len(acked) == TOTAL, f"only {len(acked)} of {TOTAL} acknowledged"

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            received = rx.control_ids()
            if acked <= set(received):
                break
            time.sleep(0.5)
        received = rx.control_ids()
        missing = acked - set(received)
        assert not missing, f"{len(missing)} acknowledged messages never delivered, e.g. {sorted(missing)[:5]}"
        assert set(received) <= acked  # duplicates, if any, carry a control id that was sent

        # The message browser shows each acknowledged message.
        tok = ihehub(home, "token", "create", "--role", "readonly")
        assert tok.returncode == 0, tok.stderr
        headers = {"Authorization": f"Bearer {tok.stdout.strip()}"}
        seen: set[str] = set()
        offset: int | None = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", headers=headers, timeout=30) as client:
            while offset is not None:
                r = client.get("/api/messages", params={"channel": "adt-crash", "limit": 1000, "offset": offset})
                assert r.status_code == 200, r.text
                page = r.json()
                seen.update(item["control_id"] for item in page["items"])
                offset = page.get("next_offset")
            assert acked <= seen
            # the receiver answers before the hub records "sent": wait until nothing is in flight
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(
                client.get("/api/messages", params={"channel": "adt-crash", "status": s, "limit": 1}).json()["items"]
                for s in ("queued", "sending", "error")
            ):
                time.sleep(0.2)
            one = client.get("/api/messages", params={"control_id": "CRASH000042"}).json()["items"][0]
            detail = client.get(f"/api/messages/{one['id']}").json()
            assert json.dumps(detail)  # serialisable
            assert detail["destinations"] == {"receiver": "sent"}
            assert detail["deliveries"][0]["attempt_log"][-1]["ok"] is True
        assert hub.stop() == 0
