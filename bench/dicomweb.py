#!/usr/bin/env python3
"""DICOMweb benchmark: a synthetic 500-slice 512x512 CT (the study of ``bench/dicom_ingest.py``) is stored
with STOW-RS into a hub running in its own process, then read over loopback HTTP as a viewer would
(``--parallel`` keep-alive connections):

* rendered frames (``.../instances/{uid}/rendered``, image/jpeg, the data set's window): every frame of the
  series, first pass (cold cache: decode, window, encode; the prefetcher renders ahead) and second pass
  (from the disk cache).  Targets (issue #7): all frames <= 1 s and the first <= 100 ms;
* WADO-RS instances (``.../instances/{uid}``, multipart/related application/dicom, as stored): every
  instance one request each, and the whole series in one multipart response;
* STOW-RS ingest rate (50 instances per request).

By default, as in the default configuration (``actors.dicom.dicomweb.prerender: true``), the hub renders each
STOW-RS instance in the background as it arrives; the viewer opens the study once the server is idle again
(the wait is reported), so the "first pass" reads from the cache.  ``--no-prerender`` measures a cold cache
(decode, window and encode on request, the prefetcher rendering ahead).

Prints a table, then one JSON line with every figure.

    .venv/bin/python bench/dicomweb.py [--instances 500] [--parallel 8] [--no-prerender]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dicom_ingest import make_study  # noqa: E402  (the same synthetic CT as the ingest benchmark)

CHILD = """
import asyncio, dataclasses, sys
from pathlib import Path
from ihehub.channels.registry import Registry
from ihehub.config import DicomActorConfig, HttpConfig, SyslogActorConfig, init_home, load_channels, load_home
from ihehub.hub import Hub

