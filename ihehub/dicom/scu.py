"""Storage SCU: send stored instances to another AE as they are on disk (PS3.4 B.2, PS3.7 9.1.1 C-STORE).

`StorageSCU` opens one association per batch (`StorageSCU.send`), proposes for each SOP class the transfer
syntax its files are stored in (PS3.8 9.3.2.2 presentation contexts), and sends each file's data set bytes
unchanged when that context is accepted.  Only an uncompressed (or deflated) file may be converted, to
whichever uncompressed syntax the peer accepted; a compressed file without its own context fails with
``0x0122`` (SOP Class not supported, PS3.7 C.5.8) rather than being decompressed.  Every instance gets a
`SendResult` with the peer's status (PS3.4 B.2.3); a failure of one does not stop the batch.

`store_on` runs one C-STORE on an association that is already open: the batch above, or a C-GET's
association, where the peer took the Storage SCP role (PS3.4 C.4.3, SCP/SCU Role Selection PS3.7 D.3.3.4).

Every association socket gets TCP_NODELAY (`ihehub.dicom.transport.tune_socket`), and the DUL thread does not
sleep between polls while a C-STORE waits for its response (`ihehub.dicom.transport.mark_active`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import ssl
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext, build_context

from ihehub.dicom.settings import DicomNode
from ihehub.dicom.transport import adapt_dul, keep_responses, mark_active, tune_socket

__all__ = [
    "MAX_CONTEXTS",
    "NOT_SUPPORTED",
    "SUB_OPERATION_FAILED",
    "AssociationFailed",
    "SendResult",
    "StorageSCU",
    "StoredFile",
    "contexts_for",
    "read_stored",
    "store_on",
]

log = logging.getLogger("ihehub.dicom")

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd presentation context IDs 1-255
NOT_SUPPORTED = 0x0122  # PS3.7 C.5.8 Refused: SOP Class not supported (no usable presentation context)
SUB_OPERATION_FAILED = 0xA702  # PS3.4 C.4.2.1.5: unable to perform sub-operations (no response, aborted)
CANNOT_READ = 0xC000  # our own failure before sending: the stored file cannot be read
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class AssociationFailed(Exception):
    """The peer could not be reached, rejected the association or accepted none of the contexts."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StoredFile:
    """A Part 10 file: its identity from the File Meta Information and where its data set starts."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    offset: int

    @property
    def compressed(self) -> bool:
        return bool(UID(self.transfer_syntax).is_compressed)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SendResult:
    """The outcome of one C-STORE: the peer's status (PS3.4 B.2.3) or ours when it was not sent."""

    sop_instance_uid: str
    sop_class_uid: str
    status: int
    comment: str | None = None
    path: Path | None = None
    transfer_syntax: str | None = None  # what went on the wire
    converted: bool = False

    @property
    def success(self) -> bool:
        return self.status == 0x0000

    @property
    def warning(self) -> bool:
        """B000/B007/B006 coercion or elements discarded, 0001 (PS3.4 B.2.3, PS3.7 C.4)."""
        return self.status == 0x0001 or 0xB000 <= self.status <= 0xBFFF

    @property
    def failed(self) -> bool:
        return not (self.success or self.warning)

    def as_dict(self) -> dict[str, Any]:
        return {"sop_instance_uid": self.sop_instance_uid, "sop_class_uid": self.sop_class_uid,
                "status": f"{self.status:04X}", "comment": self.comment, "transfer_syntax": self.transfer_syntax,
                "converted": self.converted}


def read_stored(path: Path) -> StoredFile:
    """The File Meta Information of ``path`` (PS3.10 7.1); `ValueError` when it is not a usable Part 10 file."""
    with open(path, "rb") as fp:
        try:
            read_preamble(fp, False)
            meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                                stop_when=lambda tag, vr, length: tag.group != 2)
        except Exception as exc:
            raise ValueError(f"{path.name}: not a DICOM Part 10 file ({exc})") from exc
        offset = fp.tell()
    missing = [k for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
               if not meta.get(k)]
    if missing:
        raise ValueError(f"{path.name}: File Meta Information lacks {', '.join(missing)}")
    return StoredFile(path=Path(path), sop_class_uid=str(meta.MediaStorageSOPClassUID).strip(),
                      sop_instance_uid=str(meta.MediaStorageSOPInstanceUID).strip(),
                      transfer_syntax=str(meta.TransferSyntaxUID).strip(), offset=offset)


def _syntaxes(transfer_syntax: str) -> list[str]:
    """What to propose for a file in ``transfer_syntax``: itself, plus the uncompressed ones it converts to."""
    if UID(transfer_syntax).is_compressed:
        return [transfer_syntax]
    return list(dict.fromkeys([transfer_syntax, *UNCOMPRESSED]))


