#!/usr/bin/env python3
"""DICOM routing benchmark (issue 7 "Routing"):

  (1) the study-complete routing fields (`ihehub.dicom.routing.study_summary`) of a study of S series x N
      instances whose ``metadata.json`` files hold pydicom's CT_small as DICOM JSON, against decoding those
      files whole (what reading "every instance" would cost);
  (2) routing filters: a study-complete message through one channel filter and four ``json.`` destination
      filters (the body is decoded once per message);
  (3) STOW-RS forwarding (``dicomweb+http://``) of 100 CT slices (512x512, 16-bit, ~513 KiB) to Orthanc's
      DICOMweb plugin (Debian ``orthanc-dicomweb``), one request and 10 MB requests.

Each figure is the best of ``--rounds`` with the spread; prints one JSON line at the end.

    .venv/bin/python bench/dicom_routing.py [--series 10] [--instances 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def summary_bench(tmp: Path, n_series: int, n_instances: int, rounds: int) -> dict[str, Any]:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from sqlalchemy import insert

    from ihehub.bus.db import make_engine
    from ihehub.dicom import tables as t
    from ihehub.dicom.dicomjson import instance_json
    from ihehub.dicom.routing import parse_routing_tags, study_summary

    engine = make_engine(f"sqlite:///{tmp}/index.sqlite")
    t.metadata.create_all(engine)
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    item = instance_json(ds, study_uid="1.2", series_uid="1.2.1", sop_instance_uid="1.2.1.1", pixel_vr="OW")
    study, now = "1.2.3", time.time()
    with engine.begin() as c:
        c.execute(insert(t.patients), [{"id": 1, "patient_id": "P", "issuer": "", "updated_at": now}])
        c.execute(insert(t.studies), [{"study_uid": study, "patient_pk": 1, "modalities": "CT", "created_at": now,
                                       "num_series": n_series, "num_instances": n_series * n_instances,
                                       "updated_at": now}])
        for s in range(n_series):
            su = f"{study}.{s}"
            c.execute(insert(t.series), [{"series_uid": su, "study_uid": study, "modality": "CT", "series_number": s,
                                          "num_instances": n_instances, "updated_at": now}])
            c.execute(insert(t.instances), [
                {"sop_instance_uid": f"{su}.{i}", "series_uid": su, "study_uid": study, "sop_class_uid": "1.2",
                 "transfer_syntax": "1.2.840.10008.1.2.1", "path": f"{i}.dcm", "size": 1, "calling_ae": "CT01",
                 "received_at": now, "indexed_at": now} for i in range(n_instances)])
            folder = tmp / "dicom" / study / su
            folder.mkdir(parents=True)
            (folder / "metadata.json").write_text(json.dumps([item] * n_instances))
    files = sorted((tmp / "dicom").rglob("metadata.json"))
    size = sum(p.stat().st_size for p in files)
    tags = parse_routing_tags(["BodyPartExamined", "ProtocolName", "(0018,0050)"])
    summary, whole = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with engine.connect() as conn:
            study_summary(conn, study, tmp / "dicom", tags)
        t1 = time.perf_counter()
        for p in files:
            json.loads(p.read_bytes())
        whole.append(time.perf_counter() - t1)
        summary.append(t1 - t0)
    engine.dispose()
    return {"series": n_series, "instances": n_series * n_instances, "metadata_mb": round(size / 1e6, 1),
            "summary_ms": [round(x * 1000, 1) for x in summary], "decode_all_ms": [round(x * 1000) for x in whole]}


def filter_bench(rounds: int) -> dict[str, Any]:
    from ihehub.bus.message import Message
    from ihehub.engine.expr import Filter

    body = {"study_uid": "1.2.3", "modalities": ["CT", "SR"], "calling_aes": ["CT01"], "study_description": "Chest",
            "tags": {"BodyPartExamined": ["CHEST"]},
            "series": [{"series_uid": f"1.2.3.{i}", "modality": "CT", "num_instances": 300,
                        "tags": {"BodyPartExamined": ["CHEST"]}} for i in range(10)]}
    raw = json.dumps(body).encode()
    channel = Filter.compile('json.study_uid != ""')
    dests = [Filter.compile(e) for e in ('json.modalities contains "CT" and json.calling_aes contains "CT01"',
                                         'json.study_description =~ "(?i)chest"', 'json.tags.BodyPartExamined == "X"',
                                         'json.series.modality contains "MR"')]
    n = 20_000
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            m = Message(channel="dicom-studies", raw=bytes(raw), charset="utf-8")  # a new body each time
            assert channel is not None and channel(m)
            for d in dests:
                assert d is not None
                d(m)
        per.append((time.perf_counter() - t0) / n)
    return {"body_bytes": len(raw), "us_per_message": [round(x * 1e6, 1) for x in per]}


def stow_bench(tmp: Path, rounds: int) -> dict[str, Any]:
    import numpy as np
    from pydicom.uid import generate_uid

    from ihehub.bus.message import Message
    from ihehub.channels.registry import ConnectorContext, Registry
    from tests.dicom.dicomkit import make_instance
    from tests.dicom.peers import Orthanc

    study, series = generate_uid(), generate_uid()
    folder = tmp / "store" / study / series
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(7).integers(0, 2000, size=(512, 512), dtype=np.uint16).tobytes()
    for n in range(100):
        path = folder / f"{n}.dcm"
        ds = make_instance(path, study_uid=study, series_uid=series, instance_number=n + 1, modality="CT")
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelData = pixels
        ds.save_as(path, enforce_file_format=True)
    size = sum(p.stat().st_size for p in folder.iterdir())
    out: dict[str, Any] = {"instances": 100, "mb": round(size / 1e6, 1)}
    for limit in (100, 10):
        times = []
        for r in range(rounds):
            orthanc = Orthanc(tmp / f"orthanc-{limit}-{r}", dicomweb=True)
            try:
                dest = Registry().build_destination(
                    name="bench", url=f"dicomweb+http://127.0.0.1:{orthanc.http_port}/dicom-web",
                    options={"root": str(tmp / "store"), "max_request_mb": limit}, context=ConnectorContext())

                async def send(d: Any = dest) -> float:
                    t0 = time.perf_counter()
                    response = await d.send(Message(channel="c", raw=json.dumps({"study_uid": study}).encode()))
                    elapsed = time.perf_counter() - t0
                    await d.close()
                    assert json.loads(response.body)["sent"] == 100
                    return elapsed

                times.append(asyncio.run(send()))
            finally:
                orthanc.stop()
        out[f"max_request_mb_{limit}_s"] = [round(x, 2) for x in times]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, default=10)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ihehub-bench-routing-") as tmp:
        result = {"summary": summary_bench(Path(tmp) / "s", args.series, args.instances, args.rounds),
                  "filters": filter_bench(args.rounds), "stow": stow_bench(Path(tmp) / "w", args.rounds)}
    s, f, w = result["summary"], result["filters"], result["stow"]
    print(f"(1) study_summary, {s['series']} series / {s['instances']} instances ({s['metadata_mb']} MB of "
          f"metadata.json): best {min(s['summary_ms'])} ms (runs {s['summary_ms']}); decoding every "
          f"metadata.json whole: best {min(s['decode_all_ms'])} ms")
    print(f"(2) channel filter + 4 json. destination filters on a {f['body_bytes']}-byte study-complete: "
          f"best {min(f['us_per_message'])} us per message (runs {f['us_per_message']})")
    for limit in (100, 10):
        runs = w[f"max_request_mb_{limit}_s"]
        print(f"(3) STOW-RS of {w['instances']} CT slices ({w['mb']} MB) to Orthanc DICOMweb, max_request_mb "
              f"{limit}: best {min(runs)} s = {w['instances'] / min(runs):.0f} inst/s (runs {runs})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
