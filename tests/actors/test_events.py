"""Patient events to 10+ listeners of every kind at once, on the wire and in real databases and brokers.

One in-process hub with a PIX Manager whose ``listeners`` are: two webhooks (one HMAC-signed, one taking
merges only), a SOAP service, the local outbox table, a PostgreSQL and a MariaDB table, two RabbitMQ
queues (a topic exchange and the default exchange) and two MLLP receivers (A31/A40; one restricted to a
domain), plus an ITI-10 consumer.  ITI-8 feeds go in over MLLP; a manual unlink is made on the EMPI as the
API does; every listener must get every event it asked for, each delivery tracked on the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import kombu
import pytest
from aiohttp import web
from click.testing import CliRunner
from lxml import etree
from sqlalchemy import create_engine, select, text

from ihehub.actors.events.config import CHANNEL
from ihehub.actors.events.listeners import EVENTS_NS, SOAP_ENV, soap_fault
from ihehub.actors.events.publisher import save_cursor
from ihehub.actors.events.tables import outbox
from ihehub.actors.hl7v2 import ActorOptions, OptionsError
from ihehub.api import create_token
from ihehub.bus.store import MessageQuery
from ihehub.channels.mllp_wire import mllp_send
from ihehub.channels.registry import Registry
from ihehub.cli import main
from ihehub.config import load_channels, load_home
from ihehub.config.model import DeliveryConfig
from ihehub.empi import Empi, Identifier, PatientEvent
from ihehub.hub import Hub
from tests.actors.support import OPTIONS, a01
from tests.actors.test_iti10 import SAME, FakeConsumer, values
from tests.api.api_support import LoopThread
from tests.conftest import free_port, loopback_config
from tests.helpers.receiver import Receiver

MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test"
SECRET = "s3cret-key"


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting{': ' + what if what else ''}")
        time.sleep(0.05)


class SoapService:
    """A SOAP 1.2 endpoint (aiohttp): records each envelope; answers a response envelope, or a fault."""

    def __init__(self, fault: str | None = None) -> None:
        self.fault = fault  # "Sender" / "Receiver": answer that fault instead
        self.requests: list[tuple[str, bytes]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.headers.get("Content-Type", ""), body))
        ctype = "application/soap+xml; charset=utf-8"
        if self.fault:
            xml = (f'<env:Envelope xmlns:env="{SOAP_ENV}"><env:Body><env:Fault><env:Code><env:Value>env:{self.fault}'
                   f'</env:Value></env:Code><env:Reason><env:Text xml:lang="en">refused by test</env:Text>'
                   "</env:Reason></env:Fault></env:Body></env:Envelope>")
            return web.Response(status=400 if self.fault == "Sender" else 500, body=xml.encode(), content_type=None,
                                headers={"Content-Type": ctype})
        xml = f'<env:Envelope xmlns:env="{SOAP_ENV}"><env:Body><ok xmlns="urn:test"/></env:Body></env:Envelope>'
        return web.Response(body=xml.encode(), headers={"Content-Type": ctype})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/empi", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/empi"

    def event_ids(self) -> list[int]:
        out = []
        for _ctype, body in self.requests:
            root = etree.fromstring(body)
            ev = root.find(f"{{{SOAP_ENV}}}Body/{{{EVENTS_NS}}}PatientEvent")
            assert ev is not None, body
            out.append(int(ev.get("id")))
        return out


@dataclasses.dataclass
class Running:
    hub: Hub
    port: int
    loop: LoopThread
    home: Path

    def pix(self, *messages: bytes) -> list[bytes]:
        return asyncio.run(mllp_send("127.0.0.1", self.port, list(messages), timeout=20))

    @property
    def empi(self) -> Empi:
        empi = self.hub.services["empi"]
        assert isinstance(empi, Empi)
        return empi

    def deliveries(self) -> list[dict[str, Any]]:
        store = self.hub.store
        rows = store.search(MessageQuery(channel=CHANNEL, limit=1000))
        return [d | {"event": int(r["control_id"])} for r in rows for d in store.deliveries_of(r["id"])]


def write_home(tmp_path: Path, listeners: list[dict[str, Any]], consumers: list[dict[str, Any]] | None = None,
               port: int | None = None, database: str | None = None) -> tuple[Path, int]:
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    opts = json.dumps({**OPTIONS, "listeners": listeners, "consumers": consumers or []})
    (home / "channels" / "pix.yaml").write_text(
        f'source: {{url: "mllp://127.0.0.1:{port}"}}\nactor: {{name: pix-manager, options: {opts}}}\n',
        encoding="utf-8")
    if database:
        (home / "ihehub.yaml").write_text(f"database: {database}\n", encoding="utf-8")
    return home, port


@contextmanager
def hub_at(home: Path, port: int, loop: LoopThread, *, max_attempts: int = 10, http: bool = False
           ) -> Iterator[Running]:
    cfg: Any = loopback_config(load_home(home), delivery=DeliveryConfig(
        initial_backoff=0.2, multiplier=1.0, jitter=0.0, max_attempts=max_attempts))
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry, serve_http=http)
    loop.run(hub.start())
    try:
        assert hub.channel_status("pix") == "started", hub.errors
        yield Running(hub=hub, port=port, loop=loop, home=home)
    finally:
        loop.run(hub.stop())


@contextmanager
def serving(*servers: Any) -> Iterator[LoopThread]:
    loop = LoopThread()
    try:
        for s in servers:
            loop.run(s.server.start() if isinstance(s, FakeConsumer) else s.start())
        yield loop
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                loop.run(s.server.stop() if isinstance(s, FakeConsumer) else s.stop())
        loop.close()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def mariadb_table() -> Iterator[str]:
    if not _port_open(3306):
        pytest.fail("MariaDB is not running on 127.0.0.1:3306; start it with: service mariadb start")
    name = f"empi_evt_{secrets.token_hex(4)}"
    yield name
    engine = create_engine(MARIADB_URL)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
    engine.dispose()


@pytest.fixture
def amqp_names(broker_url: str) -> Iterator[dict[str, str]]:
    tag = secrets.token_hex(4)
    names = {"exchange": f"ihehub-test-empi-{tag}", "q1": f"ihehub-test-empi-topic-{tag}",
             "q2": f"ihehub-test-empi-direct-{tag}"}
    yield names
    with kombu.Connection(broker_url, connect_timeout=5) as conn:
        ch = conn.channel()
        for q in (names["q1"], names["q2"]):
            with contextlib.suppress(Exception):
                ch.queue_delete(q)
        with contextlib.suppress(Exception):
            ch.exchange_delete(names["exchange"])


def drain(broker_url: str, queue: str) -> list[dict[str, Any]]:
    out = []
    with kombu.Connection(broker_url, connect_timeout=5) as conn:
        ch = conn.channel()
        while True:
            m = ch.basic_get(queue, no_ack=True)
            if m is None:
                return out
            assert m.properties.get("delivery_mode") == 2 and m.properties.get("content_type") == "application/json"
            out.append(json.loads(m.body))


def table_events(url: str, table: str, listener: str) -> list[int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [int(r[0]) for r in conn.execute(
                text(f"SELECT event_id FROM {table} WHERE listener = :l ORDER BY id"), {"l": listener})]
    finally:
        engine.dispose()


def wanted(events: list[PatientEvent], types: set[str] | None = None) -> list[int]:
    return [e.id for e in events if types is None or e.type.value in types]


@pytest.mark.scaleout  # PostgreSQL, MariaDB and RabbitMQ of this machine
def test_ten_listeners_of_every_kind_get_every_event(tmp_path: Path, broker_url: str, pg_database: tuple[str, str],
                                                     mariadb_table: str, amqp_names: dict[str, str]) -> None:
    hook, merges_hook = Receiver(), Receiver()
    soap = SoapService()
    ris, lab_b, pixc = FakeConsumer(), FakeConsumer(), FakeConsumer()
    pg_url = pg_database[1]
    with hook, merges_hook, serving(soap, ris, lab_b, pixc) as loop:
        listeners: list[dict[str, Any]] = [
            {"name": "hook", "kind": "webhook", "url": hook.url + "/empi", "secret": SECRET},
            {"name": "hook-merges", "kind": "webhook", "url": merges_hook.url, "events": ["merged"]},
            {"name": "soap", "kind": "soap", "url": soap.url},
            {"name": "outbox", "kind": "db"},
            {"name": "pg", "kind": "db", "url": pg_url, "table": "empi_feed"},
            {"name": "maria", "kind": "db", "url": MARIADB_URL, "table": mariadb_table},
            {"name": "rabbit-topic", "kind": "amqp", "url": broker_url, "exchange": amqp_names["exchange"],
             "queue": amqp_names["q1"]},
            {"name": "rabbit-queue", "kind": "amqp", "url": broker_url, "queue": amqp_names["q2"]},
            {"name": "ris", "kind": "mllp", "url": f"mllp://127.0.0.1:{ris.server.port}",
             "receiving_application": "RIS"},
            {"name": "lab-b", "kind": "mllp", "url": f"mllp://127.0.0.1:{lab_b.server.port}", "domains": ["HOSPB"]},
        ]
        consumers = [{"name": "pixc", "url": f"mllp://127.0.0.1:{pixc.server.port}"}]
        home, port = write_home(tmp_path, listeners, consumers)
        with hub_at(home, port, loop) as hub:
            acks = hub.pix(
                a01("E1", "A1^^^HOSPA", "ZHANG^SAN", "19800101", extra_pid=SAME),
                a01("E2", "B1^^^HOSPB", "ZHANG^SAN", "19800101", facility="HB", extra_pid=SAME),
                a01("E3", "A1^^^HOSPA", "ZHANG^SANFENG", "19800101", event="A08", extra_pid=SAME),
                a01("E4", "A2^^^HOSPA", "LI^SI", "19700505"),
                b"MSH|^~\\&|S|HA|HUB|HUB|20261127||ADT^A40^ADT_A39|E5|P|2.5\rEVN|A40\r"
                b"PID|1||A1^^^HOSPA||ZHANG^SAN\rMRG|A2^^^HOSPA\r",
            )
            assert all(b"MSA|AA|" in a for a in acks), acks
            # a manual decision, as the API and `ihehub empi review` make it: no feed, the outbox carries it
            hub.empi.unlink(Identifier(value="B1", domain="HOSPB"), by="test", reason="not the same person")
            wait_for(lambda: any(e.type.value == "unlinked" for e in hub.empi.events(after=0)))
            events = hub.empi.events(after=0)
            types = {e.type.value for e in events}
            assert {"registered", "updated", "merged", "unlinked"} <= types, types
            everything = wanted(events)

            # every delivery of every listener ends sent, one per (event, listener that wants it)
            def all_sent() -> bool:
                ds = hub.deliveries()
                return len(ds) == 9 * len(everything) + len(wanted(events, {"merged"})) and all(
                    d["state"] == "sent" for d in ds)

            wait_for(all_sent, 60, "every listener's delivery sent")
            by_listener: dict[str, list[int]] = {}
            for d in hub.deliveries():
                assert d["attempts"] == 1 and d["error"] is None, d
                by_listener.setdefault(d["destination"], []).append(d["event"])
            assert {k: sorted(v) for k, v in by_listener.items()} == {
                name: sorted(wanted(events, {"merged"} if name == "hook-merges" else None))
                for name in ("hook", "hook-merges", "soap", "outbox", "pg", "maria", "rabbit-topic", "rabbit-queue",
                             "ris", "lab-b")}

            # webhook: the event JSON, in order, signed with HMAC-SHA256 of the body
            posted = [json.loads(r["body"]) for r in hook.requests]
            assert [p["id"] for p in posted] == everything
            for r in hook.requests:
                sig = hmac.new(SECRET.encode(), r["body"], hashlib.sha256).hexdigest()  # type: ignore[arg-type]
                assert r["headers"]["x-ihehub-signature"] == f"sha256={sig}"  # type: ignore[index]
                assert r["headers"]["content-type"].startswith("application/json")  # type: ignore[index]
                body = json.loads(r["body"])  # type: ignore[arg-type]
                assert r["headers"]["x-ihehub-type"] == body["type"]  # type: ignore[index]
                assert r["headers"]["x-control-id"] == str(body["id"])  # type: ignore[index]
            assert posted[0]["type"] == "registered" and posted[0]["record"] == {"value": "A1", "domain": "HOSPA"}
            assert [json.loads(r["body"])["type"] for r in merges_hook.requests] == ["merged"]
            # SOAP 1.2
            assert soap.event_ids() == everything
            assert all(c.startswith("application/soap+xml") and 'action="urn:ihehub:empi:PatientEvent"' in c
                       for c, _ in soap.requests)
            # the outbox tables: local (SQLite here), PostgreSQL, MariaDB
            with hub.hub.engine.connect() as conn:
                local = [int(r.event_id) for r in conn.execute(select(outbox).order_by(outbox.c.id))]
            assert local == everything
            assert table_events(pg_url, "empi_feed", "pg") == everything
            assert table_events(MARIADB_URL, mariadb_table, "maria") == everything
            # RabbitMQ: persistent JSON on a topic exchange (routing key empi.<type>) and on the default exchange
            assert [m["id"] for m in drain(broker_url, amqp_names["q1"])] == everything
            assert [m["id"] for m in drain(broker_url, amqp_names["q2"])] == everything
            # MLLP: A40 for the merge (MRG-1 the subsumed record), A31 otherwise; lab-b sees HOSPB ids only
            kinds = [m.split("\r")[0].split("|")[8] for m in ris.received]
            assert kinds.count("ADT^A40^ADT_A39") == len(wanted(events, {"merged"}))
            assert len(ris.received) == len(everything)
            a40 = next(m for m in ris.received if "ADT^A40" in m)
            assert "MRG|A2^^^HOSPA" in a40 and {"A1@HOSPA"} <= values(a40)
            assert all(m.split("\r")[0].split("|")[4] == "RIS" for m in ris.received)
            assert lab_b.received and all(values(m) == {"B1@HOSPB"} for m in lab_b.received)
            # ITI-10 got the manual unlink too (an A31 of B1 alone, after the one that linked it)
            wait_for(lambda: any("B1@HOSPB" in values(m) and not any(v.endswith("@HOSPA") for v in values(m))
                                 for m in pixc.received), what="the A31 of the unlinked record")
            assert hub.hub.actors["pix"].publisher.stats()["duplicates"] == 0


def test_listener_down_is_retried_visible_and_resent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A webhook answering 503 and an MLLP listener not listening: retried, then dead; the state, attempts and
    last error show in `ihehub empi events` and ``GET /api/empi/events``; once both are up, `ihehub empi
    resend` and ``POST /api/empi/events/resend`` deliver the event."""
    down = threading.Event()
    down.set()
    hook = Receiver(lambda _r: 503 if down.is_set() else 200)
    mllp_port = free_port()
    late = FakeConsumer(mllp_port)
    with hook, serving() as loop:
        listeners = [{"name": "hook", "kind": "webhook", "url": hook.url},
                     {"name": "mllp", "kind": "mllp", "url": f"mllp://127.0.0.1:{mllp_port}"},
                     {"name": "ok", "kind": "db"}]
        home, port = write_home(tmp_path, listeners)
        monkeypatch.setenv("IHEHUB_HOME", str(home))
        with hub_at(home, port, loop, max_attempts=3, http=True) as hub:
            (ack,) = hub.pix(a01("D1", "A9^^^HOSPA", "WANG^WU", "19900909"))
            assert b"MSA|AA|D1" in ack
            wait_for(lambda: {d["destination"]: d["state"] for d in hub.deliveries()} == {
                "hook": "dead", "mllp": "dead", "ok": "sent"}, 60, "both down listeners dead-lettered")
            event = hub.deliveries()[0]["event"]
            r = CliRunner().invoke(main, ["empi", "events", "--state", "failed", "--json"])
            assert r.exit_code == 0, r.output
            (row,) = json.loads(r.output)
            assert row["event"] == event and row["type"] == "registered"
            failed = {x["listener"]: x for x in row["listeners"]}
            assert set(failed) == {"hook", "mllp"}
            assert failed["hook"]["attempts"] == 3 and "HTTP 503" in failed["hook"]["last_error"]
            assert failed["mllp"]["attempts"] == 3 and "127.0.0.1" in failed["mllp"]["last_error"]
            r = CliRunner().invoke(main, ["empi", "events", "--listener", "hok"])
            assert r.exit_code == 1 and "did you mean 'hook'" in r.output

            store = hub.hub.store
            base = f"http://127.0.0.1:{hub.hub.http_port}"
            reader = httpx.Client(base_url=base, timeout=20, headers={
                "Authorization": f"Bearer {create_token(store, role='readonly', name='viewer')}"})
            operator = httpx.Client(base_url=base, timeout=20, headers={
                "Authorization": f"Bearer {create_token(store, role='operator', name='ops')}"})
            with reader, operator:
                listed = reader.get("/api/empi/events", params={"listener": "mllp", "state": "failed"}).json()
                assert [(e["event"], [x["state"] for x in e["listeners"]]) for e in listed] == [(event, ["dead"])]
                assert reader.get("/api/empi/events", params={"listener": "nope"}).status_code == 404
                assert reader.post("/api/empi/events/resend", json={"failed": True}).status_code == 403

                down.clear()
                loop.run(late.server.start())
                r = CliRunner().invoke(main, ["empi", "resend", str(event), "--listener", "hook"])
                assert r.exit_code == 0 and "1 delivery queued" in r.output, r.output
                resp = operator.post("/api/empi/events/resend", json={"failed": True})  # still failed: mllp only
                assert resp.status_code == 200 and resp.json() == {"events": 1, "queued": 1}, resp.text
                wait_for(lambda: all(d["state"] == "sent" for d in hub.deliveries()), 30, "resent deliveries sent")
                assert [rq["status"] for rq in hook.requests] == [503, 503, 503, 200]
                assert len(late.received) == 1 and values(late.received[0]) >= {"A9@HOSPA"}

                resp = operator.post(f"/api/empi/events/{event}/resend", json={"listener": "mllp"})
                assert resp.json() == {"events": 1, "queued": 1}
                wait_for(lambda: len(late.received) == 2)
                assert operator.post("/api/empi/events/999999/resend").status_code == 404
                assert operator.post("/api/empi/events/resend", json={}).status_code == 400
            r = CliRunner().invoke(main, ["empi", "resend", "999999"])
            assert r.exit_code == 1 and "no patient event 999999" in r.output


