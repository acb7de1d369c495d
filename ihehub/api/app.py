"""The hub's one HTTP application: health, metrics, admin API, and the HTTP-source channels.

``create_app(hub)`` builds a FastAPI app bound to one `Hub` (kept in ``app.state``, no module
globals).  Paths the API does not define go to ``hub.routes`` (the `RouteTable` that ``http://``
sources on the main port register in), so one listener serves both.  OpenAPI is at
``/openapi.json`` and its browser at ``/docs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from ihehub import __version__
from ihehub.api import (
    routes_audit,
    routes_channels,
    routes_dicomweb,
    routes_empi,
    routes_empi_events,
    routes_fhir_audit,
    routes_fhir_patient,
    routes_health,
    routes_messages,
    routes_resend,
    routes_xds,
)
from ihehub.api.auth import Authenticator
from ihehub.api.errors import error_response, install_error_handlers
from ihehub.api.routes_health import DATABASE_CHECK, HealthCheck

if TYPE_CHECKING:
    from ihehub.hub import Hub

DESCRIPTION = """\
Admin API of an ihehub node: channels, the message browser, resend, health and metrics.

Send an API token as `Authorization: Bearer ihh_...` (create one with `ihehub token create`).
Roles: **admin** ⊇ **operator** (start/stop channels, resend) ⊇ **readonly** (read channels and
messages); **auditor** reads messages.  Every error is `{"error": code, "detail": text}`.
Times are ISO 8601 UTC; `since`/`until` also take epoch seconds.
"""


class ChannelFallback:
    """ASGI app for paths the API does not know: an HTTP-source channel's path, or a JSON 404."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})
            return
        if scope["type"] != "http":
            return
        routes = self.hub.routes
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if routes is not None and (
            routes.get(path) is not None or (root and path.startswith(root) and routes.get(path[len(root):]))
        ):
            await routes.asgi_app(scope, receive, send)
            return
        response = error_response(404, "not_found", f"no API endpoint or channel at {path}")
        await response(scope, receive, send)


def create_app(hub: Hub, *, health_checks: Sequence[HealthCheck] = ()) -> FastAPI:
    """The FastAPI application of ``hub``; ``health_checks`` add entries to ``/healthz`` ``checks``."""
    app = FastAPI(
        title="ihehub",
        version=__version__,
        description=DESCRIPTION,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.hub = hub
    app.state.auth = Authenticator(hub.store, required=hub.cfg.auth.required)
    app.state.health_checks = (DATABASE_CHECK, *health_checks)
    install_error_handlers(app)
    app.include_router(routes_health.router())
    app.include_router(routes_channels.router())
    app.include_router(routes_resend.router())  # before /api/messages/{id}: "resend" is not an id
    app.include_router(routes_messages.router())
    app.include_router(routes_audit.router())
    app.include_router(routes_fhir_audit.router())
    routes_dicomweb.install(app)  # /dicomweb (QIDO/WADO/STOW-RS) and /wado (WADO-URI)
    app.include_router(routes_xds.router())
    app.include_router(routes_xds.admin_router())
    app.include_router(routes_fhir_patient.router())
    app.include_router(routes_empi_events.router())  # /api/empi/events: patient-event deliveries, resend
    app.include_router(routes_empi.router())
    app.router.default = ChannelFallback(hub)
    _document_400_not_422(app)
    return app


def _document_400_not_422(app: FastAPI) -> None:
    """Invalid input is answered 400 (`install_error_handlers`); drop FastAPI's generated 422 entries."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            for operations in spec.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]
