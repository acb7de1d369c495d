"""The persistent audit sender (ITI TF-2a 3.20.4.1.1): audits emitted while the repository is down are
kept in the database across a hub restart and all arrive once it is up; mutual TLS (RFC 5425), plain
TCP octet counting and UDP (RFC 5426); a repository that restarts between batches; graceful close."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from ihehub.atna import AuditContext, AuditQuery, AuditRepository, Endpoint, Validator
from ihehub.atna.forward import AuditForwarder, RemoteRepository, repositories_from_config
from ihehub.bus import schema
from ihehub.bus.db import Writer, make_engine
from ihehub.channels.registry import Registry
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