def contexts_for(files: Iterable[StoredFile]) -> list[PresentationContext]:
    """One presentation context per (SOP class, proposed syntaxes) of ``files``, in first-seen order."""
    seen: dict[tuple[str, tuple[str, ...]], PresentationContext] = {}
    for f in files:
        key = (f.sop_class_uid, tuple(_syntaxes(f.transfer_syntax)))
        if key not in seen:
            seen[key] = build_context(f.sop_class_uid, list(key[1]))
    return list(seen.values())


def _choose(assoc: Association, f: StoredFile) -> tuple[PresentationContext | None, bool]:
    """The accepted context to send ``f`` on (one where we may act as Storage SCU) and whether its data set
    must be converted."""
    usable = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == f.sop_class_uid and cx.as_scu]
    for cx in usable:
        if cx.transfer_syntax[0] == f.transfer_syntax:
            return cx, False
    if f.compressed:
        return None, False
    for cx in usable:
        ts = cx.transfer_syntax[0]
        if not ts.is_compressed and not ts.is_deflated:
            return cx, True
    return None, False


def _dataset_bytes(f: StoredFile, target: UID | None) -> bytes:
    """The data set of ``f`` as stored, or re-encoded in the uncompressed ``target`` syntax."""
    with open(f.path, "rb") as fp:
        if target is None:
            fp.seek(f.offset)
            return fp.read()
        ds = dcmread(fp, force=True)
    raw = encode(ds, target.is_implicit_VR, target.is_little_endian, target.is_deflated)
    if raw is None:
        raise ValueError(f"cannot encode {f.sop_instance_uid} in {target.name}")
    return raw


def store_on(assoc: Association, f: StoredFile, *, message_id: int,
             move_originator: tuple[str, int] | None = None) -> SendResult:
    """Send ``f`` as a C-STORE request on ``assoc`` and wait for its response (PS3.7 9.1.1); run it on the
    association's own thread (a C-GET handler) or inside `paused`.

    The context must let us act as Storage SCU: any context of our own associations, on a C-GET association
    only those where the peer took the SCP role (SCP/SCU Role Selection).  ``move_originator`` is the (AE title,
    Message ID) of the C-MOVE this sub-operation serves (PS3.7 9.1.1.1.7-8)."""
    base = SendResult(sop_instance_uid=f.sop_instance_uid, sop_class_uid=f.sop_class_uid, status=0, path=f.path)
    cx, convert = _choose(assoc, f)
    if cx is None:
        return dataclasses.replace(base, status=NOT_SUPPORTED,
                                   comment=f"No accepted context for {f.sop_class_uid} in {f.transfer_syntax}"[:64])
    ts = cx.transfer_syntax[0]
    try:
        data = _dataset_bytes(f, ts if convert else None)
    except Exception as exc:
        return dataclasses.replace(base, status=CANNOT_READ, comment=f"Cannot read: {type(exc).__name__}: {exc}"[:64])
    req = C_STORE()
    req.MessageID = message_id & 0xFFFF
    req.AffectedSOPClassUID = f.sop_class_uid
    req.AffectedSOPInstanceUID = f.sop_instance_uid
    req.Priority = 2
    if move_originator is not None:
        req.MoveOriginatorApplicationEntityTitle = move_originator[0]
        req.MoveOriginatorMessageID = move_originator[1] & 0xFFFF
    req.DataSet = io.BytesIO(data)
    rsp = _exchange(assoc, req, cast(int, cx.context_id))
    sent = dataclasses.replace(base, transfer_syntax=str(ts), converted=convert)
    if rsp is None:
        return dataclasses.replace(sent, status=SUB_OPERATION_FAILED,
                                   comment="No C-STORE response (timeout or association lost)")
    status = int(rsp.Status) if rsp.Status is not None else SUB_OPERATION_FAILED
    comment = str(rsp.ErrorComment) if getattr(rsp, "ErrorComment", None) else None
    return dataclasses.replace(sent, status=status, comment=comment)


def _exchange(assoc: Association, req: C_STORE, context_id: int) -> C_STORE | None:
    """Send ``req`` and wait (up to the association's DIMSE timeout) for its response.  Nothing else may read
    the association's DIMSE queue meanwhile: see `paused`."""
    if not assoc.is_established:
        return None
    mark_active(assoc)
    assoc.dimse.send_msg(req, context_id)
    while True:
        mark_active(assoc)
        _, rsp = assoc.dimse.get_msg(block=True)
        if rsp is None:
            return None
        if isinstance(rsp, C_STORE) and rsp.MessageIDBeingRespondedTo == req.MessageID:
            return rsp
        log.warning("unexpected %s while waiting for a C-STORE response; ignored", type(rsp).__name__)


