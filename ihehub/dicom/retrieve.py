"""Query/Retrieve C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3): Patient Root and Study Root, STUDY/SERIES/IMAGE
levels (and PATIENT in Patient Root).

The instances of a request are found with the C-FIND matching of `ihehub.dicom.query` (its identifier read
as a C-FIND identifier of the same level), then sent as they are stored (`ihehub.dicom.scu`):

* **C-MOVE**: the Move Destination (0000,0600) is looked up in the nodes registry; an unknown title, or a
  node without host and port, is answered ``A801`` "Move destination unknown".  The sub-operations run on one
  association to that node, carrying Move Originator AE Title and Message ID (PS3.7 9.1.1.1.7-8).
* **C-GET**: the sub-operations are C-STOREs on the requesting association, on the storage contexts where
  the requestor took the SCP role (SCP/SCU Role Selection, PS3.7 D.3.3.4).

After each sub-operation a Pending (FF00) response carries the Number of Remaining, Completed, Failed and
Warning Sub-operations; a C-CANCEL stops before the next sub-operation with Cancel (FE00).  The final status
is Success (0000), Warning (B000) when some sub-operations failed or warned, or ``A702`` when all failed,
with the Failed SOP Instance UID List (0008,0058) in the identifier (PS3.4 C.4.2.1.5, C.4.2.3.1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Callable, Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import Engine, select

from ihehub.dicom import query as q
from ihehub.dicom import tables as t
from ihehub.dicom.scu import (
    SUB_OPERATION_FAILED,
    AssociationFailed,
    SendResult,
    StorageSCU,
    read_stored,
    store_on,
)
from ihehub.dicom.settings import DicomSettings

__all__ = ["GET_MODELS", "MOVE_MODELS", "MoveStats", "RetrieveError", "Retriever", "locate"]

log = logging.getLogger("ihehub.dicom")

MOVE_MODELS = {
    PatientRootQueryRetrieveInformationModelMove: q.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelMove: q.STUDY_ROOT,
}
GET_MODELS = {
    PatientRootQueryRetrieveInformationModelGet: q.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelGet: q.STUDY_ROOT,
}
SUCCESS, WARNING, PENDING, CANCEL = 0x0000, 0xB000, 0xFF00, 0xFE00
DESTINATION_UNKNOWN = 0xA801
TOO_MANY = 0xA701  # out of resources: unable to calculate the number of matches (US counts: at most 65535)
UNABLE_TO_PROCESS = 0xC000
_CHUNK = 500


class RetrieveError(Exception):
    """The request cannot be served; ``status`` is the C-MOVE/C-GET failure status to answer."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]


