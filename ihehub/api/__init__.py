"""ihehub.api — the HTTP application: admin API, message browser, health, metrics, bearer tokens."""

from ihehub.api.app import create_app
from ihehub.api.auth import (
    ROLES,
    TOKEN_PREFIX,
    Authenticator,
    Principal,
    TokenInfo,
    create_token,
    list_tokens,
    require,
    revoke_token,
)
from ihehub.api.errors import ApiError
from ihehub.api.routes_health import HealthCheck

__all__ = [
    "ROLES",
    "TOKEN_PREFIX",
    "ApiError",
    "Authenticator",
    "HealthCheck",
    "Principal",
    "TokenInfo",
    "create_app",
    "create_token",
    "list_tokens",
    "require",
    "revoke_token",
]
