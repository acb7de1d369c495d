"""pynetdicom's acceptor, tuned for ingest: C-STORE without thread hops (PS3.7 9.1.1, PS3.8 9.3.5).

**Native path first.**  On the plain (non-TLS) listener, `RequestHandler.handle` first hands each new
connection to the server's ``native`` attribute, an `ihehub.dicom.native.NativeAcceptor`: it peeks at the
A-ASSOCIATE-RQ (``MSG_PEEK``, nothing consumed) and serves an association that proposes only Storage SOP
classes and Verification, without role selection or extended negotiation, in its own loop — pynetdicom's
DUL, state machine and the tuning below are not involved at all.  Every other association (C-FIND, C-MOVE,
C-GET, Storage Commitment, mixed ones) and every association on the TLS listener reaches pynetdicom with
the socket untouched, and gets the tuning below.  ``native_store: false`` sends everything to pynetdicom.

pynetdicom runs two threads per association that poll each other: the DUL thread reads PDUs and, when it
has nothing to do, sleeps 1 ms; the association thread checks for complete DIMSE messages every 1 ms, runs
the service and queues the response for the DUL thread.  Each C-STORE then waits on both polls, which caps
one association near 300 instances/s.  This module, plugged in through the documented ``request_handler``
parameter of ``ThreadedAssociationServer``, changes three things on each acceptor association:

* **C-STORE fast path**: a C-STORE request is handled where it completes, on the DUL thread; its response
  (a fixed command set encoded here, `store_response`) is queued to that same thread, which sends it on its
  next turn.  Every other request (C-ECHO, C-FIND ...) still goes to pynetdicom's service classes.
* **Zero-copy P-DATA**: P-DATA-TF PDUs are split into PDV items as views of the received buffer
  (`split_pdata`) instead of three copies, when no handler listens to raw PDU events.
* **Adaptive poll**: while instances arrive (the last one under `ACTIVE_WINDOW` ago), the DUL thread yields
  instead of sleeping 1 ms between polls; an idle association polls at pynetdicom's pace.
* **Bulk reads** (`FastSocket`): each PDU is read into one buffer of its final size (``recv_into``) instead
  of 4 KiB pieces appended to a growing buffer.
* **Retrieve routing**: C-MOVE and C-GET requests go to the server's ``retrieve_handler``
  (`ihehub.dicom.retrieve.Retriever`, which sends the stored files without re-encoding them) instead of
  pynetdicom's Query/Retrieve service class.

`tune_socket`, `adapt_dul` and `mark_active` serve requestor associations too (`ihehub.dicom.scu`).

The supported presentation contexts are copied per association; `SupportedContexts` copies them in well
under a millisecond where ``deepcopy`` of 170 contexts x 45 transfer syntaxes takes ~70 ms.
"""

from __future__ import annotations

import copy
import logging
import queue
import socket
import struct
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import evt, transport
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext

__all__ = ["ACTIVE_WINDOW", "FastSocket", "RequestHandler", "RetrieveHandler", "StoreHandler", "SupportedContexts",
           "adapt_dul", "echo_response", "keep_responses", "mark_active", "split_pdata", "status_of",
           "store_response", "tune_raw_socket", "tune_socket"]

log = logging.getLogger("ihehub.dicom")

ACTIVE_WINDOW = 0.05  # seconds after a C-STORE during which the DUL thread does not sleep between polls
_U32 = struct.Struct(">I")  # PDU and PDV item lengths are big endian (PS3.8 9.3.1)
_U32LE = struct.Struct("<I")
_U16LE = struct.Struct("<H")
_ELEMENT = struct.Struct("<HHI")  # implicit VR little endian element header
# (association, Affected SOP Class UID, Affected SOP Instance UID, data set as received, transfer syntax UID)
# -> C-STORE status (int, or a Dataset with Status and ErrorComment).  The association is pynetdicom's or a
# `ihehub.dicom.native.NativeAssociation` (both have ``requestor.ae_title`` and ``requestor.address``); the
# data set may be a view that is only valid during the call.
StoreHandler = Callable[[Any, str, str, "bytes | memoryview", str], "int | Dataset"]
# (association, C-MOVE or C-GET request, its accepted presentation context) -> None; sends its own responses
RetrieveHandler = Callable[[Association, "C_MOVE | C_GET", PresentationContext], None]


