"""The image manager's audit trail (DICOM PS3.15 A.5.3; IHE ITI TF-2a 3.20 for the transport).

* **DICOM Instances Transferred** (DCM 110104, A.5.3.4): instances received by C-STORE are reported once per
  association when it ends (action C, the sender as Source, this AE as Destination), with every study and
  its SOP instances by SOP class and the patient; instances sent for a C-MOVE or C-GET once per request
  (action R, this AE as Source, the Move Destination or the C-GET requestor as Destination).  A
  transfer with failed instances has outcome 4 (minor failure).
* **Query** (DCM 110112, A.5.3.11): each C-FIND, with the identifier as received (base64 in the message), the
  SOP class of the information model and the transfer syntax; outcome 4 when it could not be decoded.

The audits go to the hub's `AuditContext` (`emit` never raises); anything unexpected here is logged and never
fails the DIMSE service.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.filereader import dcmread, read_dataset
from pydicom.tag import BaseTag, Tag

log = logging.getLogger("ihehub.dicom.audit")

_PATIENT_TAGS: list[BaseTag | int] = [Tag(0x0010, 0x0020), Tag(0x0010, 0x0021)]  # PatientID, IssuerOfPatientID


def _patient_cx(ds: Any) -> str | None:
    pid = str(getattr(ds, "PatientID", "") or "").strip()
    if not pid:
        return None
    issuer = str(getattr(ds, "IssuerOfPatientID", "") or "").strip()
    return f"{pid}^^^{issuer}" if issuer else pid


def patient_of_dataset(data: bytes, *, implicit: bool, little_endian: bool) -> str | None:
    """Patient ID (and issuer, as a CX) of a plain data set's bytes, reading only those two elements."""
    try:
        ds = read_dataset(BytesIO(data), implicit, little_endian, specific_tags=_PATIENT_TAGS)
    except Exception:
        return None
    return _patient_cx(ds)


def patient_of_file(path: Path) -> str | None:
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_PATIENT_TAGS)
    except Exception:
        return None
    return _patient_cx(ds)


class _Transfer:
    def __init__(self, calling: str, peer: str | None) -> None:
        self.calling = calling
        self.peer = peer
        self.studies: dict[str, dict[str, list[str]]] = {}
        self.patients: list[str] = []


class DimseAudit:
    """Collects what an association did and emits its audits through ``audit`` (an `AuditContext`)."""

    def __init__(self, audit: Any, ae_title: str) -> None:
        self.audit = audit
        self.ae_title = ae_title
        self._open: dict[int, _Transfer] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _peer(assoc: Any) -> tuple[str, str | None]:
        return str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address or "") or None

    # -- C-STORE received ---------------------------------------------------------------------------
    def stored(self, assoc: Any, stored: Any) -> None:
        """One instance received on ``assoc`` (a `StoredInstance`)."""
        try:
            key = id(assoc)
            with self._lock:
                t = self._open.get(key)
                if t is None:
                    t = self._open[key] = _Transfer(*self._peer(assoc))
                new_study = stored.study_uid not in t.studies
                t.studies.setdefault(stored.study_uid, {}).setdefault(stored.sop_class_uid, []).append(
                    stored.sop_instance_uid)
            if new_study:
                patient = patient_of_dataset(stored.dataset, implicit=stored.implicit,
                                             little_endian=stored.little_endian)
                if patient:
                    with self._lock:
                        if patient not in t.patients:
                            t.patients.append(patient)
        except Exception:
            log.exception("audit: could not note a received instance")

    def closed(self, assoc: Any) -> None:
        """The association ended: one DICOM Instances Transferred audit for what it brought."""
        with self._lock:
            t = self._open.pop(id(assoc), None)
        if t is None or not t.studies:
            return
        self._transferred(side="destination", source_ae=t.calling, source_host=t.peer, dest_ae=self.ae_title,
                          dest_host=None, studies=t.studies, patients=t.patients, outcome=0)

    # -- C-MOVE / C-GET sent ------------------------------------------------------------------------
    def sent(self, assoc: Any, dest_ae: str, dest_host: str | None, results: Sequence[Any]) -> None:
        """The sub-operations of one C-MOVE (to ``dest_ae``) or C-GET (back to the requestor)."""
        studies: dict[str, dict[str, list[str]]] = {}
        patients: list[str] = []
        failed = False
        seen: set[str] = set()
        for r in results:
            if not getattr(r, "success", False) and not getattr(r, "warning", False):
                failed = True
                continue
            path = getattr(r, "path", None)
            study = Path(path).parent.parent.name if path is not None else ""
            if not study or not r.sop_instance_uid:
                continue
            studies.setdefault(study, {}).setdefault(r.sop_class_uid, []).append(r.sop_instance_uid)
            if study not in seen and path is not None:
                seen.add(study)
                patient = patient_of_file(Path(path))
                if patient and patient not in patients:
                    patients.append(patient)
        if studies:
            requestor, _ = self._peer(assoc)
            self._transferred(side="source", source_ae=self.ae_title, source_host=None, dest_ae=dest_ae,
                              dest_host=dest_host, studies=studies, patients=patients, outcome=4 if failed else 0,
                              requestor=requestor)

    def _transferred(self, *, side: str, source_ae: str, source_host: str | None, dest_ae: str,
                     dest_host: str | None, studies: dict[str, dict[str, list[str]]], patients: list[str],
                     outcome: int, requestor: str | None = None) -> None:
        from ihehub.atna import Endpoint
        from ihehub.atna.context import StudyRef

        me = self.audit.me(self.ae_title)
        source = me if side == "source" else Endpoint(user_id=source_ae, host=source_host)
        destination = me if side == "destination" else Endpoint(user_id=dest_ae, host=dest_host)
        refs = [StudyRef(uid=uid, sop_classes=classes) for uid, classes in studies.items()]
        detail = f"requested by {requestor}" if requestor and requestor != dest_ae else None
        self.audit.emit("DICOM-STORE", side=side, source=source, destination=destination, studies=refs,
                        patients=patients, outcome=outcome, outcome_description=detail)

    # -- C-FIND -------------------------------------------------------------------------------------
    def queried(self, assoc: Any, *, sop_class: str, identifier: bytes, transfer_syntax: str, outcome: int) -> None:
        from ihehub.atna import Endpoint

        try:
            ae, host = self._peer(assoc)
            self.audit.emit("DICOM-QUERY", side="destination", source=Endpoint(user_id=ae, host=host),
                            destination=self.audit.me(self.ae_title), query=identifier, query_id=sop_class,
                            transfer_syntax=transfer_syntax, outcome=outcome)
        except Exception:
            log.exception("audit: the C-FIND audit failed")
