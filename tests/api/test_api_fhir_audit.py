"""ITI-81 ``GET /fhir/AuditEvent`` against a real hub: the Audit Record Repository on loopback ports, audits
emitted by the hub, searched over HTTP with tokens, paged with the next link, and the search audited."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ihehub.api import create_token
from ihehub.atna import AuditQuery, Endpoint
from ihehub.atna.fhir import FHIR_JSON
from ihehub.channels.registry import Registry
from ihehub.config import AtnaConfig, init_home, load_channels, load_home
from ihehub.hub import Hub
from tests.api.api_support import LoopThread, wait_for
from tests.conftest import CORPUS, loopback_config

PATIENT = "P81^^^HOSPA&1.2.156.1.1&ISO"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    home = tmp_path / "home"
    init_home(home)
    monkeypatch.setenv("IHEHUB_HOME", str(home))
    atna = AtnaConfig(schema=CORPUS / "ipf/audit/dicom2017c.xsd", schematron=CORPUS / "wustl/atna-schematron",
                      tcp_port=0)
    cfg = loopback_config(load_home(home), atna=atna)
    registry = Registry()
    h = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)  # type: ignore[arg-type]
    loop = LoopThread()
    loop.run(h.start(), timeout=60)
    try:
        yield h
    finally:
        loop.run(h.stop(), timeout=60)
        loop.close()


def _emit_queries(hub: Hub, n: int) -> None:
    for i in range(n):
        hub.audit.emit("ITI-9", source=Endpoint(user_id="CONS|CF", host="10.0.0.9"),
                       destination=hub.audit.me("HUB|HUB"), patients=[PATIENT], query=f"QBP^Q23 {i}".encode(),
                       message_id=f"Q{i}", outcome=0 if i else 4)
    wait_for(lambda: hub.audit_store.count(AuditQuery(patient="P81")) == n, 10, f"{n} ITI-9 audits stored")


def test_iti81_search_paging_auth_and_audit_of_the_search(hub: Hub) -> None:
    _emit_queries(hub, 3)
    base = f"http://127.0.0.1:{hub.http_port}/fhir/AuditEvent"
    auditor = {"Authorization": f"Bearer {create_token(hub.store, role='auditor', name='auditor-1')}"}
    today = dt.datetime.now(dt.UTC).date()
    day = {"date": [f"ge{today - dt.timedelta(days=1)}", f"le{today + dt.timedelta(days=1)}"]}

    assert httpx.get(base, params=day).status_code == 401
    ro = create_token(hub.store, role="readonly", name="ro")
    assert httpx.get(base, params=day, headers={"Authorization": f"Bearer {ro}"}).status_code == 403

    r = httpx.get(base, params={"patient.identifier": "urn:oid:1.2.156.1.1|P81"}, headers=auditor)
    assert r.status_code == 400 and r.headers["content-type"].startswith(FHIR_JSON)
    assert r.json()["resourceType"] == "OperationOutcome" and "date" in r.json()["issue"][0]["diagnostics"]
    r = httpx.get(base, params={**day, "bogus": "1"}, headers=auditor)
    assert r.status_code == 400 and "unknown search parameter 'bogus'" in r.json()["issue"][0]["diagnostics"]

    r = httpx.get(base, params={**day, "patient.identifier": "urn:oid:1.2.156.1.1|P81", "subtype": "ITI-9"},
                  headers=auditor)
    assert r.status_code == 200 and r.headers["content-type"].startswith(FHIR_JSON)
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    events = [e["resource"] for e in bundle["entry"]]
    assert len(events) == 3 and all(e["subtype"][0]["code"] == "ITI-9" for e in events)
    assert events[0]["type"]["code"] == "110112" and events[0]["agent"][0]["who"]["identifier"]["value"] == "CONS|CF"
    assert any(ent["what"]["identifier"]["value"] == PATIENT for ent in events[0]["entity"])
    assert bundle["entry"][0]["fullUrl"].endswith(f"/fhir/AuditEvent/{events[0]['id']}")

    # another assigning authority, a failed outcome, a day without events
    other = httpx.get(base, params={**day, "patient.identifier": "urn:oid:9.9|P81"}, headers=auditor).json()
    assert other["entry"] == []
    failed = httpx.get(base, params={**day, "outcome": "4", "entity-id": PATIENT}, headers=auditor).json()
    assert [e["resource"]["outcome"] for e in failed["entry"]] == ["4"]
    assert httpx.get(base, params={"date": "2001-01-01"}, headers=auditor).json()["entry"] == []

    # _count pages with the next link until it ends, every event once
    seen: list[str] = []
    first = {"date": f"ge{today - dt.timedelta(days=1)}", "agent.identifier": "CONS\\|CF", "_count": "2"}
    url: str | None = base
    pages = 0
    while url is not None:
        page = httpx.get(url, params=first if pages == 0 else None, headers=auditor).json()
        pages += 1
        assert len(page["entry"]) <= 2
        seen += [e["resource"]["id"] for e in page["entry"]]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
        assert pages <= 3
    assert len(seen) == len(set(seen)) == 3 and pages == 2

    # reading the log was itself audited (DCM 110101 Audit Log Used) with the FHIR query
    used = wait_for(lambda: hub.audit_store.search(AuditQuery(event_id="110101", user="auditor-1"),
                                                   with_raw=True).records, 10, "audit-log-used")
    assert b"/fhir/AuditEvent?" in (used[0].xml() or b"") and used[0].valid, used[0].errors


def test_api_audit_time_range_pages_newest_event_first(hub: Hub) -> None:
    _emit_queries(hub, 5)
    url = f"http://127.0.0.1:{hub.http_port}/api/audit"
    auditor = {"Authorization": f"Bearer {create_token(hub.store, role='auditor', name='auditor-2')}"}
    params = {"patient": "P81", "since": str(time.time() - 86400), "limit": "2"}
    seen: list[int] = []
    times: list[float] = []
    page = httpx.get(url, params=params, headers=auditor).json()
    while True:
        seen += [it["seq"] for it in page["items"]]
        times += [it["event_time"] for it in page["items"]]
        if page["next_before"] is None:
            assert page["next_before_time"] is None
            break
        page = httpx.get(url, params={**params, "before": page["next_before"],
                                      "before_time": page["next_before_time"]}, headers=auditor).json()
    assert len(seen) == len(set(seen)) == 5 and times == sorted(times, reverse=True)
    r = httpx.get(url, params={**params, "before": seen[1]}, headers=auditor)
    assert r.status_code == 400 and "before_time" in r.text