def test_restart_loses_no_event_and_counts_duplicates(tmp_path: Path) -> None:
    """Events committed while the hub is down are published at the next start; a cursor that lags behind
    what is on the bus (a kill -9 between the appends and the cursor write) re-reads the batch: the
    messages come again as counted duplicates and no listener receives an event twice."""
    hook = Receiver()
    with hook, serving() as loop:
        home, port = write_home(tmp_path, [{"name": "hook", "kind": "webhook", "url": hook.url},
                                           {"name": "outbox", "kind": "db"}])
        with hub_at(home, port, loop) as hub:
            hub.pix(*[a01(f"R{i}", f"R{i}^^^HOSPA", f"NAME{i}^X", f"1980010{i}") for i in range(1, 4)])
            wait_for(lambda: len(hook.requests) == 3)
            empi_engine_url = str(hub.hub.cfg.database)
        # while the hub is down another process (the CLI, a bulk import) changes the index
        cfg: Any = load_home(home)
        from ihehub.actors.hl7v2 import empi_config
        from ihehub.bus.db import make_engine
        engine = make_engine(empi_engine_url, home=cfg.home)
        offline = Empi(engine, empi_config(OPTIONS))
        offline.setup()
        for i in (4, 5):
            offline.register("HOSPA", _record(f"R{i}", f"NAME{i}"))
        with engine.begin() as conn:  # as if killed after the appends of events 1-5, before the cursor moved
            save_cursor(conn, "pix", 0)
        engine.dispose()
        with hub_at(home, port, loop) as hub:
            wait_for(lambda: len(hook.requests) == 5, what="the two offline events published")
            wait_for(lambda: hub.hub.actors["pix"].publisher.cursor == 5)
            wait_for(lambda: [d["state"] for d in hub.deliveries()] == ["sent"] * 10, what="both listeners done")
            publisher = hub.hub.actors["pix"].publisher
            assert publisher.duplicates == 3 and publisher.published == 2
            assert [json.loads(r["body"])["id"] for r in hook.requests] == [1, 2, 3, 4, 5]
            dups = hub.hub.store.search(MessageQuery(channel=CHANNEL, status="duplicate"))
            assert sorted(int(r["control_id"]) for r in dups) == [1, 2, 3]
            with hub.hub.engine.connect() as conn:
                rows = conn.execute(select(outbox.c.event_id, outbox.c.deliveries)).all()
            assert sorted(rows) == [(i, 1) for i in range(1, 6)]


