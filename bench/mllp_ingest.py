#!/usr/bin/env python3
"""MLLP ingest benchmark: 10 persistent clients send N ADT^A01 messages (each waits for its ACK).

Measured in one run against
  (a) a bare asyncio MLLP server defined in this script: frame, parse with python-hl7, ACK — no storage;
  (b) ihehub embedded (`ihehub serve`, SQLite, a channel that stores every message), and (b+) the same with
      one HTTP destination receiving every message while ingest runs;
  (c) ihehub on PostgreSQL + RabbitMQ: `ihehub serve` plus 2 `ihehub worker` processes delivering to an
      HTTP receiver (needs the machine's PostgreSQL and RabbitMQ; skipped with --no-scaleout).
Targets (issue #3): (b) >= 0.5 x (a) and >= 2,000 msg/s on a 2-core machine; p99 ACK latency <= 50 ms;
`serve` RSS <= 300 MB.  Prints a table, then one JSON line with every figure.

    .venv/bin/python bench/mllp_ingest.py [--messages 20000] [--clients 10] [--no-scaleout]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def adt(i: int) -> bytes:
    return (f"MSH|^~\\&|HIS|H1|IHEHUB|HUB|20261127101010||ADT^A01^ADT_A01|B{i:08d}|P|2.5\r"
            f"EVN|A01|20261127101010\rPID|1||MRN{i:08d}^^^H1^MR||Zhang^San||19800101|M|||"
            f"No. 1 Road^^Beijing^^100000^CHN||010-12345678\rPV1|1|I|W1^101^1\r").encode()


# -- (a) the bare server ------------------------------------------------------------------------
def bare_server(port: int, ready: mp.Event) -> None:  # type: ignore[valid-type]
    import hl7

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.buf = b""
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while True:
                end = self.buf.find(FS + CR)
                if end < 0:
                    return
                frame, self.buf = self.buf[self.buf.find(VT) + 1:end], self.buf[end + 2:]
                msg = hl7.parse(frame.decode("ascii"))
                ack = f"MSH|^~\\&|HUB||HIS||20261127||ACK^A01^ACK|A{msg['MSH.F10']}|P|2.5\rMSA|AA|{msg['MSH.F10']}\r"
                self.t.write(VT + ack.encode() + FS + CR)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Proto, "127.0.0.1", port)
        ready.set()  # type: ignore[attr-defined]
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- the load generator (own process) -----------------------------------------------------------
def client_process(port: int, start: int, count: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    async def one(cid: int, ids: range) -> list[float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lat = []
        for i in ids:
            t0 = time.perf_counter()
            writer.write(VT + adt(i) + FS + CR)
            data = await reader.readuntil(FS + CR)
            lat.append(time.perf_counter() - t0)
            if b"MSA|AA" not in data:
                raise RuntimeError(f"not AA: {data[:200]!r}")
        writer.close()
        return lat

    async def main() -> None:
        clients = CLIENTS
        per = count // clients
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(c, range(start + c * per, start + (c + 1) * per)) for c in range(clients)))
        elapsed = time.perf_counter() - t0
        out.put((elapsed, [x for r in results for x in r]))

    asyncio.run(main())


def load(port: int, count: int, start: int = 0) -> dict[str, float]:
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    p = mp.Process(target=client_process, args=(port, start, count, q))
    p.start()
    elapsed, lat = q.get(timeout=900)
    p.join()
    lat.sort()
    n = len(lat)
    return {"msgs": n, "seconds": round(elapsed, 3), "msg_per_s": round(n / elapsed, 1),
            "p50_ms": round(lat[n // 2] * 1000, 2), "p99_ms": round(lat[int(n * 0.99)] * 1000, 2)}


# -- ihehub processes ---------------------------------------------------------------------------
def rss_mb(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    vals = {ln.split(":")[0]: int(ln.split()[1]) for ln in status.splitlines() if ln.startswith(("VmRSS", "VmHWM"))}
    return round(vals["VmRSS"] / 1024, 1), round(vals["VmHWM"] / 1024, 1)


def start_hub(home: Path, role: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "ihehub", "--home", str(home), role],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def wait_ready(http_port: int, mllp_port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ihehub exited:\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", mllp_port), timeout=0.5):
                httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1)
                return
        except (OSError, httpx.HTTPError):
            time.sleep(0.1)
    raise TimeoutError("ihehub did not start")


def make_home(dest_url: str | None, *, database: str | None = None, broker: str | None = None) -> tuple[Path, int, int]:
    home = Path(tempfile.mkdtemp(prefix="ihehub-bench-"))
    http_port, mllp_port = free_port(), free_port()
    (home / "channels").mkdir()
    (home / "ihehub.yaml").write_text(
        f"http: {{host: 127.0.0.1, port: {http_port}}}\n"
        f"database: {database or 'sqlite:///db/ihehub.sqlite'}\nbroker: {broker or 'null'}\nlog_level: warning\n"
        "retention: {body_days: 0}\natna: {enabled: false}\nactors: {dicom: {enabled: false}}\n")
    dests = f"destinations:\n  - name: rx\n    url: {dest_url}\n" if dest_url else ""
    (home / "channels" / "bench.yaml").write_text(f"name: bench\nsource:\n  url: mllp://127.0.0.1:{mllp_port}\n{dests}")
    return home, http_port, mllp_port


def delivered_count(home: Path) -> int:
    import sqlite3

    con = sqlite3.connect(home / "db" / "ihehub.sqlite")
    try:
        return int(con.execute("SELECT count(*) FROM deliveries WHERE state='sent'").fetchone()[0])
    finally:
        con.close()


def run_ihehub(count: int, dest_url: str | None, *, database: str | None = None, broker: str | None = None,
               workers: int = 0, pg_count=None) -> dict[str, float]:  # type: ignore[no-untyped-def]
    home, http_port, mllp_port = make_home(dest_url, database=database, broker=broker)
    log = home / "serve.log"
    serve = start_hub(home, "serve", log)
    procs = [start_hub(home, "worker", home / f"worker{i}.log") for i in range(workers)]
    try:
        wait_ready(http_port, mllp_port, serve, log)
        load(mllp_port, 500, start=10_000_000)  # warm-up (not counted)
        res = load(mllp_port, count)
        res["serve_rss_mb"], res["serve_peak_rss_mb"] = rss_mb(serve.pid)
        if dest_url:
            t0 = time.perf_counter()
            total = count + 500
            counter = pg_count or (lambda: delivered_count(home))
            while counter() < total and time.perf_counter() - t0 < 300:
                time.sleep(0.2)
            res["delivered_all_after_s"] = round(time.perf_counter() - t0, 2)
        return res
    finally:
        for p in [serve, *procs]:
            p.send_signal(signal.SIGTERM)
        for p in [serve, *procs]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


# -- a fast HTTP receiver (own process) ----------------------------------------------------------
def receiver_process(port: int, ready: mp.Event) -> None:  # type: ignore[valid-type]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":")[1])
                await reader.readexactly(n)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        ready.set()  # type: ignore[attr-defined]
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def pg_database() -> str:
    import psycopg

    name = f"ihehub_bench_{secrets.token_hex(3)}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_pg(name: str) -> None:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


CLIENTS = 10


def main() -> None:
    global CLIENTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--no-scaleout", action="store_true", help="skip (c), PostgreSQL + RabbitMQ")
    args = ap.parse_args()
    CLIENTS = args.clients
    n = args.messages - args.messages % CLIENTS
    rows: dict[str, dict[str, float]] = {}

    ready = mp.Event()
    port = free_port()
    bare = mp.Process(target=bare_server, args=(port, ready), daemon=True)
    bare.start()
    ready.wait(10)
    load(port, 500, start=10_000_000)
    rows["a_bare"] = load(port, n)
    bare.terminate()

    rows["b_embedded"] = run_ihehub(n, None)

    rready = mp.Event()
    rport = free_port()
    rx = mp.Process(target=receiver_process, args=(rport, rready), daemon=True)
    rx.start()
    rready.wait(10)
    rows["b_embedded_http_dest"] = run_ihehub(n, f"http://127.0.0.1:{rport}/adt")

    if not args.no_scaleout:
        db = pg_database()
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"

        def pg_sent() -> int:
            import psycopg

            with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{db}") as conn:
                return int(conn.execute("SELECT count(*) FROM deliveries WHERE state='sent'").fetchone()[0])

        try:
            rows["c_pg_rabbitmq_2_workers"] = run_ihehub(
                n, f"http://127.0.0.1:{rport}/adt", database=url, broker="amqp://guest:guest@127.0.0.1:5672//",
                workers=2, pg_count=pg_sent)
        finally:
            drop_pg(db)
    rx.terminate()

    base = rows["a_bare"]["msg_per_s"]
    print(f"\nMLLP ingest, {n} ADT^A01 messages, {CLIENTS} persistent clients, {os.cpu_count()} cores\n")
    print(f"{'setup':28} {'msg/s':>9} {'x bare':>7} {'p50 ms':>7} {'p99 ms':>7} {'RSS MB':>7} {'peak':>6} "
          f"{'delivered after s':>18}")
    for name, r in rows.items():
        print(f"{name:28} {r['msg_per_s']:>9} {r['msg_per_s'] / base:>7.2f} {r['p50_ms']:>7} {r['p99_ms']:>7} "
              f"{r.get('serve_rss_mb', ''):>7} {r.get('serve_peak_rss_mb', ''):>6} "
              f"{r.get('delivered_all_after_s', ''):>18}")
    b = rows["b_embedded"]
    verdict = {
        "embedded_ratio": round(b["msg_per_s"] / base, 3),
        "ratio_ok": b["msg_per_s"] >= 0.5 * base,
        "throughput_ok": b["msg_per_s"] >= 2000,
        "p99_ok": b["p99_ms"] <= 50,
        "rss_ok": b["serve_peak_rss_mb"] <= 300,
    }
    print()
    print(json.dumps({"bench": "mllp_ingest", "messages": n, "clients": CLIENTS, **rows, **verdict}))


if __name__ == "__main__":
    main()
