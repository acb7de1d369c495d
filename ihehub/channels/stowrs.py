"""``dicomweb+http://`` and ``dicomweb+https://`` destination: STOW-RS (PS3.18 10.5) of stored instances.

The URL is the peer's DICOMweb base with ``dicomweb+`` in front: ``dicomweb+https://pacs.example/dicomweb``
stores with ``POST https://pacs.example/dicomweb/studies``.  The message body names the instances exactly as
for ``dicom://`` (the study-complete message, ``{"study_uid"|"series_uid"|"sop_instance_uid(s)": ...}``,
``{"paths": [...]}``, one path per line; `ihehub.channels.dicom.instance_paths`).

The request is ``multipart/related; type="application/dicom"``, one part per instance: the file as stored
(its File Meta Information and the data set as received), streamed from disk with a Content-Length; a study
larger than ``max_request_mb`` goes in several requests.  ``options.mapping`` sends each instance through a
DICOM mapping first (tag morphing, like ``dicom://``).

Outcome (PS3.18 10.5.3): 200 → sent; 202 (some instances failed; the response's Failed SOP Sequence is in the
report), a 5xx, 408, 429, a timeout or a connection failure → retryable `DeliveryError` (storing an instance
again replaces it); any other 4xx (401 bad credentials, 409 nothing stored, 413 too large, 415) → dead letter.
The response body of the delivery is a JSON report: requests made, instances sent, failures with their
Failure Reason (0008,1197).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, ConnectorSpec, DeliveryError, Response
from ihehub.channels.dicom import instance_paths, load_morph, morph_files, storage_root
from ihehub.channels.http import DESTINATION_TLS_SCHEMA, _client_tls, _header_safe, _tls_settings
from ihehub.channels.options import check_options
from ihehub.channels.registry import ConnectorContext

__all__ = ["SPEC", "StowDestination", "stow_batches"]

log = logging.getLogger("ihehub.dicom")

CHUNK = 1 << 20
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
RETRY_STATUS = (408, 429)

DESTINATION_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "root": {"type": "string", "minLength": 1,
                 "description": "folder of the stored instances (default: the image manager's, else data/dicom)"},
        "token": {"type": "string", "minLength": 1, "description": "bearer token (Authorization: Bearer ...)"},
        "username": {"type": "string", "minLength": 1, "description": "HTTP Basic user (with password)"},
        "password": {"type": "string", "description": "HTTP Basic password"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"},
                    "description": "extra request headers"},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "default": 300,
                    "description": "seconds for one STOW-RS request, upload and answer"},
        "connect_timeout": {"type": "number", "exclusiveMinimum": 0, "default": 10},
        "max_request_mb": {"type": "number", "exclusiveMinimum": 0, "default": 100,
                           "description": "instances go in several requests above this many MB"},
        "tls": {**DESTINATION_TLS_SCHEMA, "description": "dicomweb+https:// only; paths relative to the home"},
        "mapping": {"type": "string", "minLength": 1,
                    "description": "a mapping file (input and output kind dicom, base: input) applied to each "
                                   "instance before it is sent; the stored file is not changed"},
    },
}


def stow_batches(paths: list[Path], limit: int) -> list[list[tuple[Path, int]]]:
    """``paths`` with their sizes, cut into requests of at most ``limit`` bytes (one larger file goes alone)."""
    batches: list[list[tuple[Path, int]]] = []
    current: list[tuple[Path, int]] = []
    total = 0
    for path in paths:
        size = path.stat().st_size
        if current and total + size > limit:
            batches.append(current)
            current, total = [], 0
        current.append((path, size))
        total += size
    if current:
        batches.append(current)
    return batches


class StowDestination:
    """STOW-RS the instances a message names to a DICOMweb server (one or more requests per message)."""

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        self.where = f"dicomweb destination {name!r}"
        check_options(options, DESTINATION_OPTIONS_SCHEMA, self.where)
        self.name = name
        self.options = dict(options)
        self.context = context
        self.base, scheme = _parse_url(url)
        self.shown = self.base  # no credentials in the URL (they go in options)
        self.endpoint = self.base.rstrip("/") + "/studies"
        if scheme == "http" and "tls" in options:
            raise ConnectorError(f"{self.where}: options.tls needs a dicomweb+https:// URL")
        if "password" in options and "username" not in options:
            raise ConnectorError(f"{self.where}: options.password needs options.username")
        if "token" in options and "username" in options:
            raise ConnectorError(f"{self.where}: give options.token or options.username/password, not both")
        self.limit = int(float(options.get("max_request_mb", 100)) * 1024 * 1024)
        self._timeout = aiohttp.ClientTimeout(total=float(options.get("timeout", 300)),
                                              connect=float(options.get("connect_timeout", 10)))
        self._verify: ssl.SSLContext | bool = True
        if scheme == "https":
            self._verify = _client_tls(_tls_settings(options, context, ("ca", "cert", "key", "verify",
                                                                        "min_version")), url)
        self.headers = {"Accept": "application/dicom+json", "User-Agent": "ihehub"}
        if "token" in options:
            self.headers["Authorization"] = f"Bearer {options['token']}"
        elif "username" in options:
            pair = f"{options['username']}:{options.get('password', '')}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        for key, value in (options.get("headers") or {}).items():
            self.headers[key] = _header_safe(str(value))
        self._morph = load_morph(options, context, self.where)
        self._client: aiohttp.ClientSession | None = None

    @property
    def root(self) -> Path:
        return storage_root(self.options, self.context)

    def _http(self) -> aiohttp.ClientSession:
        if self._client is None or self._client.closed:
            connector = aiohttp.TCPConnector(limit=4, ssl=self._verify, enable_cleanup_closed=True)
            self._client = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                 skip_auto_headers=("User-Agent",))
        return self._client

    async def send(self, message: Message) -> Response:
        root = self.root
        try:
            paths = instance_paths(message.raw, root)
        except ValueError as exc:
            raise DeliveryError(f"{self.name}: {exc}", retryable=False) from None
        if not paths:
            raise DeliveryError(f"{self.name}: the message names no stored instance under {root}", retryable=False)
        spool: tempfile.TemporaryDirectory[str] | None = None
        try:
            if self._morph is not None:
                spool = tempfile.TemporaryDirectory(prefix="ihehub-morph-")
                paths = await asyncio.to_thread(morph_files, self._morph, paths, Path(spool.name), self.name)
            return await self._send_all(paths, message)
        finally:
            if spool is not None:
                spool.cleanup()

    async def _send_all(self, paths: list[Path], message: Message) -> Response:
        try:
            batches = stow_batches(paths, self.limit)
        except OSError as exc:
            raise DeliveryError(f"{self.name}: cannot read a stored instance: {exc}") from None
        report: dict[str, Any] = {"destination": self.endpoint, "requests": 0, "sent": 0, "failed": 0,
                                  "instances": [], "failures": []}
        for batch in batches:
            status, reason, content = await self._post(batch, message)
            report["requests"] += 1
            stored, failures = _parse_answer(content)
            report["instances"] += stored
            report["failures"] += failures
            # a 200 without a Referenced SOP Sequence (some servers answer with no body) stored them all
            report["sent"] += len(batch) if status == 200 and not stored and not failures else len(stored)
            report["failed"] += len(failures)
            body = json.dumps(report).encode()
            if status == 200 and not failures:
                continue
            snippet = content[:300].decode("utf-8", "replace").strip()
            error = f"{self.name}: {self.endpoint} answered HTTP {status} {reason}".rstrip()
            if failures:
                first = failures[0]
                error += (f"; {len(failures)} of {len(batch)} instances failed, first {first['sop_instance_uid']}: "
                          f"{first['reason']}")
            elif snippet:
                error += f": {snippet}"
            retryable = status in (200, 202) or status in RETRY_STATUS or status >= 500
            raise DeliveryError(error, retryable=retryable, response=body)
        return Response(ok=True, body=json.dumps(report).encode(),
                        status=f"{report['sent']} sent in {report['requests']} request(s)")

    async def _post(self, batch: list[tuple[Path, int]], message: Message) -> tuple[int, str, bytes]:
        boundary = "ihehub-" + secrets.token_hex(12)
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        tail = f"--{boundary}--\r\n".encode()
        length = sum(len(head) + size + 2 for _, size in batch) + len(tail)
        headers = {**self.headers, "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Content-Length": str(length), "X-Ihehub-Message-Id": message.id}

        async def body() -> AsyncIterator[bytes]:
            for path, size in batch:
                yield head
                sent = 0
                f = await asyncio.to_thread(open, path, "rb")  # 1 MiB reads off the event loop
                try:
                    while chunk := await asyncio.to_thread(f.read, CHUNK):
                        sent += len(chunk)
                        yield chunk
                finally:
                    f.close()
                if sent != size:  # replaced while we sent it: the Content-Length would lie
                    raise OSError(f"{path.name} changed size while being sent ({size} -> {sent} bytes)")
                yield b"\r\n"
            yield tail

        try:
            async with self._http().post(self.endpoint, data=body(), headers=headers,
                                         allow_redirects=False) as reply:
                return reply.status, reply.reason or "", await reply.read()
        except TimeoutError as exc:
            raise DeliveryError(f"{self.name}: {self.endpoint} timed out ({type(exc).__name__})") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise DeliveryError(f"{self.name}: cannot STOW-RS to {self.endpoint}: {exc or type(exc).__name__}") \
                from exc

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _parse_url(url: str) -> tuple[str, str]:
    """``dicomweb+https://host/base`` -> (``https://host/base``, ``https``)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("dicomweb+http", "dicomweb+https"):
        raise ConnectorError(f"{url!r} is not a dicomweb+http:// or dicomweb+https:// URL")
    if not parts.hostname:
        raise ConnectorError(f"{url!r}: write dicomweb+http://host:port/dicomweb-base (the server's DICOMweb root)")
    if parts.username or parts.password:
        raise ConnectorError(f"{url!r}: credentials go in options (token, or username and password), "
                             "not in the URL")
    if parts.query or parts.fragment:
        raise ConnectorError(f"{url!r}: the DICOMweb base URL has no query or fragment")
    try:
        parts.port  # noqa: B018  # raises on a bad port
    except ValueError:
        raise ConnectorError(f"{url!r}: the port is not a number between 0 and 65535") from None
    http = scheme.removeprefix("dicomweb+")
    return urlunsplit((http, parts.netloc, parts.path, "", "")), http


