"""MTOM/XOP (W3C SOAP MTOM, XOP 1.0) over MIME multipart/related (RFC 2387, RFC 2046 section 5.1).

`read_multipart` parses the body *incrementally* from an async byte stream: the root (SOAP) part is kept
in memory (size-limited), every other part is hashed (SHA-1) and counted while it streams and spills to a
temporary file once it is larger than ``memory_threshold`` — a 1 GB attachment never sits in memory.
Delimiters are accepted after CRLF or a bare LF (the NIST toolkit samples use LF); Content-IDs match with
or without ``<>``, and ``cid:`` URLs are percent-decoded (RFC 2392).

`mtom_stream` writes a multipart/related MTOM message whose attachments are read in chunks from files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import IO
from urllib.parse import unquote

from lxml import etree

from ihehub.soap.fault import SoapFault

__all__ = ["XOP_INCLUDE", "XOP_NS", "Attachment", "MultipartBody", "OutPart", "content_id", "mtom_stream",
           "parse_content_type", "read_multipart", "xop_attachment"]

XOP_NS = "http://www.w3.org/2004/08/xop/include"
XOP_INCLUDE = f"{{{XOP_NS}}}Include"
CHUNK = 256 * 1024
OUT_CHUNK = 1024 * 1024  # response parts: fewer, larger writes (each is one hop through the server's thread pool)
MAX_HEADER_BLOCK = 16 * 1024
MAX_PARTS = 10_000
FLUSH = 1024 * 1024  # spill-file writes are batched to this size


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """``("multipart/related", {"boundary": ..., "start": ..., ...})`` (RFC 2045 5.1; parameters lower-cased)."""
    msg = Message()
    msg["content-type"] = value
    params = {k.lower(): str(v) for k, v in msg.get_params(failobj=[])[1:]}
    return msg.get_content_type(), params


def content_id(value: str) -> str:
    """The bare Content-ID: ``<a@b>`` → ``a@b``; ``cid:a%40b`` → ``a@b``."""
    value = value.strip()
    if value[:4].lower() == "cid:":
        value = unquote(value[4:])
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return value.strip()


@dataclass
class Attachment:
    """One MIME part (or an inline base64 document): in ``data`` while small, else in the file ``path``."""

    content_id: str
    content_type: str
    size: int = 0
    sha1: str = ""
    data: bytes | None = None
    path: Path | None = None
    owned: bool = True  # False once the file was moved into a store: discard() leaves it alone

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        if self.data is not None:
            for i in range(0, len(self.data), size):
                yield self.data[i:i + size]
            return
        assert self.path is not None
        with self.path.open("rb") as f:
            while chunk := f.read(size):
                yield chunk

    def discard(self) -> None:
        """Remove the spill file (if any, still there and not moved into a store)."""
        if self.path is not None and self.owned:
            self.path.unlink(missing_ok=True)
            self.path = None

    @classmethod
    def from_bytes(cls, data: bytes, *, content_id: str = "", content_type: str = "application/octet-stream",
                   ) -> Attachment:
        return cls(content_id=content_id, content_type=content_type, size=len(data),
                   sha1=hashlib.sha1(data).hexdigest(), data=data)


class _Sink:
    """Receives one part's bytes: memory first, a temporary file past the threshold.  File writes and the
    SHA-1 run in a worker thread, one batch at a time in order, overlapping the next network reads (the
    event loop never blocks on the disk)."""

    def __init__(self, *, limit: int | None, threshold: int, spool_dir: Path | None) -> None:
        self.limit = limit
        self.threshold = threshold
        self.spool_dir = spool_dir
        self.buf = bytearray()
        self.file: IO[bytes] | None = None
        self.path: Path | None = None
        self.size = 0
        self.sha1 = hashlib.sha1()
        self._task: asyncio.Future[None] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.size += len(data)
        if self.limit is not None and self.size > self.limit:
            raise SoapFault("Sender", f"the SOAP part exceeds the limit of {self.limit} bytes")
        self.buf += data
        if self.file is None and self.limit is None and len(self.buf) > self.threshold:
            if self.spool_dir is not None:
                self.spool_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="mtom-", suffix=".part", dir=self.spool_dir)
            self.file = os.fdopen(fd, "wb")
            self.path = Path(name)

    @property
    def pending(self) -> int:
        """Bytes waiting to be written to the spill file."""
        return len(self.buf) if self.file is not None else 0

    def _write(self, data: bytes) -> None:
        assert self.file is not None
        self.sha1.update(data)
        self.file.write(data)

    async def drain(self) -> None:
        """Wait for the previous batch, then hand the pending bytes to a worker thread."""
        if self._task is not None:
            task, self._task = self._task, None
            await task
        if self.file is not None and self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            self._task = asyncio.ensure_future(asyncio.to_thread(self._write, data))

    async def close(self) -> None:
        await self.drain()
        if self._task is not None:
            task, self._task = self._task, None
            await task
        if self.file is not None:
            await asyncio.to_thread(self.file.close)
        else:
            self.sha1.update(self.buf)

    def abort(self) -> None:
        """Close and remove the spill file (once a write still running in its thread has finished)."""
        def cleanup(_: object = None) -> None:
            if self.file is not None:
                with contextlib.suppress(OSError):
                    self.file.close()
            if self.path is not None:
                self.path.unlink(missing_ok=True)

        if self._task is not None and not self._task.done():
            self._task.add_done_callback(cleanup)
        else:
            cleanup()


@dataclass
class MultipartBody:
    root: bytes
    root_type: str
    attachments: dict[str, Attachment] = field(default_factory=dict)

    def discard(self) -> None:
        for a in self.attachments.values():
            a.discard()


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last = None
    for raw in block.replace(b"\r\n", b"\n").split(b"\n"):
        line = raw.decode("latin-1")
        if not line.strip():
            continue
        if line[0] in " \t" and last is not None:  # folded (RFC 5322 2.2.3)
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise SoapFault("Sender", f"malformed MIME part header line: {line[:80]!r}")
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers


async def read_multipart(stream: AsyncIterator[bytes], boundary: str, *, start: str | None = None,
                         max_root: int, memory_threshold: int = 1024 * 1024,
                         spool_dir: Path | None = None) -> MultipartBody:
    """Parse a multipart/related body from ``stream``.  The root part is the one whose Content-ID is ``start``
    (RFC 2387 3.2), else the first.  `SoapFault` (Sender) on a missing/broken boundary or a truncated body;
    spilled files are removed when parsing fails."""
    if not boundary or len(boundary) > 200:
        raise SoapFault("Sender", "multipart/related without a valid boundary parameter")
    dash = b"--" + boundary.encode("latin-1")
    delim = b"\n" + dash
    start_id = content_id(start) if start else None
    buf = bytearray()
    it = stream.__aiter__()
    eof = False
    sinks: list[tuple[dict[str, str], _Sink]] = []

    async def more() -> bool:
        nonlocal eof
        if eof:
            return False
        try:
            chunk = await it.__anext__()
        except StopAsyncIteration:
            eof = True
            return False
        buf.extend(chunk)
        return True

    try:
        # preamble up to the first delimiter (which may start the body without a line break)
        pos = 0
        while True:
            if buf.startswith(dash):
                cut = len(dash)
                break
            i = buf.find(delim, pos)
            if i >= 0:
                cut = i + len(delim)
                break
            pos = max(0, len(buf) - len(delim))
            if len(buf) > MAX_HEADER_BLOCK * 4:
                raise SoapFault("Sender", "multipart/related body: the boundary from Content-Type is not found")
            if not await more():
                raise SoapFault("Sender", "multipart/related body: the boundary from Content-Type is not found")
        del buf[:cut]
        root_index: int | None = None
        while True:
            # after a delimiter: "--" closes, otherwise padding and a line break, then the part's headers
            while len(buf) < 2 and await more():
                pass
            if buf[:2] == b"--":
                break
            while b"\n" not in buf:
                if len(buf) > 1024 or not await more():
                    raise SoapFault("Sender", "multipart/related body: broken boundary line")
            nl = buf.index(b"\n")
            if buf[:nl].strip(b" \t\r"):
                raise SoapFault("Sender", "multipart/related body: text after a boundary delimiter")
            del buf[:nl + 1]
            while True:
                if buf.startswith((b"\r\n", b"\n")):  # a part without headers
                    hend, hlen = 0, (2 if buf.startswith(b"\r\n") else 1)
                    break
                a, b = buf.find(b"\r\n\r\n"), buf.find(b"\n\n")
                cands = [(x, n) for x, n in ((a, 4), (b, 2)) if x >= 0]
                if cands:
                    hend, hlen = min(cands)
                    break
                if len(buf) > MAX_HEADER_BLOCK:
                    raise SoapFault("Sender", "multipart/related body: part headers too long")
                if not await more():
                    raise SoapFault("Sender", "multipart/related body: truncated in the part headers")
            headers = _parse_headers(bytes(buf[:hend]))
            del buf[:hend + hlen]
            cte = headers.get("content-transfer-encoding", "binary").lower()
            if cte not in ("binary", "8bit", "7bit"):
                raise SoapFault("Sender", f"unsupported Content-Transfer-Encoding {cte!r} in an MTOM part")
            cid = content_id(headers.get("content-id", ""))
            is_root = root_index is None and (cid == start_id if start_id else not sinks)
            if is_root:
                root_index = len(sinks)
            sink = _Sink(limit=max_root if is_root else None, threshold=memory_threshold, spool_dir=spool_dir)
            sinks.append((headers, sink))
            if len(sinks) > MAX_PARTS:
                raise SoapFault("Sender", "multipart/related body: too many parts")
            # the content, up to the next delimiter
            pos = 0
            while True:
                i = buf.find(delim, pos)
                if i >= 0:
                    end = i - 1 if i > 0 and buf[i - 1] == 0x0D else i
                    sink.write(memoryview(buf)[:end])
                    del buf[:i + len(delim)]
                    break
                keep = len(delim) + 1
                if len(buf) > keep:
                    sink.write(memoryview(buf)[:len(buf) - keep])
                    del buf[:len(buf) - keep]
                if sink.pending >= FLUSH:
                    await sink.drain()
                pos = 0
                if not await more():
                    raise SoapFault("Sender", "multipart/related body ends without its closing boundary "
                                              f"(part {cid or len(sinks)} is truncated)")
            await sink.close()
        if root_index is None:
            raise SoapFault("Sender", f"multipart/related: no part has the start Content-ID <{start_id}>")
    except BaseException:
        for _, s in sinks:
            s.abort()
        raise
    root_headers, root_sink = sinks[root_index]
    body = MultipartBody(root=bytes(root_sink.buf), root_type=root_headers.get("content-type", ""))
    for n, (headers, sink) in enumerate(sinks):
        if n == root_index:
            continue
        cid = content_id(headers.get("content-id", "")) or f"part-{n}"
        body.attachments[cid] = Attachment(
            content_id=cid, content_type=headers.get("content-type", "application/octet-stream"),
            size=sink.size, sha1=sink.sha1.hexdigest(), data=None if sink.path else bytes(sink.buf),
            path=sink.path)
    return body


def xop_attachment(element: etree._Element, attachments: dict[str, Attachment]) -> Attachment | None:
    """The attachment an ``xop:Include`` child of ``element`` points to; None when there is no xop:Include.
    `SoapFault` (Sender) when the cid: reference names no part (XOP 1.0 section 3.1)."""
    inc = element.find(XOP_INCLUDE)
    if inc is None:
        return None
    href = inc.get("href") or ""
    if not href.lower().startswith("cid:"):
        raise SoapFault("Sender", f"xop:Include href {href!r} is not a cid: URL")
    cid = content_id(href)
    att = attachments.get(cid) or attachments.get(content_id(href[4:]))  # tolerate a raw (undecoded) Content-ID
    if att is None:
        raise SoapFault("Sender", f"xop:Include references the missing MIME part cid:{cid}")
    return att


@dataclass
class OutPart:
    """A binary part of an outgoing MTOM message; ``cid`` is bare (no ``<>``)."""

    cid: str
    content_type: str
    source: Attachment | bytes | Path


def _part_chunks(source: Attachment | bytes | Path) -> Iterator[bytes]:
    if isinstance(source, bytes):
        yield source
    elif isinstance(source, Path):
        with source.open("rb") as f:
            while chunk := f.read(OUT_CHUNK):
                yield chunk
    else:
        yield from source.chunks(OUT_CHUNK)


def mtom_stream(envelope: bytes, parts: Sequence[OutPart], *, soap_content_type: str = "application/soap+xml",
                action: str | None = None) -> tuple[str, Iterator[bytes]]:
    """``(Content-Type, chunks)`` of an MTOM message: the XOP root (``envelope``, already holding the
    ``xop:Include href="cid:..."`` elements) then each part, read lazily."""
    boundary = f"MIMEBoundary_{uuid.uuid4().hex}"
    root_id = f"root.{uuid.uuid4().hex}@ihehub"
    ctype = (f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; start="<{root_id}>"; '
             f'start-info="{soap_content_type}"')
    if action:
        ctype += f'; action="{action}"'

    def chunks() -> Iterator[bytes]:
        yield (f"--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; "
               f'type="{soap_content_type}"\r\nContent-Transfer-Encoding: binary\r\n'
               f"Content-ID: <{root_id}>\r\n\r\n").encode()
        yield envelope
        for part in parts:
            yield (f"\r\n--{boundary}\r\nContent-Type: {part.content_type}\r\n"
                   f"Content-Transfer-Encoding: binary\r\nContent-ID: <{part.cid}>\r\n\r\n").encode()
            yield from _part_chunks(part.source)
        yield f"\r\n--{boundary}--\r\n".encode()

    return ctype, chunks()