@dataclasses.dataclass(slots=True)
class MoveStats:
    """Sub-operation counts of one C-MOVE or C-GET (PS3.4 C.4.2.1.5)."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = dataclasses.field(default_factory=list)

    def count(self, result: SendResult) -> None:
        self.remaining -= 1
        if result.success:
            self.completed += 1
        elif result.warning:
            self.warning += 1
        else:
            self.failed += 1
            if result.sop_instance_uid:
                self.failed_uids.append(result.sop_instance_uid)


def locate(engine: Engine, root: Path, identifier: Dataset, *, model: str,
           limit: int = 65535, patients: q.ScopeLookup | None = None) -> list[Path]:
    """The files of the instances ``identifier`` names (PS3.4 C.4.2.2.1: the level and its unique keys, or
    keys of the levels above), in series and instance number order; `RetrieveError` when it cannot be read.
    With ``patients`` (the EMPI link) the identifier matches as in C-FIND: a PATIENT-level request for a
    surviving Patient ID retrieves the studies received under the ids merged into it."""
    try:
        query = q.FindQuery.parse(identifier, root=model)
    except q.FindError as exc:
        raise RetrieveError(exc.status, exc.comment) from exc
    if patients is not None and query.level == 0:  # the studies of the patient(s), linked rows included
        query = dataclasses.replace(query, level=1)
    unique = q.UNIQUE[query.level]
    i, st, p = t.instances, t.studies, t.patients
    with engine.connect() as conn:
        keys = {(str(v.get(unique) or ""), str(v.get("IssuerOfPatientID") or ""))
                for v in q.find(conn, query, limit=10 * limit, patients=patients)}
        paths: list[Path] = []
        key_list = sorted(keys)
        for start in range(0, len(key_list), _CHUNK):
            chunk = key_list[start:start + _CHUNK]
            stmt = select(i.c.path).order_by(i.c.study_uid, i.c.series_uid, i.c.instance_number,
                                             i.c.sop_instance_uid)
            if query.level == 0:
                stmt = stmt.select_from(i.join(st, st.c.study_uid == i.c.study_uid)
                                        .join(p, p.c.id == st.c.patient_pk))
                rows = conn.execute(stmt.where(p.c.patient_id.in_([k for k, _ in chunk]))
                                    .add_columns(p.c.patient_id, p.c.issuer))
                paths += [root / r.path for r in rows if (r.patient_id, r.issuer) in keys]
            else:
                column = {1: i.c.study_uid, 2: i.c.series_uid, 3: i.c.sop_instance_uid}[query.level]
                paths += [root / r.path for r in conn.execute(stmt.where(column.in_([k for k, _ in chunk])))]
            if len(paths) > limit:
                raise RetrieveError(TOO_MANY, f"More than {limit} instances match; narrow the request")
    return paths


class Retriever:
    """Serves C-MOVE and C-GET requests of the image manager's associations (`RetrieveHandler` of
    `ihehub.dicom.transport`).  ``client_ssl_context`` is used for Move Destinations with ``tls: true``."""

    def __init__(self, *, engine: Engine, root: Path, settings: DicomSettings,
                 client_ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0,
                 on_sent: Callable[[Association, str, str | None, list[SendResult]], None] | None = None) -> None:
        self.engine = engine
        self.root = root
        self.settings = settings
        self.client_ssl_context = client_ssl_context
        self.timeout = timeout
        self.patients: q.ScopeLookup | None = None  # the EMPI link (ImageManager.link_patients)
        # (requesting association, destination AE, destination host, the sub-operations' results): the audit
        self.on_sent = on_sent

    def __call__(self, assoc: Association, req: C_MOVE | C_GET, cx: PresentationContext) -> None:
        if isinstance(req, C_MOVE):
            self.move(assoc, req, cx)
        else:
            self.get(assoc, req, cx)

    # -- C-MOVE -----------------------------------------------------------------------------------
    def move(self, assoc: Association, req: C_MOVE, cx: PresentationContext) -> None:
        """PS3.4 C.4.2.3: find, associate with the Move Destination, send, report each sub-operation."""
        reply = _Replier(assoc, req, cx)
        destination = str(req.MoveDestination or "").strip()
        node = self.settings.node(destination)
        if node is None or node.host is None or node.port is None:
            log.warning("C-MOVE from %s to unknown destination %r", assoc.requestor.ae_title, destination)
            reply.final(DESTINATION_UNKNOWN, None, comment="Move destination unknown")
            return
        files = self._files(reply, model=MOVE_MODELS.get(str(req.AffectedSOPClassUID), q.STUDY_ROOT))
        if files is None:
            return
        stats = MoveStats(remaining=len(files))
        if not files:
            reply.final(SUCCESS, stats)
            return
        try:
            scu = StorageSCU(calling_ae=self.settings.ae_title, node=node, ssl_context=self.client_ssl_context,
                             timeout=self.timeout)
            results = scu.send(files, move_originator=(str(assoc.requestor.ae_title).strip(), int(req.MessageID or 0)),
                               cancelled=lambda: reply.cancelled)
            try:
                sent = self._run(reply, stats, results)
            finally:
                results.close()  # releases the association to the destination at once, even when the mover left
            self._sent(assoc, node.ae_title, node.host, sent)
        except (AssociationFailed, ValueError) as exc:
            log.warning("C-MOVE to %s: %s", destination, exc)
            for path in files[len(files) - stats.remaining:]:  # PS3.4 C.4.2.1.5: the Failed SOP Instance UID List
                with contextlib.suppress(OSError, ValueError):
                    stats.failed_uids.append(read_stored(path).sop_instance_uid)
            stats.failed += stats.remaining
            stats.remaining = 0
            partly = stats.completed or stats.warning  # an association lost after some sub-operations
            reply.final(WARNING if partly else SUB_OPERATION_FAILED, stats, comment=str(exc))

    # -- C-GET ------------------------------------------------------------------------------------
    def get(self, assoc: Association, req: C_GET, cx: PresentationContext) -> None:
        """PS3.4 C.4.3.3: the same, with the C-STOREs on the requesting association."""
        reply = _Replier(assoc, req, cx)
        paths = self._files(reply, model=GET_MODELS.get(str(req.AffectedSOPClassUID), q.STUDY_ROOT))
        if paths is None:
            return
        stats = MoveStats(remaining=len(paths))
        base = int(req.MessageID or 0)

        def results() -> Iterator[SendResult]:
            for n, path in enumerate(paths, start=1):
                if reply.cancelled:
                    return
                try:
                    f = read_stored(path)
                except (OSError, ValueError) as exc:
                    yield SendResult(sop_instance_uid="", sop_class_uid="", status=UNABLE_TO_PROCESS, path=path,
                                     comment=str(exc)[:64])
                    continue
                yield store_on(assoc, f, message_id=base + n)

        sent = self._run(reply, stats, results())
        self._sent(assoc, str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address), sent)

    # -- shared -----------------------------------------------------------------------------------
    def _files(self, reply: _Replier, *, model: str) -> list[Path] | None:
        try:
            identifier = reply.identifier()
            return locate(self.engine, self.root, identifier, model=model, patients=self.patients)
        except RetrieveError as exc:
            reply.final(exc.status, None, comment=exc.comment)
        except Exception as exc:
            log.exception("retrieve: cannot find the instances")
            reply.final(UNABLE_TO_PROCESS, None, comment=f"Unable to process: {type(exc).__name__}")
        return None

    def _sent(self, assoc: Association, ae_title: str, host: str | None, sent: list[SendResult]) -> None:
        if self.on_sent is not None and sent:
            try:
                self.on_sent(assoc, ae_title, host, sent)
            except Exception:  # the audit never fails a retrieve
                log.exception("retrieve: the transfer audit failed")

    def _run(self, reply: _Replier, stats: MoveStats, results: Iterable[SendResult]) -> list[SendResult]:
        """Send, report pending counts, then the final status; returns the results of the sub-operations."""
        done: list[SendResult] = []
        for result in results:
            done.append(result)
            stats.count(result)
            if result.failed:
                log.info("retrieve sub-operation for %s failed: %04X %s", result.sop_instance_uid, result.status,
                         result.comment or "")
            if not reply.assoc.is_established:
                return done
            if stats.remaining:
                reply.pending(stats)
        if reply.cancelled or stats.remaining:
            reply.final(CANCEL, stats)
            return done
        if stats.failed and not stats.completed and not stats.warning:
            reply.final(SUB_OPERATION_FAILED, stats)
        elif stats.failed or stats.warning:
            reply.final(WARNING, stats)
        else:
            reply.final(SUCCESS, stats)
        return done


class _Replier:
    """Builds and sends the responses of one C-MOVE or C-GET request (PS3.7 9.1.3.1, 9.1.4.1)."""

    def __init__(self, assoc: Association, req: C_MOVE | C_GET, cx: PresentationContext) -> None:
        self.assoc = assoc
        self.req = req
        self.cx = cx
        self.ts = cx.transfer_syntax[0]
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        """True once a C-CANCEL for this request arrived (PS3.7 9.3.2.3)."""
        if not self._cancelled and self.req.MessageID in self.assoc.dimse.cancel_req:
            self._cancelled = True
        return self._cancelled

    def identifier(self) -> Dataset:
        try:
            return cast(Dataset, decode(cast(BytesIO, self.req.Identifier), self.ts.is_implicit_VR,
                                        self.ts.is_little_endian, self.ts.is_deflated))
        except Exception as exc:
            raise RetrieveError(UNABLE_TO_PROCESS, f"Cannot decode the identifier: {type(exc).__name__}") from exc

    def pending(self, stats: MoveStats) -> None:
        self._send(PENDING, stats, final=False)

    def final(self, status: int, stats: MoveStats | None, *, comment: str | None = None) -> None:
        self._send(status, stats, final=True, comment=comment)

    def _send(self, status: int, stats: MoveStats | None, *, final: bool, comment: str | None = None) -> None:
        if not self.assoc.is_established:
            return
        rsp: Any = C_MOVE() if isinstance(self.req, C_MOVE) else C_GET()
        rsp.MessageIDBeingRespondedTo = self.req.MessageID
        rsp.AffectedSOPClassUID = self.req.AffectedSOPClassUID
        rsp.Status = status
        if comment and status not in (SUCCESS, PENDING, CANCEL):
            rsp.ErrorComment = comment[:64]
        if stats is not None:
            if not final or status == CANCEL:
                rsp.NumberOfRemainingSuboperations = stats.remaining
            rsp.NumberOfCompletedSuboperations = stats.completed
            rsp.NumberOfFailedSuboperations = stats.failed
            rsp.NumberOfWarningSuboperations = stats.warning
            if final and status not in (SUCCESS, PENDING) and (stats.failed_uids or status == CANCEL):
                ds = Dataset()
                ds.FailedSOPInstanceUIDList = stats.failed_uids
                rsp.Identifier = BytesIO(cast(bytes, encode(ds, self.ts.is_implicit_VR, self.ts.is_little_endian,
                                                            self.ts.is_deflated)))
        self.assoc.dimse.send_msg(rsp, cast(int, self.cx.context_id))
