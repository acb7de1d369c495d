"""PIXm (ITI-83) and PDQm (ITI-78) over HTTP against a hub whose EMPI is fed by ITI-8 on MLLP."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from ihehub.api import create_token
from ihehub.atna import AuditQuery
from tests.actors.support import a01, running_hub
from tests.api.api_support import wait_for

GB = "GB 18030-2000"
HOSPA = "urn:oid:1.2.156.1.1"
HOSPB = "urn:oid:1.2.156.1.2"


def _get(client: httpx.Client, path: str, **params: Any) -> httpx.Response:
    return client.get(path, params=params)


@pytest.fixture(scope="module")
def fhir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_hub(tmp_path_factory.mktemp("fhir"), http=True) as hub:
        feeds = hub.pix(
            a01("F1", "A100^^^HOSPA", "张^三", "19800101", charset=GB, encoding="gb18030"),
            a01("F2", "B200^^^HOSPB", "张^三", "19800101", facility="HB", charset=GB, encoding="gb18030"),
            a01("F3", "A101^^^HOSPA", "WANG^ALICE", "19910505", "F"),
            a01("F4", "A102^^^HOSPA", "WANG^BRUNO", "19700303"),
            a01("F5", "A103^^^HOSPA", "WANG^CARLA", "19650707", "F"),
        )
        assert all(b"MSA|AA|" in f for f in feeds), feeds
        token = create_token(hub.hub.store, role="readonly", name="viewer")
        base = f"http://127.0.0.1:{hub.hub.http_port}"
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=20) as client:
            yield hub, client


def test_pixm_cross_reference_and_its_error_cases(fhir: Any) -> None:
    hub, client = fhir
    r = _get(client, "/fhir/Patient/$ihe-pix", sourceIdentifier=f"{HOSPA}|A100")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "Parameters"
    targets = [p["valueIdentifier"] for p in body["parameter"] if p["name"] == "targetIdentifier"]
    assert {"system": HOSPB, "value": "B200", "use": "usual"} in targets
    assert not any(t["value"] == "A100" for t in targets)  # the queried identifier is left out
    (ref,) = [p["valueReference"]["reference"] for p in body["parameter"] if p["name"] == "targetId"]
    assert ref.startswith("Patient/")

    # targetSystem restricts the answer; a bare OID and the namespace name the same domain
    r = client.get("/fhir/Patient/$ihe-pix", params=[("sourceIdentifier", "1.2.156.1.1|A100"),
                                                       ("targetSystem", HOSPB)])
    assert [p["valueIdentifier"]["value"] for p in r.json()["parameter"] if p["name"] == "targetIdentifier"] == ["B200"]
    # a known patient with no identifier in the target domain: 200 and no targetIdentifier
    r = _get(client, "/fhir/Patient/$ihe-pix", sourceIdentifier=f"{HOSPA}|A101", targetSystem=HOSPB)
    assert r.status_code == 200 and not [p for p in r.json()["parameter"] if p["name"] == "targetIdentifier"]

    # PIXm error cases (ITI TF-2c 3.83.4.2.2.3-5)
    r = _get(client, "/fhir/Patient/$ihe-pix", sourceIdentifier="urn:oid:9.9.9|A100")
    assert r.status_code == 400
    assert r.json()["issue"][0] == {"severity": "error", "code": "code-invalid",
                                    "diagnostics": "sourceIdentifier Assigning Authority not found"}
    r = _get(client, "/fhir/Patient/$ihe-pix", sourceIdentifier=f"{HOSPA}|A100", targetSystem="urn:oid:9.9.9")
    assert r.status_code == 403 and r.json()["issue"][0]["diagnostics"] == "targetSystem not found"
    r = _get(client, "/fhir/Patient/$ihe-pix", sourceIdentifier=f"{HOSPA}|NOPE")
    assert r.status_code == 404 and r.json()["issue"][0]["code"] == "not-found"
    for bad in ("A100", f"{HOSPA}|", ""):
        r = _get(client, "/fhir/Patient/$ihe-pix", sourceIdentifier=bad)
        assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome", bad

    # every query is audited as ITI-83 when the repository runs
    store = hub.hub.audit_store
    recs = wait_for(lambda: store.search(AuditQuery(event_type="ITI-83")).records, 10, "ITI-83 audits")
    assert recs


def test_pdqm_search_read_paging_and_chinese_names(fhir: Any) -> None:
    _, client = fhir
    # hanzi family name, UTF-8 over HTTP, fed in GB18030 over MLLP: one enterprise patient with both records
    r = _get(client, "/fhir/Patient", family="张", birthdate="1980-01-01")
    assert r.status_code == 200
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset" and bundle["total"] == 1
    patient = bundle["entry"][0]["resource"]
    assert patient["name"][0]["family"] == "张" and patient["gender"] == "male"
    assert patient["birthDate"] == "1980-01-01"
    assert {(i["system"], i["value"]) for i in patient["identifier"]} >= {(HOSPA, "A100"), (HOSPB, "B200")}

    # read by the enterprise id of the search result
    r = client.get(f"/fhir/Patient/{patient['id']}")
    assert r.status_code == 200 and r.json()["id"] == patient["id"]
    assert client.get("/fhir/Patient/NOPE").status_code == 404

    # identifier search and gender; pinyin finds the hanzi record
    r = _get(client, "/fhir/Patient", identifier=f"{HOSPB}|B200")
    assert [e["resource"]["id"] for e in r.json()["entry"]] == [patient["id"]]
    r = _get(client, "/fhir/Patient", family="ZHANG", given="SAN")
    assert r.json()["total"] == 1

    # paging: 3 WANGs, _count=2 → next link with _offset
    r = _get(client, "/fhir/Patient", family="WANG", _count=2)
    page = r.json()
    assert page["total"] == 3 and len(page["entry"]) == 2
    nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
    page2 = client.get(nxt).json()
    assert len(page2["entry"]) == 1
    assert not {e["resource"]["id"] for e in page["entry"]} & {e["resource"]["id"] for e in page2["entry"]}
    r = _get(client, "/fhir/Patient", family="WANG", gender="female")
    assert sorted(e["resource"]["name"][0]["given"][0] for e in r.json()["entry"]) == ["ALICE", "CARLA"]

    # unknown parameter: ignored with a warning, or 400 with Prefer: handling=strict
    r = _get(client, "/fhir/Patient", family="WANG", shoe_size="44")
    outcome = [e for e in r.json()["entry"] if e["search"]["mode"] == "outcome"]
    assert r.status_code == 200 and "shoe_size" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    r = client.get("/fhir/Patient", params={"family": "WANG", "shoe_size": "44"},
                   headers={"Prefer": "handling=strict"})
    assert r.status_code == 400
    # bad values and empty searches are 400 with an OperationOutcome
    for params in ({"gender": "robot"}, {"birthdate": "gt2000"}, {"birthdate": "01/01/1980"}, {},
                   {"identifier": "A100"}, {"_count": "0"}):
        r = client.get("/fhir/Patient", params=params)
        assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome", params
    # nothing found: an empty bundle
    assert _get(client, "/fhir/Patient", family="NOBODY").json()["total"] == 0


def test_fhir_patient_needs_a_token_and_an_empi(fhir: Any) -> None:
    hub, client = fhir
    anonymous = httpx.get(f"{client.base_url}/fhir/Patient", params={"family": "WANG"}, timeout=10)
    assert anonymous.status_code == 401
    empi = hub.hub.services.pop("empi")
    try:
        r = _get(client, "/fhir/Patient", family="WANG")
        assert r.status_code == 404 and "pix-manager" in r.json()["issue"][0]["diagnostics"]
    finally:
        hub.hub.services["empi"] = empi
