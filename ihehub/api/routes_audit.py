"""``/api/audit``: search the Audit Record Repository, view one record, verify the hash chain.

Roles: auditor and admin.  Every search or view is itself audited (DCM 110101 "Audit Log Used",
IHE ITI TF-2a 3.81 and the ATNA profile's requirement that reading the audit log is audited).
"""

from __future__ import annotations

import asyncio
import csv
import io
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from ihehub.api.auth import Principal, require
from ihehub.api.errors import ApiError
from ihehub.api.params import parse_time

AUDIT_ROLES = ("auditor",)  # admin is admitted by every role check
OUTBOX_READ = ("auditor", "operator")
OUTBOX_OPERATE = ("operator",)
CSV_COLUMNS = ("seq", "received_at", "event_time", "event_id", "event_type", "action", "outcome", "source_id",
               "peer", "valid", "patients", "users")


def _repo(request: Request) -> Any:
    hub = request.app.state.hub
    if getattr(hub, "audit_store", None) is None:
        raise ApiError(404, "atna_disabled", "the Audit Record Repository is not running on this node "
                       "(atna.enabled is false in ihehub.yaml)")
    return hub


def _used(hub: Any, principal: Principal, request: Request, query: str) -> None:
    from ihehub.atna import Endpoint

    if hub.audit is not None:
        peer = request.client.host if request.client else None
        hub.audit.emit("AUDIT-LOG-USED", user=Endpoint(user_id=principal.name, host=peer),
                       audit_log=f"{request.url.scheme}://{request.url.netloc}/api/audit?{query}")


def router() -> APIRouter:
    r = APIRouter(prefix="/api/audit", tags=["audit"])

    @r.get("", summary="Search audit records (newest first, keyset paging with `before`; with since/until: "
                        "newest event first, paging with `before` and `before_time`)")
    async def search(
        request: Request,
        principal: Annotated[Principal, Depends(require(*AUDIT_ROLES))],
        patient: str | None = None,
        user: str | None = None,
        event_id: str | None = Query(None, description="EventID code, e.g. 110112"),
        event_type: str | None = Query(None, description="EventTypeCode, e.g. ITI-9"),
        outcome: int | None = Query(None, description="0 success, 4 minor, 8 serious, 12 major failure"),
        source: str | None = None,
        entity: str | None = Query(None, description="any participant object id (document, study, query...)"),
        valid: bool | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = Query(50, ge=1, le=1000),
        before: int | None = Query(None, description="next_before of the previous page"),
        before_time: float | None = Query(None, description="next_before_time of the previous page (a search "
                                          "with since or until)"),
        format: str = Query("json", pattern="^(json|csv)$"),
    ) -> Response:
        from ihehub.atna import AuditQuery

        hub = _repo(request)
        t0, t1 = parse_time("since", since), parse_time("until", until)
        by_time = t0 is not None or t1 is not None  # a time range: newest event first (as ITI-81)
        if by_time and before is not None and before_time is None:
            raise ApiError(400, "bad_request", "a search with since/until pages with before and before_time "
                           "(next_before and next_before_time of the previous page)")
        q = AuditQuery(patient=patient, user=user, event_id=event_id, event_type=event_type, outcome=outcome,
                       source=source, entity=entity, valid=valid, since=t0, until=t1, limit=limit, before=before,
                       before_time=before_time if by_time else None, by_time=by_time)
        page = await asyncio.to_thread(hub.audit_store.search, q)
        _used(hub, principal, request, str(request.url.query))
        items = [rec.to_dict() for rec in page.records]
        if format == "csv":
            out = io.StringIO()
            w = csv.writer(out)
            w.writerow(CSV_COLUMNS)
            for it in items:
                ids = it.get("ids", {}) or {}
                row = {**it, "patients": " ".join(ids.get("patient", [])), "users": " ".join(ids.get("user", []))}
                w.writerow([row.get(c, "") if row.get(c) is not None else "" for c in CSV_COLUMNS])
            return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": 'attachment; filename="audit.csv"'})
        return JSONResponse({"items": items, "limit": limit, "next_before": page.next_before,
                             "next_before_time": page.next_before_time})

    @r.get("/verify", summary="Verify the hash chain: finds any edited or deleted record")
    async def verify(request: Request, principal: Annotated[Principal, Depends(require(*AUDIT_ROLES))]) -> Any:
        hub = _repo(request)
        report = await asyncio.to_thread(hub.audit_store.verify)
        _used(hub, principal, request, "verify")
        return {"ok": report.ok, "checked": report.checked, "first_bad": report.first_bad, "problem": report.problem}

    @r.get("/outbox", summary="The audit sender's queue: counts per repository and rows (newest first)")
    async def outbox(
        request: Request,
        principal: Annotated[Principal, Depends(require(*OUTBOX_READ))],
        state: str | None = Query(None, pattern="^(queued|sent|dead)$", description="queued, sent (kept) or dead"),
        repository: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        before: int | None = Query(None, description="next_before of the previous page"),
    ) -> Any:
        from ihehub.atna.forward import outbox_rows, outbox_summary

        hub = request.app.state.hub
        names = [r.name for r in hub.audit_forwarder.repositories] if hub.audit_forwarder is not None else []
        summary = await asyncio.to_thread(outbox_summary, hub.engine, names)
        rows = await asyncio.to_thread(outbox_rows, hub.engine, state=state, repository=repository, limit=limit + 1,
                                       before=before)
        return {"repositories": {n: s.to_dict() for n, s in summary.items()}, "items": rows[:limit],
                "limit": limit, "next_before": rows[limit - 1]["id"] if len(rows) > limit else None}

    @r.post("/outbox/resend", summary="Queue audits again: given rows (dead or sent) or every dead one")
    async def outbox_resend(
        request: Request,
        principal: Annotated[Principal, Depends(require(*OUTBOX_OPERATE))],
        body: Annotated[dict[str, Any], Body(examples=[{"ids": [12, 13]}, {"all_dead": True, "repository": "arr"}])],
    ) -> Any:
        from ihehub.atna.forward import resend_op

        hub = request.app.state.hub
        ids, all_dead, repository = body.get("ids") or [], body.get("all_dead") is True, body.get("repository")
        unknown = set(body) - {"ids", "all_dead", "repository"}
        if unknown:
            raise ApiError(400, "bad_request", f"unknown field(s) {', '.join(sorted(unknown))}; expected ids, "
                           "all_dead, repository")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ApiError(400, "bad_request", "ids must be a list of outbox row ids (integers)")
        if repository is not None and not isinstance(repository, str):
            raise ApiError(400, "bad_request", "repository must be a string")
        if bool(ids) == all_dead:
            raise ApiError(400, "bad_request", "give either ids or all_dead: true")
        queued = await hub.writer.arun(resend_op(ids, all_dead=all_dead, repository=repository))
        if queued and hub.audit_forwarder is not None:
            hub.audit_forwarder.wake()
        return {"queued": queued}

    @r.get("/{seq}", summary="One audit record with its message as received")
    async def one(seq: int, request: Request,
                  principal: Annotated[Principal, Depends(require(*AUDIT_ROLES))]) -> Any:
        hub = _repo(request)
        rec = await asyncio.to_thread(hub.audit_store.get, seq)
        if rec is None:
            raise ApiError(404, "not_found", f"no audit record {seq}")
        _used(hub, principal, request, f"seq={seq}")
        xml = rec.xml()
        return {**rec.to_dict(), "xml": xml.decode("utf-8", "replace") if xml is not None else None}

    return r
