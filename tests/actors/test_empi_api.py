"""``/api/empi`` over HTTP against a hub whose EMPI is fed by ITI-8: search, views, review, link, merge."""

from __future__ import annotations

from pathlib import Path

import httpx

from ihehub.api import create_token
from tests.actors.support import a01, qbp23, running_hub

GB = "GB 18030-2000"


def test_empi_api_views_review_link_merge_and_errors(tmp_path: Path) -> None:
    with running_hub(tmp_path, http=True) as hub:
        feeds = hub.pix(
            a01("E1", "A1^^^HOSPA", "王^伟", "19800101", charset=GB, encoding="gb18030"),
            # same name and year, another day and month: a possible match for review
            a01("E2", "B1^^^HOSPB", "王^伟", "19800315", facility="HB", charset=GB, encoding="gb18030"),
            a01("E3", "A2^^^HOSPA", "LI^NA", "19900909", "F"),
            a01("E4", "A3^^^HOSPA", "LI^NA", "19900909", "F"),
        )
        assert all(b"MSA|AA|" in f for f in feeds), feeds
        store = hub.hub.store
        base = f"http://127.0.0.1:{hub.hub.http_port}"
        reader = httpx.Client(base_url=base, timeout=20, headers={
            "Authorization": f"Bearer {create_token(store, role='readonly', name='viewer')}"})
        operator = httpx.Client(base_url=base, timeout=20, headers={
            "Authorization": f"Bearer {create_token(store, role='operator', name='dr-li')}"})
        with reader, operator:
            doms = reader.get("/api/empi/domains").json()
            assert {"HOSPA", "HOSPB", "IHEHUB"} <= {d["namespace"] for d in doms}

            # search by hanzi; the record view; its history
            found = reader.get("/api/empi/patients", params={"family": "王"}).json()
            assert found["total"] == 2
            rec = reader.get("/api/empi/records/HOSPA|A1").json()
            assert rec["record"]["names"][0]["family"] == "王" and rec["status"] == "active"
            hist = reader.get("/api/empi/records/HOSPA|A1/history").json()
            assert [v["event"] for v in hist] == ["A01"]
            cands = reader.get("/api/empi/records/HOSPB|B1/candidates").json()
            assert cands and cands[0]["record"] == {"value": "A1", "domain": "HOSPA"}

            # the review queue: readonly sees it, only an operator decides
            queue = reader.get("/api/empi/review").json()
            (item,) = [q for q in queue if q["record"]["value"] == "B1"]
            assert reader.post(f"/api/empi/review/{item['id']}/accept").status_code == 403
            accepted = operator.post(f"/api/empi/review/{item['id']}/accept")
            assert accepted.status_code == 200, accepted.text
            assert operator.post(f"/api/empi/review/{item['id']}/accept").status_code == 409  # decided already
            assert operator.post("/api/empi/review/99999/reject").status_code == 404
            (xref,) = hub.pix(qbp23("Q1", "A1^^^HOSPA"))
            assert b"B1^^^HOSPB" in xref  # PIX now cross-references the accepted record

            # the patient view by enterprise id and by record
            epid = accepted.json()["patient"]
            view = reader.get(f"/api/empi/patients/{epid}").json()
            assert {r["identifier"]["value"] for r in view["records"]} == {"A1", "B1"}
            assert reader.get("/api/empi/patients/HOSPB|B1").json()["patient"] == epid

            # unlink and link again by hand, with the author recorded
            un = operator.post("/api/empi/unlink", json={"record": "HOSPB|B1", "reason": "different mother"})
            assert un.status_code == 200 and un.json()["patient"] != epid
            ln = operator.post("/api/empi/link", json={"record": "HOSPB|B1", "target": "HOSPA|A1", "reason": "ID card"})
            assert ln.status_code == 200 and ln.json()["patient"] == epid
            links = reader.get(f"/api/empi/patients/{epid}").json()["links"]
            assert any(lk["created_by"] == "dr-li" and lk["reason"] == "ID card" for lk in links)

            # merge two records of one domain, then unmerge
            merged = operator.post("/api/empi/merge", json={"surviving": "HOSPA|A2", "subsumed": "HOSPA|A3"})
            assert merged.status_code == 200, merged.text
            mid = merged.json()["merge"]["id"]
            assert reader.get("/api/empi/records/HOSPA|A3").json()["status"] == "merged"
            assert operator.post(f"/api/empi/merges/{mid}/unmerge").status_code == 200
            assert reader.get("/api/empi/records/HOSPA|A3").json()["status"] == "active"

            # bad input: JSON errors naming the problem
            r = operator.post("/api/empi/merge", json={"surviving": "HOSPA|A2"})
            assert r.status_code == 400 and "subsumed" in r.json()["detail"]
            r = operator.post("/api/empi/merge", json={"surviving": "HOSPA|A2", "subsumed": "HOSPA|NOPE"})
            assert r.status_code == 404 and r.json()["field"]
            r = reader.get("/api/empi/records/NOWHERE|X")
            assert r.status_code == 404 and r.json()["error"] == "not_found"
            assert reader.get("/api/empi/records/A1").status_code == 400
            assert reader.get("/api/empi/patients").status_code == 400
            assert httpx.get(f"{base}/api/empi/review", timeout=10).status_code == 401
