#!/usr/bin/env python3
"""DICOM ingest benchmark: DCMTK ``storescu`` (TCP_NODELAY=1, one association) sends N synthetic 512x512 CT
instances (16-bit, Explicit VR Little Endian, 512 KiB each) to

  (a) DCMTK ``storescp`` writing the files (the reference: C++, no index);
  (b) ihehub's image manager in its own process: files as received, SQLite index, series metadata;
  (c) Orthanc (Debian ``orthanc``, SQLite index) when ``/usr/sbin/Orthanc`` is installed.

Each setup runs ``--rounds`` times (interleaved); the median counts.  Targets (issue #7): (b) >= 0.5 x (a)
and (b) >= 5 x (c).  Also reported: when the last instance of (b) was queryable, and its RSS.  Prints a
table, then one JSON line with every figure.

    .venv/bin/python bench/dicom_ingest.py [--instances 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {"PATH": "/usr/sbin:/usr/bin:/bin", "TCP_NODELAY": "1"}
ORTHANC = "/usr/sbin/Orthanc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_study(folder: Path, n: int) -> int:
    """N CT slices of one series; returns the bytes per file."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    base = np.random.default_rng(7).integers(0, 2000, size=(512, 512), dtype=np.uint16)
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^CT", "BENCH1", "CT"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "080000", "BENCH"
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.ImagePositionPatient = [0, 0, i * 1.25]
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (base + i).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"ct{i:04d}.dcm", enforce_file_format=True)
    return (folder / "ct0000.dcm").stat().st_size


def wait_echo(port: int, aec: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["echoscu", "-aec", aec, "127.0.0.1", str(port)], env=ENV, capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"no DICOM echo from port {port}")


