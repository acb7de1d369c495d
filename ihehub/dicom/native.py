"""A native DICOM upper layer for storage associations (PS3.8 section 9, PS3.7 9.3.1, PS3.7 9.3.5).

pynetdicom runs each association as a state machine on a reactor thread that polls an event queue; for
C-STORE that machinery costs more than receiving and writing the instance.  `NativeAcceptor` serves the
associations that only need storage — every proposed abstract syntax a Storage SOP class or Verification,
and no user-information item beyond Maximum Length, Implementation Class UID and Implementation Version
Name — in one plain loop on the connection's own thread, and hands every other association, untouched,
to pynetdicom:

* the A-ASSOCIATE-RQ is read with ``MSG_PEEK`` (nothing consumed), decoded with pynetdicom's PDU classes
  and checked (`NativeAcceptor.handle`); an association that needs more (C-FIND, C-MOVE, C-GET, Storage
  Commitment, SCP/SCU role selection, user identity, extended negotiation, asynchronous operations) goes
  to pynetdicom with the socket as it was;
* acceptance follows the pynetdicom path's rules: the image manager's caller check (``admit``: A-ASSOCIATE-RJ
  1/1/3), the association limit counted over both paths (A-ASSOCIATE-RJ 2/3/2), the presentation contexts
  negotiated by pynetdicom's own ``negotiate_as_acceptor`` against the listener's supported contexts, and
  an A-ASSOCIATE-AC encoded by pynetdicom with the AE's maximum PDU length and implementation UID/version;
* then a loop reads PDUs straight into buffers: P-DATA-TF PDV items are parsed as they arrive, command
  fragments collected (implicit VR little endian, PS3.7 6.3.1), data set fragments received directly
  into one reused buffer (``recv_into``, no reassembly copy).  A complete C-STORE-RQ calls the store
  handler with a view of that buffer and its C-STORE-RSP goes out at once; C-ECHO-RQ gets C-ECHO-RSP;
  A-RELEASE-RQ gets A-RELEASE-RP; an A-ABORT ends the association.  Anything else — an unknown or
  unexpected PDU, a malformed PDV, a fragment on a context that was not accepted, any other DIMSE
  command — is answered with A-ABORT (PS3.8 9.3.8) and the connection closed; the server goes on.
* ``idle_timeout`` (the pynetdicom path's network timeout) bounds each wait for data (``SO_RCVTIMEO``), and
  the ACSE timeout the wait for the A-ASSOCIATE-RQ.

An instance is handed to the store handler only once its last fragment arrived: a peer that aborts or
vanishes mid data set leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import pdu, pdu_primitives
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from ihehub.dicom.transport import echo_response, status_of, store_response

__all__ = ["InstanceSink", "NativeAcceptor", "NativeAssociation", "NativeStoreHandler", "Requestor",
           "parse_command"]

log = logging.getLogger("ihehub.dicom")

# PDU types (PS3.8 Table 9-1 ... 9-26)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
MAX_ASSOCIATE_RQ = 32 * 1024  # peeked whole, so within the initial TCP window; larger ones go to pynetdicom
MAX_COMMAND = 64 * 1024  # a DIMSE command set is a few hundred bytes
MAX_PDU = 1 << 30  # a PDU that claims more is not believed (A-ABORT), when no max_pdu is configured
KEEP_BUFFER = 64 * 1024 * 1024  # a data set buffer grown past this is dropped after its instance
C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
NO_DATASET = 0x0101
# A-ABORT reasons of the service provider (PS3.8 9.3.8)
UNRECOGNIZED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 0x01, 0x02, 0x06

_PDU = struct.Struct(">BxI")  # type, reserved, length
_PDV = struct.Struct(">IBB")  # item length, presentation context ID, message control header
_ELEMENT = struct.Struct("<HHI")  # implicit VR little endian element header
_U16LE = struct.Struct("<H")



class InstanceSink(Protocol):
    """Where the data set of one C-STORE goes as it arrives (`ihehub.dicom.server.ImageManager._receive`).

    ``write`` gets each fragment as received; ``finish`` the complete data set once its last fragment came,
    and returns the C-STORE status (an int, or a Dataset with Status and Error Comment); ``discard`` is
    called instead when the association ends first.  The views are of a buffer that is reused once the
    call returned: keep a copy, never the view."""

    def write(self, data: memoryview) -> None: ...

    def finish(self, dataset: memoryview) -> int | Dataset: ...

    def discard(self) -> None: ...


# (association, Affected SOP Class UID, Affected SOP Instance UID, transfer syntax UID) -> its sink
NativeStoreHandler = Callable[[Any, str, str, str], InstanceSink]


class _Closed(Exception):
    """The connection ended (peer closed, reset, timed out) or the association is over."""


class _Idle(_Closed):
    """Nothing arrived within the idle timeout (``SO_RCVTIMEO``)."""


class _Abort(Exception):
    """A protocol error: send A-ABORT with ``reason`` (service provider) and close."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Requestor:
    """The calling side, as the audit and the logs read it from pynetdicom's ``assoc.requestor``."""

    __slots__ = ("address", "ae_title", "port")

    def __init__(self, ae_title: str, address: str, port: int) -> None:
        self.ae_title = ae_title
        self.address = address
        self.port = port


