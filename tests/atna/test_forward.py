"""The persistent audit sender (ITI TF-2a 3.20.4.1.1): audits emitted while the repository is down are
kept in the database across a hub restart and all arrive once it is up; mutual TLS (RFC 5425), plain
TCP octet counting and UDP (RFC 5426); a repository that restarts between batches; graceful close;
audits not delivered in time move to dead, are listed and resent (API, CLI), sent rows are purged,
and /healthz and /metrics show the queue."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from ihehub.api import create_token
from ihehub.atna import AuditContext, AuditQuery, AuditRepository, Endpoint, Validator
from ihehub.atna.forward import (
    AuditForwarder,
    OutboxSummary,
    RemoteRepository,
    outbox_rows,
    repositories_from_config,
    resend_op,
)
from ihehub.bus import schema
from ihehub.bus.db import Writer, make_engine
from ihehub.channels.registry import Registry
from ihehub.cli import main
from ihehub.config import AtnaConfig, init_home, load_channels, load_home
from ihehub.hub import Hub
from ihehub.tls import client_ssl_context, ensure_tls, server_ssl_context
from tests.api.api_support import LoopThread, wait_for
from tests.atna.conftest import close_store, open_store
from tests.conftest import free_port, loopback_config

PATIENT = "FWD{}^^^HOSPA&1.2.156.1.1&ISO"


class Remote:
    """Another node's Audit Record RemoteRepository on loopback, in its own database, started and stopped at will."""

    def __init__(self, tmp: Path, loop: LoopThread, pki: dict[str, str], validator: Validator | None = None) -> None:
        self.store, self.writer = open_store(f"sqlite:///{tmp}/remote.sqlite")
        self.loop = loop
        self.ctx = server_ssl_context(pki["cert"], pki["key"], pki["ca"], True)  # client certificate required
        self.validator = validator
        self.repo: AuditRepository | None = None

    def start(self, *, tls_port: int | None = None, tcp_port: int | None = None, udp_port: int | None = None) -> None:
        self.repo = AuditRepository(self.store, self.validator, host="127.0.0.1")
        self.loop.run(self.repo.start(tls_port=tls_port, tcp_port=tcp_port, udp_port=udp_port,
                                      ssl_context=self.ctx if tls_port is not None else None))

    def stop(self) -> None:
        if self.repo is not None:
            self.loop.run(self.repo.stop())
            self.repo = None

    def count(self, prefix: str = "FWD") -> int:
        """ITI-9 audits whose patient id starts with ``prefix``."""
        return sum(1 for r in self.store.search(AuditQuery(event_type="ITI-9", limit=10_000)).records
                   if any(v.startswith(prefix) for k, v in r.ids if k == "patient"))

    def close(self) -> None:
        self.stop()
        close_store(self.store, self.writer)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def remote(tmp_path: Path, loop: LoopThread, pki: dict[str, str]) -> Iterator[Remote]:
    r = Remote(tmp_path, loop, pki)
    yield r
    r.close()


def _emit(audit: AuditContext, n: int, tag: str = "") -> None:
    for i in range(n):
        audit.emit("ITI-9", source=Endpoint(user_id="CONS|CF", host="10.0.0.9"), destination=audit.me("HUB|HUB"),
                   patients=[PATIENT.format(f"{tag}{i}")], query=f"QBP^Q23 {i}".encode(), message_id=f"M{tag}{i}")


def _hub(home: Path, port: int) -> Hub:
    atna = AtnaConfig(tcp_port=None, repositories=({"url": f"syslog+tls://127.0.0.1:{port}", "name": "arr"},))
    cfg = loopback_config(load_home(home), atna=atna)
    registry = Registry()
    return Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry, serve_http=False)  # type: ignore[arg-type]


