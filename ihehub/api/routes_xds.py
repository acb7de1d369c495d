"""XDS.b SOAP endpoints: ``POST /xds/registry`` (ITI-42, ITI-18), ``POST /xds/repository`` (ITI-41, ITI-43) and,
when the XDS-I.b Imaging Document Source runs (``actors.xds.imaging``), ``POST /xds/imaging`` (RAD-69).

SOAP 1.2 (1.1 accepted) with WS-Addressing; requests may be MTOM/XOP (``multipart/related``) and are read
as a stream (large attachments go to disk, `ihehub.soap.transport`); ITI-43 answers with an MTOM message
whose parts are streamed from the document store.  ``GET /xds/<endpoint>?wsdl`` serves the endpoint's
WSDL (IHE ITI TF-2x Appendix V) with this server's address.  Every transaction is audited (ITI TF-2a
3.18.5.1, TF-2b 3.41.7.1 / 3.42.7.1 / 3.43.6.1) when the hub runs an audit context.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from lxml import etree

from ihehub.api.auth import Principal, require
from ihehub.api.errors import error_response
from ihehub.soap import SOAP11_NS, SOAP12_NS, Limits, SoapFault, SoapRequest, read_request, reply_action
from ihehub.soap.envelope import CONTENT_TYPES, WSA_ANONYMOUS, build_envelope, fault_envelope
from ihehub.soap.mtom import mtom_stream

log = logging.getLogger("ihehub.api.xds")

ENDPOINT_NAMES = ("registry", "repository", "imaging")


def _fault(fault: SoapFault, soap_ns: str, relates_to: str | None = None) -> Response:
    body = fault_envelope(fault, soap_ns=soap_ns, relates_to=relates_to)
    return Response(body, status_code=fault.http_status if soap_ns == SOAP12_NS else 500,
                    media_type=CONTENT_TYPES[soap_ns] + "; charset=utf-8")


def _audit(hub: Any, request: Request, req: SoapRequest, reply: Any, repository_id: str | None,
           home: str | None) -> None:
    audit = hub.services.get("audit")
    if audit is None:
        return
    from ihehub.atna import Endpoint
    from ihehub.atna.context import DocumentRef

    peer = Endpoint(user_id=req.envelope.addressing.reply_to or WSA_ANONYMOUS,
                    host=request.client.host if request.client else None)
    me = audit.me(str(request.url.replace(query="")))
    kw: dict[str, Any] = {"outcome": reply.outcome, "patients": reply.patients}
    if reply.transaction in ("ITI-43", "RAD-69"):  # the repository / imaging source sends the data: the Source
        kw.update(source=me, destination=peer,
                  documents=[DocumentRef(unique_id=u, repository_id=repository_id, home_community_id=home)
                             for u in reply.documents])
        if reply.transaction == "RAD-69":
            kw["studies"] = reply.studies
    else:
        kw.update(source=peer, destination=me)
        if reply.transaction == "ITI-18":
            kw.update(query=etree.tostring(req.payload), query_id=reply.query_id)
        else:
            kw.update(submission_set=reply.submission_set)
    audit.emit(reply.transaction, **kw)


async def _soap(request: Request, endpoint: str) -> Response:
    hub = request.app.state.hub
    svc = hub.services.get("xds")
    if svc is None:
        return error_response(404, "not_found", "XDS is not enabled on this node (actors.xds.enabled)")
    handler = svc
    if endpoint == "imaging":
        handler = hub.services.get("xds_imaging")
        if handler is None:
            return error_response(404, "not_found", "the XDS-I.b Imaging Document Source is not enabled on this "
                                                    "node (actors.xds.imaging)")
    content_type = request.headers.get("content-type", "")
    soap_ns = SOAP11_NS if content_type.lower().startswith("text/xml") else SOAP12_NS
    try:
        req = await read_request(content_type, request.stream(), soap_action=request.headers.get("soapaction"),
                                 limits=Limits(spool_dir=svc.spool_dir))
    except SoapFault as fault:
        return _fault(fault, soap_ns)
    soap_ns = req.soap_ns
    relates = req.envelope.addressing.message_id
    try:
        reply = await asyncio.to_thread(handler.handle, req) if endpoint == "imaging" else \
            await asyncio.to_thread(svc.handle, endpoint, req)
    except SoapFault as fault:
        return _fault(fault, soap_ns, relates)
    except Exception as exc:
        log.exception("xds %s: %s failed", endpoint, req.action)
        return _fault(SoapFault("Receiver", f"internal error: {type(exc).__name__}"), soap_ns, relates)
    finally:
        req.discard()
    _audit(hub, request, req, reply, svc.repository.repository_unique_id, svc.repository.home_community_id)
    action = reply_action(req.action or "")
    envelope = build_envelope(reply.payload, soap_ns=soap_ns, action=action, relates_to=relates)
    if reply.parts or req.mtom:
        ctype, chunks = mtom_stream(envelope, reply.parts, soap_content_type=CONTENT_TYPES[soap_ns], action=action)
        return StreamingResponse(chunks, media_type=ctype)
    return Response(envelope, media_type=f'{CONTENT_TYPES[soap_ns]}; charset=utf-8; action="{action}"'
                    if soap_ns == SOAP12_NS else "text/xml; charset=utf-8")


def _wsdl(request: Request, endpoint: str) -> Response:
    text = resources.files("ihehub.xds").joinpath("wsdl", f"{endpoint}.wsdl").read_text(encoding="utf-8")
    location = str(request.url.replace(query=""))
    return Response(text.replace("{{LOCATION}}", location), media_type="text/xml; charset=utf-8")


def router() -> APIRouter:
    r = APIRouter(prefix="/xds", tags=["xds"])

    @r.get("/{endpoint}", summary="The endpoint's WSDL (`?wsdl`): registry (ITI-42, ITI-18) or repository "
                                  "(ITI-41, ITI-43)")
    async def wsdl(endpoint: str, request: Request) -> Response:
        if endpoint not in ENDPOINT_NAMES or "wsdl" not in {k.lower() for k in request.query_params}:
            return error_response(404, "not_found", f"no XDS document at {request.url.path} (try ?wsdl on "
                                                    "/xds/registry, /xds/repository or /xds/imaging)")
        return _wsdl(request, endpoint)

    @r.post("/{endpoint}", summary="SOAP 1.2 endpoint: registry (ITI-42, ITI-18) or repository (ITI-41, ITI-43; "
                                   "MTOM)")
    async def soap(endpoint: str, request: Request) -> Response:
        if endpoint not in ENDPOINT_NAMES:
            return error_response(404, "not_found", f"no XDS endpoint {endpoint!r}: registry, repository or "
                                                    "imaging")
        return await _soap(request, endpoint)

    return r


def admin_router() -> APIRouter:
    """``POST /api/xds/imaging/publish``: publish a study's KOS manifest now (RAD-68), for operators."""
    r = APIRouter(prefix="/api/xds", tags=["xds"])

    @r.post("/imaging/publish", summary="XDS-I.b RAD-68: publish (or re-publish, replacing) a study's manifest")
    async def publish(request: Request, _: Annotated[Principal, Depends(require("operator"))],
                      body: Annotated[dict[str, str], Body(examples=[{"study_uid": "1.2.840.113619.2.1"}])]
                      ) -> Response:
        source = request.app.state.hub.services.get("xds_imaging")
        if source is None:
            return error_response(404, "not_found", "the XDS-I.b Imaging Document Source is not enabled on this "
                                                    "node (actors.xds.imaging)")
        study = body.get("study_uid") if isinstance(body, dict) else None
        if not isinstance(study, str) or not study.strip():
            return error_response(400, "missing_field", "the request body needs 'study_uid'")
        from ihehub.actors.xds_imaging import PublishError

        try:
            published = await asyncio.to_thread(source.publish, study.strip())
        except PublishError as exc:
            return error_response(409, "cannot_publish", str(exc))
        out = {"study_uid": study.strip(), "status": published.status, "document_unique_id":
               published.document_unique_id, "patient_id": published.patient_id, "instances": published.instances,
               "submission_set_unique_id": published.submission_set_unique_id,
               "errors": [{"code": e.code, "context": e.context} for e in published.errors]}
        return JSONResponse(out, status_code=200 if not published.errors else 422)

    return r

