"""Refused API credentials are audited (DICOM PS3.15 A.5.3.11, A.5.3.12; issue #5): a malformed, unknown or
revoked bearer token → User Authentication (EventID 110114, EventTypeCode 110122 Login) with outcome 4;
a valid token without the role → Security Alert (110113, 110132 Use of Restricted Function).  End to end
against a hub: the records are in its Audit Record Repository, valid, and visible at ``/api/audit``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ihehub.api import create_token, list_tokens, revoke_token
from ihehub.api.auth import hash_token
from ihehub.atna import AuditQuery
from ihehub.channels.registry import Registry
from ihehub.config import AtnaConfig, init_home, load_channels, load_home
from ihehub.hub import Hub
from tests.api.api_support import LoopThread, wait_for
from tests.conftest import CORPUS, loopback_config


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    home = tmp_path / "home"
    init_home(home)
    atna = AtnaConfig(schema=CORPUS / "ipf/audit/dicom2017c.xsd", schematron=CORPUS / "wustl/atna-schematron")
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


def test_refused_tokens_are_audited_and_visible_at_api_audit(hub: Hub) -> None:
    base = f"http://127.0.0.1:{hub.http_port}"
    unknown = "ihh_" + "A" * 43
    revoked = create_token(hub.store, role="admin", name="old-laptop")
    revoke_token(hub.store, list_tokens(hub.store)[0].id)
    readonly = create_token(hub.store, role="readonly", name="dashboard")

    assert httpx.get(f"{base}/api/channels").status_code == 401  # no credential: nothing to audit
    for header in (f"Bearer {unknown}", "Bearer not-a-token", f"Bearer {revoked}"):
        r = httpx.get(f"{base}/api/channels", headers={"Authorization": header})
        assert r.status_code == 401, r.text
    assert httpx.get(f"{base}/api/audit", headers={"Authorization": f"Bearer {readonly}"}).status_code == 403

    store = hub.audit_store
    wait_for(lambda: store.count(AuditQuery(event_id="110114")) == 3, 10, "3 failed logins stored")
    wait_for(lambda: store.count(AuditQuery(event_id="110113")) == 1, 10, "1 security alert stored")

    auditor = {"Authorization": f"Bearer {create_token(hub.store, role='auditor', name='auditor')}"}
    r = httpx.get(f"{base}/api/audit", params={"event_id": "110114"}, headers=auditor)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 3
    assert all(it["event_type"] == "110122" and it["outcome"] == 4 and it["valid"] for it in items), items
    users = {u for it in items for u in it["ids"]["user"]}
    assert {f"token sha256:{hash_token(unknown)[:16]}", f"token sha256:{hash_token(revoked)[:16]}",
            "malformed credential"} <= users
    assert not any(unknown in str(it) or revoked in str(it) for it in items)  # never the secret itself
    # the login audit names the requested endpoint and why it was refused
    rec = store.search(AuditQuery(event_id="110114", limit=10), with_raw=True).records
    assert any(b"GET /api/channels: unknown token" in (x.raw or b"") for x in rec)
    assert any(b"has been revoked" in (x.raw or b"") for x in rec)

    r = httpx.get(f"{base}/api/audit", params={"event_id": "110113"}, headers=auditor)
    alert = r.json()["items"][0]
    assert alert["event_type"] == "110132" and alert["outcome"] == 4 and alert["valid"], alert
    assert any("dashboard" in u for u in alert["ids"]["user"])
