"""DICOMweb on the hub's HTTP app: ``/dicomweb`` (QIDO-RS, WADO-RS, STOW-RS; PS3.18 10.4-10.6) and WADO-URI
at ``/wado`` (PS3.18 9).  The HTTP binding only: content negotiation (PS3.18 8.7), multipart/related
(RFC 2387) bodies, auth and CORS; the work is `ihehub.dicom.web` and `ihehub.dicom.stow`.

* Auth: the API's bearer tokens; reads need ``readonly`` (or operator/admin), STOW-RS needs ``operator``.
* CORS (Fetch standard) for ``/dicomweb`` and ``/wado`` when ``actors.dicom.dicomweb.cors_origins`` lists
  origins; preflight requests are answered without a token.
* Errors are the API's JSON ``{"error", "detail"}``: 400 bad parameter or body, 404 unknown UID, 406 a media
  type or transfer syntax we cannot produce, 409 STOW-RS stored nothing, 413 body too large, 415 a request
  media type other than ``multipart/related; type="application/dicom"``.
* ``accept`` as a query parameter overrides the Accept header (PS3.18 8.3.3.1).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from ihehub.api.auth import Principal, require
from ihehub.api.errors import ApiError, error_response
from ihehub.dicom.render import RenderError, RenderParams
from ihehub.dicom.stow import DICOM_MEDIA_TYPE, stow
from ihehub.dicom.web import BASE_PATH, DicomWeb, Located, WebError
from ihehub.dicom.websettings import DicomWebSettings

__all__ = ["ScopedCORS", "install", "parse_accept", "parse_media_type", "parse_multipart"]

DICOM_JSON = "application/dicom+json"
PREFIXES = (BASE_PATH, "/wado")
Reader = Annotated[Principal, Depends(require("readonly"))]
Writer = Annotated[Principal, Depends(require("operator"))]
MediaRange = tuple[str, dict[str, str]]


# -- media types ---------------------------------------------------------------------------------------------


def parse_media_type(value: str) -> MediaRange:
    """``type/subtype; a=b; c="d"`` → (lower-case type, parameters with lower-case names, unquoted values)."""
    head, *rest = value.split(";")
    params: dict[str, str] = {}
    for item in rest:
        name, _, val = item.partition("=")
        if name.strip():
            params[name.strip().lower()] = val.strip().strip('"')
    return head.strip().lower(), params


def parse_accept(value: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header (RFC 9110 12.5.1), highest ``q`` first; ``*/*`` when absent."""
    if not value or not value.strip():
        return [("*/*", {})]
    ranges = [parse_media_type(part) for part in value.split(",") if part.strip()]
    return sorted(ranges, key=lambda r: -_quality(r[1]))


def _quality(params: dict[str, str]) -> float:
    try:
        return float(params.get("q", "1"))
    except ValueError:
        return 0.0


def _accept(request: Request) -> list[MediaRange]:
    return parse_accept(request.query_params.get("accept") or request.headers.get("accept"))


def parse_multipart(body: bytes, boundary: str, default_type: str) -> list[tuple[str, bytes]]:
    """The parts of a multipart body (RFC 2046 5.1.1) as ``(media type, content)``; `ValueError` when broken."""
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0 or (start > 0 and body[start - 2:start] != b"\r\n"):
        raise ValueError(f"the body has no boundary line --{boundary}")
    parts: list[tuple[str, bytes]] = []
    pos = start + len(delimiter)
    while body[pos:pos + 2] != b"--":
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("the body ends inside a boundary line")
        pos = eol + 2
        nxt = body.find(b"\r\n" + delimiter, pos)
        if nxt < 0:
            raise ValueError("the body has no closing boundary")
        if body.startswith(b"\r\n", pos):
            header, content_start = b"", pos + 2
        else:
            end = body.find(b"\r\n\r\n", pos, nxt + 2)
            if end < 0:
                raise ValueError("a part has no blank line after its headers")
            header, content_start = body[pos:end], end + 4
        media = default_type
        for line in header.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                media = parse_media_type(value)[0]
        parts.append((media, body[content_start:nxt]))
        pos = nxt + 2 + len(delimiter)
        if pos > len(body):
            raise ValueError("the body has no closing boundary")
    return parts


