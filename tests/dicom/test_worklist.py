"""Modality Worklist (PS3.4 Annex K, IHE RAD-5) fed by HL7 orders (RAD-4: ORM^O01 and OMI^O23) through an
MLLP channel with ``actor: modality-worklist``, queried with DCMTK ``findscu -W``; cancellations remove the
steps; orders that cannot be read get AE with the field named."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from ihehub.channels.mllp_wire import mllp_send
from ihehub.channels.registry import Registry
from ihehub.config import DicomActorConfig, load_channels, load_home
from ihehub.dicom import ImageManager, worklist
from ihehub.hub import Hub
from tests.api.api_support import LoopThread
from tests.conftest import free_port, loopback_config
from tests.dicom.dicomkit import findscu


def _orm(control: str = "NW", accession: str = "ACC100") -> bytes:
    obr = ["OBR", "1", "PL1", "FL1", "CT001^CT Chest^L"] + [""] * 13 + [accession, "RP100", "SPS100", "", "", "",
                                                                         "CT", "", "", "^^^20240301090000"]
    segs = [
        "MSH|^~\\&|RIS|HOSP|IHEHUB|HOSP|20240301080000||ORM^O01|M1|P|2.3.1|||||CHN|UNICODE UTF-8",
        "PID|||P100^^^HOSPA||Wang^XiaoMing~王^小明||19800101|M",
        "PV1||O",
        f"ORC|{control}|PL1|FL1||SC||^^^20240301090000||20240301080000|||DR1^Li^Lei",
        "|".join(obr),
        "ZDS|1.2.826.0.1.3680043.8.498.100^100^Application^DICOM",
    ]
    return ("\r".join(segs) + "\r").encode("utf-8")


def _omi(control: str = "NW") -> bytes:
    segs = [
        "MSH|^~\\&|RIS|HOSP|IHEHUB|HOSP|20240301080000||OMI^O23^OMI_O23|M2|P|2.5.1",
        "PID|||P200^^^HOSPA||Smith^Anna||19700505|F",
        f"ORC|{control}|PL2|FL2||SC",
        "TQ1|||||||20240302100000",
        "OBR|1|PL2|FL2|MR001^MR Brain^L",
        "IPC|ACC200|RP200|1.2.826.0.1.3680043.8.498.200|SPS200|MR||STATION1||MRSCANNER",
        "IPC|ACC200|RP200|1.2.826.0.1.3680043.8.498.200|SPS201|MR||STATION1||MRSCANNER",
    ]
    return ("\r".join(segs) + "\r").encode("ascii")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hub, int]]:
    """One hub for the module: an MLLP channel with the worklist actor, and the image manager."""
    home = tmp_path_factory.mktemp("mwl") / "home"
    (home / "channels").mkdir(parents=True)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("IHEHUB_HOME", str(home))
        yield from _hub(home)


def _hub(home: Path) -> Iterator[tuple[Hub, int]]:
    port = free_port()
    (home / "channels" / "orders.yaml").write_text(
        f'source: {{url: "mllp://127.0.0.1:{port}"}}\nactor: modality-worklist\n', encoding="utf-8")
    cfg: Any = loopback_config(load_home(home))
    cfg = dataclasses.replace(cfg, actors=dataclasses.replace(cfg.actors, dicom=DicomActorConfig(port=0)))
    registry = Registry()
    h = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)
    loop = LoopThread()
    loop.run(h.start())
    try:
        yield h, port
    finally:
        loop.run(h.stop())
        loop.close()


def _send(port: int, *messages: bytes) -> list[bytes]:
    return list(asyncio.run(mllp_send("127.0.0.1", port, list(messages), timeout=10)))


def _mwl(**sps: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in ("PatientName", "PatientID", "AccessionNumber", "RequestedProcedureID", "StudyInstanceUID",
                    "RequestedProcedureDescription", "ReferringPhysicianName", "RequestedProcedureCodeSequence"):
        setattr(ds, keyword, None)
    item = Dataset()
    for keyword in ("ScheduledStationAETitle", "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
                    "Modality", "ScheduledProcedureStepID"):
        setattr(item, keyword, sps.get(keyword))
    ds.ScheduledProcedureStepSequence = Sequence([item])
    return ds


def test_orders_feed_the_worklist_and_findscu_reads_it(hub: tuple[Hub, int], tmp_path: Path) -> None:
    h, port = hub
    manager: ImageManager = h.dicom
    acks = _send(port, _orm(), _omi())
    assert all(b"MSA|AA|" in a for a in acks), acks
    res, found = findscu(manager, _mwl(), tmp_path / "all", model="-W")
    assert res.returncode == 0, res.stderr
    assert sorted(str(d.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID) for d in found) == \
        ["SPS100", "SPS200", "SPS201"]
    res, found = findscu(manager, _mwl(Modality="CT", ScheduledProcedureStepStartDate="20240301"),
                         tmp_path / "ct", model="-W")
    (ct,) = found
    assert str(ct.PatientName) == "Wang^XiaoMing=王^小明" and ct.PatientID == "P100"
    assert ct.AccessionNumber == "ACC100" and ct.RequestedProcedureID == "RP100"
    assert ct.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.100"
    assert str(ct.ReferringPhysicianName) == "Li^Lei"
    assert ct.RequestedProcedureCodeSequence[0].CodeValue == "CT001"
    step = ct.ScheduledProcedureStepSequence[0]
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == ("20240301", "090000")
    res, found = findscu(manager, _mwl(ScheduledStationAETitle="MRSCANNER",
                                       ScheduledProcedureStepStartDate="20240302-20240303"), tmp_path / "mr",
                         model="-W")
    assert {d.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID for d in found} == {"SPS200", "SPS201"}
    named = _mwl()
    named.PatientName = "王*"
    res, found = findscu(manager, named, tmp_path / "name", model="-W")
    assert [d.AccessionNumber for d in found] == ["ACC100"]
    # cancelling the orders removes their steps
    acks = _send(port, _orm("CA"), _omi("CA"))
    assert all(b"MSA|AA|" in a for a in acks), acks
    res, found = findscu(manager, _mwl(), tmp_path / "none", model="-W")
    assert res.returncode == 0 and found == []


def test_bad_orders_are_refused_with_the_field(hub: tuple[Hub, int]) -> None:
    _, port = hub
    no_accession = _orm(accession="")
    unknown_control = _orm("ZZ")
    not_an_order = _orm().replace(b"ORM^O01", b"ADT^A01")
    no_ipc = b"\r".join(line for line in _omi().split(b"\r") if not line.startswith(b"IPC"))
    acks = _send(port, no_accession, unknown_control, not_an_order, no_ipc)
    assert b"MSA|AE|" in acks[0] and b"ERR|OBR^1^18^101" in acks[0]  # v2.3.1 ERR: location^code
    assert b"MSA|AE|" in acks[1] and b"ORC^1^1" in acks[1]
    assert b"MSA|AE|" in acks[2] and b"MSH^1^9" in acks[2]
    assert b"MSA|AE|" in acks[3] and b"IPC" in acks[3]


def test_schedule_replace_cancel_and_match_on_both_databases(engine: Any) -> None:
    step = worklist.ScheduledStep(accession_number="A1", sps_id="S1", patient_id="P1", patient_name="Doe^Jane",
                                  modality="US", station_ae="US1", start_date="20240105", start_time="0800")
    worklist.schedule(engine, [step, dataclasses.replace(step, sps_id="S2", modality="CT", start_date="20240106")])
    worklist.schedule(engine, [dataclasses.replace(step, station_ae="US2")])  # XO: replaced, not duplicated

    def ask(**keys: Any) -> list[str]:
        ds = Dataset()
        ds.AccessionNumber = None
        item = Dataset()
        item.ScheduledProcedureStepID = None
        for k, v in keys.items():
            setattr(ds if k in worklist.TOP_KEYS else item, k, v)
        ds.ScheduledProcedureStepSequence = Sequence([item])
        with engine.connect() as conn:
            return sorted(str(r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID)
                          for r in worklist.find(conn, ds))

    assert ask() == ["S1", "S2"]
    assert ask(ScheduledStationAETitle="US2") == ["S1"]
    assert ask(ScheduledProcedureStepStartDate="20240106-") == ["S2"]
    assert ask(PatientName="doe*", Modality="CT") == ["S2"]
    assert ask(ScheduledProcedureStepStartTime="07-09") == ["S1", "S2"]
    assert worklist.cancel(engine, "A1", ["S2"]) == 1
    assert ask() == ["S1"]
    assert worklist.cancel(engine, "A1") == 1
    assert ask() == []
    two = Dataset()
    two.ScheduledProcedureStepSequence = Sequence([Dataset(), Dataset()])
    with engine.connect() as conn, pytest.raises(worklist.WorklistError):
        list(worklist.find(conn, two))