@pytest.mark.scaleout
def test_postgresql_event_committed_out_of_order_is_published(tmp_path: Path, pg_database: tuple[str, str]) -> None:
    """On PostgreSQL an event id can commit after a higher one (two writing processes): the publisher keeps the
    missing id as a gap and publishes it when it commits; the local outbox table lives in PostgreSQL too."""
    from ihehub.empi import EventType
    from ihehub.empi.store import add_event

    hook = Receiver()
    with hook, serving() as loop:
        home, port = write_home(tmp_path, [{"name": "hook", "kind": "webhook", "url": hook.url},
                                           {"name": "outbox", "kind": "db"}], database=pg_database[1])
        with hub_at(home, port, loop) as hub:
            engine = hub.hub.engine
            assert engine.dialect.name == "postgresql"
            with engine.connect() as conn:
                tx = conn.begin()  # another process's transaction, still open
                late = add_event(conn, type=EventType.UPDATED, patient="IHEHUB-LATE", at=time.time(),
                                 identifiers=(Identifier(value="L1", domain="HOSPA"),))
                (ack,) = hub.pix(a01("P1", "P1^^^HOSPA", "EARLY^BIRD", "19800101"))
                assert b"MSA|AA|P1" in ack
                wait_for(lambda: len(hook.requests) == 1)
                first = json.loads(hook.requests[0]["body"])  # type: ignore[arg-type]
                assert first["id"] > late.id and hub.hub.actors["pix"].publisher.stats()["gaps"] >= 1
                tx.commit()
            wait_for(lambda: len(hook.requests) == 2, what="the late event published from the gap list")
            assert json.loads(hook.requests[1]["body"])["id"] == late.id  # type: ignore[arg-type]
            wait_for(lambda: [d["state"] for d in hub.deliveries()] == ["sent"] * 4)
            with engine.connect() as conn:
                assert sorted(r.event_id for r in conn.execute(select(outbox.c.event_id))) == sorted(
                    [late.id, first["id"]])