def _part_header(content_type: str, boundary: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1")


def _multipart_response(parts: Sequence[tuple[str, bytes]], media_type: str) -> Response:
    """A multipart/related response (RFC 2387) of parts already in memory (frames, bulk data)."""
    boundary = secrets.token_hex(16)
    chunks = [b"".join((_part_header(ctype, boundary), data, b"\r\n")) for ctype, data in parts]
    return Response(b"".join(chunks) + f"--{boundary}--\r\n".encode("latin-1"),
                    media_type=f'multipart/related; type="{media_type}"; boundary={boundary}')


def _instances_response(web: DicomWeb, located: Sequence[Located], ts: str | None) -> StreamingResponse:
    """The instances as multipart/related application/dicom, each file read in a worker thread as it is sent
    (a 500-instance study is never in memory at once)."""
    boundary = secrets.token_hex(16)

    async def stream() -> AsyncIterator[bytes]:
        for loc in located:
            data = await asyncio.to_thread(web.instance_bytes, loc, ts)
            yield _part_header(_part_type(loc, ts), boundary)
            yield data
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode("latin-1")

    return StreamingResponse(stream(), media_type=f'multipart/related; type="{DICOM_MEDIA_TYPE}"; '
                                                  f"boundary={boundary}")


# -- service and settings ------------------------------------------------------------------------------------


def settings_of(hub: Any) -> DicomWebSettings:
    """``actors.dicom.dicomweb`` of the hub's configuration."""
    dicom = getattr(getattr(getattr(hub, "cfg", None), "actors", None), "dicom", None)
    return DicomWebSettings.from_mapping(getattr(dicom, "dicomweb", None) or {})


def _web(request: Request) -> DicomWeb:
    state = request.app.state
    manager = getattr(state.hub, "dicom", None)
    if manager is None:
        raise ApiError(404, "dicom_disabled", "the DICOM image manager is not running on this node "
                       "(actors.dicom.enabled is false in ihehub.yaml)")
    with state.dicomweb_lock:
        web: DicomWeb | None = getattr(state, "dicomweb", None)
        if web is None or web.manager is not manager:
            if web is not None:
                web.close()
            web = DicomWeb(manager, state.dicomweb_settings)
            state.dicomweb = web
    return web


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _warning_headers(warnings: Sequence[str]) -> dict[str, str]:
    if not warnings:
        return {}
    return {"Warning": ", ".join(f'299 ihehub "{w.replace(chr(34), chr(39))}"' for w in warnings)}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=headers)


def _check_json(request: Request) -> None:
    for media, _ in _accept(request):
        if media in (DICOM_JSON, "application/json", "*/*", "application/*"):
            return
    raise ApiError(406, "not_acceptable", "only application/dicom+json is offered here (no XML)")


def _dicom_transfer_syntaxes(request: Request) -> list[str | None]:
    """The transfer syntaxes acceptable with ``multipart/related; type="application/dicom"`` (PS3.18 8.7.3.5),
    best first (None: none named); 406 when application/dicom is not acceptable at all."""
    out: list[str | None] = []
    for media, params in _accept(request):
        kind = params.get("type", DICOM_MEDIA_TYPE).lower()
        if (media in ("multipart/related", "multipart/*") and kind == DICOM_MEDIA_TYPE) or media in (
                DICOM_MEDIA_TYPE, "*/*"):
            out.append(params.get("transfer-syntax"))
    if not out:
        raise ApiError(406, "not_acceptable", 'instances are sent as multipart/related; type="application/dicom"')
    return out


def _choose_transfer_syntax(web: DicomWeb, located: Sequence[Located], candidates: Sequence[str | None]) -> str | None:
    """The first candidate every instance can be sent in; the last one's 406 when none fits."""
    for ts in candidates[:-1]:
        try:
            web.check_transfer_syntax(located, ts)
        except WebError:
            continue
        return ts
    web.check_transfer_syntax(located, candidates[-1])
    return candidates[-1]


