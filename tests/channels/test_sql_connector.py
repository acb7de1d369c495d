"""sql:// connectors on this machine's real PostgreSQL and MariaDB: claim, mark, GB18030, outages, inserts."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, DeliveryError, Outcome
from ihehub.channels.registry import ConnectorContext, Registry
from ihehub.channels.sql import SQLDestination, SQLSource, connect, database_url
from tests.channels.sql_kit import GB_HL7, MARIADB, Status, maria_exec, maria_scratch_table, pg_exec
from tests.channels.test_file_connector import Hub, run
from tests.conftest import free_port


@pytest.fixture
def maria_table() -> Iterator[str]:
    with maria_scratch_table() as name:
        yield name


HL7_TABLE = """CREATE TABLE hl7_out (id serial PRIMARY KEY, status text NOT NULL DEFAULT 'new',
    message bytea, error_text varchar(40), done_at timestamptz, hub_id text)"""


@contextlib.asynccontextmanager
async def started(url: str, hub: Hub, status: Status | None = None, **options: Any) -> AsyncIterator[SQLSource]:
    """A started source whose own loop is parked (poll_interval 1 h): the tests call poll_once."""
    options.setdefault("poll_interval", 3600)
    context = ConnectorContext(on_source_status=status)
    source = SQLSource(name="his", url=f"sql://{url}", options=options, context=context)
    await source.start(hub)
    try:
        while source.polls == 0:
            await asyncio.sleep(0.005)
        yield source
    finally:
        await source.stop()


# --------------------------------------------------------------------------- options and URLs


def test_urls_and_options_are_checked() -> None:
    assert database_url("sql://postgresql+psycopg://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert connect("sqlite:///data/his.db", "/srv/hub").url.database == "/srv/hub/data/his.db"
    assert connect("postgresql://u@h/db", "/srv/hub").url.drivername == "postgresql+psycopg"
    with pytest.raises(ConnectorError, match="after sql:// comes a SQLAlchemy URL"):
        database_url("sql://nonsense")
    ctx = ConnectorContext()
    with pytest.raises(ConnectorError, match="unknown option 'batchsize' \\(did you mean 'batch_size'\\?\\)"):
        SQLSource(name="x", url="sql://sqlite:///x.db", options={"table": "t", "batchsize": 5}, context=ctx)
    with pytest.raises(ConnectorError, match="'table' is a required property"):
        SQLSource(name="x", url="sql://sqlite:///x.db", options={}, context=ctx)
    with pytest.raises(ConnectorError, match="must differ"):
        SQLSource(name="x", url="sql://sqlite:///x.db", options={"table": "t", "done_value": "new"}, context=ctx)
    with pytest.raises(ConnectorError, match="unknown charset 'gb9999'"):
        SQLSource(name="x", url="sql://sqlite:///x.db", options={"table": "t", "charset": "gb9999"}, context=ctx)
    with pytest.raises(ConnectorError, match=r"options\.columns\.x"):
        SQLDestination(name="x", url="sql://sqlite:///x.db", options={"table": "t", "columns": {"x": "bdy"}},
                       context=ctx)
    registry = Registry()
    assert registry.spec("sql").source == "ihehub.channels.sql:SQLSource"


# --------------------------------------------------------------------------- source on PostgreSQL


def test_rows_become_messages_and_are_marked_in_the_same_transaction(pg_database: tuple[str, str]) -> None:
    _, url = pg_database
    broken = "MSH|^~\\&|HIS|H1|HUB|H0|20261127||ADT^A08|HIS-0002|P|2.5\rPID|1\r".encode("gb18030")
    pg_exec(url, HL7_TABLE)
    refusal = Outcome(code="AE", error="PID-3 is required by this channel and missing from PID|1" * 2)
    hub = Hub(Outcome(code="AA", message_id="m-1"), refusal)

    async def scenario() -> int:
        async with started(url, hub, table="hl7_out", body_column="message", charset="GB18030",
                           error_column="error_text", processed_at_column="done_at",
                           message_id_column="hub_id") as source:
            await asyncio.to_thread(pg_exec, url, "INSERT INTO hl7_out (message) VALUES (%s), (%s), (NULL)",
                                    params=(GB_HL7, broken))
            await asyncio.to_thread(pg_exec, url, "INSERT INTO hl7_out (status, message) VALUES ('done', %s)",
                                    params=(GB_HL7,))
            return await source.poll_once()

    assert run(scenario()) == 3
    assert len(hub.messages) == 2  # the NULL body never reaches the hub
    first = hub.messages[0]
    assert first.raw == GB_HL7 and first.charset == "gb18030" and "张三" in first.text()
    assert (first.control_id, first.message_type, first.content_type) == ("1", "ADT^A01", "application/hl7-v2")
    assert first.headers == {"sql.table": "hl7_out", "sql.key": "1"}
    rows = pg_exec(url, "SELECT id, status, error_text, done_at IS NOT NULL, hub_id FROM hl7_out ORDER BY id")
    assert rows[0] == (1, "done", None, True, "m-1")
    assert rows[1][:2] == (2, "error") and rows[1][2] == refusal.error[:40]  # type: ignore[index]
    assert rows[1][4] == hub.messages[1].id  # the refused message is in the hub's store under this id
    assert rows[2][:3] == (3, "error", "body column 'message' is NULL")
    assert rows[3][1] == "done"  # was done before: never offered


def test_hub_unavailable_leaves_the_rest_in_order_for_the_next_poll(pg_database: tuple[str, str]) -> None:
    _, url = pg_database
    pg_exec(url, "CREATE TABLE q (seq int PRIMARY KEY, flag smallint NOT NULL, kind text, patient text)")
    busy = Outcome(code="AR", error="store unavailable")
    hub = Hub(Outcome(code="AA"), busy, Outcome(code="AA"))
    options = {"table": "q", "key_column": "seq", "status_column": "flag", "new_value": 0, "done_value": 1,
               "error_value": 2, "message_type_column": "kind", "columns": ["seq", "patient", "kind"],
               "where": "kind <> 'ORM'"}

    async def scenario() -> tuple[int, int]:
        async with started(url, hub, **options) as source:
            await asyncio.to_thread(pg_exec, url, "INSERT INTO q VALUES (30, 0, 'ADT', '李四'), (10, 0, 'ADT', '张三'),"
                                    " (20, 0, 'ORM', 'x'), (40, 1, 'ADT', 'done before')")
            return await source.poll_once(), await source.poll_once()

    assert run(scenario()) == (1, 1)
    assert [m.control_id for m in hub.messages] == ["10", "30", "30"]  # seq order; 30 offered again
    assert json.loads(hub.messages[0].raw) == {"seq": 10, "patient": "张三", "kind": "ADT"}
    assert (hub.messages[0].content_type, hub.messages[0].message_type) == ("application/json", "ADT")
    assert pg_exec(url, "SELECT seq, flag FROM q ORDER BY seq") == [(10, 1), (20, 0), (30, 1), (40, 1)]


def test_a_query_of_its_own_joins_another_table(pg_database: tuple[str, str]) -> None:
    _, url = pg_database
    pg_exec(url, "CREATE TABLE patient (pid text PRIMARY KEY, name text)",
            "CREATE TABLE visit (vid int PRIMARY KEY, pid text, status text NOT NULL, note text)",
            "INSERT INTO patient VALUES ('P1', '张三'), ('P2', '李四')")
    query = ("SELECT v.vid, v.pid, p.name FROM visit v JOIN patient p ON p.pid = v.pid WHERE v.status = :new_value "
             "ORDER BY v.vid LIMIT :batch_size FOR UPDATE OF v SKIP LOCKED")
    hub, status = Hub(), Status()

    async def scenario() -> int:
        async with started(url, hub, status, table="visit", key_column="vid", query=query, batch_size=1) as source:
            visits = "INSERT INTO visit VALUES (2, 'P2', 'new', 'x'), (1, 'P1', 'new', 'y')"
            await asyncio.to_thread(pg_exec, url, visits)
            taken = await source.poll_once()
            assert source.more  # a full batch: the loop polls again at once
            return taken + await source.poll_once()

    assert run(scenario()) == 2
    assert [json.loads(m.raw) for m in hub.messages] == [{"vid": 1, "pid": "P1", "name": "张三"},
                                                         {"vid": 2, "pid": "P2", "name": "李四"}]
    assert pg_exec(url, "SELECT vid, status FROM visit ORDER BY vid") == [(1, "done"), (2, "done")]
    with pytest.raises(ConnectorError, match=r"options\.query replaces columns, where and order_by"):
        SQLSource(name="x", url=f"sql://{url}", options={"table": "visit", "query": query, "where": "1 = 1"},
                  context=ConnectorContext())


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_two_nodes_share_a_table_without_taking_a_row_twice(backend: str, request: pytest.FixtureRequest) -> None:
    """SELECT ... FOR UPDATE SKIP LOCKED: a node holding rows does not block the other one."""
    if backend == "postgresql":
        url, table = request.getfixturevalue("pg_database")[1], "t"

        def execute(sql: str) -> list[Any]:
            return pg_exec(url, sql)
    else:
        url, table = MARIADB, request.getfixturevalue("maria_table")

        def execute(sql: str) -> list[Any]:
            return [tuple(r) for r in maria_exec(sql)]
    execute(f"CREATE TABLE {table} (id int PRIMARY KEY, status varchar(10) NOT NULL, v varchar(10))")
    release = asyncio.Event()
    seen: dict[str, list[str]] = {"a": [], "b": []}

    def node(label: str) -> Any:
        async def inbound(message: Message) -> Outcome:
            seen[label].append(str(message.control_id))
            if label == "a":
                await release.wait()  # node a keeps its rows locked meanwhile
            return Outcome(code="AA")
        return inbound

    async def scenario() -> tuple[int, int]:
        async with started(url, node("a"), table=table, batch_size=2) as a, \
                started(url, node("b"), table=table, batch_size=2) as b:  # type: ignore[arg-type]
            rows = f"INSERT INTO {table} VALUES (1, 'new', 'v1'), (2, 'new', 'v2'), (3, 'new', 'v3'), (4, 'new', 'v4')"
            await asyncio.to_thread(execute, rows)
            first = asyncio.create_task(a.poll_once())
            while not seen["a"]:
                await asyncio.sleep(0.01)
            taken_b = await b.poll_once()
            release.set()
            return await first, taken_b

    assert run(scenario()) == (2, 2)
    assert seen["a"] == ["1", "2"] and seen["b"] == ["3", "4"]
    assert execute(f"SELECT count(*) FROM {table} WHERE status = 'done'") == [(4,)]


def test_database_down_is_reported_in_the_status_and_polling_resumes(pg_database: tuple[str, str]) -> None:
    name, url = pg_database
    pg_exec(url, "CREATE TABLE t (id int PRIMARY KEY, status text NOT NULL)")
    admin = url.rsplit("/", 1)[0] + "/test"
    status, hub = Status(), Hub()

    async def scenario() -> None:
        async with started(url, hub, status, table="t") as source:
            assert status.reports == []
            await asyncio.to_thread(pg_exec, url, "INSERT INTO t VALUES (1, 'new')")
            pg_exec(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
                    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
            with pytest.raises(sa.exc.OperationalError):
                await source.poll_once()
            with pytest.raises(sa.exc.OperationalError):
                await source.poll_once()
            assert source.failures == 2 and len(status.reports) == 1  # reported once, not on every poll
            pg_exec(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            assert await source.poll_once() == 1

    run(scenario())
    (channel, error), cleared = status.reports
    assert channel == "his" and error is not None
    assert error.startswith(f"sql source 'his': database postgresql+psycopg://postgres@127.0.0.1:5432/{name} "
                            "unavailable:")
    assert cleared == ("his", None)
    assert [m.control_id for m in hub.messages] == ["1"]


def test_a_missing_column_is_named_in_the_status() -> None:
    status = Status()

    async def scenario(path: str) -> None:
        engine = sa.create_engine(f"sqlite:///{path}")
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (id integer PRIMARY KEY, state text)"))
        engine.dispose()
        async with started(f"sqlite:///{path}", Hub(), status, table="t") as source:
            with pytest.raises(ConnectorError):
                await source.poll_once()
        async with started(f"sqlite:///{path}", Hub(), status, table="nope") as source:
            with pytest.raises(ConnectorError):
                await source.poll_once()

    with contextlib.ExitStack() as stack:
        import tempfile

        folder = stack.enter_context(tempfile.TemporaryDirectory())
        run(scenario(f"{folder}/his.db"))
    errors = [e for _, e in status.reports if e]
    assert errors[0] == ("sql source 'his': options of sql source 'his': table 't' has no column 'status' "
                         "(did you mean 'state'?); columns: id, state")
    assert errors[1].endswith("table 'nope' does not exist in sqlite:///" + errors[1].split("sqlite:///")[1])


# --------------------------------------------------------------------------- source on MariaDB


def test_mariadb_flag_column_and_chinese_text_column(maria_table: str) -> None:
    maria_exec(f"CREATE TABLE {maria_table} (id int PRIMARY KEY, processed tinyint NOT NULL DEFAULT 0, "
               "msg mediumtext CHARACTER SET gbk, created datetime(3), reason varchar(255)) "
               "DEFAULT CHARSET=utf8mb4")
    text = GB_HL7.decode("gb18030")
    hub = Hub(Outcome(code="AA"), Outcome(code="AE", error="bad"))

    async def scenario() -> int:
        async with started(MARIADB, hub, table=maria_table, status_column="processed", new_value=0,
                           done_value=1, error_value=-1, error_column="reason", body_column="msg",
                           charset="gb18030") as source:
            await asyncio.to_thread(
                maria_exec, f"INSERT INTO {maria_table} (id, msg, created) VALUES (7, %s, '2026-11-27 10:10:10.5'),"
                " (8, %s, NULL)", params=(text, "MSH|^~\\&|HIS|H1|HUB|H0|20261127||ADT^A08|X|P|2.5\r"))
            return await source.poll_once()

    assert run(scenario()) == 2
    message = hub.messages[0]
    assert message.raw == GB_HL7 and "张三" in message.text() and message.charset == "gb18030"
    rows = maria_exec(f"SELECT id, processed, reason FROM {maria_table} ORDER BY id")
    assert [tuple(r) for r in rows] == [(7, 1, None), (8, -1, "bad")]


def test_mariadb_json_rows(maria_table: str) -> None:
    maria_exec(f"CREATE TABLE {maria_table} (`key` varchar(20) PRIMARY KEY, status varchar(10), "
               "name varchar(40), amount decimal(8,2), created datetime, photo blob) DEFAULT CHARSET=utf8mb4")
    hub = Hub()

    async def scenario() -> int:
        async with started(MARIADB, hub, table=maria_table, key_column="key") as source:
            await asyncio.to_thread(maria_exec, f"INSERT INTO {maria_table} VALUES "
                                    "('K1', 'new', '王五', 12.50, '2026-11-27 08:00:00', x'00ff')")
            return await source.poll_once()

    assert run(scenario()) == 1
    assert json.loads(hub.messages[0].raw) == {"key": "K1", "status": "new", "name": "王五", "amount": "12.50",
                                               "created": "2026-11-27T08:00:00", "photo": "AP8="}
    assert [tuple(r) for r in maria_exec(f"SELECT status FROM {maria_table}")] == [("done",)]


# --------------------------------------------------------------------------- destination


def message(raw: bytes, **fields: Any) -> Message:
    return Message(channel="adt", raw=raw, **fields)


def test_destination_inserts_mapped_columns_on_postgresql(pg_database: tuple[str, str]) -> None:
    _, url = pg_database
    pg_exec(url, "CREATE TABLE adt_in (id serial PRIMARY KEY, control_id text, message_type text, "
                 "body bytea, body_text text, received_at timestamptz, patient text, ward text, extra jsonb)")
    columns = {"control_id": "control_id", "message_type": "message_type", "body": "body", "body_text": "body",
               "received_at": "received_at", "patient": "json:/patient/name", "ward": "header:ward",
               "extra": "json:tags"}
    dest = SQLDestination(name="adt/ris", url=f"sql://{url}", options={"table": "adt_in", "columns": columns},
                          context=ConnectorContext())
    body = json.dumps({"patient": {"name": "张三"}, "tags": ["a", "b"]}, ensure_ascii=False).encode("gb18030")
    msg = message(body, charset="gb18030", control_id="C1", message_type="ADT^A01", headers={"ward": "W3"})

    async def scenario() -> Any:
        try:
            return await dest.send(msg)
        finally:
            await dest.close()

    response = run(scenario())
    assert response.ok and response.status == "inserted" and json.loads(response.body) == [1]
    (row,) = pg_exec(url, "SELECT control_id, message_type, body, body_text, received_at, patient, ward, extra "
                          "FROM adt_in")
    assert row[:4] == ("C1", "ADT^A01", body, body.decode("gb18030"))
    assert row[4] == msg.received_at and row[5:] == ("张三", "W3", ["a", "b"])  # jsonb gets JSON, not a string


def test_destination_upserts_json_bodies_on_mariadb(maria_table: str) -> None:
    maria_exec(f"CREATE TABLE {maria_table} (mrn varchar(20) PRIMARY KEY, name varchar(40) NOT NULL, "
               "sex char(1)) DEFAULT CHARSET=utf8mb4")
    dest = SQLDestination(name="adt/empi", url=f"sql://{MARIADB}",
                          options={"table": maria_table, "upsert_key": ["mrn"]}, context=ConnectorContext())

    def body(data: dict[str, Any]) -> bytes:
        return json.dumps(data, ensure_ascii=False).encode()

    async def scenario() -> list[Any]:
        out: list[Any] = []
        try:
            for data in ({"mrn": "M1", "name": "张三", "sex": "M"}, {"mrn": "M1", "name": "张三丰", "sex": "M"},
                         {"mrn": "M2", "name": "李四"}):
                out.append((await dest.send(message(body(data)))).status)
            for bad in (b"not json", body({"mrn": "M3", "nmae": "x"}), body({"mrn": "M4"})):
                with pytest.raises(DeliveryError) as info:
                    await dest.send(message(bad))
                out.append((info.value.retryable, str(info.value)))
        finally:
            await dest.close()
        return out

    statuses = run(scenario())
    assert statuses[:3] == ["upserted"] * 3
    assert statuses[3][0] is False and "not JSON" in statuses[3][1]
    assert statuses[4] == (False, f"adt/empi: table {maria_table!r} has no column 'nmae' (a key of the JSON body);"
                                  " map keys with options.columns")
    assert statuses[5][0] is False and "Field 'name' doesn't have a default value" in statuses[5][1]
    rows = maria_exec(f"SELECT mrn, name, sex FROM {maria_table} ORDER BY mrn")
    assert [tuple(r) for r in rows] == [("M1", "张三丰", "M"), ("M2", "李四", None)]


def test_destination_database_down_is_retryable() -> None:
    port = free_port()  # nothing listens there
    dest = SQLDestination(name="adt/ris", url=f"sql://mysql+pymysql://root@127.0.0.1:{port}/test",
                          options={"table": "t"}, context=ConnectorContext())

    async def scenario() -> DeliveryError:
        try:
            with pytest.raises(DeliveryError) as info:
                await dest.send(message(b"{}"))
            return info.value
        finally:
            await dest.close()

    error = run(scenario())
    assert error.retryable
    assert str(error).startswith(f"adt/ris: database mysql+pymysql://root@127.0.0.1:{port}/test unavailable: ")
