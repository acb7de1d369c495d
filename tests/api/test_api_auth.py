"""Bearer tokens (RFC 6750): creation, storage as SHA-256 only, 401/403 answers, caching, roles."""

from __future__ import annotations

import hashlib

import httpx
import pytest
from sqlalchemy import select

from ihehub.api import ApiError, Authenticator, create_token, list_tokens, revoke_token
from ihehub.api.auth import GRANTS, ROLES, well_formed
from ihehub.bus.store import MessageStore
from ihehub.bus.tables import api_tokens
from tests.api.api_support import Running, run, wait_for


def test_token_is_random_prefixed_and_stored_only_as_sha256(store: MessageStore) -> None:
    token = create_token(store, role="operator", name="ris-integration")
    other = create_token(store.engine, role="readonly", name="dashboard")  # the CLI passes an engine
    assert token.startswith("ihh_") and len(token) == 4 + 43 and well_formed(token)
    assert token != other
    with store.engine.connect() as conn:
        rows = conn.execute(select(api_tokens)).mappings().all()
    assert {r["token_hash"] for r in rows} == {hashlib.sha256(t.encode()).hexdigest() for t in (token, other)}
    assert all(token not in str(dict(r)) for r in rows)
    listed = list_tokens(store)
    assert [(t.name, t.role, t.revoked) for t in listed] == [("ris-integration", "operator", False),
                                                            ("dashboard", "readonly", False)]


def test_bad_role_and_name_are_refused(store: MessageStore) -> None:
    with pytest.raises(ValueError, match=r"unknown role 'opertor' \(did you mean 'operator'\?\)"):
        create_token(store, role="opertor", name="x")
    with pytest.raises(ValueError, match="name of 1 to 128"):
        create_token(store, role="admin", name="  ")


def test_revoke(store: MessageStore) -> None:
    create_token(store, role="admin", name="ops")
    info = list_tokens(store)[0]
    assert revoke_token(store, info.id) is True
    assert revoke_token(store, info.id) is False  # already revoked
    assert revoke_token(store, "nope") is False
    assert list_tokens(store)[0].revoked_at is not None
    assert list_tokens(store, include_revoked=False) == []


def test_roles_nest_admin_operator_readonly_and_auditor_is_apart() -> None:
    assert set(ROLES) == set(GRANTS)
    assert GRANTS["admin"] > GRANTS["operator"] > GRANTS["readonly"]
    assert GRANTS["auditor"] == {"auditor"}


def test_verified_tokens_are_cached_and_last_use_is_written_once_a_minute(store: MessageStore) -> None:
    now = [1000.0]
    auth = Authenticator(store, cache_seconds=5, touch_seconds=60, clock=lambda: now[0])
    token = create_token(store, role="operator", name="cached")
    header = f"Bearer {token}"

    async def check() -> str:
        return (await auth.authenticate(header)).name

    assert run(check()) == "cached"
    first_use = _wait_last_used(store)
    revoke_token(store, list_tokens(store)[0].id)
    now[0] += 4  # inside the cache window: still accepted without a database read
    assert run(check()) == "cached"
    now[0] += 2  # the cache entry expired: the revocation is seen
    with pytest.raises(ApiError) as err:
        run(check())
    assert err.value.status_code == 401 and "revoked" in str(err.value.detail)
    assert list_tokens(store)[0].last_used_at == first_use  # not written again within the minute


def _wait_last_used(store: MessageStore) -> float:
    value: float = wait_for(lambda: list_tokens(store)[0].last_used_at, 5, "last_used_at")
    return value


def _assert_401(r: httpx.Response, detail_part: str, invalid: bool) -> None:
    assert r.status_code == 401, r.text
    body = r.json()
    assert body["error"] == "unauthorized" and detail_part in body["detail"]
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert ('error="invalid_token"' in challenge) is invalid


def test_401_for_missing_malformed_unknown_and_revoked_tokens(running: Running) -> None:
    url = running.base + "/api/messages"
    c = running.client
    _assert_401(c.get(url), "needs an API token", invalid=False)
    basic = {"Authorization": "Basic dXNlcjpwdw=="}
    _assert_401(c.get(url, headers=basic), "'Bearer <token>'", invalid=False)
    _assert_401(c.get(url, headers={"Authorization": "Bearer hello"}), "malformed token", invalid=True)
    unknown = "ihh_" + "A" * 43
    _assert_401(c.get(url, headers={"Authorization": f"Bearer {unknown}"}), "unknown token", invalid=True)
    token = create_token(running.hub.store, role="admin", name="leaver")
    revoke_token(running.hub.store, next(t.id for t in list_tokens(running.hub.store) if t.name == "leaver"))
    _assert_401(c.get(url, headers={"Authorization": f"Bearer {token}"}), "(leaver) has been revoked",
                invalid=True)


def test_403_names_the_roles_allowed(running: Running) -> None:
    r = running.post("/api/channels/lab/stop", role="readonly")
    assert r.status_code == 403
    body = r.json()
    assert body["error"] == "forbidden"
    assert body["detail"].startswith("this needs role admin or operator;")
    assert "has role readonly" in body["detail"]
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    assert running.post("/api/messages/resend", role="auditor", json={"all": True}).status_code == 403
    assert running.hub.channel_status("lab") == "started"


def test_every_role_reads_messages_and_channels(running: Running) -> None:
    for role in ROLES:
        assert running.get("/api/messages", role=role).status_code == 200, role
        assert running.get("/api/channels", role=role).status_code == 200, role
    used = wait_for(lambda: all(t.last_used_at for t in list_tokens(running.hub.store)), 5, "last_used_at")
    assert used