def _frame_accept(request: Request) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for media, params in _accept(request):
        if media in ("multipart/related", "multipart/*"):
            out.append((params.get("type", "application/octet-stream").lower(), params.get("transfer-syntax")))
        elif media in ("*/*", "application/octet-stream") or media.startswith("image/"):
            out.append((media, params.get("transfer-syntax")))
    return out


def _image_type(ranges: Sequence[MediaRange], offered: Sequence[str]) -> str:
    for media, _ in ranges:
        if media in offered:
            return media
        if media in ("*/*", "image/*"):
            return offered[0]
    raise ApiError(406, "not_acceptable", f"rendered images are {', '.join(offered)}")


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"frames must be a comma-separated list of numbers, not {text!r}") \
            from None
    if not numbers or min(numbers) < 1:
        raise ApiError(400, "invalid_parameter", "frame numbers start at 1")
    return numbers


def _audit(request: Request, principal: Principal, *, side: str, instances: Sequence[tuple[str, str, str]],
           failed: bool = False) -> None:
    """DICOM Instances Transferred (PS3.15 A.5.3.4, DCM 110104) for a STOW-RS (we are the destination, action
    C) or a retrieve of instances (we are the source, action R); ``instances``: (study, SOP class, SOP instance).
    Never raises: a failed audit is logged by the audit context."""
    audit = getattr(request.app.state.hub, "audit", None)
    if audit is None or not instances:
        return
    from ihehub.atna import Endpoint, StudyRef

    studies: dict[str, dict[str, list[str]]] = {}
    for study, sop_class, sop_instance in instances:
        studies.setdefault(study, {}).setdefault(sop_class, []).append(sop_instance)
    peer = Endpoint(user_id=principal.name, host=request.client.host if request.client else None)
    me = audit.me(f"{_base(request)}{BASE_PATH}")
    source, destination = (peer, me) if side == "destination" else (me, peer)
    audit.emit("DICOM-STORE", side=side, source=source, destination=destination, outcome=4 if failed else 0,
               studies=[StudyRef(uid=uid, sop_classes=classes) for uid, classes in studies.items()])


def _located_refs(located: Sequence[Located]) -> list[tuple[str, str, str]]:
    return [(loc.study_uid, loc.sop_class_uid, loc.sop_instance_uid) for loc in located]


# -- routes --------------------------------------------------------------------------------------------------


