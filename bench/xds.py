#!/usr/bin/env python3
"""XDS.b benchmark: ITI-41 / ITI-43 of a large document over MTOM, server RSS during a 1 GB upload, and
ITI-18 FindDocuments latency with N DocumentEntries.

The hub (`Hub`, its HTTP app and `hub.services["xds"]`, SQLite) runs in a child process on a temporary
home; this process is the client (httpx, streamed request bodies, so its own memory does not matter) and
samples the child's RSS from /proc while a 1 GB document uploads.  The ITI-41 requests are the NIST
toolkit's Xop sample (corpus/nist/pnr/Xop) with fresh uniqueIds and a generated attachment.
ITI-18 runs at the service level (`StoredQueries.run`, no HTTP) on a registry filled with N entries by
ITI-42 registrations of 10 documents each (10 documents per patient).

Targets (issue #6): ITI-41 of 30 MB <= 1.5 s, ITI-43 of it <= 0.5 s, RSS growth < 100 MB during a 1 GB
upload, ITI-18 FindDocuments p99 <= 50 ms.  Prints a table, then one JSON line.

    .venv/bin/python bench/xds.py [--size-mb 30] [--big-mb 1024] [--entries 10000] [--queries 500]
                                  [--pg postgresql://127.0.0.1:5432/test]   (ITI-18 on PostgreSQL instead)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = (ROOT / ".." / "shared" / "corpus").resolve()
XOP_BODY = CORPUS / "nist" / "pnr" / "Xop" / "body.txt"

RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
SS_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
ITI41 = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
ITI43 = "urn:ihe:iti:2007:RetrieveDocumentSet"
REPO = "1.3.6.1.4.1.21367.2017.2.3.4242.1"
BOUNDARY = "MIMEBoundary_bench0123456789"


# -- the hub (child process) ------------------------------------------------------------------------
def serve(home: str, ready: Any) -> None:
    import dataclasses
    import logging

    from ihehub.channels.registry import Registry
    from ihehub.config import AtnaConfig, DicomActorConfig, init_home, load_home
    from ihehub.hub import Hub

    logging.basicConfig(level=logging.WARNING)
    Path(home, "channels").mkdir(parents=True)
    init_home(Path(home))
    cfg = load_home(Path(home), environ={"IHEHUB_HTTP_PORT": "0"})
    cfg = dataclasses.replace(cfg, atna=AtnaConfig(enabled=False),
                              actors=dataclasses.replace(cfg.actors, dicom=DicomActorConfig(enabled=False)))

    async def main() -> None:
        hub = Hub(cfg, [], registry=Registry())
        await hub.start()
        ready.send(hub.http_port)
        await asyncio.Event().wait()

    asyncio.run(main())


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- requests ---------------------------------------------------------------------------------------
def _envelope_template() -> bytes:
    body = XOP_BODY.read_bytes()
    return body[body.index(b"<?xml"):body.index(b"</soapenv:Envelope>") + len(b"</soapenv:Envelope>")]


def _set_external_id(root: Any, scheme: str, value: str) -> None:
    for ext in root.iter(f"{{{RIM}}}ExternalIdentifier"):
        if ext.get("identificationScheme") == scheme:
            ext.set("value", value)


def pnr_envelope(doc_uid: str, patient: str = "SR7^^^&1.2.260&ISO") -> bytes:
    from lxml import etree

    root = etree.fromstring(_envelope_template())
    _set_external_id(root, DE_UNIQUE_ID, doc_uid)
    _set_external_id(root, SS_UNIQUE_ID, doc_uid + ".99")
    _set_external_id(root, DE_PATIENT_ID, patient)
    _set_external_id(root, SS_PATIENT_ID, patient)
    inc = root.find(".//{http://www.w3.org/2004/08/xop/include}Include")
    inc.set("href", "cid:doc%40bench")
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def mtom_body(envelope: bytes, size: int, block: bytes) -> Iterator[bytes]:
    yield (f"--{BOUNDARY}\r\nContent-Type: application/xop+xml; charset=UTF-8; type=\"application/soap+xml\"\r\n"
           f"Content-Transfer-Encoding: binary\r\nContent-ID: <root@bench>\r\n\r\n").encode() + envelope
    yield (f"\r\n--{BOUNDARY}\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: binary\r\n"
           f"Content-ID: <doc@bench>\r\n\r\n").encode()
    yield from document(size, block)
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


MTOM_CT = (f'multipart/related; boundary="{BOUNDARY}"; type="application/xop+xml"; start="<root@bench>"; '
           f'start-info="application/soap+xml"; action="{ITI41}"')


def retrieve_envelope(doc_uid: str) -> bytes:
    return (f'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
            f'xmlns:a="http://www.w3.org/2005/08/addressing"><s:Header><a:Action>{ITI43}</a:Action>'
            f"<a:MessageID>{uuid.uuid4().urn}</a:MessageID></s:Header><s:Body>"
            f'<x:RetrieveDocumentSetRequest xmlns:x="urn:ihe:iti:xds-b:2007"><x:DocumentRequest>'
            f"<x:RepositoryUniqueId>{REPO}</x:RepositoryUniqueId><x:DocumentUniqueId>{doc_uid}</x:DocumentUniqueId>"
            "</x:DocumentRequest></x:RetrieveDocumentSetRequest></s:Body></s:Envelope>").encode()


def provide(client: Any, url: str, size: int, block: bytes) -> tuple[float, str, str]:
    uid = f"1.2.3.4.{uuid.uuid4().int % 10**12}"
    t0 = time.perf_counter()
    r = client.post(url, content=mtom_body(pnr_envelope(uid), size, block), headers={"content-type": MTOM_CT})
    elapsed = time.perf_counter() - t0
    if r.status_code != 200 or b"ResponseStatusType:Success" not in r.content:
        raise SystemExit(f"ITI-41 failed: {r.status_code} {r.content[:2000]!r}")
    sha = hashlib.sha1()
    for chunk in document(size, block):
        sha.update(chunk)
    return elapsed, uid, sha.hexdigest()


def document(size: int, block: bytes) -> Iterator[bytes]:
    """The generated document: ``block`` repeated up to ``size`` bytes."""
    sent = 0
    while sent < size:
        chunk = block[:size - sent]
        sent += len(chunk)
        yield chunk


def retrieve(client: Any, url: str, uid: str) -> tuple[float, str]:
    """Seconds until the whole MTOM response is received, and the SHA-1 of the document in it."""
    t0 = time.perf_counter()
    sha = hashlib.sha1()
    with client.stream("POST", url, content=retrieve_envelope(uid),
                       headers={"content-type": "application/soap+xml"}) as r:
        ctype = r.headers["content-type"]
        data = b"".join(r.iter_bytes(1 << 20))
    elapsed = time.perf_counter() - t0
    from ihehub.soap import read_request

    async def one() -> Any:
        yield data

    req = asyncio.run(read_request(ctype, one()))
    doc = req.payload.find("{urn:ihe:iti:xds-b:2007}DocumentResponse/{urn:ihe:iti:xds-b:2007}Document")
    sha.update(req.content(doc).read_bytes())
    return elapsed, sha.hexdigest()


# -- ITI-18 -----------------------------------------------------------------------------------------
def submission(patient: str, n_docs: int, serial: int) -> Any:
    """An lcm:SubmitObjectsRequest of ``n_docs`` DocumentEntries (cloned from the NIST sample) for ``patient``."""
    from lxml import etree

    from ihehub.xds import ebrim

    root = etree.fromstring(_envelope_template())
    sor = root.find(".//{urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0}SubmitObjectsRequest")
    objects = sor[0]
    template = objects.find(f"{{{RIM}}}ExtrinsicObject")
    assoc = objects.find(f"{{{RIM}}}Association")
    objects.remove(template)
    objects.remove(assoc)
    _set_external_id(sor, SS_UNIQUE_ID, f"1.2.9.{serial}")
    _set_external_id(sor, SS_PATIENT_ID, patient)
    for i in range(n_docs):
        doc_id = f"Doc{i}"
        eo = copy.deepcopy(template)
        for el in eo.iter():
            if el.get("id"):
                el.set("id", f"{doc_id}_{el.get('id')}")
            for attr in ("classifiedObject", "registryObject"):
                if el.get(attr):
                    el.set(attr, doc_id)
        eo.set("id", doc_id)
        _set_external_id(eo, DE_UNIQUE_ID, f"1.2.8.{serial}.{i}")
        _set_external_id(eo, DE_PATIENT_ID, patient)
        ebrim.set_slot(eo, "hash", [hashlib.sha1(f"{serial}.{i}".encode()).hexdigest()])
        ebrim.set_slot(eo, "size", ["100"])
        ebrim.set_slot(eo, "repositoryUniqueId", [REPO])
        objects.insert(0, eo)
        a = copy.deepcopy(assoc)
        a.set("id", f"Assoc{i}")
        a.set("targetObject", doc_id)
        objects.append(a)
    return sor


def find_documents(patient: str) -> Any:
    from lxml import etree

    q = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
    root = etree.Element(f"{{{q}}}AdhocQueryRequest", nsmap={"query": q, "rim": RIM})
    etree.SubElement(root, f"{{{q}}}ResponseOption", returnType="LeafClass", returnComposedObjects="true")
    aq = etree.SubElement(root, f"{{{RIM}}}AdhocQuery", id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d")
    for name, value in (("$XDSDocumentEntryPatientId", f"'{patient}'"),
                        ("$XDSDocumentEntryStatus", "('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')")):
        slot = etree.SubElement(aq, f"{{{RIM}}}Slot", name=name)
        etree.SubElement(etree.SubElement(slot, f"{{{RIM}}}ValueList"), f"{{{RIM}}}Value").text = value
    return root


def iti18(url: str, entries: int, queries: int) -> dict[str, Any]:
    from ihehub.bus import schema
    from ihehub.bus.db import make_engine
    from ihehub.xds.query import StoredQueries
    from ihehub.xds.registry import XdsRegistry

    engine = make_engine(url)
    schema.upgrade(engine)
    registry = XdsRegistry(engine)
    queries_svc = StoredQueries(engine)
    per = 10
    run = uuid.uuid4().hex[:8]
    patients = max(1, entries // per)
    t0 = time.perf_counter()
    for p in range(patients):
        result = registry.register(submission(f"P{run}{p}^^^&1.2.260&ISO", per, int(run, 16) * 10**7 + p))
        if result.status.endswith("Success") is False:
            raise SystemExit(f"ITI-42 failed: {result.errors[:3]}")
    load_s = time.perf_counter() - t0
    times = []
    for i in range(queries):
        patient = f"P{run}{(i * 7919) % patients}^^^&1.2.260&ISO"
        t = time.perf_counter()
        resp = queries_svc.run(find_documents(patient))
        times.append(time.perf_counter() - t)
        found = len(resp.findall(f".//{{{RIM}}}ExtrinsicObject"))
        if found != per:
            raise SystemExit(f"ITI-18 returned {found} documents, expected {per}")
    times.sort()
    return {"entries": patients * per, "register_s": round(load_s, 1),
            "p50_ms": round(times[len(times) // 2] * 1000, 2),
            "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 2)}


# -- main -------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=30)
    ap.add_argument("--big-mb", type=int, default=1024, help="the upload during which RSS is sampled (0: skip)")
    ap.add_argument("--entries", type=int, default=10_000, help="DocumentEntries for ITI-18 (0: skip)")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--pg", help="run ITI-18 on this PostgreSQL database instead of a temporary SQLite file")
    args = ap.parse_args()

    import httpx

    out: dict[str, Any] = {"bench": "xds"}
    block = os.urandom(1 << 20)
    with tempfile.TemporaryDirectory(prefix="xds-bench-") as tmp:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve, args=(str(Path(tmp) / "home"), child), daemon=True)
        proc.start()
        try:
            if not parent.poll(120):
                raise SystemExit("the hub did not start")
            port = parent.recv()
            url = f"http://127.0.0.1:{port}/xds/repository"
            size = args.size_mb << 20
            with httpx.Client(timeout=600) as client:
                provide(client, url, 1 << 20, block)  # warm-up (imports, first registration)
                t41, uid, sha = provide(client, url, size, block)
                t43, got_sha = retrieve(client, url, uid)
                if got_sha != sha:
                    raise SystemExit("ITI-43 returned different bytes")
                out.update(iti41_mb=args.size_mb, iti41_s=round(t41, 3), iti43_s=round(t43, 3))
                print(f"ITI-41 {args.size_mb} MB over MTOM: {t41:.3f} s   (target <= 1.5 s)")
                print(f"ITI-43 {args.size_mb} MB (MTOM response): {t43:.3f} s   (target <= 0.5 s)")
                if args.big_mb:
                    base = rss_kb(proc.pid)
                    peak = [base]
                    done = threading.Event()

                    def sample() -> None:
                        while not done.is_set():
                            peak[0] = max(peak[0], rss_kb(proc.pid))
                            time.sleep(0.02)

                    sampler = threading.Thread(target=sample, daemon=True)
                    sampler.start()
                    tbig, _, _ = provide(client, url, args.big_mb << 20, block)
                    done.set()
                    sampler.join()
                    growth = (peak[0] - base) / 1024
                    out.update(big_mb=args.big_mb, big_upload_s=round(tbig, 1), rss_base_mb=round(base / 1024, 1),
                               rss_growth_mb=round(growth, 1))
                    print(f"ITI-41 {args.big_mb} MB: {tbig:.1f} s; server RSS {base / 1024:.0f} MB -> peak "
                          f"{peak[0] / 1024:.0f} MB (growth {growth:.1f} MB, target < 100 MB)")
        finally:
            proc.terminate()
            proc.join(10)
        if args.entries:
            db = args.pg or f"sqlite:///{Path(tmp) / 'iti18.db'}"
            res = iti18(db, args.entries, args.queries)
            out["iti18"] = {"db": "postgresql" if args.pg else "sqlite", **res}
            print(f"ITI-18 FindDocuments, {res['entries']} entries ({out['iti18']['db']}, registered in "
                  f"{res['register_s']} s): p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms (target <= 50 ms)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