def test_hub_keeps_audits_while_the_repository_is_down_and_across_a_restart(
        tmp_path: Path, loop: LoopThread, pki: dict[str, str]) -> None:
    home = tmp_path / "home"
    init_home(home)
    ensure_tls(load_home(home), key_type="ec")
    hub_pki = {"ca": str(home / "tls/ca.pem"), "cert": str(home / "tls/server.pem"),
               "key": str(home / "tls/server-key.pem")}
    remote = Remote(tmp_path, loop, hub_pki)
    port = free_port()
    try:
        hub = _hub(home, port)
        loop.run(hub.start(), timeout=60)
        try:
            _emit(hub.audit, 100)
            wait_for(lambda: hub.audit_forwarder.depth()["arr"] >= 101, 10, "APP-START + 100 audits queued")
            assert hub.audit_forwarder.stats["arr"]["failures"] >= 1  # it tried: connection refused
        finally:
            loop.run(hub.stop(), timeout=60)
        remote.start(tls_port=port)  # the repository comes up while the hub is down
        hub = _hub(home, port)
        loop.run(hub.start(), timeout=60)
        try:
            wait_for(lambda: remote.count() == 100, 20, "all 100 audits at the repository")
            wait_for(lambda: hub.audit_forwarder.depth()["arr"] == 0, 10, "queue empty")
            metrics = hub.metrics.render().decode()
            assert 'ihehub_audit_outbox_depth{repository="arr"} 0.0' in metrics
            assert 'ihehub_audit_forwarded_total{repository="arr"}' in metrics
            # APP-START, APP-STOP of the first run and APP-START of the second went too, with the node's certificate
            recs = remote.store.search(AuditQuery(event_id="110100", limit=10)).records
            assert len(recs) == 3 and all(r.transport == "tls" and r.tls_subject for r in recs)
            # the local repository has them as well (the default sink)
            assert hub.audit_store.count(AuditQuery(event_type="ITI-9")) == 100
        finally:
            loop.run(hub.stop(), timeout=60)
        assert remote.store.count(AuditQuery(event_id="110100")) == 4  # APP-STOP sent on graceful close
        assert remote.count() == 100  # each exactly once
    finally:
        remote.close()


@dataclasses.dataclass
class Sender:
    forwarder: AuditForwarder
    audit: AuditContext
    writer: Writer


@pytest.fixture
def sender_db(store_url: str) -> Iterator[tuple[object, Writer]]:
    """The sending node's database: SQLite and the machine's PostgreSQL (claims with SKIP LOCKED)."""
    engine = make_engine(store_url)
    schema.upgrade(engine)
    writer = Writer(engine)
    yield engine, writer
    writer.close()
    engine.dispose()


def _sender(db: tuple[object, Writer], repos: list[RemoteRepository], **kw: object) -> Sender:
    engine, writer = db
    fwd = AuditForwarder(engine, writer, repos, first_backoff=0.05, max_backoff=0.2, **kw)  # type: ignore[arg-type]
    return Sender(forwarder=fwd, audit=AuditContext(source_id="sender", sinks=(fwd.sink,)), writer=writer)


def test_tcp_and_udp_and_a_repository_restarting_between_batches(
        remote: Remote, loop: LoopThread, sender_db: tuple[object, Writer]) -> None:
    tcp, udp = free_port(), free_port()
    remote.start(tcp_port=tcp, udp_port=udp)
    s = _sender(sender_db, [RemoteRepository.from_url("tcp", f"syslog+tcp://127.0.0.1:{tcp}"),
                            RemoteRepository.from_url("udp", f"syslog+udp://127.0.0.1:{udp}")])
    loop.run(s.forwarder.start())
    try:
        _emit(s.audit, 20, "A")
        # both transports: 20 each, told apart by the transport the repository recorded
        wait_for(lambda: remote.count("FWDA") == 40, 20, "20 over TCP + 20 over UDP")
        by_transport = [r.transport for r in remote.store.search(AuditQuery(event_type="ITI-9", limit=100)).records]
        assert by_transport.count("tcp") == 20 and by_transport.count("udp") == 20
        assert s.forwarder.connected("tcp") and not s.forwarder.connected("udp")
        remote.stop()  # the repository closes the kept-open TCP connection ...
        wait_for(lambda: not s.forwarder.connected("tcp"), 5, "the sender to see the repository close")
        _emit(s.audit, 10, "B")  # ... audits emitted while it is down wait (UDP ones are lost: RFC 5426)
        wait_for(lambda: s.forwarder.stats["tcp"]["failures"] >= 1, 10, "a refused connection")
        wait_for(lambda: s.forwarder.depth()["tcp"] == 10, 10, "the 10 audits queued")
        assert s.forwarder.stats["tcp"]["sent"] == 20  # none went into the closed connection
        remote.start(tcp_port=tcp, udp_port=udp)
        wait_for(lambda: sum(1 for r in remote.store.search(AuditQuery(event_type="ITI-9", limit=100)).records
                             if r.transport == "tcp") == 30, 20, "the 10 queued audits over a new connection")
    finally:
        loop.run(s.forwarder.stop())
    assert s.forwarder.depth() == {"tcp": 0, "udp": 0}


