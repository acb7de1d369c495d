"""The database goes away: sources stop acknowledging (AR 207), nothing acknowledged is lost, and
delivery resumes by itself when it returns.  Runs on the machine's real PostgreSQL: the outage is made
by refusing connections to this test's own database and terminating its sessions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from ihehub.channels.mllp_wire import mllp_send
from ihehub.channels.registry import Registry
from ihehub.config import load_channels, load_home
from ihehub.hub import Hub
from tests.api.api_support import LoopThread, wait_for
from tests.conftest import PG_ADMIN_URL, free_port, loopback_config
from tests.e2e.test_pipeline import ack_code, adt
from tests.helpers.receiver import Receiver

pytestmark = pytest.mark.scaleout


def set_outage(name: str, down: bool) -> None:
    admin = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"false" if down else "true"}')
        if down:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


def test_database_outage_nak_then_resume(tmp_path: Path, pg_database: tuple[str, str]) -> None:
    name, url = pg_database
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    port = free_port()
    (home / "ihehub.yaml").write_text(
        f"database: {url}\n"
        "delivery: {max_attempts: 100, initial_backoff: 0.1, max_backoff: 0.5, jitter: 0, lease_seconds: 3}\n"
        "retention: {body_days: 0}\n", encoding="utf-8")
    with Receiver() as rx:
        (home / "channels" / "adt.yaml").write_text(
            f'source: {{url: "mllp://127.0.0.1:{port}"}}\ndestinations:\n  - {{name: ris, url: "{rx.url}/ris"}}\n',
            encoding="utf-8")
        cfg = loopback_config(load_home(home))
        registry = Registry()
        hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)
        loop = LoopThread()
        loop.run(hub.start())
        try:
            def send(*cids: str) -> list[str]:
                acks = asyncio.run(mllp_send("127.0.0.1", port, [adt(c) for c in cids], timeout=30))
                return [ack_code(a) for a in acks]

            assert send("UP1", "UP2") == ["AA", "AA"]
            wait_for(lambda: {"UP1", "UP2"} <= set(rx.control_ids()), 10, "deliveries before the outage")

            set_outage(name, True)
            codes = send("DOWN1", "DOWN2")
            assert codes == ["AR", "AR"]  # not stored, so not acknowledged: the sender keeps them

            set_outage(name, False)
            codes = wait_for(lambda: (c := send("BACK1")) == ["AA"] and c, 20, "AA after the database returns")
            assert codes == ["AA"]
            assert send("DOWN1", "DOWN2") == ["AA", "AA"]  # the sender's resend after AR
            wait_for(lambda: {"BACK1", "DOWN1", "DOWN2"} <= set(rx.control_ids()), 20, "delivery resumed")
            assert set(rx.control_ids()) == {"UP1", "UP2", "DOWN1", "DOWN2", "BACK1"}
        finally:
            set_outage(name, False)
            loop.run(hub.stop())
            loop.close()