def send(port: int, aec: str, study: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(["storescu", "+sd", "-aet", "BENCHSCU", "-aec", aec, "127.0.0.1", str(port), str(study)],
                       env=ENV, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu to {aec} failed: {r.stderr[-500:]}")
    return elapsed


def rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return (round(int(fields["VmRSS"].split()[0]) / 1024, 1), round(int(fields["VmHWM"].split()[0]) / 1024, 1))


# -- (a) storescp -----------------------------------------------------------------------------------
def run_storescp(study: Path, work: Path) -> float:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    with subprocess.Popen(["storescp", "-od", str(out), str(port)], env=ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as p:
        try:
            wait_echo(port, "ANY-SCP")
            return send(port, "ANY-SCP", study)
        finally:
            p.terminate()


# -- (b) ihehub -------------------------------------------------------------------------------------
CHILD = r"""
import asyncio, sys
from pathlib import Path
from typing import Any
from ihehub.bus.db import make_engine
from ihehub.bus import schema
from ihehub.dicom import ImageManager, DicomSettings

async def main(data: Path) -> None:
    engine = make_engine(f"sqlite:///{data}/index.sqlite")
    schema.upgrade(engine)
    manager = ImageManager(DicomSettings(port=0, host="127.0.0.1"), engine, data)
    await manager.start()
    print(manager.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await manager.stop()
    engine.dispose()

asyncio.run(main(Path(sys.argv[1])))
"""


def run_ihehub(study: Path, work: Path, n: int) -> dict[str, float]:
    data = work / "ihehub"
    data.mkdir()
    with subprocess.Popen([sys.executable, "-c", CHILD, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}) as p:
        try:
            assert p.stdout is not None
            port = int(p.stdout.readline())
            wait_echo(port, "IHEHUB")
            t0 = time.perf_counter()
            elapsed = send(port, "IHEHUB", study)
            indexed = None
            while time.perf_counter() - t0 < 60:
                with sqlite3.connect(data / "index.sqlite") as db:
                    if db.execute("SELECT count(*) FROM dicom_instances").fetchone()[0] >= n:
                        indexed = time.perf_counter() - t0
                        break
                time.sleep(0.01)
            rss, peak = rss_mb(p.pid)
            return {"seconds": elapsed, "indexed_after_s": indexed or float("nan"),
                    "index_lag_s": (indexed or float("nan")) - elapsed, "rss_mb": rss, "peak_rss_mb": peak}
        finally:
            if p.stdin:
                p.stdin.close()
            p.wait(30)


# -- (c) Orthanc ------------------------------------------------------------------------------------
def run_orthanc(study: Path, work: Path) -> float:
    root = work / "orthanc"
    root.mkdir()
    port, http = free_port(), free_port()
    config = {"Name": "bench", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http, "RemoteAccessAllowed": False,
              "DicomCheckCalledAet": False, "StorageCompression": False, "Plugins": [], "HttpServerEnabled": True,
              "DicomAlwaysAllowStore": True, "LogExportedResources": False}
    (root / "orthanc.json").write_text(json.dumps(config))
    with subprocess.Popen([ORTHANC, str(root / "orthanc.json")], env=ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as p:
        try:
            wait_echo(port, "ORTHANC")
            return send(port, "ORTHANC", study)
        finally:
            p.terminate()
            p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n = args.instances
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool, path=ENV["PATH"]) is None:
            sys.exit(f"DCMTK {tool} is missing: run `make peers`")
    orthanc = Path(ORTHANC).exists()
    with tempfile.TemporaryDirectory(prefix="dicom-bench-") as tmp:
        tmpdir = Path(tmp)
        size = make_study(tmpdir / "study", n)
        runs: dict[str, list[float]] = {"a_storescp": [], "b_ihehub": [], "c_orthanc": []}
        extra: list[dict[str, float]] = []
        for r in range(args.rounds):
            work = tmpdir / f"round{r}"
            work.mkdir()
            runs["a_storescp"].append(run_storescp(tmpdir / "study", work))
            res = run_ihehub(tmpdir / "study", work, n)
            runs["b_ihehub"].append(res["seconds"])
            extra.append(res)
            if orthanc:
                runs["c_orthanc"].append(run_orthanc(tmpdir / "study", work))
            shutil.rmtree(work)
    rows: dict[str, dict[str, Any]] = {}
    for name, secs in runs.items():
        if not secs:
            continue
        med = statistics.median(secs)
        rows[name] = {"seconds": round(med, 3), "instances_per_s": round(n / med, 1),
                      "mb_per_s": round(n * size / med / 1e6, 1), "all_s": [round(s, 3) for s in secs]}
    best = min(extra, key=lambda e: e["seconds"])
    rows["b_ihehub"].update({"indexed_after_s": round(statistics.median(e["indexed_after_s"] for e in extra), 3),
                             "index_lag_s": round(statistics.median(e["index_lag_s"] for e in extra), 3),
                             "rss_mb": best["rss_mb"], "peak_rss_mb": max(e["peak_rss_mb"] for e in extra)})
    a, b = rows["a_storescp"]["instances_per_s"], rows["b_ihehub"]["instances_per_s"]
    c = rows["c_orthanc"]["instances_per_s"] if "c_orthanc" in rows else None
    print(f"\nDICOM ingest: {n} CT instances of {size / 1024:.0f} KiB, one storescu association (TCP_NODELAY=1), "
          f"{os.cpu_count()} cores, median of {args.rounds}\n")
    print(f"{'setup':12} {'seconds':>8} {'inst/s':>8} {'MB/s':>7} {'x storescp':>10}")
    for name, row in rows.items():
        print(f"{name:12} {row['seconds']:>8} {row['instances_per_s']:>8} {row['mb_per_s']:>7} "
              f"{row['instances_per_s'] / a:>10.2f}")
    bi = rows["b_ihehub"]
    print(f"\nihehub: all {n} queryable {bi['indexed_after_s']} s after the first C-STORE "
          f"({bi['index_lag_s']} s after the last response); RSS {bi['rss_mb']} MB, peak {bi['peak_rss_mb']} MB")
    if c is None:
        print("Orthanc: not installed (apt-get install orthanc), (c) skipped")
    verdict = {"ratio_vs_storescp": round(b / a, 3), "ratio_ok": b >= 0.5 * a,
               "ratio_vs_orthanc": round(b / c, 3) if c else None, "orthanc_ok": (b >= 5 * c) if c else None}
    print()
    print(json.dumps({"bench": "dicom_ingest", "instances": n, "bytes_per_instance": size, "rounds": args.rounds,
                      **rows, **verdict}))


if __name__ == "__main__":
    main()