def test_stop_leaves_unsent_audits_queued_and_tls_needs_a_trusted_repository(
        remote: Remote, loop: LoopThread, sender_db: tuple[object, Writer], pki: dict[str, str],
        tmp_path: Path) -> None:
    port = free_port()
    remote.start(tls_port=port)
    # a client context without a certificate: the repository requires one and refuses the handshake
    no_cert = client_ssl_context(pki["ca"])
    s = _sender(sender_db, [RemoteRepository.from_url("arr", f"syslog+tls://127.0.0.1:{port}", ssl_context=no_cert)],
                close_timeout=0.5)
    loop.run(s.forwarder.start())
    _emit(s.audit, 5)
    wait_for(lambda: s.forwarder.stats["arr"]["failures"] >= 1, 10, "a refused handshake")
    loop.run(s.forwarder.stop(), timeout=30)
    assert s.forwarder.depth() == {"arr": 5} and remote.count() == 0  # kept for the next start
    # the configured repository (ihehub.yaml atna.repositories) presents the client certificate
    repos = repositories_from_config(
        [{"url": f"syslog+tls://127.0.0.1:{port}", "name": "arr", "cert": pki["client"], "key": pki["client_key"],
          "ca": pki["ca"]}], home=tmp_path, ca=Path(pki["ca"]), cert=Path(pki["cert"]), key=Path(pki["key"]))
    s2 = _sender(sender_db, repos)
    loop.run(s2.forwarder.start())
    try:
        wait_for(lambda: remote.count() == 5, 20, "the 5 kept audits")
        subjects = {r.tls_subject for r in remote.store.search(AuditQuery(event_type="ITI-9", limit=10)).records}
        assert subjects and all(s_ and "audit-sender" in s_ for s_ in subjects)
    finally:
        loop.run(s2.forwarder.stop())


