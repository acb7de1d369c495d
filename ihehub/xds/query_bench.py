"""Benchmark of ITI-18 FindDocuments (issue 6: p99 <= 50 ms with 1,000,000 DocumentEntries in PostgreSQL).

:func:`load_documents` fills the registry tables with synthetic DocumentEntries (``docs_per_patient`` per
patient, seven coded classifications and one author each; PostgreSQL through ``COPY``, other databases
through executemany); :func:`bench_find_documents` runs a mix of FindDocuments requests (patient + status;
+ classCode; + creationTime range; + eventCodeList AND; + authorPerson LIKE) through
:class:`~ihehub.xds.query.StoredQueries` and returns the latency percentiles.  ``bench/xds.py`` calls both.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Engine, func, insert, select, text

from ihehub.xds import ebrim
from ihehub.xds import tables as t
from ihehub.xds.query import QUERY_IDS, StoredQueries

PATIENT_ROOT = "1.2.156.112604.999"
LOINC = "2.16.840.1.113883.6.1"
EVENTS = "1.2.156.112604.999.2"
CLASS_CODES = ("11490-0", "18748-4", "11488-4", "34133-9", "18842-5")
_OBJ_COLS = ("id", "entry_uuid", "kind", "lid", "version", "unique_id", "patient_id", "status", "object_type",
             "creation_time", "service_start_time", "mime_type", "hash", "size", "repository_unique_id", "xml",
             "registered_at")
_XML = ('<rim:ExtrinsicObject xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0" id="{uuid}" '
        'mimeType="text/xml" objectType="' + ebrim.DE_OBJECT_TYPE_STABLE + '" status="' + ebrim.APPROVED + '">'
        '<rim:Slot name="creationTime"><rim:ValueList><rim:Value>{ct}</rim:Value></rim:ValueList></rim:Slot>'
        '<rim:Name><rim:LocalizedString value="出院小结 {n}"/></rim:Name>'
        '<rim:ExternalIdentifier id="{uuid}-p" registryObject="{uuid}" identificationScheme="'
        + ebrim.DE_PATIENT_ID + '" value="{pid}"/>'
        '<rim:ExternalIdentifier id="{uuid}-u" registryObject="{uuid}" identificationScheme="'
        + ebrim.DE_UNIQUE_ID + '" value="{uid}"/></rim:ExtrinsicObject>')


def patient_id(n: int) -> str:
    return f"BENCH{n:08d}^^^&{PATIENT_ROOT}&ISO"


def _rows(start_id: int, first_n: int, count: int, docs_per_patient: int, seed: int) -> Iterator[
        tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """Batches of (objects, codes, slots) rows: ids from ``start_id``, bench entry numbers from ``first_n``."""
    rnd = random.Random(seed)
    now = time.time()
    batch = 5000
    for first in range(start_id, start_id + count, batch):
        objects, codes, slots = [], [], []
        for oid in range(first, min(first + batch, start_id + count)):
            n = first_n + oid - start_id
            pid = patient_id(n // docs_per_patient)
            entry_uuid = f"urn:uuid:00000000-0000-4000-8000-{oid:012d}"
            ct = (f"20{rnd.randint(10, 24):02d}{rnd.randint(1, 12):02d}{rnd.randint(1, 28):02d}"
                  f"{rnd.randint(0, 23):02d}0000")
            uid = f"{PATIENT_ROOT}.1.{oid}"
            objects.append((oid, entry_uuid, "DocumentEntry", entry_uuid, 1, uid, pid, ebrim.APPROVED,
                            ebrim.DE_OBJECT_TYPE_STABLE, ct, ct[:8], "text/xml",
                            "da39a3ee5e6b4b0d3255bfef95601890afd80709", 1024, f"{PATIENT_ROOT}.9",
                            _XML.format(uuid=entry_uuid, ct=ct, n=n, pid=pid.replace("&", "&amp;"), uid=uid), now))
            for scheme, code, cs in (
                    (ebrim.DE_CLASS_CODE, rnd.choice(CLASS_CODES), LOINC), (ebrim.DE_TYPE_CODE, "18842-5", LOINC),
                    (ebrim.DE_FORMAT_CODE, "urn:ihe:pcc:xds-ms:2007", "1.3.6.1.4.1.19376.1.2.3"),
                    (ebrim.DE_PRACTICE_SETTING_CODE, "394802001", "2.16.840.1.113883.6.96"),
                    (ebrim.DE_HEALTHCARE_FACILITY_TYPE_CODE, "225732001", "2.16.840.1.113883.6.96"),
                    (ebrim.DE_CONFIDENTIALITY_CODE, "N", "2.16.840.1.113883.5.25"),
                    (ebrim.DE_EVENT_CODE, f"E{rnd.randint(1, 20)}", EVENTS)):
                codes.append((oid, scheme, code, cs))
            slots.append((oid, "authorPerson", f"^医生{rnd.randint(1, 500)}^^^^"))
        yield objects, codes, slots


def load_documents(engine: Engine, entries: int, *, docs_per_patient: int = 20, seed: int = 1) -> int:
    """Add synthetic DocumentEntries until the registry holds ``entries`` bench entries; returns how many
    were added (0 when already loaded)."""
    with engine.connect() as conn:
        have = conn.execute(select(func.count()).select_from(t.objects)
                            .where(t.objects.c.unique_id.like(f"{PATIENT_ROOT}.1.%"))).scalar_one()
        if have >= entries:
            return 0
        start = (conn.execute(select(func.max(t.objects.c.id))).scalar() or 0) + 1
    missing = entries - have
    postgres = engine.dialect.name == "postgresql"
    for objects, codes, slots in _rows(start, have, missing, docs_per_patient, seed + have):
        if postgres:
            _copy(engine, objects, codes, slots)
        else:
            with engine.begin() as conn:
                conn.execute(insert(t.objects), [dict(zip(_OBJ_COLS, r, strict=True)) for r in objects])
                conn.execute(insert(t.codes), [dict(zip(("object_id", "scheme", "code", "coding_scheme"), r,
                                                        strict=True)) for r in codes])
                conn.execute(insert(t.slots), [dict(zip(("object_id", "name", "value"), r, strict=True))
                                               for r in slots])
    if postgres:
        with engine.begin() as conn:
            conn.execute(text("SELECT setval(pg_get_serial_sequence('xds_objects', 'id'), "
                              "(SELECT max(id) FROM xds_objects))"))
            conn.execute(text("ANALYZE xds_objects"))
            conn.execute(text("ANALYZE xds_codes"))
            conn.execute(text("ANALYZE xds_slots"))
    return missing


def _copy(engine: Engine, objects: Sequence[tuple[Any, ...]], codes: Sequence[tuple[Any, ...]],
          slots: Sequence[tuple[Any, ...]]) -> None:
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        for table, cols, rows in (("xds_objects", _OBJ_COLS, objects),
                                  ("xds_codes", ("object_id", "scheme", "code", "coding_scheme"), codes),
                                  ("xds_slots", ("object_id", "name", "value"), slots)):
            with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        raw.commit()
    finally:
        raw.close()


def _request(patient: str, variant: int, rnd: random.Random) -> Any:
    from lxml import etree

    rim, query = ebrim.NS["rim"], ebrim.NS["query"]
    root = etree.Element(f"{{{query}}}AdhocQueryRequest", nsmap={"query": query, "rim": rim})
    etree.SubElement(root, f"{{{query}}}ResponseOption", returnComposedObjects="true", returnType="LeafClass")
    aq = etree.SubElement(root, f"{{{rim}}}AdhocQuery", id=QUERY_IDS["FindDocuments"])
    params = {"$XDSDocumentEntryPatientId": f"'{patient}'", "$XDSDocumentEntryStatus": f"('{ebrim.APPROVED}')"}
    if variant == 1:
        params["$XDSDocumentEntryClassCode"] = f"('{rnd.choice(CLASS_CODES)}^^{LOINC}')"
    elif variant == 2:
        params["$XDSDocumentEntryCreationTimeFrom"] = "2015"
        params["$XDSDocumentEntryCreationTimeTo"] = "20200601"
    elif variant == 3:
        params["$XDSDocumentEntryEventCodeList"] = f"('E1^^{EVENTS}','E2^^{EVENTS}','E3^^{EVENTS}')"
        params["$XDSDocumentEntryClassCode"] = f"('{CLASS_CODES[0]}^^{LOINC}','{CLASS_CODES[1]}^^{LOINC}')"
    elif variant == 4:
        params["$XDSDocumentEntryAuthorPerson"] = "('^医生1%')"
    for name, value in params.items():
        slot = etree.SubElement(aq, f"{{{rim}}}Slot", name=name)
        etree.SubElement(etree.SubElement(slot, f"{{{rim}}}ValueList"), f"{{{rim}}}Value").text = value
    return root


def bench_find_documents(engine: Engine, *, queries: int = 500, seed: int = 7,
                         docs_per_patient: int = 20) -> dict[str, float]:
    """Latency of FindDocuments (LeafClass) over random bench patients: p50 / p99 / max in ms, mean hits."""
    with engine.connect() as conn:
        entries = conn.execute(select(func.count()).select_from(t.objects)
                               .where(t.objects.c.unique_id.like(f"{PATIENT_ROOT}.1.%"))).scalar_one()
    patients = max(1, entries // docs_per_patient)
    sq = StoredQueries(engine)
    rnd = random.Random(seed)
    for i in range(20):  # warm-up: connections, statement cache
        sq.run(_request(patient_id(rnd.randrange(patients)), i % 5, rnd))
    times, hits = [], []
    for i in range(queries):
        request = _request(patient_id(rnd.randrange(patients)), i % 5, rnd)
        started = time.perf_counter()
        response = sq.run(request)
        times.append((time.perf_counter() - started) * 1000)
        hits.append(len(response[-1]))
    times.sort()
    return {"entries": float(entries), "queries": float(queries), "p50_ms": round(statistics.median(times), 2),
            "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2), "max_ms": round(times[-1], 2),
            "mean_hits": round(statistics.mean(hits), 1)}
