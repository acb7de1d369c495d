"""Storage Commitment Push Model SCP (DICOM PS3.4 Annex J; IHE RAD-10 "Storage Commitment").

A modality asks, with N-ACTION (Action Type 1, "Request Storage Commitment"), that the hub take responsibility
for the SOP instances it lists (Transaction UID, Referenced SOP Sequence).  The hub answers the N-ACTION at
once (0000: request accepted) and, once everything received so far is indexed, reports the result with
N-EVENT-REPORT on an association of its own to the requestor (PS3.4 J.3.3.2: the SCP is the
association-requestor and proposes the SCP role through SCP/SCU Role Selection): Event Type 1 when every
instance is committed, 2 with the Failed SOP Sequence otherwise (Failure Reason 0112 "No such object
instance", 0119 "Class / Instance conflict").  The requestor must be a node of ``actors.dicom.nodes``
(AE title, host, port): an unknown requestor gets N-ACTION status 0110 with that advice, not a silent loss.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE, build_role
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy import Engine, select

from ihehub.dicom import tables as t
from ihehub.dicom.settings import DicomSettings

log = logging.getLogger("ihehub.dicom.commitment")

INSTANCE_UID = "1.2.840.10008.1.20.1.1"  # the well-known Storage Commitment Push Model SOP Instance
NO_SUCH_OBJECT = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
PROCESSING_FAILURE = 0x0110
NO_SUCH_ACTION = 0x0123
INVALID_ARGUMENT = 0x0115


class StorageCommitment:
    """The N-ACTION handler and the N-EVENT-REPORT sender of one image manager."""

    def __init__(self, *, engine: Engine, settings: DicomSettings, flush: Any,
                 client_ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0) -> None:
        self.engine = engine
        self.settings = settings
        self.flush = flush  # () -> bool: wait until every received instance is indexed
        self.client_ssl_context = client_ssl_context
        self.timeout = timeout
        self.reports: list[tuple[str, int]] = []  # (transaction UID, event type) sent, for operators and tests

    # -- N-ACTION ---------------------------------------------------------------------------------
    def on_action(self, event: Any) -> tuple[int | Dataset, Dataset | None]:
        """EVT_N_ACTION: check the request, accept it, report later on a thread of its own."""
        if event.request.ActionTypeID != 1:
            return NO_SUCH_ACTION, None
        try:
            info = event.action_information
            transaction = str(info.TransactionUID)
            refs = [(str(r.ReferencedSOPClassUID), str(r.ReferencedSOPInstanceUID))
                    for r in info.ReferencedSOPSequence]
        except Exception as exc:
            log.warning("storage commitment from %s: bad request: %s", event.assoc.requestor.ae_title, exc)
            return INVALID_ARGUMENT, None
        calling = str(event.assoc.requestor.ae_title).strip()
        node = self.settings.node(calling)
        if node is None or node.host is None or node.port is None:
            log.warning("storage commitment from %s refused: not a node with an address in actors.dicom.nodes",
                        calling)
            status = Dataset()
            status.Status = PROCESSING_FAILURE
            status.ErrorComment = "requestor unknown: add it to actors.dicom.nodes"
            return status, None
        threading.Thread(target=self._report, args=(node, transaction, refs), daemon=True,
                         name=f"stgcmt-{transaction[-12:]}").start()
        return 0x0000, None

    # -- N-EVENT-REPORT ---------------------------------------------------------------------------
    def result(self, refs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str, int]]]:
        """(committed, failed with reason) for the referenced instances, from the index."""
        uids = [u for _, u in refs]
        with self.engine.connect() as conn:
            known = dict(conn.execute(select(t.instances.c.sop_instance_uid, t.instances.c.sop_class_uid)
                                      .where(t.instances.c.sop_instance_uid.in_(uids))).all()) if uids else {}
        ok, failed = [], []
        for cls, uid in refs:
            if uid not in known:
                failed.append((cls, uid, NO_SUCH_OBJECT))
            elif known[uid] != cls:
                failed.append((cls, uid, CLASS_INSTANCE_CONFLICT))
            else:
                ok.append((cls, uid))
        return ok, failed

    def _report(self, node: Any, transaction: str, refs: list[tuple[str, str]]) -> None:
        time.sleep(0.1)  # the N-ACTION response goes out first
        self.flush()
        ok, failed = self.result(refs)
        ds = Dataset()
        ds.TransactionUID = transaction
        ds.ReferencedSOPSequence = DicomSequence([_ref(c, u) for c, u in ok])
        if failed:
            ds.FailedSOPSequence = DicomSequence([_ref(c, u, reason) for c, u, reason in failed])
        event_type = 2 if failed else 1
        ae = AE(ae_title=self.settings.ae_title)
        ae.add_requested_context(StorageCommitmentPushModel)
        for attempt in range(3):
            try:
                assoc = ae.associate(node.host, node.port, ae_title=node.ae_title,
                                     ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
                                     tls_args=(self.client_ssl_context, node.host) if node.tls and
                                     self.client_ssl_context is not None else None)
                if not assoc.is_established:
                    raise ConnectionError("association rejected or aborted")
                try:
                    status, _ = assoc.send_n_event_report(ds, event_type, StorageCommitmentPushModel, INSTANCE_UID)
                finally:
                    assoc.release()
                if status is None or int(getattr(status, "Status", 0xFFFF)) != 0:
                    raise ConnectionError(f"N-EVENT-REPORT answered {getattr(status, 'Status', None)}")
                self.reports.append((transaction, event_type))
                log.info("storage commitment %s reported to %s: %d committed, %d failed", transaction,
                         node.ae_title, len(ok), len(failed))
                return
            except Exception as exc:
                log.warning("storage commitment %s: report to %s failed (attempt %d): %s", transaction,
                            node.ae_title, attempt + 1, exc)
                time.sleep(2 ** attempt)
        log.error("storage commitment %s: the report to %s could not be delivered", transaction, node.ae_title)


def _ref(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item