def router() -> APIRouter:
    """The /dicomweb routes.  Handlers are async and hand file, database and pixel work to worker threads
    (``asyncio.to_thread``); a cached rendered frame is answered on the event loop."""
    r = APIRouter(prefix=BASE_PATH, tags=["dicomweb"])

    async def search(request: Request, resource: str, study: str | None = None,
                     series: str | None = None) -> Response:
        _check_json(request)
        web = _web(request)
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "accept"]
        result = await asyncio.to_thread(web.search, resource, params, base_url=_base(request), study_uid=study,
                                         series_uid=series)
        return _json(result.items, headers=_warning_headers(result.warnings))

    @r.get("/studies", summary="QIDO-RS: search for studies")
    async def search_studies(request: Request, _p: Reader) -> Response:
        return await search(request, "studies")

    @r.get("/series", summary="QIDO-RS: search for series")
    async def search_all_series(request: Request, _p: Reader) -> Response:
        return await search(request, "series")

    @r.get("/instances", summary="QIDO-RS: search for instances")
    async def search_all_instances(request: Request, _p: Reader) -> Response:
        return await search(request, "instances")

    @r.get("/studies/{study}/series", summary="QIDO-RS: search for series of a study")
    async def search_series(request: Request, study: str, _p: Reader) -> Response:
        return await search(request, "series", study)

    @r.get("/studies/{study}/instances", summary="QIDO-RS: search for instances of a study")
    async def search_study_instances(request: Request, study: str, _p: Reader) -> Response:
        return await search(request, "instances", study)

    @r.get("/studies/{study}/series/{series}/instances", summary="QIDO-RS: search for instances of a series")
    async def search_instances(request: Request, study: str, series: str, _p: Reader) -> Response:
        return await search(request, "instances", study, series)

    async def retrieve(request: Request, principal: Principal, study: str, series: str | None = None,
                       instance: str | None = None) -> Response:
        candidates = _dicom_transfer_syntaxes(request)
        web = _web(request)
        located = await asyncio.to_thread(web.locate, study, series, instance)
        ts = _choose_transfer_syntax(web, located, candidates)
        _audit(request, principal, side="source", instances=_located_refs(located))
        if len(located) == 1:  # one instance: a plain body with its length, no chunked streaming
            data = await asyncio.to_thread(web.instance_bytes, located[0], ts)
            return _multipart_response([(_part_type(located[0], ts), data)], DICOM_MEDIA_TYPE)
        return _instances_response(web, located, ts)

    @r.get("/studies/{study}", summary="WADO-RS: retrieve a study (multipart/related application/dicom)")
    async def retrieve_study(request: Request, study: str, p: Reader) -> Response:
        return await retrieve(request, p, study)

    @r.get("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series")
    async def retrieve_series(request: Request, study: str, series: str, p: Reader) -> Response:
        return await retrieve(request, p, study, series)

    @r.get("/studies/{study}/series/{series}/instances/{instance}", summary="WADO-RS: retrieve an instance")
    async def retrieve_instance(request: Request, study: str, series: str, instance: str, p: Reader) -> Response:
        return await retrieve(request, p, study, series, instance)

    async def metadata(request: Request, study: str, series: str | None = None,
                       instance: str | None = None) -> Response:
        _check_json(request)
        web = _web(request)
        base = _base(request)

        def work() -> bytes:
            return web.metadata(web.locate(study, series, instance), base_url=base)

        return Response(await asyncio.to_thread(work), media_type=DICOM_JSON)

    @r.get("/studies/{study}/metadata", summary="WADO-RS: metadata of a study (DICOM JSON)")
    async def study_metadata(request: Request, study: str, _p: Reader) -> Response:
        return await metadata(request, study)

    @r.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: metadata of a series")
    async def series_metadata(request: Request, study: str, series: str, _p: Reader) -> Response:
        return await metadata(request, study, series)

    @r.get("/studies/{study}/series/{series}/instances/{instance}/metadata",
           summary="WADO-RS: metadata of an instance")
    async def instance_metadata(request: Request, study: str, series: str, instance: str, _p: Reader) -> Response:
        return await metadata(request, study, series, instance)

    @r.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}",
           summary="WADO-RS: bulk data of an instance's element")
    async def bulkdata(request: Request, study: str, series: str, instance: str, tag: str,
                       _p: Reader) -> Response:
        web = _web(request)

        def work() -> bytes:
            return web.bulkdata(web.locate(study, series, instance)[0], tag)

        return _multipart_response([("application/octet-stream", await asyncio.to_thread(work))],
                                   "application/octet-stream")

    @r.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
           summary="WADO-RS: frames (uncompressed: application/octet-stream)")
    async def frames(request: Request, study: str, series: str, instance: str, frames: str,
                     _p: Reader) -> Response:
        numbers = _frame_numbers(frames)
        accept = _frame_accept(request)
        web = _web(request)

        def work() -> list[tuple[str, bytes]]:
            return web.frames(web.locate(study, series, instance)[0], numbers, accept)

        parts = await asyncio.to_thread(work)
        return _multipart_response(parts, parts[0][0].split(";")[0])

    async def rendered(request: Request, study: str, series: str, instance: str, frame: int) -> Response:
        web = _web(request)
        media = _image_type(_accept(request), ("image/jpeg", "image/png", "image/gif"))
        qp = request.query_params
        try:
            params = RenderParams.parse(media_type=media, window=qp.get("window"), viewport=qp.get("viewport"),
                                        quality=qp.get("quality"), default_quality=web.settings.default_quality)
        except RenderError as exc:
            raise ApiError(400, "invalid_parameter", str(exc)) from exc
        data = web.cached(study, series, instance, frame, params)
        if data is None:
            def work() -> bytes:
                return web.rendered(web.locate_instance(study, series, instance), frame, params)

            data = await asyncio.to_thread(work)
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    @r.get("/studies/{study}/series/{series}/instances/{instance}/rendered",
           summary="WADO-RS: rendered instance (image/jpeg or image/png; window, viewport, quality)")
    async def rendered_instance(request: Request, study: str, series: str, instance: str, _p: Reader) -> Response:
        return await rendered(request, study, series, instance, 1)

    @r.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
           summary="WADO-RS: rendered frame")
    async def rendered_frame(request: Request, study: str, series: str, instance: str, frames: str,
                             _p: Reader) -> Response:
        numbers = _frame_numbers(frames)
        if len(numbers) != 1:
            raise ApiError(400, "invalid_parameter", "ask for one rendered frame per request")
        return await rendered(request, study, series, instance, numbers[0])

    @r.post("/studies", summary="STOW-RS: store instances (multipart/related; type=\"application/dicom\")")
    async def store(request: Request, p: Writer) -> Response:
        return await _stow(request, p, None)

    @r.post("/studies/{study}", summary="STOW-RS: store instances of one study")
    async def store_study(request: Request, study: str, p: Writer) -> Response:
        return await _stow(request, p, study)

    return r


