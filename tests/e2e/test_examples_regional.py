"""examples/regional runs end to end: a copy of the example home on free loopback ports (the example's
YAML reads its ports from ${VARIABLES}), an in-process hub, the GB18030 samples sent over MLLP.

HIS ADT -> mapping -> EMPI (hanzi name, mapped sex and department, update, merge); RIS order -> mapping ->
Modality Worklist read by DCMTK ``findscu -W``; RIS report -> mapping -> ITI-41 over ``soap://`` to the
hub's repository, found by ITI-18 and returned by ITI-43; a department code no table maps -> AE naming the
rule, field and value, the message in the browser with status error; the mapping files' own tests pass."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import shutil
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner
from lxml import etree
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from ihehub.api import create_token
from ihehub.bus.store import MessageQuery
from ihehub.channels.mllp_wire import mllp_send
from ihehub.channels.registry import Registry
from ihehub.cli import main
from ihehub.config import HttpConfig, load_channels, load_home
from ihehub.empi import Identifier
from ihehub.hub import Hub
from ihehub.soap import build_envelope
from ihehub.xds import ebrim
from tests.api.api_support import LoopThread, wait_for
from tests.conftest import free_port, loopback_config
from tests.dicom.dicomkit import findscu
from tests.xds.query_fixtures import adhoc, q, ql
from tests.xds.test_endpoints import parse

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "regional"
PORTS = ("HIS_ADT_PORT", "RIS_ORDERS_PORT", "RIS_REPORTS_PORT", "IHEHUB_HTTP_PORT")
REPOSITORY = "1.2.156.112604.1.9.1"  # actors.xds.repository_unique_id of the example
PATIENT = "100234^^^&1.2.156.112604.1.1&ISO"  # PID-3 100234^^^H1 in the affinity domain
REPORT = "双侧大脑半球对称，脑实质内未见异常信号。\n头颅MR平扫未见明显异常。"
RIM = ebrim.NS["rim"]


def _sample(home: Path, name: str) -> bytes:
    return (home / "samples" / name).read_bytes()


def _send(port: int, *messages: bytes) -> list[bytes]:
    return list(asyncio.run(mllp_send("127.0.0.1", port, list(messages), timeout=20)))


def _worklist_query() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in ("PatientName", "PatientID", "PatientSex", "AccessionNumber", "RequestedProcedureID",
                    "StudyInstanceUID", "RequestedProcedureDescription"):
        setattr(ds, keyword, None)
    step = Dataset()
    for keyword in ("Modality", "ScheduledProcedureStepID", "ScheduledProcedureStepStartDate",
                    "ScheduledProcedureStepStartTime"):
        setattr(step, keyword, None)
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return ds


def _soap(client: httpx.Client, url: str, action: str, payload: str) -> Any:
    r = client.post(url, content=build_envelope(etree.fromstring(payload.encode()), action=action, to=url),
                    headers={"content-type": "application/soap+xml"})
    assert r.status_code == 200, r.text
    return parse(r)


def _check_adt(hub: Hub, port: int, home: Path) -> None:
    names = ("adt-a01-admit.hl7", "adt-a04-register.hl7", "adt-a08-update.hl7", "adt-a04-duplicate.hl7",
             "adt-a40-merge.hl7")
    acks = _send(port, *(_sample(home, n) for n in names))
    assert all(b"MSA|AA|" in a for a in acks), acks
    assert b"GB 18030-2000" in acks[0]  # the ACK is in the message's (mapped) charset
    empi = hub.services["empi"]
    record = empi.record(Identifier(value="100234", domain="H1")).record
    assert (record.names[0].family, record.names[0].given) == ("欧阳", "娜娜")
    assert record.sex == "F" and record.department == "RAD"  # local 2 / 0301 mapped by the code tables
    assert "13812340000" in record.phones  # the A08
    assert empi.record(Identifier(value="100300", domain="1.2.156.112604.1.1")).record.sex == "M"
    assert empi.record(Identifier(value="100301", domain="H1")).status == "merged"  # the A40


def _check_broken_adt(hub: Hub, port: int, home: Path) -> None:
    (ack,) = _send(port, _sample(home, "broken-adt-unknown-department.hl7"))
    text = ack.decode("gb18030")
    assert "MSA|AE|HIS0099" in text, text
    for part in ("mappings/his-adt.yaml", "rule", "PV1-10", "'7777'", "code table 'dept'"):
        assert part in text, (part, text)
    token = create_token(hub.store, role="readonly", name="engineer")
    with httpx.Client(timeout=30) as client:
        r = client.get(f"http://127.0.0.1:{hub.http_port}/api/messages",
                       params={"channel": "his-adt", "status": "error"},
                       headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    (row,) = r.json()["items"]
    assert row["control_id"] == "HIS0099" and row["status"] == "error"
    assert "PV1-10" in row["error"] and "7777" in row["error"]


def _check_worklist(hub: Hub, port: int, home: Path, workdir: Path) -> None:
    (ack,) = _send(port, _sample(home, "orm-o01-mri.hl7"))
    assert b"MSA|AA|" in ack, ack
    res, found = findscu(hub.dicom, _worklist_query(), workdir, model="-W", aet="MRSCANNER")
    assert res.returncode == 0, res.stderr
    (item,) = found
    assert str(item.PatientName) == "OUYANG^NANA=欧阳^娜娜"
    assert (item.PatientID, item.PatientSex, item.AccessionNumber) == ("100234", "F", "RA20260110001")
    step = item.ScheduledProcedureStepSequence[0]
    assert (step.Modality, step.ScheduledProcedureStepID) == ("MR", "SPS0001")  # local MRI -> MR
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == ("20260111", "093000")


def _check_report(hub: Hub, port: int, home: Path) -> None:
    (ack,) = _send(port, _sample(home, "oru-r01-report.hl7"))
    assert b"MSA|AA|" in ack, ack

    def delivered() -> list[Any]:
        rows = hub.store.search(MessageQuery(channel="ris-reports"))
        return [d for r in rows for d in hub.store.deliveries_of(r["id"]) if d["state"] == "sent"]
    (delivery,) = wait_for(delivered, 30, "the ITI-41 delivery")
    assert b"ResponseStatusType:Success" in delivery["response"], delivery["response"]  # the repository's answer
    base = f"http://127.0.0.1:{hub.http_port}"
    with httpx.Client(timeout=30) as client:
        found = _soap(client, f"{base}/xds/registry", "urn:ihe:iti:2007:RegistryStoredQuery", etree.tostring(
            adhoc("FindDocuments", {"$XDSDocumentEntryPatientId": q(PATIENT),
                                    "$XDSDocumentEntryStatus": ql(ebrim.APPROVED)})).decode())
        (entry,) = found.payload.iter(f"{{{RIM}}}ExtrinsicObject")
        assert entry.get("mimeType") == "text/plain"
        assert entry.find(f"{{{RIM}}}Name/{{{RIM}}}LocalizedString").get("value") == "头颅MR平扫报告"
        uid = ebrim.external_id(entry, ebrim.DE_UNIQUE_ID)
        assert uid == "1.2.156.112604.1.1.7.20260110001.20260111150000"
        xds = ebrim.NS["xds"]
        got = _soap(client, f"{base}/xds/repository", "urn:ihe:iti:2007:RetrieveDocumentSet",
                    f'<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{xds}"><xdsb:DocumentRequest>'
                    f"<xdsb:RepositoryUniqueId>{REPOSITORY}</xdsb:RepositoryUniqueId>"
                    f"<xdsb:DocumentUniqueId>{uid}</xdsb:DocumentUniqueId>"
                    "</xdsb:DocumentRequest></xdsb:RetrieveDocumentSetRequest>")
    (document,) = got.attachments.values()
    assert document.read_bytes().decode("utf-8") == REPORT

    # a report of a patient the EMPI does not know: the registry refuses it (HTTP 200, status Failure), and
    # the delivery is dead-lettered with the IHE error, not recorded as sent
    unknown = (_sample(home, "oru-r01-report.hl7").replace(b"|RIS0002|", b"|RIS0099|")
               .replace(b"100234^^^H1", b"999999^^^H1").replace(b"RA20260110001", b"RA20260110099"))
    (ack,) = _send(port, unknown)
    assert b"MSA|AA|" in ack, ack

    def dead() -> list[Any]:
        rows = hub.store.search(MessageQuery(channel="ris-reports", control_id="RIS0099"))
        return [d for r in rows for d in hub.store.deliveries_of(r["id"]) if d["state"] == "dead"]
    (failed,) = wait_for(dead, 30, "the refused ITI-41 delivery")
    assert "XDSUnknownPatientId" in (failed["error"] or ""), failed


def test_sample_files_are_what_make_samples_writes(tmp_path: Path) -> None:
    """The committed GB18030 samples equal the generator's output (edit make_samples.py, then run it)."""
    spec = importlib.util.spec_from_file_location("make_samples", EXAMPLE / "samples" / "make_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.write_all(tmp_path)
    assert len(written) == len(list((EXAMPLE / "samples").glob("*.hl7"))) == 8
    for path in written:
        assert path.read_bytes() == (EXAMPLE / "samples" / path.name).read_bytes(), path.name
        path.read_bytes().decode("gb18030")  # really GB18030, not UTF-8
    assert "欧阳".encode("gb18030") in (EXAMPLE / "samples" / "adt-a01-admit.hl7").read_bytes()


def test_regional_example_end_to_end(tmp_path: Path, monkeypatch: Any) -> None:
    home = tmp_path / "regional"
    shutil.copytree(EXAMPLE, home)
    ports = {name: free_port() for name in PORTS}
    for name, port in ports.items():
        monkeypatch.setenv(name, str(port))
    monkeypatch.setenv("REGIONAL_LISTEN", "127.0.0.1")
    monkeypatch.setenv("IHEHUB_HOME", str(home))

    # the mapping files' own tests: blocks pass (`ihehub map check` also runs them)
    r = CliRunner().invoke(main, ["map", "check", *map(str, sorted((home / "mappings").glob("*.yaml")))])
    assert r.exit_code == 0, r.output

    loaded = load_home(home)
    cfg: Any = loopback_config(loaded)
    cfg = dataclasses.replace(
        cfg, http=HttpConfig(host="127.0.0.1", port=ports["IHEHUB_HTTP_PORT"]),  # the soap:// destination's port
        actors=dataclasses.replace(cfg.actors, dicom=dataclasses.replace(loaded.actors.dicom, port=0)))
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)
    loop = LoopThread()
    loop.run(hub.start(), timeout=60)
    try:
        assert {n: hub.channel_status(n) for n in ("his-adt", "ris-orders", "ris-reports")} == dict.fromkeys(
            ("his-adt", "ris-orders", "ris-reports"), "started"), hub.errors
        _check_adt(hub, ports["HIS_ADT_PORT"], home)
        _check_broken_adt(hub, ports["HIS_ADT_PORT"], home)
        _check_worklist(hub, ports["RIS_ORDERS_PORT"], home, tmp_path / "mwl")
        _check_report(hub, ports["RIS_REPORTS_PORT"], home)
    finally:
        loop.run(hub.stop(), timeout=60)
        loop.close()
