"""``/api/empi``: the master patient index for people — search and view patients with their records, links,
merges, history and events; the review queue (accept / reject); link, unlink, merge and unmerge by hand.

Reads need the readonly role, changes the operator role; every change names its author (the token's
name) and is one EMPI transaction that publishes its patient events like a feed does.  Identifiers are
``domain|value`` where a path or query takes one (the domain by namespace or OID).  EMPI errors become
``{"error", "detail", "field"}``: 404 for an unknown patient, record or review item, 409 for a change the
index refuses in its current state (already merged, decided), 400 for anything else the caller must fix.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from ihehub.api.auth import Principal, require
from ihehub.api.errors import ApiError

READ = ("readonly", "auditor")
OPERATE = ("operator",)


def _empi(request: Request) -> Any:
    empi = request.app.state.hub.services.get("empi")
    if empi is None:
        raise ApiError(404, "no_empi", "this node runs no EMPI: configure a channel with actor pix-manager or "
                                       "pdq-supplier")
    return empi


def _identifier(raw: str, field: str) -> Any:
    from ihehub.empi import Identifier

    domain, bar, value = raw.partition("|")
    if not bar or not domain.strip() or not value.strip():
        raise ApiError(400, "bad_identifier", f"{field} must be 'domain|value' (domain by namespace or OID), "
                                              f"not {raw!r}")
    return Identifier(value=value.strip(), domain=domain.strip())


async def _call(fn: Any, *args: Any, **kw: Any) -> JSONResponse:
    """Run an EMPI call off the event loop; its result as JSON, its `EmpiError` as a JSON 4xx."""
    from ihehub.empi import EmpiError
    from ihehub.empi.errors import Conflict, NotFound, UnknownDomain, UnknownPatient

    try:
        result = await asyncio.to_thread(fn, *args, **kw)
    except (UnknownPatient, NotFound, UnknownDomain) as exc:
        return JSONResponse({"error": "not_found", "detail": exc.message, "field": exc.field}, status_code=404)
    except Conflict as exc:
        return JSONResponse({"error": "conflict", "detail": exc.message, "field": exc.field}, status_code=409)
    except EmpiError as exc:
        return JSONResponse({"error": "invalid", "detail": exc.message, "field": exc.field}, status_code=400)
    return JSONResponse(jsonable_encoder(result))


def router() -> APIRouter:
    r = APIRouter(prefix="/api/empi", tags=["empi"])

    @r.get("/domains", summary="Identifier domains (assigning authorities) of the index")
    async def domains(request: Request, _: Annotated[Principal, Depends(require(*READ))]) -> JSONResponse:
        return await _call(_empi(request).domains)

    @r.get("/patients", summary="Search patients (every given field must match; * is a wildcard)")
    async def search(request: Request, _: Annotated[Principal, Depends(require(*READ))],
                     family: str | None = None, given: str | None = None,
                     birth_date: str | None = Query(None, description="YYYY, YYYYMM or YYYYMMDD"),
                     sex: str | None = None,
                     identifier: str | None = Query(None, description="domain|value"),
                     national_id: str | None = None, phone: str | None = None,
                     limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0)) -> JSONResponse:
        from ihehub.empi import PatientQuery

        query = PatientQuery(family=family, given=given, birth_date=birth_date, sex=sex, national_id=national_id,
                             phone=phone,
                             identifier=_identifier(identifier, "identifier") if identifier else None)
        if query == PatientQuery():
            raise ApiError(400, "empty_query", "give at least one of family, given, birth_date, sex, identifier, "
                                               "national_id, phone")
        return await _call(_empi(request).find, query, limit=limit, offset=offset)

    @r.get("/patients/{identifier}", summary="A patient (enterprise id, or domain|value of any of its records) "
                                             "with records, links, merges and events")
    async def patient(identifier: str, request: Request,
                      _: Annotated[Principal, Depends(require(*READ))]) -> JSONResponse:
        empi = _empi(request)
        if "|" not in identifier:
            identifier = f"{empi.config.enterprise_namespace}|{identifier}"
        return await _call(empi.patient, _identifier(identifier, "identifier"))

    @r.get("/records/{identifier}", summary="One source record (domain|value) as it stands")
    async def record(identifier: str, request: Request,
                     _: Annotated[Principal, Depends(require(*READ))]) -> JSONResponse:
        return await _call(_empi(request).record, _identifier(identifier, "identifier"))

    @r.get("/records/{identifier}/history", summary="Every version of a record's demographics, oldest first")
    async def history(identifier: str, request: Request,
                      _: Annotated[Principal, Depends(require(*READ))]) -> JSONResponse:
        return await _call(_empi(request).history, _identifier(identifier, "identifier"))

    @r.get("/records/{identifier}/candidates", summary="Who this record could be: scored candidates with the "
                                                       "per-field explanation")
    async def candidates(identifier: str, request: Request,
                         _: Annotated[Principal, Depends(require(*READ))]) -> JSONResponse:
        return await _call(_empi(request).candidates, _identifier(identifier, "identifier"))

    @r.get("/review", summary="The review queue (possible matches between the two thresholds)")
    async def review(request: Request, _: Annotated[Principal, Depends(require(*READ))],
                     state: str = Query("open", pattern="^(open|accepted|rejected|obsolete)$"),
                     limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)) -> JSONResponse:
        return await _call(_empi(request).review_queue, state=state, limit=limit, offset=offset)

    @r.post("/review/{review_id}/accept", summary="Accept a possible match: the record joins the candidate")
    async def accept(review_id: int, request: Request,
                     who: Annotated[Principal, Depends(require(*OPERATE))]) -> JSONResponse:
        return await _call(_empi(request).accept, review_id, by=who.name)

    @r.post("/review/{review_id}/reject", summary="Reject a possible match: the two stay apart")
    async def reject(review_id: int, request: Request,
                     who: Annotated[Principal, Depends(require(*OPERATE))]) -> JSONResponse:
        return await _call(_empi(request).reject, review_id, by=who.name)

    @r.post("/link", summary="Move a record (domain|value) to the patient of another record or enterprise id")
    async def link(request: Request, who: Annotated[Principal, Depends(require(*OPERATE))],
                   body: Annotated[dict[str, str], Body(examples=[{"record": "HOSPA|A100", "target": "HOSPB|B7",
                                                                   "reason": "same person, checked ID card"}])]
                   ) -> JSONResponse:
        empi = _empi(request)
        return await _call(empi.link, _identifier(_field(body, "record"), "record"),
                           _identifier(_field(body, "target"), "target"), by=who.name, reason=body.get("reason", ""))

    @r.post("/unlink", summary="Take a record out of its patient into a new one (the matcher keeps them apart)")
    async def unlink(request: Request, who: Annotated[Principal, Depends(require(*OPERATE))],
                     body: Annotated[dict[str, str], Body(examples=[{"record": "HOSPA|A100", "reason": "twins"}])]
                     ) -> JSONResponse:
        return await _call(_empi(request).unlink, _identifier(_field(body, "record"), "record"), by=who.name,
                           reason=body.get("reason", ""))

    @r.post("/merge", summary="Merge: records of one domain (A40 semantics) or two enterprise patients")
    async def merge(request: Request, who: Annotated[Principal, Depends(require(*OPERATE))],
                    body: Annotated[dict[str, str], Body(examples=[{"surviving": "HOSPA|A100",
                                                                    "subsumed": "HOSPA|A999"}])]) -> JSONResponse:
        return await _call(_empi(request).merge, _identifier(_field(body, "surviving"), "surviving"),
                           _identifier(_field(body, "subsumed"), "subsumed"), by=who.name, event="manual")

    @r.post("/merges/{merge_id}/unmerge", summary="Undo a merge from its snapshot")
    async def unmerge(merge_id: int, request: Request,
                      who: Annotated[Principal, Depends(require(*OPERATE))]) -> JSONResponse:
        return await _call(_empi(request).unmerge, merge_id, by=who.name)

    return r


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, "missing_field", f"the request body needs {name!r} as 'domain|value'")
    return value
