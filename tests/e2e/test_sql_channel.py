"""A real channel in an in-process hub: an intermediate table on PostgreSQL in, a MariaDB table out.

Rows in → messages stored → rows marked done → rows inserted downstream; GB18030 HL7 in a bytea
column is decoded right; the database going away shows in the channel status and polling resumes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ihehub.bus.store import MessageQuery
from ihehub.channels.registry import Registry
from ihehub.config import load_channels, load_home
from ihehub.hub import Hub
from tests.api.api_support import LoopThread, wait_for
from tests.channels.sql_kit import GB_HL7, MARIADB, maria_exec, maria_scratch_table, pg_exec
from tests.conftest import loopback_config


@pytest.fixture
def maria_table() -> Iterator[str]:
    with maria_scratch_table() as name:
        yield name


def test_intermediate_table_to_table(tmp_path: Path, pg_database: tuple[str, str], maria_table: str) -> None:
    name, url = pg_database
    admin = url.rsplit("/", 1)[0] + "/test"
    pg_exec(url, "CREATE TABLE his_out (id bigserial PRIMARY KEY, status varchar(8) NOT NULL DEFAULT 'new', "
                 "msg bytea NOT NULL, err text, hub_id text)")
    maria_exec(f"CREATE TABLE {maria_table} (id int AUTO_INCREMENT PRIMARY KEY, control_id varchar(64), "
               "message_type varchar(20), body mediumblob, text mediumtext) DEFAULT CHARSET=utf8mb4")
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    (home / "ihehub.yaml").write_text(
        "database: sqlite:///db/ihehub.sqlite\n"
        "delivery: {max_attempts: 5, initial_backoff: 0.05, max_backoff: 0.2, jitter: 0, lease_seconds: 5}\n",
        encoding="utf-8")
    (home / "channels" / "his.yaml").write_text(f"""
source:
  url: "sql://{url}"
  options: {{table: his_out, body_column: msg, charset: gb18030, error_column: err, message_id_column: hub_id,
            poll_interval: 0.1}}
dedup: true
filter: 'MSH-9.1 == "ADT"'
destinations:
  - name: ris
    url: "sql://{MARIADB}"
    options:
      table: {maria_table}
      columns: {{control_id: control_id, message_type: message_type, body: body, text: body}}
""", encoding="utf-8")
    cfg = loopback_config(load_home(home))
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)  # type: ignore[arg-type]
    loop = LoopThread()
    loop.run(hub.start())
    try:
        assert hub.channel_status("his") == "started"
        pg_exec(url, "INSERT INTO his_out (msg) VALUES (%s), (%s)",
                params=(GB_HL7, GB_HL7.replace(b"|HIS-0001|", b"|HIS-0002|")))
        wait_for(lambda: len(maria_exec(f"SELECT id FROM {maria_table}")) == 2, 15, "two rows in MariaDB")
        stored = hub.store.search(MessageQuery(channel="his"))
        assert sorted(r["control_id"] for r in stored) == ["1", "2"]
        rows = pg_exec(url, "SELECT id, status, err, hub_id FROM his_out ORDER BY id")
        assert [r[:3] for r in rows] == [(1, "done", None), (2, "done", None)]
        assert {r[3] for r in rows} == {r["id"] for r in stored}
        out = maria_exec(f"SELECT control_id, message_type, body, text FROM {maria_table} ORDER BY control_id")
        assert [tuple(r[:3]) for r in out] == [("1", "ADT^A01", GB_HL7),
                                               ("2", "ADT^A01", GB_HL7.replace(b"|HIS-0001|", b"|HIS-0002|"))]
        assert "张三" in out[0][3]

        # the database goes away: the channel says so, keeps running, and picks up where it was
        pg_exec(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        error = wait_for(lambda: hub.errors.get("his"), 15, "the outage in the channel status")
        assert error.startswith(f"sql source 'his': database postgresql+psycopg://postgres@127.0.0.1:5432/{name} "
                                "unavailable:")
        assert hub.channel_status("his") == "started"
        pg_exec(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        pg_exec(url, "INSERT INTO his_out (msg) VALUES (%s)", params=(GB_HL7.replace(b"ADT^A01", b"ORU^R01"),))
        wait_for(lambda: pg_exec(url, "SELECT status FROM his_out WHERE id = 3") == [("done",)], 15, "row 3")
        # the source clears its status once the poll that marked row 3 has finished (just after the commit)
        wait_for(lambda: "his" not in hub.errors, 10, "the outage cleared from the channel status")
        assert [r["status"] for r in hub.store.search(MessageQuery(channel="his", status="filtered"))] == ["filtered"]
    finally:
        loop.run(hub.stop())
        loop.close()
