"""Interoperability with Debian's rsyslog (issue #5): the hub's persistent audit sender delivers RFC 5424
audit messages to rsyslogd's ``imtcp`` (octet counting, RFC 6587), rsyslog writes them to a file
unchanged, and rsyslog's ``omfwd`` (TCP, octet-counted framing, RFC 5424 template) forwards them into
the hub's Audit Record RemoteRepository, which parses, validates (schema + Schematron) and stores them.

The same over TLS (RFC 5425) with Debian's ``rsyslog-gnutls`` (``make peers`` installs it): the hub's
sender presents its client certificate to rsyslog's ``imtcp`` with the ``gtls`` stream driver (mutual
TLS, the client certificate checked against the test CA), and ``omfwd`` (``gtls``, octet-counted,
the repository's name checked) presents rsyslog's certificate to the repository's TLS listener,
which requires one.  The certificates are made by the test session (tests/atna/conftest.py ``pki``).

rsyslogd runs in the foreground with its own configuration and work directory, listening on a port
the kernel chooses (``listenPortFileName``), as this (unprivileged for the ports it uses) user.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from ihehub.atna import AuditContext, AuditQuery, AuditRepository, Endpoint, Validator, parse_syslog
from ihehub.atna.forward import AuditForwarder, RemoteRepository
from ihehub.atna.tables import atna_outbox
from ihehub.tls import client_ssl_context, server_ssl_context
from tests.api.api_support import LoopThread, wait_for
from tests.atna.conftest import close_store, open_store

CONF = """\
global(workDirectory="{work}" maxMessageSize="256k")
module(load="imtcp")
input(type="imtcp" port="0" listenPortFileName="{work}/tcp.port" ruleset="audit")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="audit") {{
  action(type="omfile" file="{work}/audit.log" template="raw")
  action(type="omfwd" target="127.0.0.1" port="{repo_port}" protocol="tcp" TCP_Framing="octet-counted"
         template="RSYSLOG_SyslogProtocol23Format"
         action.resumeRetryCount="-1" queue.type="LinkedList" queue.filename="fwd")
}}
"""


# rsyslog-gnutls: imtcp over TLS requiring a client certificate from the test CA; omfwd over TLS
# presenting rsyslog's certificate and checking the repository's name
TLS_CONF = """\
global(workDirectory="{work}" maxMessageSize="256k" defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{ca}" defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/certvalid")
input(type="imtcp" port="0" listenPortFileName="{work}/tcp.port" ruleset="audit")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="audit") {{
  action(type="omfile" file="{work}/audit.log" template="raw")
  action(type="omfwd" target="127.0.0.1" port="{repo_port}" protocol="tcp" TCP_Framing="octet-counted"
         streamDriver="gtls" streamDriverMode="1" streamDriverAuthMode="x509/name"
         streamDriverPermittedPeers="localhost" template="RSYSLOG_SyslogProtocol23Format"
         action.resumeRetryCount="-1" queue.type="LinkedList" queue.filename="fwd")
}}
"""


def start_rsyslogd(work: Path, repo_port: int, conf_text: str = CONF,
                   **files: str) -> tuple[subprocess.Popen[bytes], int]:
    """rsyslogd in the foreground (``-n``) on an ephemeral port; returns the process and the port."""
    rsyslogd = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
    assert Path(rsyslogd).exists(), "rsyslogd is not installed (Debian package rsyslog; make peers)"
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "rsyslog.conf"
    conf.write_text(conf_text.format(work=work, repo_port=repo_port, **files), encoding="utf-8")
    check = subprocess.run([rsyslogd, "-N1", "-f", str(conf)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([rsyslogd, "-n", "-f", str(conf), "-i", str(work / "rsyslogd.pid")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    port_file = work / "tcp.port"
    deadline = time.monotonic() + 20
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"rsyslogd exited with {proc.returncode}: {out}")
        assert time.monotonic() < deadline, "rsyslogd did not open its TCP port"
        time.sleep(0.05)
    return proc, int(port_file.read_text().strip())


def stop_rsyslogd(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def emit_queries(audit: AuditContext, prefix: str, n: int, note: str = "") -> None:
    """``n`` ITI-9 query audits for patients ``<prefix>0`` ... (the query text gets ``note``)."""
    for i in range(n):
        audit.emit("ITI-9", source=Endpoint(user_id="CONS|CF", host="10.0.0.9"), destination=audit.me("HUB|HUB"),
                   patients=[f"{prefix}{i}^^^HOSPA&1.2.156.1.1&ISO"], query=f"QBP^Q23 {i}{note}".encode(),
                   message_id=f"{prefix}{i}")


def file_lines(path: Path) -> list[bytes]:
    """The non-empty lines rsyslog has written to ``path`` so far."""
    return [x for x in path.read_bytes().split(b"\n") if x] if path.exists() else []


def test_hub_sender_to_rsyslog_and_rsyslog_forwarding_into_the_repository(
        tmp_path: Path, loop: LoopThread, validator: Validator) -> None:
    store, writer = open_store(f"sqlite:///{tmp_path}/repo.sqlite")
    repo = AuditRepository(store, validator, host="127.0.0.1")
    loop.run(repo.start(tcp_port=0))
    proc, port = start_rsyslogd(tmp_path / "rsyslog", int(repo.tcp_port or 0))
    out_file = tmp_path / "rsyslog" / "audit.log"
    sender_store, sender_writer = open_store(f"sqlite:///{tmp_path}/sender.sqlite")
    fwd = AuditForwarder(sender_store.engine, sender_writer,
                         [RemoteRepository.from_url("rsyslog", f"syslog+tcp://127.0.0.1:{port}")])
    audit = AuditContext(source_id="ihehub-rsyslog-test", enterprise_site="HOSP-A", sinks=(fwd.sink,))
    loop.run(fwd.start())
    try:
        emit_queries(audit, "RS", 25)

        def lines() -> list[bytes]:
            return file_lines(out_file)

        wait_for(lambda: len(lines()) == 25, 30, "25 audit messages in rsyslog's file")
        for line in lines():  # rsyslog kept each message as sent: RFC 5424 with the BOM before the XML
            msg = parse_syslog(line)
            assert msg.msgid == "IHE+RFC-3881" and msg.app_name == "ihehub"
            assert msg.bom and msg.msg.lstrip().startswith((b"<?xml", b"<AuditMessage"))
        # ... and forwarded them (omfwd, octet-counted TCP) into the repository: parsed, valid, stored
        wait_for(lambda: store.count(AuditQuery(event_type="ITI-9")) == 25, 30, "25 forwarded audits stored")
        records = store.search(AuditQuery(event_type="ITI-9", limit=100)).records
        assert all(r.valid for r in records), [r.errors for r in records if not r.valid][:2]
        assert {r.source_id for r in records} == {"ihehub-rsyslog-test"} and {r.transport for r in records} == {"tcp"}
        assert {v for r in records for k, v in r.ids if k == "patient"} == {
            f"RS{i}^^^HOSPA&1.2.156.1.1&ISO" for i in range(25)}
        assert fwd.depth() == {"rsyslog": 0}
    finally:
        loop.run(fwd.stop())
        stop_rsyslogd(proc)
        loop.run(repo.stop())
        close_store(sender_store, sender_writer)
        close_store(store, writer)


def test_tls_both_ways_hub_sender_to_rsyslog_gtls_and_rsyslog_omfwd_gtls_into_the_repository(
        tmp_path: Path, loop: LoopThread, validator: Validator, pki: dict[str, str]) -> None:
    gtls = Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so")
    assert gtls.exists() or any(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so")), \
        "rsyslog's TLS driver is not installed (Debian package rsyslog-gnutls; make peers)"
    store, writer = open_store(f"sqlite:///{tmp_path}/repo.sqlite")
    repo = AuditRepository(store, validator, host="127.0.0.1")
    # the repository's RFC 5425 listener requires a client certificate
    loop.run(repo.start(tls_port=0, ssl_context=server_ssl_context(pki["cert"], pki["key"], pki["ca"], True)))
    proc, port = start_rsyslogd(tmp_path / "rsyslog", int(repo.tls_port or 0), TLS_CONF,
                                ca=pki["ca"], cert=pki["cert"], key=pki["key"])
    out_file = tmp_path / "rsyslog" / "audit.log"
    sender_store, sender_writer = open_store(f"sqlite:///{tmp_path}/sender.sqlite")
    to_rsyslog = RemoteRepository.from_url(  # the hub's sender, mutual TLS with its client certificate
        "rsyslog", f"syslog+tls://127.0.0.1:{port}",
        ssl_context=client_ssl_context(pki["ca"], pki["client"], pki["client_key"]))
    fwd = AuditForwarder(sender_store.engine, sender_writer, [to_rsyslog], keep_sent=3600.0)
    audit = AuditContext(source_id="ihehub-rsyslog-tls", enterprise_site="HOSP-A", sinks=(fwd.sink,))
    loop.run(fwd.start())
    try:
        emit_queries(audit, "RT", 20, note=" \u6c49")

        def lines() -> list[bytes]:
            return file_lines(out_file)

        wait_for(lambda: len(lines()) == 20, 30, "20 audit messages in rsyslog's file (received over TLS)")
        wait_for(lambda: fwd.summary()["rsyslog"].sent == 20, 10, "the sender to mark the 20 sent")
        assert fwd.connected("rsyslog")
        with sender_store.engine.connect() as conn:  # what the sender sent, byte for byte
            sent = {bytes(r[0]) for r in conn.execute(select(atna_outbox.c.payload)).all()}
        assert set(lines()) == sent  # rsyslog has each message exactly as the hub sent it
        # ... and forwarded them over TLS into the repository: parsed, valid, stored with rsyslog's certificate
        wait_for(lambda: store.count(AuditQuery(event_type="ITI-9")) == 20, 30, "20 forwarded audits stored")
        records = store.search(AuditQuery(event_type="ITI-9", limit=100), with_raw=True).records
        assert all(r.valid for r in records), [r.errors for r in records if not r.valid][:2]
        assert {r.transport for r in records} == {"tls"} and {r.source_id for r in records} == {"ihehub-rsyslog-tls"}
        assert all(r.tls_subject and "ihehub-1" in r.tls_subject for r in records)  # rsyslog's client certificate
        # the audit XML intact (rsyslog's RSYSLOG_SyslogProtocol23Format template ends the message with a LF)
        assert {(r.xml() or b"").removesuffix(b"\n") for r in records} == {parse_syslog(p).msg for p in sent}
    finally:
        loop.run(fwd.stop())
        stop_rsyslogd(proc)
        loop.run(repo.stop())
        close_store(sender_store, sender_writer)
        close_store(store, writer)
