"""Bearer-token authentication (RFC 6750) with roles.

A token is ``ihh_`` + 32 random bytes in URL-safe base64 (RFC 4648 §5).  Only its SHA-256 is
stored (``api_tokens.token_hash``), so a copy of the database does not give API access; the
token itself is shown once, by the command that creates it.

Roles: ``admin`` ⊇ ``operator`` ⊇ ``readonly`` for the channel and message endpoints; ``auditor``
is a separate role that may read messages (and the audit endpoints).  An endpoint names the least
role it needs with `require`; a token of any role that includes it passes.

Errors follow RFC 6750 §3: no or malformed credentials → 401 with ``WWW-Authenticate: Bearer``;
an unknown or revoked token → 401 with ``error="invalid_token"``; a valid token without the
role → 403 with ``error="insufficient_scope"``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Connection, Engine, insert, select, update

from ihehub.api.errors import ApiError
from ihehub.bus.store import MessageStore
from ihehub.bus.tables import api_tokens
from ihehub.channels.registry import did_you_mean

log = logging.getLogger("ihehub.api.auth")

TOKEN_PREFIX = "ihh_"
ROLES: tuple[str, ...] = ("admin", "operator", "auditor", "readonly")
# role of the token -> roles it acts as
GRANTS: Mapping[str, frozenset[str]] = MappingProxyType({
    "admin": frozenset({"admin", "operator", "readonly"}),
    "operator": frozenset({"operator", "readonly"}),
    "auditor": frozenset({"auditor"}),
    "readonly": frozenset({"readonly"}),
})
CACHE_SECONDS = 5.0
TOUCH_SECONDS = 60.0
_CACHE_MAX = 10_000
_REALM = 'realm="ihehub"'

Target = MessageStore | Engine


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TokenInfo:
    """One row of ``api_tokens`` without its hash.  Times are epoch seconds."""

    id: str
    name: str
    role: str
    created_at: float
    last_used_at: float | None = None
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Principal:
    """Who made a request: the token's name and role (``anonymous``/admin when auth is off)."""

    name: str
    role: str
    token_id: str | None = None


# --------------------------------------------------------------------------- token store


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def well_formed(token: str) -> bool:
    """``ihh_`` followed by the URL-safe base64 of 32 bytes (43 characters, no padding)."""
    body = token[len(TOKEN_PREFIX):]
    if not token.startswith(TOKEN_PREFIX) or len(body) != 43:
        return False
    try:
        return len(base64.urlsafe_b64decode(body + "=")) == 32
    except (binascii.Error, ValueError):
        return False


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}{did_you_mean(role, ROLES)}; roles: {', '.join(ROLES)}")
    return role


def _write(target: Target, op: Callable[[Connection], Any]) -> Any:
    """Writes go through the store's single writer thread when there is one (SQLite: one writer)."""
    if isinstance(target, MessageStore):
        return target.writer.run(op)
    with target.begin() as conn:
        return op(conn)


def _engine(target: Target) -> Engine:
    return target.engine if isinstance(target, MessageStore) else target


def _info(row: Any) -> TokenInfo:
    return TokenInfo(id=row.id, name=row.name, role=row.role, created_at=row.created_at,
                     last_used_at=row.last_used_at, revoked_at=row.revoked_at)


def create_token(target: Target, *, role: str, name: str) -> str:
    """Create a token for ``name`` with ``role``; returns the token, which is not stored anywhere.

    ``target`` is the running hub's `MessageStore` or an `Engine` (the CLI).  Raises `ValueError`
    for an unknown role or an empty or over-long name.
    """
    check_role(role)
    name = name.strip()
    if not name or len(name) > 128:
        raise ValueError("a token needs a name of 1 to 128 characters (who or what uses it)")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = {"id": secrets.token_hex(8), "name": name, "role": role, "token_hash": hash_token(token),
           "created_at": time.time(), "last_used_at": None, "revoked_at": None}

    def op(conn: Connection) -> None:
        conn.execute(insert(api_tokens), [row])

    _write(target, op)
    return token


def list_tokens(target: Target, *, include_revoked: bool = True) -> list[TokenInfo]:
    """Every token, oldest first (never the hash)."""
    t = api_tokens.c
    stmt = select(t.id, t.name, t.role, t.created_at, t.last_used_at, t.revoked_at)
    stmt = stmt.order_by(t.created_at, t.id)
    if not include_revoked:
        stmt = stmt.where(t.revoked_at.is_(None))
    with _engine(target).connect() as conn:
        return [_info(r) for r in conn.execute(stmt)]


def revoke_token(target: Target, token_id: str) -> bool:
    """Revoke the token with ``token_id``; False when there is no such token or it was revoked already.

    A running hub stops accepting it within `CACHE_SECONDS`.
    """

    def op(conn: Connection) -> int:
        res = conn.execute(
            update(api_tokens)
            .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=time.time())
        )
        return int(res.rowcount or 0)

    return bool(_write(target, op))


def find_token(target: Target, token: str) -> TokenInfo | None:
    """The token's row (revoked or not), or None when the token is unknown."""
    t = api_tokens.c
    with _engine(target).connect() as conn:
        row = conn.execute(
            select(t.id, t.name, t.role, t.created_at, t.last_used_at, t.revoked_at)
            .where(t.token_hash == hash_token(token))
        ).first()
    return _info(row) if row is not None else None


# --------------------------------------------------------------------------- request checks


def _unauthorized(detail: str, *, invalid: bool) -> ApiError:
    challenge = f'Bearer {_REALM}, error="invalid_token"' if invalid else f"Bearer {_REALM}"
    return ApiError(401, "unauthorized", detail, headers={"WWW-Authenticate": challenge})


