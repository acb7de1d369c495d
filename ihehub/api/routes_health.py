"""``GET /healthz`` (liveness and readiness for load balancers) and ``GET /metrics`` (Prometheus).

Neither needs a token: a load balancer and a Prometheus server have none.  ``/metrics`` is the
Prometheus text exposition format 0.0.4.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from ihehub import __version__
from ihehub.api.errors import short
from ihehub.api.models import Health
from ihehub.bus.tables import messages

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HealthCheck:
    """One entry of ``checks`` in ``/healthz``.

    ``run(hub)`` returns ``"ok"`` or the reason it is not; it runs in a worker thread and may
    block up to ``timeout`` seconds.  A failing check makes the status ``degraded``; a failing
    ``critical`` check also makes the answer 503.
    """

    name: str
    run: Callable[[Any], str]
    critical: bool = False
    timeout: float = 5.0


def _database(hub: Any) -> str:
    with hub.store.engine.connect() as conn:
        conn.execute(select(messages.c.id).limit(1)).first()
    return "ok"


DATABASE_CHECK = HealthCheck(name="database", run=_database, critical=True)
# the Consistent Time client's verdict (ITI-1), checked when ``time.servers`` are configured
TIME_CHECK = HealthCheck(name="time", run=lambda hub: str(hub.time_client.health()))
# the audit sender's queue, checked when ``atna.repositories`` are configured: dead audits, or one queued
# longer than ``atna.outbox_alert_after`` seconds
AUDIT_OUTBOX_CHECK = HealthCheck(name="audit_outbox", run=lambda hub: str(hub.audit_forwarder.health(
    hub.cfg.atna.outbox_alert_after or float("inf"))))


def _dicom_linker(hub: Any) -> Any:
    manager = getattr(hub, "dicom", None)
    return getattr(manager, "patients", None) if manager is not None else None


def _dicom_patients(hub: Any) -> str:
    """The DICOM index's link to the EMPI: degraded while patients are in ``error`` (the EMPI could not be
    read for them; the linker retries) — ``unknown`` (no feed yet) and ``no-domain`` are normal."""
    errors = _dicom_linker(hub).state_counts().get("error", 0)
    return "ok" if not errors else (f"{errors} DICOM patient(s) could not be linked to the EMPI; retried every "
                                    f"{hub.cfg.actors.dicom.empi.get('retry_seconds', 60):g} s")


DICOM_PATIENTS_CHECK = HealthCheck(name="dicom_patients", run=_dicom_patients)


def _audit_outbox(hub: Any) -> dict[str, Any]:
    fwd = hub.audit_forwarder
    return {name: {**s.to_dict(), "connected": fwd.connected(name), "last_error": fwd.stats[name]["last_error"]}
            for name, s in fwd.summary().items() if name in fwd.stats}


async def _run(check: HealthCheck, hub: Any) -> str:
    try:
        return await asyncio.wait_for(asyncio.to_thread(check.run, hub), timeout=check.timeout)
    except TimeoutError:
        return f"no answer within {check.timeout:g} s"
    except Exception as exc:
        return short(exc)


async def healthz(request: Request) -> JSONResponse:
    """Node health: 200 when the message store can be read, 503 when it cannot."""
    hub = request.app.state.hub
    checks_to_run: tuple[HealthCheck, ...] = request.app.state.health_checks
    clock = getattr(hub, "time_client", None)
    if clock is not None:
        checks_to_run = (*checks_to_run, TIME_CHECK)
    forwarder = getattr(hub, "audit_forwarder", None)
    if forwarder is not None:
        checks_to_run = (*checks_to_run, AUDIT_OUTBOX_CHECK)
    linker = _dicom_linker(hub)
    if linker is not None:
        checks_to_run = (*checks_to_run, DICOM_PATIENTS_CHECK)
    results = await asyncio.gather(*(_run(c, hub) for c in checks_to_run))
    outbox: dict[str, Any] = {}
    if forwarder is not None:
        with contextlib.suppress(Exception):  # the database is down: the database check says so
            outbox = await asyncio.to_thread(_audit_outbox, hub)
    linked: dict[str, int] = {}
    if linker is not None:
        with contextlib.suppress(Exception):
            linked = await asyncio.to_thread(linker.state_counts)
    checks = {c.name: r for c, r in zip(checks_to_run, results, strict=True)}
    channels = {name: hub.channel_status(name) for name in hub.channel_configs}
    failed_critical = any(c.critical and checks[c.name] != "ok" for c in checks_to_run)
    degraded = any(v != "ok" for v in checks.values()) or "error" in channels.values()
    body = Health(
        status="degraded" if degraded else "ok",
        node=hub.cfg.node_id,
        worker_id=hub.worker_id,
        version=__version__,
        uptime_s=round(time.time() - hub.started_at, 3),
        database=checks.get("database", "ok"),
        checks=checks,
        channels=channels,
        errors=dict(hub.errors),
        time=clock.status() if clock is not None else {"status": "not configured"},
        audit_outbox=outbox,
        dicom_patients=linked,
    )
    return JSONResponse(body.model_dump(), status_code=503 if failed_critical else 200)


async def metrics(request: Request) -> Response:
    """Prometheus text format; queue depths are read from the store at scrape time."""
    hub = request.app.state.hub
    text: bytes = await asyncio.to_thread(hub.metrics.render)
    return Response(content=text, headers={"content-type": PROMETHEUS_TEXT})


def router() -> APIRouter:
    r = APIRouter(tags=["health"])
    r.add_api_route("/healthz", healthz, methods=["GET"], response_model=Health,
                    responses={503: {"model": Health, "description": "the message store cannot be read"}},
                    summary="Node health")
    r.add_api_route("/metrics", metrics, methods=["GET"], response_class=Response,
                    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
                    summary="Prometheus metrics")
    return r