@pytest.mark.parametrize(("url", "error"), [
    ("syslog+tls://127.0.0.1:6514", "needs a TLS client context"),
    ("syslog://127.0.0.1:6514", "must start with one of"),
    ("syslog+tcp://127.0.0.1", "needs a host and a port"),
    ("syslog+tcp://127.0.0.1:notaport", "needs a host and a port"),
])
def test_bad_repository_urls_are_refused_clearly(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        RemoteRepository.from_url("x", url)


def test_two_repositories_with_one_name_are_refused(tmp_path: Path) -> None:
    items = [{"url": "syslog+udp://127.0.0.1:5140", "name": "a"}, {"url": "syslog+tcp://127.0.0.1:601", "name": "a"}]
    with pytest.raises(ValueError, match="used twice"):
        repositories_from_config(items, home=tmp_path, ca=tmp_path / "ca", cert=tmp_path / "c", key=tmp_path / "k")


def test_emit_never_blocks_on_a_down_repository(loop: LoopThread, sender_db: tuple[object, Writer]) -> None:
    s = _sender(sender_db, [RemoteRepository.from_url("down", f"syslog+tcp://127.0.0.1:{free_port()}")])
    loop.run(s.forwarder.start())
    try:
        async def burst() -> float:
            t0 = asyncio.get_running_loop().time()
            _emit(s.audit, 200, "C")
            return asyncio.get_running_loop().time() - t0

        assert loop.run(burst()) < 5.0
        wait_for(lambda: s.forwarder.depth()["down"] == 200, 10, "200 queued")
    finally:
        loop.run(s.forwarder.stop())



def test_undelivered_audits_go_dead_are_resent_and_sent_rows_are_purged(
        remote: Remote, loop: LoopThread, sender_db: tuple[object, Writer], pki: dict[str, str]) -> None:
    port = free_port()  # a mutual-TLS repository, down at first
    ctx = client_ssl_context(pki["ca"], pki["client"], pki["client_key"])
    s = _sender(sender_db, [RemoteRepository.from_url("arr", f"syslog+tls://127.0.0.1:{port}", ssl_context=ctx)],
                expire_after=1.0, keep_sent=2.0)
    engine = s.forwarder.engine
    loop.run(s.forwarder.start())
    try:
        _emit(s.audit, 5, "D")
        wait_for(lambda: s.forwarder.summary()["arr"].dead == 5, 15, "5 audits given up")
        assert s.forwarder.summary()["arr"] == OutboxSummary(dead=5)
        wait_for(lambda: s.forwarder.stats["arr"]["expired"] == 5, 5, "the expiry counted")  # after its commit
        assert s.forwarder.stats["arr"]["failures"] >= 2
        dead = outbox_rows(engine, state="dead")
        assert len(dead) == 5 and all(r["dead_at"] and r["size"] > 500 for r in dead)
        assert all(r["last_error"].startswith("expired: not delivered within 1 s; last error: ") for r in dead)
        assert "arr: 5 audit message(s) given up" in s.forwarder.health(float("inf"))
        families = {f.name: f.samples for f in s.forwarder.collect()}
        assert families["ihehub_audit_outbox_dead"][0].value == 5
        assert families["ihehub_audit_outbox_depth"][0].value == 0

        _emit(s.audit, 3, "Q")  # newer ones wait, with their age
        wait_for(lambda: s.forwarder.summary()["arr"].queued == 3, 10, "3 queued")
        assert "queued, the oldest for" in s.forwarder.health(0.0)
        remote.start(tls_port=port)
        wait_for(lambda: remote.count("FWDQ") == 3, 20, "the 3 queued audits delivered")
        wait_for(lambda: s.forwarder.summary()["arr"].sent == 3, 5, "3 sent rows kept")
        assert remote.count("FWDD") == 0 and s.forwarder.summary()["arr"].dead == 5  # dead stays dead

        with pytest.raises(ValueError, match="name the outbox rows"):
            resend_op([])
        queued_id = [r["id"] for r in outbox_rows(engine, state="sent")][:1]
        assert loop.run(s.writer.arun(resend_op([dead[0]["id"]]))) == 1  # one by id ...
        assert loop.run(s.writer.arun(resend_op([], all_dead=True, repository="other"))) == 0
        assert loop.run(s.writer.arun(resend_op([], all_dead=True))) == 4  # ... then the rest
        s.forwarder.wake()
        wait_for(lambda: remote.count("FWDD") == 5, 20, "the 5 resent audits")
        # a sent row may be sent again (a repository that lost it)
        assert loop.run(s.writer.arun(resend_op(queued_id))) in (0, 1)  # 0 if already purged
        # kept sent rows are purged keep_sent seconds after their delivery
        wait_for(lambda: s.forwarder.summary()["arr"] == OutboxSummary(), 15, "sent rows purged")
        wait_for(lambda: s.forwarder.stats["arr"]["purged"] >= 8, 5, "the purge counted")  # after its commit
        assert s.forwarder.health(0.0) == "ok"
    finally:
        loop.run(s.forwarder.stop())


def test_bad_sender_settings_are_refused(sender_db: tuple[object, Writer]) -> None:
    engine, writer = sender_db
    with pytest.raises(ValueError, match="first_backoff <= max_backoff"):
        AuditForwarder(engine, writer, [], first_backoff=5, max_backoff=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be >= 0"):
        AuditForwarder(engine, writer, [], expire_after=-1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state 'lost'"):
        outbox_rows(engine, state="lost")  # type: ignore[arg-type]


def test_hub_outbox_over_http_and_cli_with_health_and_metrics(
        tmp_path: Path, loop: LoopThread, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    init_home(home)
    ensure_tls(load_home(home), key_type="ec")
    monkeypatch.setenv("IHEHUB_HOME", str(home))
    remote = Remote(tmp_path, loop, {"ca": str(home / "tls/ca.pem"), "cert": str(home / "tls/server.pem"),
                                     "key": str(home / "tls/server-key.pem")})
    port = free_port()
    atna = AtnaConfig(tcp_port=None, repositories=({"url": f"syslog+tls://127.0.0.1:{port}", "name": "arr"},),
                      outbox_expire_hours=2 / 3600, outbox_keep_sent_hours=0, outbox_max_backoff=1)
    cfg = loopback_config(load_home(home), atna=atna)
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)  # type: ignore[arg-type]
    loop.run(hub.start(), timeout=60)
    try:
        _emit(hub.audit, 4, "H")
        wait_for(lambda: hub.audit_forwarder.summary()["arr"].dead == 5, 20, "APP-START + 4 audits given up")
        base = f"http://127.0.0.1:{hub.http_port}"
        health = httpx.get(f"{base}/healthz").json()
        assert health["status"] == "degraded" and "5 audit message(s) given up" in health["checks"]["audit_outbox"]
        assert health["audit_outbox"]["arr"]["dead"] == 5 and health["audit_outbox"]["arr"]["connected"] is False
        assert 'ihehub_audit_outbox_dead{repository="arr"} 5.0' in httpx.get(f"{base}/metrics").text
        tokens = {role: {"Authorization": f"Bearer {create_token(hub.store, role=role, name=role)}"}
                  for role in ("auditor", "operator", "readonly")}
        url = f"{base}/api/audit/outbox"
        assert httpx.get(url, headers=tokens["readonly"]).status_code == 403
        page = httpx.get(url, params={"state": "dead", "limit": 3}, headers=tokens["auditor"]).json()
        # (requests are audited too: refused ones, token use; those audits join the queue and expire as well)
        assert page["repositories"]["arr"]["dead"] >= 5 and page["repositories"]["arr"]["sent"] == 0
        assert len(page["items"]) == 3 and page["next_before"] == page["items"][-1]["id"]
        assert all(it["state"] == "dead" and it["repository"] == "arr" for it in page["items"])
        rest = httpx.get(url, params={"state": "dead", "before": page["next_before"]}, headers=tokens["auditor"])
        assert len(rest.json()["items"]) >= 2 and all(it["id"] < page["next_before"] for it in rest.json()["items"])
        assert httpx.get(url, params={"state": "lost"}, headers=tokens["auditor"]).status_code == 400

        listed = CliRunner().invoke(main, ["audit", "outbox", "--dead"])
        assert listed.exit_code == 0 and "arr: " in listed.output and " dead, 0 sent (kept)" in listed.output
        assert listed.output.count("expired: not delivered within 2 s") >= 5
        assert CliRunner().invoke(main, ["audit", "resend"]).exit_code == 1  # neither ids nor --all-dead
        # the local repository has them too; a search with --since lists them newest event first
        found = CliRunner().invoke(main, ["audit", "search", "--event-type", "ITI-9", "--since", "1h"]).output
        assert [line.split("/")[1].strip()[:5] for line in found.splitlines() if "FWDH" in line] == [
            "FWDH3", "FWDH2", "FWDH1", "FWDH0"]

        resend = f"{url}/resend"
        assert httpx.post(resend, json={"all_dead": True}, headers=tokens["auditor"]).status_code == 403
        for bad in ({"ids": [1], "all_dead": True}, {}, {"ids": ["x"]}, {"all_dead": True, "nope": 1}):
            assert httpx.post(resend, json=bad, headers=tokens["operator"]).status_code == 400, bad
        remote.start(tls_port=port)
        one = CliRunner().invoke(main, ["audit", "resend", str(page["items"][0]["id"])])
        assert one.exit_code == 0 and "1 audit message(s) queued again" in one.output
        r = httpx.post(resend, json={"all_dead": True}, headers=tokens["operator"])  # and the sender tries now
        assert r.status_code == 200 and r.json()["queued"] >= 4
        wait_for(lambda: remote.count("FWDH") == 4, 30, "the 4 ITI-9 audits at the repository")
        wait_for(lambda: hub.audit_forwarder.summary()["arr"] == OutboxSummary(), 10,
                 "queue empty (keep_sent 0: removed once sent)")
        assert remote.store.count(AuditQuery(event_id="110100")) == 1  # the APP-START too
        assert httpx.get(f"{base}/healthz").json()["checks"]["audit_outbox"] == "ok"
    finally:
        loop.run(hub.stop(), timeout=60)
        remote.close()