class Authenticator:
    """Checks bearer tokens for one app; keeps verified tokens for a few seconds (no global state).

    ``last_used_at`` is written at most once per `TOUCH_SECONDS` per token, in the background.
    """

    def __init__(
        self,
        store: MessageStore,
        *,
        required: bool = True,
        cache_seconds: float = CACHE_SECONDS,
        touch_seconds: float = TOUCH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.required = required
        self.cache_seconds = cache_seconds
        self.touch_seconds = touch_seconds
        self._clock = clock
        self._cache: dict[str, tuple[TokenInfo, float]] = {}
        self._touched: dict[str, float] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value; raises 401 `ApiError` when there is none."""
        if not self.required:
            return Principal(name="anonymous", role="admin")
        if not authorization or not authorization.strip():
            raise _unauthorized("this endpoint needs an API token: send 'Authorization: Bearer ihh_...'",
                                invalid=False)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized(
                f"the Authorization header must be 'Bearer <token>', not a {scheme!r} credential",
                invalid=False,
            )
        if not well_formed(token):
            raise _unauthorized("malformed token: an ihehub token looks like 'ihh_' + 43 URL-safe characters",
                                invalid=True)
        key = hash_token(token)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            info = cached[0]
        else:
            found = await asyncio.to_thread(find_token, self.store, token)
            if found is None:
                self._cache.pop(key, None)
                raise _unauthorized("unknown token", invalid=True)
            if found.revoked:
                self._cache.pop(key, None)
                raise _unauthorized(f"token {found.id} ({found.name}) has been revoked", invalid=True)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            info = found
            self._cache[key] = (info, now + self.cache_seconds)
        self._touch(info, now)
        return Principal(name=info.name, role=info.role, token_id=info.id)

    def authorize(self, principal: Principal, roles: tuple[str, ...]) -> None:
        """403 unless the principal's role includes one of ``roles``."""
        if not self.required or GRANTS.get(principal.role, frozenset()).intersection(roles):
            return
        allowed = [r for r in ROLES if GRANTS[r].intersection(roles)]
        raise ApiError(
            403, "forbidden",
            f"this needs role {' or '.join(allowed)}; token {principal.token_id} ({principal.name}) "
            f"has role {principal.role}",
            headers={"WWW-Authenticate": f'Bearer {_REALM}, error="insufficient_scope"'},
        )

    def forget(self) -> None:
        """Drop cached verifications (e.g. right after revoking a token in this process)."""
        self._cache.clear()

    def _touch(self, info: TokenInfo, now: float) -> None:
        last = self._touched.get(info.id)
        if last is not None and now - last < self.touch_seconds:
            return
        self._touched[info.id] = now
        when = time.time()

        def op(conn: Connection) -> None:
            conn.execute(update(api_tokens).where(api_tokens.c.id == info.id).values(last_used_at=when))

        self.store.writer.submit(op).add_done_callback(_log_failure)


def _log_failure(fut: Any) -> None:
    exc = fut.exception()
    if exc is not None:
        log.warning("could not record token use: %s", exc)


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API token from `ihehub token create --role ROLE NAME` (starts with ihh_).",
)


def require(*roles: str) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency that admits tokens whose role includes one of ``roles``.

    ``require("operator")`` admits operator and admin; ``require("readonly", "auditor")`` admits
    every role.  The principal is returned and kept in ``request.state.principal``.
    """
    for role in roles:
        check_role(role)
    wanted = tuple(roles)

    async def dependency(
        request: Request, _credentials: HTTPAuthorizationCredentials | None = Security(_bearer)
    ) -> Principal:
        auth: Authenticator = request.app.state.auth
        header = request.headers.get("authorization")
        try:
            principal = await auth.authenticate(header)
        except ApiError as exc:
            if header and header.strip():  # a credential was presented and refused (none: nothing to audit)
                audit_refusal(request, "LOGIN", _credential_id(header), exc)
            raise
        try:
            auth.authorize(principal, wanted)
        except ApiError as exc:
            audit_refusal(request, "SECURITY-ALERT", f"token {principal.token_id} ({principal.name})", exc)
            raise
        request.state.principal = principal
        return principal

    return dependency


def _credential_id(header: str) -> str:
    """Who presented ``header``, without the secret: ``token sha256:<first 16 hex>`` (matches the
    ``api_tokens`` row of a known or revoked token) or ``malformed credential``."""
    _scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return f"token sha256:{hash_token(token)[:16]}" if well_formed(token) else "malformed credential"


def audit_refusal(request: Request, key: str, who: str, exc: ApiError) -> None:
    """Audit a refused API request through the hub's audit context (never raises, never blocks):
    ``LOGIN`` — DICOM PS3.15 A.5.3.11 User Authentication (EventID 110114, EventTypeCode 110122 Login)
    with EventOutcomeIndicator 4 for a bearer token that is malformed, unknown or revoked (401);
    ``SECURITY-ALERT`` — A.5.3.12 Security Alert (110113, 110132 Use of Restricted Function) for a valid
    token without the role (403)."""
    audit = getattr(getattr(request.app.state, "hub", None), "audit", None)
    if audit is None:
        return
    from ihehub.atna import Endpoint

    peer = request.client.host if request.client else None
    detail = f"{request.method} {request.url.path}: {exc.detail}"
    if key == "LOGIN":
        audit.emit("LOGIN", outcome=4, user=Endpoint(user_id=who, host=peer), outcome_description=detail)
    else:
        audit.emit("SECURITY-ALERT", outcome=4, alert="use-of-restricted-function",
                   user=Endpoint(user_id=who, host=peer), subject=peer or who, detail=detail)