def _part_type(loc: Located, ts: str | None) -> str:
    sent = loc.transfer_syntax if ts in (None, "*") else ts
    return f"{DICOM_MEDIA_TYPE}; transfer-syntax={sent}"


async def _stow(request: Request, principal: Principal, study: str | None) -> Response:
    """STOW-RS (PS3.18 10.5): check the request's media type, read the body within the limit, store."""
    media, params = parse_media_type(request.headers.get("content-type", ""))
    if media != "multipart/related":
        raise ApiError(415, "unsupported_media_type",
                       f'STOW-RS takes multipart/related; type="application/dicom", not {media or "no Content-Type"}')
    kind = params.get("type", DICOM_MEDIA_TYPE).lower()
    if kind != DICOM_MEDIA_TYPE:
        raise ApiError(415, "unsupported_media_type", f"parts of type {kind} are not accepted; send PS3.10 files "
                       "as application/dicom")
    boundary = params.get("boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "the Content-Type has no boundary parameter")
    web = _web(request)
    limit = web.settings.stow_max_mb * 1024 * 1024
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(413, "payload_too_large", f"the body is over {web.settings.stow_max_mb} MB "
                       "(actors.dicom.dicomweb.stow_max_mb)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the body is over {web.settings.stow_max_mb} MB")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        parts = parse_multipart(body, boundary, DICOM_MEDIA_TYPE)
    except ValueError as exc:
        raise ApiError(400, "bad_request", f"cannot read the multipart body: {exc}") from exc
    if not parts:
        raise ApiError(400, "bad_request", "the multipart body has no parts")
    result = await asyncio.to_thread(stow, web.manager, parts, study_uid=study, base_url=_base(request))
    web.forget(result.stored)
    _audit(request, principal, side="destination", failed=result.status != 200,
           instances=[(s.study_uid, s.sop_class_uid, s.sop_instance_uid) for s in result.stored])
    if web.settings.prerender:
        web.prerender(result.stored)
    return _json(result.body, status=result.status)


# -- WADO-URI ------------------------------------------------------------------------------------------------


def wado_router() -> APIRouter:
    r = APIRouter(tags=["dicomweb"])

    @r.get("/wado", summary="WADO-URI (PS3.18 9): requestType=WADO&studyUID&seriesUID&objectUID&contentType")
    async def wado(request: Request, principal: Reader) -> Response:
        qp = request.query_params
        if qp.get("requestType") != "WADO":
            raise ApiError(400, "invalid_parameter", "requestType=WADO is required")
        missing = [k for k in ("studyUID", "seriesUID", "objectUID") if not qp.get(k)]
        if missing:
            raise ApiError(400, "invalid_parameter", f"{', '.join(missing)} required")
        for unsupported in ("anonymize", "region", "presentationUID"):
            if qp.get(unsupported):
                raise ApiError(400, "invalid_parameter", f"{unsupported} is not supported")
        offered = ("image/jpeg", "application/dicom", "image/png", "image/gif")
        wanted = parse_accept(qp.get("contentType") or "image/jpeg")
        media = next((m for m, _ in wanted if m in offered), None)
        if media is None and any(m in ("*/*", "image/*") for m, _ in wanted):
            media = "image/jpeg"
        if media is None:
            raise ApiError(406, "not_acceptable", f"contentType must be one of {', '.join(offered)}")
        web = _web(request)
        study, series, instance = qp["studyUID"], qp["seriesUID"], qp["objectUID"]
        if media == DICOM_MEDIA_TYPE:
            ts = qp.get("transferSyntax")

            def read() -> tuple[Located, bytes]:
                loc = web.locate(study, series, instance)[0]
                web.check_transfer_syntax([loc], ts)
                return loc, web.instance_bytes(loc, ts)

            loc, part10 = await asyncio.to_thread(read)
            _audit(request, principal, side="source", instances=_located_refs([loc]))
            return Response(part10, media_type=DICOM_MEDIA_TYPE)
        center, width = qp.get("windowCenter"), qp.get("windowWidth")
        if (center is None) != (width is None):
            raise ApiError(400, "invalid_parameter", "windowCenter and windowWidth go together")
        try:
            size = (_int(qp, "columns"), _int(qp, "rows"))
            params = RenderParams(media_type=media, window=(float(center), float(width), "LINEAR")
                                  if center is not None and width is not None else None,
                                  size=size if any(size) else None,
                                  quality=_int(qp, "imageQuality") or web.settings.default_quality)
            frame = _int(qp, "frameNumber") or 1
        except (RenderError, ValueError) as exc:
            raise ApiError(400, "invalid_parameter", str(exc)) from exc
        data = web.cached(study, series, instance, frame, params)
        if data is None:
            def render() -> bytes:
                return web.rendered(web.locate_instance(study, series, instance), frame, params)

            data = await asyncio.to_thread(render)
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    return r


def _int(params: Any, name: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {value!r}") from None


# -- mounting ------------------------------------------------------------------------------------------------


class ScopedCORS:
    """CORS (Starlette's `CORSMiddleware`) for the DICOMweb paths only; other paths pass through untouched."""

    def __init__(self, app: ASGIApp, *, origins: Sequence[str], prefixes: tuple[str, ...] = PREFIXES) -> None:
        self.app = app
        self.prefixes = prefixes
        self.cors = CORSMiddleware(app, allow_origins=list(origins), allow_methods=["GET", "POST", "OPTIONS"],
                                   allow_headers=["*"],
                                   expose_headers=["Warning", "Content-Location", "Content-Type"], max_age=600)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).startswith(self.prefixes):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def _web_error(_request: Request, exc: Exception) -> Response:
    if isinstance(exc, WebError):
        return error_response(exc.status, exc.error, exc.detail)
    return error_response(500, "internal_error", type(exc).__name__)


def install(app: FastAPI) -> None:
    """Mount ``/dicomweb`` and ``/wado`` on ``app`` (its ``state.hub`` gives the image manager and settings)."""
    hub = app.state.hub
    settings = settings_of(hub)
    app.state.dicomweb_settings = settings
    app.state.dicomweb_lock = threading.Lock()
    manager = getattr(hub, "dicom", None)
    if manager is not None:  # built now so that the hub can reach it (services["dicomweb"].prerender_study)
        app.state.dicomweb = DicomWeb(manager, settings)
        services = getattr(hub, "services", None)
        if isinstance(services, dict):
            services["dicomweb"] = app.state.dicomweb
    app.include_router(router())
    app.include_router(wado_router())
    app.add_exception_handler(WebError, _web_error)
    if settings.cors_origins:
        app.add_middleware(ScopedCORS, origins=settings.cors_origins)
