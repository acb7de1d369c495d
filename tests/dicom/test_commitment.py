"""Storage Commitment Push Model (PS3.4 Annex J): N-ACTION accepted, N-EVENT-REPORT on the hub's own
association to the requestor (SCP role negotiated), failures with their reasons, unknown requestors refused."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy import Engine

from ihehub.dicom.commitment import INSTANCE_UID
from ihehub.dicom.settings import DicomNode
from tests.conftest import free_port
from tests.dicom.conftest import ManagerFactory
from tests.dicom.dicomkit import make_instance, store


class Modality:
    """A modality's Storage Commitment SCU that listens for the N-EVENT-REPORT (and accepts the SCP role)."""

    def __init__(self, ae_title: str = "MODALITY") -> None:
        self.port = free_port()
        self.reports: list[tuple[int, Dataset]] = []
        self.ae = AE(ae_title=ae_title)
        self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self.ae.add_requested_context(StorageCommitmentPushModel)
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])

    def _on_report(self, event: Any) -> tuple[int, None]:
        self.reports.append((int(event.request.EventTypeID), event.event_information))
        return 0x0000, None

    def request(self, port: int, refs: list[tuple[str, str]], transaction: str) -> Any:
        ds = Dataset()
        ds.TransactionUID = transaction
        seq = []
        for cls, uid in refs:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, uid
            seq.append(item)
        ds.ReferencedSOPSequence = DicomSequence(seq)
        assoc = self.ae.associate("127.0.0.1", port, ae_title="IHEHUB")
        assert assoc.is_established
        try:
            status, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, INSTANCE_UID)
        finally:
            assoc.release()
        return status

    def wait(self, n: int, timeout: float = 30) -> list[tuple[int, Dataset]]:
        end = time.monotonic() + timeout
        while len(self.reports) < n and time.monotonic() < end:
            time.sleep(0.05)
        assert len(self.reports) >= n, f"{len(self.reports)} storage commitment reports, expected {n}"
        return self.reports

    def close(self) -> None:
        self.server.shutdown()


def test_commitment_reports_success_and_failures(start_manager: ManagerFactory, sqlite_engine: Engine,
                                                  tmp_path: Path) -> None:
    modality = Modality()
    try:
        manager = start_manager(sqlite_engine, nodes=(DicomNode(name="mr1", ae_title="MODALITY", host="127.0.0.1",
                                                                port=modality.port),))
        files, refs = [], []
        for n in range(2):
            f = tmp_path / f"i{n}.dcm"
            ds = make_instance(f, instance_number=n + 1)
            files.append(f)
            refs.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        store(manager, *files, aet="MODALITY")

        status = modality.request(manager.port, refs, "1.2.3.100")
        assert status.Status == 0x0000
        ((event_type, info),) = modality.wait(1)
        assert event_type == 1 and info.TransactionUID == "1.2.3.100"
        assert {r.ReferencedSOPInstanceUID for r in info.ReferencedSOPSequence} == {u for _, u in refs}
        assert "FailedSOPSequence" not in info

        # an instance never sent and one under the wrong SOP class: event type 2 with the reasons
        wrong_class = ("1.2.840.10008.5.1.4.1.1.2", refs[0][1])
        status = modality.request(manager.port, [refs[1], ("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5.999"),
                                                 wrong_class], "1.2.3.101")
        assert status.Status == 0x0000
        event_type, info = modality.wait(2)[1]
        assert event_type == 2 and info.TransactionUID == "1.2.3.101"
        assert [r.ReferencedSOPInstanceUID for r in info.ReferencedSOPSequence] == [refs[1][1]]
        reasons = {r.ReferencedSOPInstanceUID: r.FailureReason for r in info.FailedSOPSequence}
        assert reasons == {"1.2.3.4.5.999": 0x0112, refs[0][1]: 0x0119}
        end = time.monotonic() + 10  # the hub records a report once its association is released
        while len(manager.commitment.reports) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        assert manager.commitment.reports == [("1.2.3.100", 1), ("1.2.3.101", 2)]
    finally:
        modality.close()


def test_unknown_requestor_is_refused_with_advice(start_manager: ManagerFactory, sqlite_engine: Engine) -> None:
    manager = start_manager(sqlite_engine)
    stranger = Modality("STRANGER")
    try:
        status = stranger.request(manager.port, [("1.2.840.10008.5.1.4.1.1.7", "1.2.3")], "1.2.3.200")
        assert status.Status == 0x0110 and "actors.dicom.nodes" in status.ErrorComment
        time.sleep(0.5)
        assert stranger.reports == []
    finally:
        stranger.close()