def parse_command(data: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """The elements of a DIMSE command set (group 0000, implicit VR little endian) by element number;
    ValueError when it is not a well-formed group 0000 element sequence."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise ValueError("command element header cut off")
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise ValueError(f"({group:04X},{element:04X}) is not a command element or runs past the end")
        out[element] = bytes(data[pos:pos + length])
        pos += length
    return out


def _u16(command: dict[int, bytes], element: int) -> int | None:
    raw = command.get(element)
    return _U16LE.unpack(raw)[0] if raw is not None and len(raw) == 2 else None


def _uid(command: dict[int, bytes], element: int) -> str:
    return command.get(element, b"").rstrip(b"\x00 ").decode("ascii", errors="replace")


def _abort_pdu(source: int, reason: int) -> bytes:
    return bytes((ABORT, 0, 0, 0, 0, 4, 0, 0, source, reason))


def _reject_pdu(result: int, source: int, reason: int) -> bytes:
    return bytes((ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, result, source, reason))


_RELEASE_RP = bytes((RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0))
_PLAIN_ITEMS = (pdu_primitives.MaximumLengthNotification, pdu_primitives.ImplementationClassUIDNotification,
                pdu_primitives.ImplementationVersionNameNotification)


def _timeval(seconds: float | None) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO; 0 (no timeout) for ``None``."""
    if not seconds:
        return struct.pack("ll", 0, 0)
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    return struct.pack("ll", whole, micro if whole or micro else 1)


class NativeAcceptor:
    """The native path of one (plain TCP) listener; `handle` is called by the request handler for each
    connection before pynetdicom sees it.

    ``contexts``: the listener's supported presentation contexts; ``syntaxes``: the abstract syntaxes an
    association may propose to be served here (storage and Verification); ``admit(calling AE title,
    address)`` is the caller check (False: rejected, counted and logged by the caller); ``receive`` the
    `NativeStoreHandler`; ``closed(association)`` is called when an accepted association ends;
    ``pynetdicom_acceptors()`` counts the listener's pynetdicom acceptor associations (for the limit)."""

    def __init__(self, *, ae: Any, contexts: list[PresentationContext], syntaxes: frozenset[str],
                 admit: Callable[[str, str], bool], receive: NativeStoreHandler,
                 closed: Callable[[Any], None], pynetdicom_acceptors: Callable[[], int],
                 max_associations: int, max_pdu: int, idle_timeout: float | None, acse_timeout: float | None,
                 tune: Callable[[socket.socket], None] | None = None) -> None:
        self.ae = ae
        self.contexts = contexts
        self.syntaxes = syntaxes
        self.admit = admit
        self.receive = receive
        self.closed = closed
        self.pynetdicom_acceptors = pynetdicom_acceptors
        self.max_associations = max_associations
        self.max_pdu = max_pdu
        self.idle_timeout = idle_timeout
        self.acse_timeout = acse_timeout
        self.tune = tune
        self.active: set[NativeAssociation] = set()
        self.accepted = 0  # associations served natively since start
        self.handed_over = 0  # associations left to pynetdicom
        self._lock = threading.Lock()

    def handle(self, sock: socket.socket, address: tuple[Any, ...]) -> bool:
        """Serve the connection natively if it is a storage association (True: done, socket closed), else
        leave it unread for pynetdicom (False)."""
        if self.tune is not None:
            self.tune(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self.acse_timeout))
            raw = self._peek_request(sock)
        except (OSError, _Closed):  # nothing (complete) came within the ACSE timeout, or the peer left
            _close(sock)
            return True
        rq = _decode_request(raw) if raw is not None else None
        if rq is None or not self._serves(rq):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(None))
            with self._lock:
                self.handed_over += 1
            return False
        assoc = NativeAssociation(self, sock, address, rq)
        try:
            _recv_exact(sock, memoryview(bytearray(len(raw or b""))))  # consume the request we peeked at
            assoc.run()
        except Exception:  # never let one connection take the listener down
            log.exception("native association from %s failed", assoc.requestor.ae_title)
        finally:
            _close(sock)
        return True

    def abort_all(self, wait: float = 5.0) -> None:
        """Abort every native association (the image manager stops) and wait up to ``wait`` seconds for
        their threads to finish the instance they were storing."""
        with self._lock:
            active = list(self.active)
        for assoc in active:
            assoc.abort()
        deadline = time.monotonic() + wait
        while self.count() and time.monotonic() < deadline:
            time.sleep(0.01)

    def count(self) -> int:
        with self._lock:
            return len(self.active)

    # -- negotiation ----------------------------------------------------------------------------
    @staticmethod
    def _peek_request(sock: socket.socket) -> bytes | None:
        head = sock.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL)
        if len(head) < 6:
            raise _Closed("the peer closed before its A-ASSOCIATE-RQ")
        kind, length = _PDU.unpack(head)
        if kind != ASSOCIATE_RQ or length > MAX_ASSOCIATE_RQ:
            return None  # pynetdicom answers whatever this is
        raw = sock.recv(6 + length, socket.MSG_PEEK | socket.MSG_WAITALL)
        if len(raw) < 6 + length:
            raise _Closed("the peer closed inside its A-ASSOCIATE-RQ")
        return raw

    def _serves(self, rq: A_ASSOCIATE) -> bool:
        contexts = rq.presentation_context_definition_list
        if not contexts or any(str(cx.abstract_syntax) not in self.syntaxes for cx in contexts):
            return False
        return all(isinstance(item, _PLAIN_ITEMS) for item in rq.user_information)

    def _register(self, assoc: NativeAssociation) -> bool:
        """Count ``assoc`` in; False when the limit is reached (PS3.8 A-ASSOCIATE-RJ 2/3/2)."""
        with self._lock:
            if len(self.active) + 1 + self.pynetdicom_acceptors() > self.max_associations:
                return False
            self.active.add(assoc)
            self.accepted += 1
            return True

    def _unregister(self, assoc: NativeAssociation) -> None:
        with self._lock:
            self.active.discard(assoc)