@contextlib.contextmanager
def paused(assoc: Association) -> Iterator[None]:
    """Hold the association reactor of our own (requestor) association so that it does not take C-STORE
    responses off the DIMSE queue, for a whole batch (``Association.send_c_store`` pauses it per message,
    which races with fast responses: the reactor may wake once more after the pause flag went up)."""
    assoc._reactor_checkpoint.clear()
    try:
        while assoc.is_established and not assoc._is_paused:
            time.sleep(0.0001)
        time.sleep(0.002)  # a reactor that saw the flag set just before the clear finishes its turn
        while assoc.is_established and not assoc._is_paused:
            time.sleep(0.0001)
        yield
    finally:
        assoc._reactor_checkpoint.set()


class StorageSCU:
    """Sends stored instances to ``node`` as ``calling_ae``; TLS when ``node.tls`` (``ssl_context`` required).

    ``timeout`` bounds connecting, the association negotiation and each C-STORE response (seconds)."""

    def __init__(self, *, calling_ae: str, node: DicomNode, ssl_context: ssl.SSLContext | None = None,
                 timeout: float = 30.0, max_pdu: int = 0) -> None:
        if node.host is None or node.port is None:
            raise ValueError(f"node {node.name} has no host and port to send to")
        if node.tls and ssl_context is None:
            raise ValueError(f"node {node.name} requires TLS but no TLS client context was given")
        self.calling_ae = calling_ae
        self.node = node
        self.ssl_context = ssl_context if node.tls else None
        self.timeout = timeout
        self.max_pdu = max_pdu

    def send(self, paths: Iterable[Path | StoredFile], *, move_originator: tuple[str, int] | None = None,
             cancelled: Callable[[], bool] | None = None) -> Generator[SendResult, None, None]:
        """Send every file, one association per `MAX_CONTEXTS` distinct presentation contexts; yields one
        result per file in order.  `AssociationFailed` when the peer cannot be associated with (before the
        first result of an association); the caller may stop iterating at any time (cancel)."""
        files: list[StoredFile | SendResult] = []
        for p in paths:
            if isinstance(p, StoredFile):
                files.append(p)
                continue
            try:
                files.append(read_stored(Path(p)))
            except (OSError, ValueError) as exc:
                files.append(SendResult(sop_instance_uid="", sop_class_uid="", status=CANNOT_READ, path=Path(p),
                                        comment=str(exc)[:64]))
        for batch in _batches(files):
            stored = [f for f in batch if isinstance(f, StoredFile)]
            assoc = self._associate(contexts_for(stored)) if stored else None
            try:
                with paused(assoc) if assoc is not None else contextlib.nullcontext():
                    for msg_id, item in enumerate(batch, start=1):
                        if cancelled is not None and cancelled():
                            return
                        if isinstance(item, SendResult):
                            yield item
                        else:
                            yield store_on(cast(Association, assoc), item, message_id=msg_id,
                                           move_originator=move_originator)
            finally:
                if assoc is not None:
                    _close(assoc)

    def send_all(self, paths: Iterable[Path | StoredFile], **kwargs: Any) -> list[SendResult]:
        return list(self.send(paths, **kwargs))

    def _associate(self, contexts: list[PresentationContext]) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.timeout
        ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        ae.maximum_pdu_size = self.max_pdu
        node = cast(DicomNode, self.node)
        tls_args = (self.ssl_context, cast(str, node.host)) if self.ssl_context is not None else None
        assoc = ae.associate(cast(str, node.host), cast(int, node.port), contexts, ae_title=node.ae_title,
                             tls_args=tls_args, evt_handlers=[(evt.EVT_CONN_OPEN, _on_conn_open)])
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            _close(assoc)
            raise AssociationFailed(f"association with {node.ae_title} at {node.host}:{node.port} {why}")
        if not assoc.accepted_contexts:
            _close(assoc)
            raise AssociationFailed(f"{node.ae_title} accepted none of the {len(contexts)} presentation contexts")
        return assoc


def _on_conn_open(event: evt.Event) -> None:
    tune_socket(event.assoc)
    adapt_dul(event.assoc)
    keep_responses(event.assoc)


def _close(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
    elif not (assoc.is_aborted or assoc.is_rejected or assoc.is_released):
        assoc.abort()
    sock = assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.close()


def _batches(items: list[StoredFile | SendResult]) -> Iterator[list[StoredFile | SendResult]]:
    """Split ``items`` so that no association needs more than `MAX_CONTEXTS` presentation contexts."""
    batch: list[StoredFile | SendResult] = []
    keys: set[tuple[str, tuple[str, ...]]] = set()
    for item in items:
        if isinstance(item, StoredFile):
            key = (item.sop_class_uid, tuple(_syntaxes(item.transfer_syntax)))
            if key not in keys and len(keys) >= MAX_CONTEXTS:
                yield batch
                batch, keys = [], set()
            keys.add(key)
        batch.append(item)
    if batch:
        yield batch
