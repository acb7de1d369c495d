"""``/fhir/Patient``: PIXm ITI-83 (``$ihe-pix``) and PDQm ITI-78 (search and read) over the hub's EMPI.

The EMPI is the one the PIX Manager / PDQ Supplier channels use (``hub.services["empi"]``); a node without
such a channel answers 404 with an OperationOutcome saying so.  Roles: readonly (and everything above it).
Every query is audited as the IHE profile says (ITI-83: ITI TF-2c 3.83.5; ITI-78: 3.78.5) with the query
URL as the query object and the patients returned; auditing never fails the query.  The FHIR logic is in
`ihehub.actors.fhir_patient`.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ihehub.api.auth import Principal, require

FHIR_JSON = "application/fhir+json"
READ_ROLES = ("readonly", "auditor")


def _fhir(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def _empi(request: Request) -> Any:
    from ihehub.actors.fhir_patient import FhirError

    empi = request.app.state.hub.services.get("empi")
    if empi is None:
        raise FhirError(404, "not-supported", "this node runs no EMPI: configure a channel with actor "
                                              "pix-manager or pdq-supplier")
    return empi


def _audit(request: Request, principal: Principal, key: str, patients: list[str], outcome: int) -> None:
    """The ITI-83 / ITI-78 audit: the client is the source (it asks), this node the destination."""
    hub = request.app.state.hub
    if hub.audit is None:
        return
    from ihehub.atna import Endpoint

    peer = request.client.host if request.client else None
    hub.audit.emit(key, source=Endpoint(user_id=principal.name, host=peer), destination=hub.audit.me(),
                   patients=patients, query=str(request.url), outcome=outcome)


def router() -> APIRouter:
    r = APIRouter(prefix="/fhir", tags=["fhir patient"])

    @r.get("/Patient/$ihe-pix", summary="ITI-83 PIXm: the patient's identifiers in other domains")
    async def pix(request: Request, principal: Annotated[Principal, Depends(require(*READ_ROLES))]) -> JSONResponse:
        from ihehub.actors.fhir_patient import FhirError, pix_query

        q = request.query_params
        try:
            empi = _empi(request)
            body = await asyncio.to_thread(pix_query, empi, q.get("sourceIdentifier"), q.getlist("targetSystem"))
        except FhirError as exc:
            _audit(request, principal, "ITI-83", [], 4 if exc.status < 500 else 8)
            return _fhir(exc.outcome(), exc.status)
        ids = [p["valueIdentifier"]["value"] for p in body["parameter"] if p["name"] == "targetIdentifier"]
        _audit(request, principal, "ITI-83", [q.get("sourceIdentifier", "").partition("|")[2], *ids], 0)
        return _fhir(body)

    @r.get("/Patient", summary="ITI-78 PDQm: search patients by demographics (FHIR R4 searchset Bundle)")
    async def search(request: Request,
                     principal: Annotated[Principal, Depends(require(*READ_ROLES))]) -> JSONResponse:
        from ihehub.actors.fhir_patient import FhirError, parse_search
        from ihehub.actors.fhir_patient import search as run

        strict = "handling=strict" in request.headers.get("prefer", "").replace(" ", "")
        items = request.query_params.multi_items()
        try:
            empi = _empi(request)
            params = parse_search(items, strict=strict)
            resources, total = await asyncio.to_thread(run, empi, params)
        except FhirError as exc:
            _audit(request, principal, "ITI-78", [], 4)
            return _fhir(exc.outcome(), exc.status)
        _audit(request, principal, "ITI-78", [res["id"] for res in resources], 0)
        base = f"{request.url.scheme}://{request.url.netloc}/fhir"
        kept = [(k, v) for k, v in items if k != "_offset"]
        links = [{"relation": "self", "url": str(request.url)}]
        if params.offset + len(resources) < total:
            nxt = urlencode([*kept, ("_offset", str(params.offset + params.count))])
            links.append({"relation": "next", "url": f"{base}/Patient?{nxt}"})
        if params.offset > 0:
            prev = urlencode([*kept, ("_offset", str(max(0, params.offset - params.count)))])
            links.append({"relation": "previous", "url": f"{base}/Patient?{prev}"})
        entries: list[dict[str, Any]] = [
            {"fullUrl": f"{base}/Patient/{res['id']}", "resource": res, "search": {"mode": "match"}}
            for res in resources]
        if params.ignored:
            entries.append({"resource": {"resourceType": "OperationOutcome", "issue": [
                {"severity": "warning", "code": "not-supported",
                 "diagnostics": f"search parameter {name!r} is not supported and was ignored"}
                for name in params.ignored]}, "search": {"mode": "outcome"}})
        return _fhir({"resourceType": "Bundle", "type": "searchset", "total": total, "link": links,
                      "entry": entries})

    @r.get("/Patient/{patient_id}", summary="ITI-78 PDQm: read one enterprise patient")
    async def read(patient_id: str, request: Request,
                   principal: Annotated[Principal, Depends(require(*READ_ROLES))]) -> JSONResponse:
        from ihehub.actors.fhir_patient import FhirError
        from ihehub.actors.fhir_patient import read as get

        try:
            empi = _empi(request)
            body = await asyncio.to_thread(get, empi, patient_id)
        except FhirError as exc:
            _audit(request, principal, "ITI-78", [], 4)
            return _fhir(exc.outcome(), exc.status)
        _audit(request, principal, "ITI-78", [patient_id], 0)
        return _fhir(body)

    return r
