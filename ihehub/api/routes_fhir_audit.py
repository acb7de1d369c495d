"""``GET /fhir/AuditEvent``: IHE ITI-81 Retrieve ATNA Audit Event (ITI TF-2c 3.81) over the Audit Record
Repository — a FHIR R4 searchset Bundle of AuditEvent resources converted from the stored DICOM audit
messages (`ihehub.atna.fhir`).

Roles: auditor and admin.  A search the server cannot run (no ``date``, an unknown parameter, a bad
value) is 400 with an OperationOutcome (FHIR R4 3.1.1.4).  Every search is itself audited (DCM 110101
"Audit Log Used", ITI TF-2c 3.81.5).  Paging is keyset: the ``next`` link carries ``_cursor``.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ihehub.api.auth import Principal, require
from ihehub.api.routes_audit import AUDIT_ROLES


def _fhir(body: dict[str, Any], status: int = 200) -> JSONResponse:
    from ihehub.atna.fhir import FHIR_JSON

    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def _used(hub: Any, principal: Principal, request: Request) -> None:
    """DCM 110101 Audit Log Used (ITI TF-2c 3.81.5): who searched, from where, with which URL."""
    from ihehub.atna import Endpoint

    if hub.audit is not None:
        peer = request.client.host if request.client else None
        hub.audit.emit("AUDIT-LOG-USED", user=Endpoint(user_id=principal.name, host=peer), audit_log=str(request.url))


def router() -> APIRouter:
    r = APIRouter(prefix="/fhir", tags=["audit"])

    @r.get("/AuditEvent", summary="ITI-81: search audit events (FHIR R4 AuditEvent; `date` required)")
    async def search(request: Request,
                     principal: Annotated[Principal, Depends(require(*AUDIT_ROLES))]) -> JSONResponse:
        from ihehub.atna.fhir import (
            CURSOR,
            FhirSearchError,
            next_cursor,
            operation_outcome,
            parse_search,
            record_to_audit_event,
            searchset,
        )

        hub = request.app.state.hub
        if getattr(hub, "audit_store", None) is None:
            return _fhir(operation_outcome("the Audit Record Repository is not running on this node "
                                           "(atna.enabled is false in ihehub.yaml)", code="not-supported"), 404)
        try:
            fs = parse_search(request.query_params.multi_items())
        except FhirSearchError as exc:
            return _fhir(operation_outcome(str(exc)), 400)
        page = await asyncio.to_thread(hub.audit_store.search, fs.query, with_raw=True)
        _used(hub, principal, request)
        events: list[dict[str, Any]] = []
        notes: list[str] = []
        for rec in page.records:
            if not fs.accepts(rec):
                continue
            res = record_to_audit_event(rec)
            if res is None:
                notes.append(f"audit record {rec.seq} holds no readable audit message (GET /api/audit/{rec.seq})")
                continue
            events.append(res)
        base = f"{request.url.scheme}://{request.url.netloc}/fhir"
        path = f"{base}/AuditEvent"
        next_url = None
        if (cursor := next_cursor(page)) is not None:
            next_url = f"{path}?{urlencode([*fs.params, (CURSOR, cursor)])}"
        query = request.url.query
        return _fhir(searchset(events, base=base, self_url=f"{path}?{query}" if query else path,
                               next_url=next_url, notes=notes))

    return r