async def main(home: Path, prerender: bool) -> None:
    (home / "channels").mkdir(parents=True)
    init_home(home)
    (home / "ihehub.yaml").write_text("auth:\\n  required: false\\n", encoding="utf-8")
    cfg = load_home(home, environ={})
    actors = dataclasses.replace(cfg.actors, syslog=SyslogActorConfig(tls_port=0, udp_port=0),
                                 dicom=DicomActorConfig(enabled=True, port=0, dicomweb={"prerender": prerender}))
    cfg = dataclasses.replace(cfg, http=HttpConfig(host="127.0.0.1", port=0), actors=actors,
                              atna=dataclasses.replace(cfg.atna, enabled=False))
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)
    await hub.start()
    print(hub.http_port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await hub.stop()

asyncio.run(main(Path(sys.argv[1]), sys.argv[2] == "1"))
"""


async def stow(client: httpx.AsyncClient, files: list[Path], batch: int = 50) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(files), batch):
        boundary = secrets.token_hex(8)
        body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + b"\r\n"
                        for f in files[start:start + batch]) + f"--{boundary}--\r\n".encode()
        r = await client.post("/dicomweb/studies", content=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        r.raise_for_status()
    return time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc): the server's cost, whatever else the machine runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def raw_fetch_all(port: int, urls: list[str], parallel: int, accept: str) -> tuple[float, float, int]:
    """Fetch ``urls`` in order with ``parallel`` keep-alive connections; (seconds for all, seconds until the
    first URL's answer, bytes).  A minimal HTTP/1.1 client on asyncio streams: a viewer's (browser's) HTTP
    stack costs next to nothing, while httpx would spend more CPU per request than the server."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for u in urls:
        queue.put_nowait(u)
    first: list[float] = []
    size = 0
    t0 = time.perf_counter()

    async def worker() -> None:
        nonlocal size
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not queue.empty():
                url = queue.get_nowait()
                writer.write(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: {accept}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"{url}: {head.splitlines()[0]!r}")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = await reader.readexactly(length)
                size += len(body)  # (not ``size += len(await ...)``: that reads ``size`` before the await)
                if url == urls[0]:
                    first.append(time.perf_counter() - t0)
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(parallel)))
    return time.perf_counter() - t0, first[0], size


async def wait_idle(pid: int, quiet: float = 0.5, limit: float = 120.0) -> float:
    """Wait until the server has used (almost) no CPU for ``quiet`` seconds; returns the seconds waited."""
    t0 = time.perf_counter()
    last = cpu_seconds(pid)
    while time.perf_counter() - t0 < limit:
        await asyncio.sleep(quiet)
        now = cpu_seconds(pid)
        if now - last < quiet * 0.05:
            break
        last = now
    return time.perf_counter() - t0


async def run(port: int, pid: int, files: list[Path], parallel: int, prerender: bool) -> dict[str, Any]:
    import pydicom

    cpu: dict[str, float] = {}

    limits = httpx.Limits(max_connections=parallel, max_keepalive_connections=parallel)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) as client:
        c0 = cpu_seconds(pid)
        stow_s = await stow(client, files)
        cpu["stow"] = cpu_seconds(pid) - c0
        waited = await wait_idle(pid) if prerender else 0.0  # the study is opened once it was pre-rendered
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        study, series = first.StudyInstanceUID, first.SeriesInstanceUID
        found = (await client.get(f"/dicomweb/studies/{study}/series/{series}/instances",
                                  params={"limit": str(len(files))})).json()
        uids = [it["00080018"]["Value"][0] for it in sorted(found, key=lambda it: it["00200013"]["Value"][0])]
        assert len(uids) == len(files), f"{len(uids)} of {len(files)} instances found"
        base = f"/dicomweb/studies/{study}/series/{series}/instances"
        rendered = [f"{base}/{u}/rendered" for u in uids]
        c0 = cpu_seconds(pid)
        cold = await raw_fetch_all(port, rendered, parallel, "image/jpeg")
        c1 = cpu_seconds(pid)
        warm = await raw_fetch_all(port, rendered, parallel, "image/jpeg")
        c2 = cpu_seconds(pid)
        cpu["cold"], cpu["warm"] = c1 - c0, c2 - c1
        dicom = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        c0 = cpu_seconds(pid)
        inst = await raw_fetch_all(port, [f"{base}/{u}" for u in uids], parallel, dicom["Accept"])
        cpu["instances"] = cpu_seconds(pid) - c0
        t0 = time.perf_counter()
        whole = await client.get(f"/dicomweb/studies/{study}/series/{series}", headers=dicom)
        whole.raise_for_status()
        series_s = time.perf_counter() - t0
    n = len(files)
    return {
        "prerender_wait_s": round(waited, 2),
        "stow": {"seconds": round(stow_s, 3), "instances_per_s": round(n / stow_s, 1),
                 "server_cpu_ms_each": round(cpu["stow"] / n * 1000, 2)},
        "rendered_first_pass": {"all_s": round(cold[0], 3), "first_ms": round(cold[1] * 1000, 1),
                                "frames_per_s": round(n / cold[0], 1), "jpeg_kb": round(cold[2] / n / 1024, 1),
                                "server_cpu_ms_each": round(cpu["cold"] / n * 1000, 2)},
        "rendered_cached": {"all_s": round(warm[0], 3), "first_ms": round(warm[1] * 1000, 1),
                            "frames_per_s": round(n / warm[0], 1),
                            "server_cpu_ms_each": round(cpu["warm"] / n * 1000, 2)},
        "wado_instances": {"all_s": round(inst[0], 3), "instances_per_s": round(n / inst[0], 1),
                           "mb_per_s": round(inst[2] / inst[0] / 1e6, 1),
                           "server_cpu_ms_each": round(cpu["instances"] / n * 1000, 2)},
        "wado_series": {"seconds": round(series_s, 3), "mb_per_s": round(len(whole.content) / series_s / 1e6, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--prerender", action=argparse.BooleanOptionalAction, default=True,
                        help="dicomweb.prerender (the default configuration: on): STOW-RS instances are rendered in "
                             "the background as they arrive; --no-prerender measures a cold cache")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ihehub-dicomweb-bench-") as tmp:
        work = Path(tmp)
        make_study(work / "study", args.instances)
        files = sorted((work / "study").glob("*.dcm"))
        child = [sys.executable, "-c", CHILD, str(work / "home"), "1" if args.prerender else "0"]
        with subprocess.Popen(child, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}) as p:
            try:
                assert p.stdout is not None
                port = int(p.stdout.readline())
                result = asyncio.run(run(port, p.pid, files, args.parallel, args.prerender))
            finally:
                if p.stdin:
                    p.stdin.close()
                p.wait(60)
    n = args.instances
    cold, warm = result["rendered_first_pass"], result["rendered_cached"]
    print(f"\nDICOMweb: {n} CT instances 512x512x16, {args.parallel} parallel keep-alive connections, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")
    print(f"STOW-RS ingest           {result['stow']['seconds']:>7} s  {result['stow']['instances_per_s']:>7} inst/s")
    print(f"rendered, first pass     {cold['all_s']:>7} s  {cold['frames_per_s']:>7} frames/s  first "
          f"{cold['first_ms']} ms  ({cold['jpeg_kb']} KiB JPEG)")
    print(f"rendered, cached         {warm['all_s']:>7} s  {warm['frames_per_s']:>7} frames/s  first "
          f"{warm['first_ms']} ms")
    wi, ws = result["wado_instances"], result["wado_series"]
    print(f"WADO-RS instances        {wi['all_s']:>7} s  {wi['instances_per_s']:>7} inst/s  {wi['mb_per_s']} MB/s")
    print(f"WADO-RS whole series     {ws['seconds']:>7} s  {ws['mb_per_s']:>7} MB/s\n")
    targets = {"cached_all_ok": warm["all_s"] <= 1.0, "cached_first_ok": warm["first_ms"] <= 100,
               "first_pass_all_ok": cold["all_s"] <= 1.0, "first_pass_first_ok": cold["first_ms"] <= 100}
    for name, row in result.items():
        if isinstance(row, dict) and "server_cpu_ms_each" in row:
            print(f"server CPU per item, {name:20} {row['server_cpu_ms_each']:>7} ms")
    print(json.dumps({"bench": "dicomweb", "instances": n, "parallel": args.parallel, "prerender": args.prerender,
                      "load_average": round(os.getloadavg()[0], 1), **result, **targets}))


if __name__ == "__main__":
    main()