class SupportedContexts(list[PresentationContext]):
    """The acceptor's presentation contexts; ``deepcopy`` copies each context's own lists only (UIDs are
    immutable strings), as pynetdicom does for every association it accepts."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        out = []
        for cx in self:
            dup = copy.copy(cx)
            dup.__dict__ = {k: (list(v) if isinstance(v, list) else v) for k, v in cx.__dict__.items()}
            out.append(dup)
        return out


class FastSocket(transport.AssociationSocket):
    """An AssociationSocket whose ``recv`` fills a preallocated buffer (fewer system calls, no regrowth)."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        try:
            while got < nr_bytes:
                n = sock.recv_into(view[got:], nr_bytes - got)
                if not n:  # connection closed: return what we have, as pynetdicom does
                    return buf[:got]
                got += n
        finally:
            view.release()
        return buf


class _PDataTF:
    """A received P-DATA-TF PDU (PS3.8 9.3.5) whose PDV items are views into the received buffer."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[int, memoryview]]) -> None:
        self.items = items

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        primitive._presentation_data_value_list = self.items  # type: ignore[assignment]  # no bytes() copy
        return primitive


def split_pdata(pdu: bytearray | bytes) -> list[tuple[int, memoryview]]:
    """The (presentation context ID, PDV) items of a P-DATA-TF PDU, without copying; ValueError if malformed."""
    view = memoryview(pdu)
    end = 6 + _U32.unpack_from(view, 2)[0]
    if end != len(view):
        raise ValueError("P-DATA-TF length does not match the PDU")
    items = []
    offset = 6
    while offset < end:
        if offset + 6 > end:
            raise ValueError("PDV item header cut off")
        length = _U32.unpack_from(view, offset)[0]
        if length < 2 or offset + 4 + length > end:
            raise ValueError("PDV item length out of range")
        items.append((view[offset + 4], view[offset + 5:offset + 4 + length]))
        offset += 4 + length
    return items


class _AdaptiveDUL(DULServiceProvider):
    """pynetdicom's DUL whose idle poll interval is 0 while C-STOREs arrive (see `ACTIVE_WINDOW`), and which
    decodes P-DATA-TF PDUs without copying their values when nobody listens to raw PDU events."""

    _active_at = 0.0
    _base_delay = 0.001

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        if bytestream[:1] != b"\x04" or self.assoc.get_handlers(evt.EVT_DATA_RECV) or \
                self.assoc.get_handlers(evt.EVT_PDU_RECV):
            return super()._decode_pdu(bytestream)
        return _PDataTF(split_pdata(bytestream)), "Evt10"

    @property
    def _run_loop_delay(self) -> float:
        return 0.0 if time.monotonic() - self._active_at < ACTIVE_WINDOW else self._base_delay

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        self._base_delay = value


class _StoreFastPath(queue.Queue[Any]):
    """The DIMSE message queue of one association: C-STORE requests are answered on the spot (on the DUL
    thread that completed them); everything else is queued for the association thread as before."""

    def __init__(self, assoc: Association, handler: StoreHandler) -> None:
        super().__init__()
        self.assoc = assoc
        self.handler = handler

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, primitive = item
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is None:
            self._store(int(context_id), primitive)
            return
        super().put(item, block, timeout)

    def _store(self, context_id: int, req: C_STORE) -> None:
        dul = self.assoc.dul
        if isinstance(dul, _AdaptiveDUL):
            dul._active_at = time.monotonic()
        cx = self.assoc._accepted_cx.get(context_id)
        try:
            if cx is None:
                raise LookupError(f"no accepted presentation context {context_id}")
            data = cast(BytesIO, req.DataSet)
            view = data.getbuffer() if data is not None else memoryview(b"")
            try:
                status = self.handler(self.assoc, str(req.AffectedSOPClassUID or ""),
                                      str(req.AffectedSOPInstanceUID or ""), view, str(cx.transfer_syntax[0]))
            finally:
                view.release()
        except Exception:  # PS3.4 B.2.3: 0xC000-0xCFFF cannot understand; never leave the peer waiting
            log.exception("C-STORE handler failed")
            status = 0xC211
        code, comment = status_of(status)
        if not self.assoc.is_established:
            return
        command = store_response(message_id=int(req.MessageID or 0), sop_class_uid=str(req.AffectedSOPClassUID or ""),
                                 sop_instance_uid=str(req.AffectedSOPInstanceUID or ""), status=code,
                                 error_comment=comment)
        primitive = P_DATA()
        pdv: list[Any] = [[context_id, b"\x03" + command]]  # pynetdicom wants [ID, PDV] lists; 0x03: last command
        primitive.presentation_data_value_list = pdv
        self.assoc.dul.send_pdu(primitive)


def status_of(status: int | Dataset) -> tuple[int, str | None]:
    """The status code and Error Comment of a store handler's answer (an int, or a Dataset with Status)."""
    if isinstance(status, Dataset):
        comment = status.get("ErrorComment")
        return int(status.Status), str(comment) if comment else None
    return int(status), None


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", errors="replace")
    return raw + pad if len(raw) % 2 else raw