def _decode_request(raw: bytes) -> A_ASSOCIATE | None:
    try:
        item = pdu.A_ASSOCIATE_RQ()
        item.decode(raw)
        return item.to_primitive()
    except Exception:  # malformed: pynetdicom's state machine answers it as it always did
        return None


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, want = 0, len(view)
    while got < want:
        try:
            n = sock.recv_into(view[got:], want - got)
        except BlockingIOError as exc:  # SO_RCVTIMEO expired
            raise _Idle("idle timeout") from exc
        except OSError as exc:  # reset
            raise _Closed(str(exc)) from exc
        if not n:
            raise _Closed("the peer closed the connection")
        got += n


class NativeAssociation:
    """One association served by `NativeAcceptor`: what the audit reads of an association (``requestor``
    with ``ae_title`` and ``address``), the accepted contexts, and the receive loop."""

    def __init__(self, acceptor: NativeAcceptor, sock: socket.socket, address: tuple[Any, ...],
                 rq: A_ASSOCIATE) -> None:
        self.acceptor = acceptor
        self.sock = sock
        self.rq = rq
        self.requestor = Requestor(str(rq.calling_ae_title).strip(), str(address[0]), int(address[1]))
        self.called_ae_title = str(rq.called_ae_title).strip()
        self.peer_max_pdu = 0
        for item in rq.user_information:
            if isinstance(item, pdu_primitives.MaximumLengthNotification):
                self.peer_max_pdu = int(item.maximum_length_received or 0)
        self.accepted: dict[int, tuple[str, str]] = {}  # context ID -> (abstract syntax, transfer syntax)
        self.is_native = True
        self.stored = 0
        self._send_lock = threading.Lock()
        self._aborted = False
        self._buf = bytearray(1024 * 1024)
        self._view = memoryview(self._buf)
        self._head = bytearray(6)
        self._head_view = memoryview(self._head)

    def __repr__(self) -> str:
        return f"<NativeAssociation {self.requestor.ae_title}@{self.requestor.address}:{self.requestor.port}>"

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self) -> None:
        acceptor = self.acceptor
        if not acceptor.admit(self.requestor.ae_title, self.requestor.address):
            self._reject(0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE title not recognized
            return
        if not acceptor._register(self):
            log.warning("association from %s rejected: %d associations open", self.requestor.ae_title,
                        acceptor.max_associations)
            self._reject(0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit
            return
        try:
            self._accept()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(acceptor.idle_timeout))
            self._loop()
        except _Abort as exc:
            log.warning("association from %s aborted: %s", self.requestor.ae_title, exc)
            self._send_abort(0x02, exc.reason)
        except _Idle:
            log.info("association from %s aborted: silent for %s s", self.requestor.ae_title, acceptor.idle_timeout)
            self._send_abort(0x02, 0x00)
        except _Closed as exc:
            log.debug("association from %s ended: %s", self.requestor.ae_title, exc)
        finally:
            self.close()
            try:
                acceptor.closed(self)
            except Exception:
                log.exception("the close handler of a native association failed")
            acceptor._unregister(self)

    def abort(self) -> None:
        """A-ABORT (service user) from another thread; the receive loop then ends."""
        self._aborted = True
        with contextlib.suppress(_Closed):
            self._send(_abort_pdu(0x00, 0x00), wait=1.0)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _send(self, data: bytes, wait: float = -1) -> None:
        if not self._send_lock.acquire(timeout=wait):
            raise _Closed("the association thread is stuck sending")
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise _Closed(f"cannot send: {exc}") from exc
        finally:
            self._send_lock.release()

    def _send_abort(self, source: int, reason: int) -> None:
        try:
            self._send(_abort_pdu(source, reason))
        except _Closed:
            return

    def _reject(self, result: int, source: int, reason: int) -> None:
        try:
            self._send(_reject_pdu(result, source, reason))
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(2.0))
            while self.sock.recv(4096):  # the requestor closes the connection after an A-ASSOCIATE-RJ
                continue
        except (OSError, _Closed):
            return

    def _accept(self) -> None:
        """Negotiate the presentation contexts (pynetdicom's rules) and send the A-ASSOCIATE-AC."""
        acceptor = self.acceptor
        result, _ = negotiate_as_acceptor(self.rq.presentation_context_definition_list, acceptor.contexts, {})
        for cx in result:
            if cx.result == 0x00 and cx.context_id is not None:
                self.accepted[int(cx.context_id)] = (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT
        primitive.calling_ae_title = self.rq.calling_ae_title
        primitive.called_ae_title = self.rq.called_ae_title
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = result
        max_length = pdu_primitives.MaximumLengthNotification()
        max_length.maximum_length_received = acceptor.max_pdu
        class_uid = pdu_primitives.ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = acceptor.ae.implementation_class_uid
        items: list[Any] = [max_length, class_uid]
        if acceptor.ae.implementation_version_name:
            version = pdu_primitives.ImplementationVersionNameNotification()
            version.implementation_version_name = acceptor.ae.implementation_version_name
            items.append(version)
        primitive.user_information = items
        ac = pdu.A_ASSOCIATE_AC()
        ac.from_primitive(primitive)
        self._send(ac.encode())
        log.debug("native association from %s (%s) accepted: %d of %d contexts", self.requestor.ae_title,
                  self.requestor.address, len(self.accepted), len(result))

    # -- the receive loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        sock, head, head_view = self.sock, self._head, self._head_view
        limit = self.acceptor.max_pdu or MAX_PDU
        while True:
            if self._aborted:
                raise _Closed("aborted")
            _recv_exact(sock, head_view)
            kind, length = _PDU.unpack(head)
            if kind == P_DATA_TF:
                if length > limit:
                    raise _Abort(INVALID_PARAMETER, f"P-DATA-TF of {length} bytes exceeds {limit}")
                self._pdata(length)
            elif kind == RELEASE_RQ:
                self._skip(length)
                self._send(_RELEASE_RP)
                log.debug("native association from %s released", self.requestor.ae_title)
                return
            elif kind == ABORT:
                raise _Closed("A-ABORT from the peer")
            elif kind in (ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, RELEASE_RP):
                raise _Abort(UNEXPECTED_PDU, f"unexpected PDU type 0x{kind:02X}")
            else:
                raise _Abort(UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{kind:02X}")

    def _skip(self, length: int) -> None:
        if length > 64:
            raise _Abort(INVALID_PARAMETER, f"a {length}-byte release request")
        _recv_exact(self.sock, memoryview(bytearray(length)))

    # P-DATA-TF (PS3.8 9.3.5) and message fragments (PS3.8 E.2); one message at a time (no asynchronous
    # operations were negotiated): its command fragments, then its data set fragments on the same context.
    _command: bytearray | None = None  # the command being collected
    _context = 0  # its presentation context
    _fields: dict[int, bytes] | None = None  # a complete C-STORE-RQ command receiving its data set
    _sink: InstanceSink | None = None  # where that data set goes (None: the handler failed)
    _size = 0  # data set bytes received so far

    def _pdata(self, length: int) -> None:
        sock, head, head_view = self.sock, self._head, self._head_view
        remaining = length
        while remaining:
            if remaining < 6:
                raise _Abort(INVALID_PARAMETER, "PDV item header cut off")
            _recv_exact(sock, head_view)
            item_length, context_id, control = _PDV.unpack(head)
            if item_length < 2 or item_length + 4 > remaining:
                raise _Abort(INVALID_PARAMETER, f"PDV item length {item_length} out of range")
            remaining -= 4 + item_length
            size = item_length - 2
            if context_id not in self.accepted:
                raise _Abort(INVALID_PARAMETER, f"PDV on presentation context {context_id}, not accepted")
            if control & 0x01:
                self._command_fragment(context_id, control, size)
            else:
                self._dataset_fragment(context_id, control, size)

    def _command_fragment(self, context_id: int, control: int, size: int) -> None:
        if self._fields is not None:
            raise _Abort(INVALID_PARAMETER, "a command fragment while a data set was expected")
        if self._command is None:
            self._command, self._context = bytearray(), context_id
        elif context_id != self._context:
            raise _Abort(INVALID_PARAMETER, "command fragments on two presentation contexts")
        if len(self._command) + size > MAX_COMMAND:
            raise _Abort(INVALID_PARAMETER, "command set too long")
        chunk = bytearray(size)
        _recv_exact(self.sock, memoryview(chunk))
        self._command += chunk
        if not control & 0x02:
            return
        raw, self._command = self._command, None
        try:
            fields = parse_command(raw)
        except ValueError as exc:
            raise _Abort(INVALID_PARAMETER, f"malformed command set: {exc}") from exc
        command, message_id = _u16(fields, 0x0100), _u16(fields, 0x0110)
        if message_id is None:
            raise _Abort(INVALID_PARAMETER, "a request without Message ID")
        has_dataset = _u16(fields, 0x0800) != NO_DATASET
        if command == C_ECHO_RQ and not has_dataset:
            self._respond(echo_response(message_id=message_id, sop_class_uid=_uid(fields, 0x0002)))
        elif command == C_STORE_RQ and has_dataset:
            self._fields, self._size = fields, 0
            self._sink = None
            try:
                self._sink = self.acceptor.receive(self, _uid(fields, 0x0002), _uid(fields, 0x1000),
                                                   self.accepted[context_id][1])
            except Exception:
                log.exception("C-STORE handler failed")
        else:  # only storage and Verification were negotiated
            raise _Abort(INVALID_PARAMETER, f"unexpected DIMSE command 0x{command or 0:04X}")

    def _dataset_fragment(self, context_id: int, control: int, size: int) -> None:
        if self._fields is None or context_id != self._context:
            raise _Abort(INVALID_PARAMETER, "a data set fragment without its command")
        start, end = self._size, self._size + size
        if end > len(self._buf):
            self._grow(end)
        fragment = self._view[start:end]
        _recv_exact(self.sock, fragment)
        self._size = end
        sink = self._sink
        if sink is not None:
            try:
                sink.write(fragment)  # to the file while the peer sends the next fragment
            except Exception:
                log.exception("C-STORE handler failed")
                self._drop_sink()
        fragment.release()
        if control & 0x02:
            fields, self._fields = self._fields, None
            self._store(fields, self._view[:end])

    def _grow(self, need: int) -> None:
        capacity = max(need, 2 * len(self._buf))
        buf = bytearray(capacity)
        buf[:self._size] = self._view[:self._size]
        self._view.release()
        self._buf, self._view = buf, memoryview(buf)

    def _drop_sink(self) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            try:
                sink.discard()
            except Exception:
                log.exception("discarding a partial instance failed")

    def close(self) -> None:
        """The association ended: a data set still arriving is dropped."""
        self._drop_sink()

    # -- DIMSE ----------------------------------------------------------------------------------
    def _store(self, fields: dict[int, bytes], dataset: memoryview) -> None:
        """The last fragment of a C-STORE-RQ's data set arrived: finish it, send the C-STORE-RSP."""
        sink, self._sink = self._sink, None
        status: int | Dataset = 0x0110  # processing failure: the handler could not take the instance
        if sink is not None:
            try:
                status = sink.finish(dataset)
            except Exception:  # PS3.4 B.2.3: 0xC000-0xCFFF cannot understand; never leave the peer waiting
                log.exception("C-STORE handler failed")
                status = 0xC211
        try:
            dataset.release()  # a handler that kept the view fails loudly instead of reading the next one
        except BufferError:  # something holds an export of it: leave this buffer to it
            self._buf = bytearray(len(self._buf))
            self._view = memoryview(self._buf)
        if len(self._buf) > KEEP_BUFFER:
            self._view.release()
            self._buf = bytearray(1024 * 1024)
            self._view = memoryview(self._buf)
        code, comment = status_of(status)
        if code == 0x0000:
            self.stored += 1
        self._respond(store_response(message_id=_u16(fields, 0x0110) or 0, sop_class_uid=_uid(fields, 0x0002),
                                     sop_instance_uid=_uid(fields, 0x1000), status=code, error_comment=comment))

    def _respond(self, command: bytes) -> None:
        """Send a command set as the last (and only, unless the peer's maximum PDU is smaller) fragment."""
        cap = self.peer_max_pdu - 6 if self.peer_max_pdu else len(command)
        cap = max(cap, 1)
        parts = []
        for start in range(0, len(command), cap):
            chunk = command[start:start + cap]
            last = 0x03 if start + cap >= len(command) else 0x01
            parts.append(_PDU.pack(P_DATA_TF, 6 + len(chunk)) + _PDV.pack(2 + len(chunk), self._context, last) + chunk)
        self._send(b"".join(parts))