def _parse_answer(content: bytes) -> tuple[list[str], list[dict[str, Any]]]:
    """The SOP Instance UIDs a STOW-RS response says were stored, and its failures with their reasons."""
    try:
        data = json.loads(content) if content.strip() else {}
    except ValueError:
        return [], []
    if isinstance(data, list):
        data = data[0] if data and isinstance(data[0], dict) else {}
    if not isinstance(data, dict):
        return [], []

    def items(tag: str) -> list[dict[str, Any]]:
        seq = data.get(tag)
        values = seq.get("Value") if isinstance(seq, dict) else None
        return [v for v in values or () if isinstance(v, dict)]

    def first(item: dict[str, Any], tag: str) -> Any:
        elem = item.get(tag)
        values = elem.get("Value") if isinstance(elem, dict) else None
        return values[0] if values else None

    stored = [str(first(i, REFERENCED_SOP_INSTANCE_UID) or "") for i in items(REFERENCED_SOP_SEQUENCE)]
    failures = []
    for item in items(FAILED_SOP_SEQUENCE):
        reason = first(item, FAILURE_REASON)
        failures.append({"sop_instance_uid": str(first(item, REFERENCED_SOP_INSTANCE_UID) or ""),
                         "reason": f"{int(reason):04X}" if isinstance(reason, int) else str(reason or "")})
    return stored, failures


SPEC = ConnectorSpec(
    schemes=("dicomweb+http", "dicomweb+https"),
    description="STOW-RS the stored DICOM instances a message names to a DICOMweb server (files as stored)",
    destination="ihehub.channels.stowrs:StowDestination",
    options_schema=DESTINATION_OPTIONS_SCHEMA,
    example="""\
# channels/dicom-studies.yaml: CT studies also go to an AI service over DICOMweb
destinations:
  - name: ai
    url: dicomweb+https://ai.example/dicomweb   # POST .../studies
    filter: 'json.modalities contains "CT"'
    options: {token: "${AI_TOKEN}", max_request_mb: 200}
""",
)
