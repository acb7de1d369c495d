#!/usr/bin/env python3
"""ATNA ingest benchmark: N audit messages over 4 mutual-TLS connections (RFC 5425) into the Audit Record
Repository, received + validated (DICOM audit XSD + WUSTL Schematron) + stored (SQLite, hash chain,
group commit).

The repository runs in this process (asyncio + the bus Writer thread), as `ihehub serve` runs it; the
senders run in a child process that pre-builds the messages (ITI-8/9/18/43/DICOM audits made by
`AuditContext`, so every one is valid), connects 4 TLS clients with client certificates and writes
as fast as TCP allows.  Throughput is counted from the first received frame to the last commit; lost =
sent - stored (rows in the database).  Target (issue #5): >= 10,000 msg/s, 0 lost.

In the same run (unless ``--no-rsyslog``), the same messages go over the same number of connections to
Debian's rsyslogd (``imtcp``, octet counting, writing each message to a file: no validation, no database),
and the repository's rate is compared with rsyslog's (target >= 0.5 x).  rsyslog is fed plain TCP: Debian's
rsyslog has no TLS driver without ``rsyslog-gnutls``; with it the comparison favours rsyslog.
Prints a table, then one JSON line.

    .venv/bin/python bench/atna_ingest.py [--messages 100000] [--connections 4] [--no-validate] [--no-rsyslog]
        [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = (ROOT / ".." / "shared" / "corpus").resolve()


def build_messages(n: int) -> list[bytes]:
    from ihehub.atna import AuditContext, DocumentRef, Endpoint, StudyRef, syslog_message

    audit = AuditContext(source_id="bench-node", enterprise_site="HOSP-A", host="10.1.2.3",
                         home_community_id="urn:oid:1.2.3.4")
    peer = Endpoint(user_id="HIS|HOSP-A", host="10.1.2.4")
    me = audit.me("IHEHUB|HUB")
    out = []
    for i in range(n):
        cx = f"MRN{i % 5000:06d}^^^HOSP-A&1.2.156.1&ISO"
        kind = i % 5
        if kind == 0:
            msg = audit.transaction("ITI-8", source=peer, destination=me, trigger="A01", patients=[cx],
                                    message_id=f"ADT{i}")
        elif kind == 1:
            msg = audit.transaction("ITI-9", source=peer, destination=me, patients=[cx],
                                    query=f"QBP^Q23|{i}|{cx}".encode(), message_id=f"QBP{i}")
        elif kind == 2:
            msg = audit.transaction("ITI-18", source=peer, destination=me, patients=[cx],
                                    query=b"<AdhocQueryRequest/>",
                                    query_id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d")
        elif kind == 3:
            msg = audit.transaction("ITI-43", source=me, destination=peer,
                                    documents=[DocumentRef(unique_id=f"1.2.3.{i}", repository_id="1.2.3.100")])
        else:
            msg = audit.transaction("DICOM-STORE", source=peer, destination=me, patients=[cx],
                                    studies=[StudyRef(uid=f"1.2.840.99.{i}",
                                                      sop_classes={"1.2.840.10008.5.1.4.1.1.2": [f"1.2.3.{i}.1"]})])
        out.append(syslog_message(msg, hostname="his-gw"))
    return out


def sender(port: int, pki: dict[str, str] | None, n: int, connections: int, ready: Any, go: Any,
           result: Any) -> None:
    """``pki`` None: plain TCP (the rsyslog run)."""
    from ihehub.atna import SyslogTlsClient
    from ihehub.tls import client_ssl_context

    messages = build_messages(n)
    ctx = client_ssl_context(pki["ca"], pki["client"], pki["client_key"]) if pki is not None else None

    async def main() -> tuple[int, float]:
        clients = [SyslogTlsClient("127.0.0.1", port, ssl_context=ctx, server_hostname="localhost", timeout=120)
                   for _ in range(connections)]
        for c in clients:
            await c.connect()
        ready.set()
        go.wait()
        t0 = time.perf_counter()
        shares = [messages[i::connections] for i in range(connections)]

        async def one(c: SyslogTlsClient, share: list[bytes]) -> None:
            for k in range(0, len(share), 256):
                await c.send(share[k:k + 256])
            await c.close()

        await asyncio.gather(*(one(c, s) for c, s in zip(clients, shares, strict=True)))
        return sum(c.sent for c in clients), time.perf_counter() - t0

    sent, elapsed = asyncio.run(main())
    result.put((sent, elapsed))


def make_pki(folder: Path) -> dict[str, str]:
    from ihehub.config.model import HubConfig
    from ihehub.tls import ensure_tls, issue_client_cert

    cfg = HubConfig(home=folder)
    ensure_tls(cfg, key_type="ec")
    cert, key = issue_client_cert(cfg, "bench-sender", key_type="ec")
    return {"ca": str(cfg.tls.ca), "cert": str(cfg.tls.cert), "key": str(cfg.tls.key), "client": str(cert),
            "client_key": str(key)}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a (worker) process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_repository(args: argparse.Namespace, folder: Path, pki: dict[str, str]) -> dict[str, object]:
    from sqlalchemy import func, select

    from ihehub.atna import AuditRepository, AuditStore, Validator
    from ihehub.atna.tables import audit_records
    from ihehub.bus import schema
    from ihehub.bus.db import Writer, make_engine
    from ihehub.tls import server_ssl_context

    engine = make_engine(f"sqlite:///{folder}/audit.sqlite")
    schema.upgrade(engine)
    writer = Writer(engine)
    store = AuditStore(engine, writer)
    validator = None if args.no_validate else Validator(CORPUS / "ipf/audit/dicom2017c.xsd",
                                                        CORPUS / "wustl/atna-schematron")
    repo = AuditRepository(store, validator, host="127.0.0.1", workers=args.workers)
    await repo.start(tls_port=0, ssl_context=server_ssl_context(pki["cert"], pki["key"], pki["ca"], True))
    ready, go = mp.Event(), mp.Event()
    result: Any = mp.Queue()
    proc = mp.Process(target=sender, args=(repo.tls_port, pki, args.messages, args.connections, ready, go, result))
    proc.start()
    loop = asyncio.get_running_loop()
    while not ready.is_set():
        await asyncio.sleep(0.05)
        if not proc.is_alive():
            raise SystemExit("the sender process died while preparing")
    workers = repo.examiner.pids() if repo.examiner is not None else []
    main0, workers0 = time.process_time(), sum(_cpu_seconds(pid) for pid in workers)
    go.set()
    t0 = time.perf_counter()
    first = None
    deadline = loop.time() + args.timeout
    while store.stored < args.messages and loop.time() < deadline:
        if first is None and repo.stats["frames"]:
            first = time.perf_counter()
        await asyncio.sleep(0.01)
        if not proc.is_alive() and repo.connection_count == 0 and not repo.backlog:
            break
    t_end = time.perf_counter()
    main_cpu = time.process_time() - main0
    cpu = main_cpu + sum(_cpu_seconds(pid) for pid in workers) - workers0
    sent, send_elapsed = await asyncio.to_thread(result.get, True, 60)
    await asyncio.to_thread(proc.join, 30)
    await repo.stop()
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(audit_records)).scalar_one()
        invalid = conn.execute(select(func.count()).select_from(audit_records)
                               .where(audit_records.c.valid.is_(False))).scalar_one()
    verify_t0 = time.perf_counter()
    report = store.verify()
    verify_s = time.perf_counter() - verify_t0
    store.close()
    writer.close()
    engine.dispose()
    elapsed = t_end - (first or t0)
    return {
        "messages": args.messages, "connections": args.connections, "sent": sent, "stored": rows,
        "lost": sent - rows, "invalid": invalid, "validated": validator is not None,
        "seconds": round(elapsed, 3), "msg_per_s": round(rows / elapsed) if elapsed else 0,
        "sender_seconds": round(send_elapsed, 3), "repository_cpu_s": round(cpu, 2),
        "cpu_us_per_msg": round(cpu / rows * 1e6, 1) if rows else None,
        "main_cpu_us_per_msg": round(main_cpu / rows * 1e6, 1) if rows else None,
        "writer_batches": writer.batches,
        "cache_hits": validator.cache_hits if validator and not args.workers else None,
        "workers": args.workers, "verify_ok": report.ok, "verify_s": round(verify_s, 2), "cores": os.cpu_count(),
    }


RSYSLOG_CONF = """\
global(workDirectory="{work}" maxMessageSize="256k")
module(load="imtcp")
input(type="imtcp" port="0" listenPortFileName="{work}/tcp.port" ruleset="audit")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="audit") {{ action(type="omfile" file="{work}/audit.log" template="raw") }}
"""


def run_rsyslog(args: argparse.Namespace, folder: Path) -> dict[str, object]:
    """The same load into rsyslogd (imtcp -> omfile); lines in the file count as stored."""
    rsyslogd = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
    if not Path(rsyslogd).exists():
        return {"rsyslog": "not installed"}
    work = folder / "rsyslog"
    work.mkdir()
    (work / "rsyslog.conf").write_text(RSYSLOG_CONF.format(work=work), encoding="utf-8")
    proc = subprocess.Popen([rsyslogd, "-n", "-f", str(work / "rsyslog.conf"), "-i", str(work / "pid")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = work / "tcp.port"
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                return {"rsyslog": "rsyslogd did not start"}
            time.sleep(0.05)
        ready, go = mp.Event(), mp.Event()
        result: Any = mp.Queue()
        sender_proc = mp.Process(target=sender, args=(int(port_file.read_text()), None, args.messages,
                                                      args.connections, ready, go, result))
        sender_proc.start()
        ready.wait(120)
        out = work / "audit.log"
        go.set()
        t0 = time.perf_counter()
        lines, offset, last_growth = 0, 0, time.monotonic()
        t_last = t0
        while lines < args.messages and time.monotonic() - last_growth < 10:
            time.sleep(0.01)
            if not out.exists():
                continue
            with out.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            if chunk:
                offset += len(chunk)
                lines += chunk.count(b"\n")
                last_growth, t_last = time.monotonic(), time.perf_counter()
        sent, _ = result.get(True, 60)
        sender_proc.join(30)
        elapsed = t_last - t0
        return {"rsyslog_stored": lines, "rsyslog_lost": sent - lines, "rsyslog_seconds": round(elapsed, 3),
                "rsyslog_msg_per_s": round(lines / elapsed) if elapsed else 0}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--no-validate", action="store_true", help="store without XSD/Schematron validation")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--workers", type=int, default=2,
                    help="worker processes examining (parsing, validating) the messages; 0: in the event loop")
    ap.add_argument("--no-rsyslog", action="store_true", help="skip the rsyslog comparison")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="atna-bench-") as tmp:
        folder = Path(tmp)
        pki = make_pki(folder / "home")
        res = asyncio.run(run_repository(args, folder, pki))
        if not args.no_rsyslog:
            res.update(run_rsyslog(args, folder))
            if res.get("rsyslog_msg_per_s"):
                res["vs_rsyslog"] = round(res["msg_per_s"] / res["rsyslog_msg_per_s"], 2)  # type: ignore[operator]
    ssl_version = ssl.OPENSSL_VERSION
    print(f"ATNA ingest: {res['messages']} messages over {res['connections']} TLS connections ({ssl_version})")
    print(f"{'':28}{'value':>14}")
    for key in ("sent", "stored", "lost", "invalid", "seconds", "msg_per_s", "sender_seconds", "repository_cpu_s",
                "cpu_us_per_msg", "main_cpu_us_per_msg", "writer_batches", "workers", "cache_hits", "verify_ok",
                "verify_s", "cores", "rsyslog", "rsyslog_stored", "rsyslog_lost", "rsyslog_seconds",
                "rsyslog_msg_per_s", "vs_rsyslog"):
        if key in res:
            print(f"{key:28}{res[key]!s:>14}")
    target = res["msg_per_s"] >= 10_000 and res["lost"] == 0  # type: ignore[operator]
    if "vs_rsyslog" in res:
        target = target and res["vs_rsyslog"] >= 0.5  # type: ignore[operator]
    print(f"target >= 10,000 msg/s, 0 lost (and >= 0.5 x rsyslog when measured): {'met' if target else 'NOT met'}")
    print(json.dumps({"bench": "atna_ingest", **res, "target_met": target}))


if __name__ == "__main__":
    main()