def _record(pid: str, family: str) -> Any:
    from ihehub.empi import PatientRecord, PersonName

    return PatientRecord(pid=pid, names=(PersonName(family=family, given="Y"),), birth_date="19991231", sex="F")


def test_soap_sender_fault_is_not_retried(tmp_path: Path) -> None:
    soap = SoapService(fault="Sender")
    with serving(soap) as loop:
        home, port = write_home(tmp_path, [{"name": "soap", "kind": "soap", "url": soap.url}])
        with hub_at(home, port, loop) as hub:
            hub.pix(a01("S1", "S1^^^HOSPA", "FAULT^X", "19800101"))
            wait_for(lambda: [d["state"] for d in hub.deliveries()] == ["dead"])
            (d,) = hub.deliveries()
            assert d["attempts"] == 1 and "SOAP fault env:Sender: refused by test" in d["error"]
    assert soap_fault(b"<not-xml") is None
    assert soap_fault(f'<e:Envelope xmlns:e="{SOAP_ENV}"><e:Body/></e:Envelope>'.encode()) is None


@pytest.mark.parametrize(("listeners", "message"), [
    ([{"name": "x", "kind": "webhook"}], "listeners/x: a webhook listener needs a url"),
    ([{"name": "x", "kind": "webhook", "url": "mllp://h:1"}], "listeners/x/url: 'mllp://h:1' is not a webhook URL"),
    ([{"name": "x", "kind": "mllp", "url": "mllp://h:1", "secret": "k"}], "secret do(es) not apply to a mllp"),
    ([{"name": "x", "kind": "mllp", "url": "mllp://h:1", "events": ["deleted"]}], "'deleted' has none"),
    ([{"name": "x", "kind": "db", "url": "nonsense"}], "neither 'local'"),
    ([{"name": "x", "kind": "db", "table": "t"}], "table applies to an external database"),
    ([{"name": "x", "kind": "sftp", "url": "sftp://h"}], "listeners/0/kind"),
    ([{"name": "x", "kind": "db", "events": ["born"]}], "listeners/0/events/0"),
    ([{"name": "x", "kind": "db"}, {"name": "x", "kind": "db"}], "the name 'x' is used twice"),
])
def test_listener_option_errors(listeners: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(OptionsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ActorOptions.parse("pix-manager", {"listeners": listeners})
    with pytest.raises(OptionsError, match="belong to a pix-manager"):
        ActorOptions.parse("pdq-supplier", {"listeners": [{"name": "x", "kind": "db"}]})


def test_a_bad_listener_keeps_the_channel_down(tmp_path: Path) -> None:
    with serving() as loop:
        home, _port = write_home(tmp_path, [{"name": "x", "kind": "webhook", "url": "http://127.0.0.1:9/x",
                                            "options": {"methodd": "POST"}}])
        cfg: Any = loopback_config(load_home(home))
        registry = Registry()
        hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry, serve_http=False)
        loop.run(hub.start())
        try:
            assert hub.channel_status("pix") == "error"
            assert "methodd" in hub.errors["pix"]
        finally:
            loop.run(hub.stop())