def _response(field: int, *, message_id: int, sop_class_uid: str, status: int, tail: bytes = b"") -> bytes:
    """A DIMSE response command set without a data set, implicit VR little endian (PS3.7 6.3.1, 9.3):
    ``tail`` carries the elements after Status (already encoded, in tag order)."""
    body = b"".join((
        _element(0x0002, _padded(sop_class_uid, b"\x00")),
        _element(0x0100, _U16LE.pack(field)),  # Command Field
        _element(0x0120, _U16LE.pack(message_id & 0xFFFF)),  # Message ID Being Responded To
        _element(0x0800, _U16LE.pack(0x0101)),  # Command Data Set Type: no data set
        _element(0x0900, _U16LE.pack(status & 0xFFFF)),
        tail,
    ))
    return _element(0x0000, _U32LE.pack(len(body))) + body


def store_response(*, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int,
                   error_comment: str | None = None) -> bytes:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2)."""
    comment = _element(0x0902, _padded(error_comment[:64], b" ")) if error_comment else b""
    return _response(0x8001, message_id=message_id, sop_class_uid=sop_class_uid, status=status,
                     tail=comment + _element(0x1000, _padded(sop_instance_uid, b"\x00")))


def echo_response(*, message_id: int, sop_class_uid: str, status: int = 0x0000) -> bytes:
    """The command set of a C-ECHO-RSP (PS3.7 9.3.5.2)."""
    return _response(0x8030, message_id=message_id, sop_class_uid=sop_class_uid, status=status)


class RequestHandler(transport.RequestHandler):
    """pynetdicom's acceptor request handler with `FastSocket`, `_AdaptiveDUL` and the C-STORE fast path.

    The store handler is the server's ``store_handler`` attribute (set by the image manager); without it
    C-STORE goes through pynetdicom's Storage service class and ``EVT_C_STORE``.  When the server has a
    ``native`` attribute (an `ihehub.dicom.native.NativeAcceptor`, plain TCP listeners) it looks at each
    connection first and serves storage associations itself; the rest reach pynetdicom unread."""

    def handle(self) -> None:
        native = getattr(self.server, "native", None)
        if native is not None and type(self.request) is socket.socket and native.handle(self.request,
                                                                                         self.client_address):
            return  # served natively (TLS sockets never are)
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if sock is not None and type(sock) is transport.AssociationSocket:
            sock.__class__ = FastSocket  # same state, bulk reads
        adapt_dul(assoc)
        handler = getattr(self.server, "store_handler", None)
        if handler is not None:
            assoc.dimse.msg_queue = _StoreFastPath(assoc, handler)
        retrieve = getattr(self.server, "retrieve_handler", None)
        if retrieve is not None:
            _serve_retrieve(assoc, retrieve)
        return assoc


def _serve_retrieve(assoc: Association, handler: RetrieveHandler) -> None:
    """Route C-MOVE and C-GET requests of ``assoc`` to ``handler`` instead of pynetdicom's Query/Retrieve
    service class (which decodes and re-encodes every instance); everything else is served as before.

    The handler runs on the association thread, as pynetdicom's service classes do, with the reactor marked
    paused so that it may send and receive DIMSE messages itself (C-STORE sub-operations of a C-GET)."""
    serve = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        if not isinstance(msg, C_MOVE | C_GET) or not msg.is_valid_request or assoc._sent_release:
            serve(msg, context_id)
            return
        cx = assoc._accepted_cx.get(context_id)
        if cx is None:
            serve(msg, context_id)  # pynetdicom aborts on an unknown context
            return
        assoc.dimse.cancel_req = {}
        assoc._is_paused = True
        try:
            handler(assoc, msg, cx)
        except Exception:
            log.exception("%s handler failed", msg.msg_type)
        finally:
            assoc._is_paused = False
            assoc.dimse.cancel_req = {}

    assoc._serve_request = serve_request  # type: ignore[method-assign]


def adapt_dul(assoc: Association) -> None:
    """Give ``assoc`` the adaptive DUL (no 1 ms sleeps between polls while `mark_active` was called lately)."""
    if type(assoc.dul) is DULServiceProvider:
        base = assoc.dul.__dict__.pop("_run_loop_delay", 0.001)
        assoc.dul.__class__ = _AdaptiveDUL
        assoc.dul._run_loop_delay = base


def mark_active(assoc: Association) -> None:
    """A DIMSE exchange is starting: keep the DUL thread polling without sleeping for `ACTIVE_WINDOW`."""
    dul = assoc.dul
    if isinstance(dul, _AdaptiveDUL):
        dul._active_at = time.monotonic()


def keep_responses(assoc: Association) -> None:
    """Give a DIMSE response that pynetdicom's reactor took by mistake back to the ``send_*`` call waiting for it.

    pynetdicom pauses a requestor's reactor around each ``send_*`` call with a checkpoint, but the reactor sets
    ``_is_paused`` just *before* waiting on that checkpoint and clears it after, so a ``send_*`` call can see
    "paused" while the reactor is about to poll the message queue once more.  When the peer answers within
    that window (a fast SCP on loopback: ihehub's native store path answers in well under a millisecond), the
    reactor takes the response, logs "Received unexpected C-... service message" and drops it, and the
    sender waits for its DIMSE timeout (pynetdicom issue #875).  Here a message that is not a request, taken
    while a ``send_*`` call holds the checkpoint, goes back on the queue; the reactor then blocks at the
    checkpoint and the sender receives it."""
    serve = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and not assoc._reactor_checkpoint.is_set():
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_request  # type: ignore[method-assign]


def tune_socket(assoc: Association) -> None:
    """TCP_NODELAY (no ~40 ms wait for the peer's delayed ACK per small PDU) and SO_KEEPALIVE on the
    association's socket; called from ``EVT_CONN_OPEN`` by acceptors and requestors alike."""
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if sock is not None:
        tune_raw_socket(sock)


def tune_raw_socket(sock: socket.socket) -> None:
    """`tune_socket` for a bare socket (`ihehub.dicom.native` associations)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError as exc:  # the peer may already be gone
        log.debug("cannot set socket options: %s", exc)
