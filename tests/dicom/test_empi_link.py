"""DICOM patients linked to the EMPI in a running hub (issue 7 "Storage and index", PIR of issue 4).

On the wire: DCMTK storescu stores a study for P1 (issuer HOSPA) before the EMPI knows P1; an ITI-8 A01 over
MLLP links it; an A40 merges P1 into P2 and findscu / QIDO by P2 (and by P2's enterprise id) find the study,
returned as P2, getscu of patient P2 retrieves it while the files keep P1; an unmerge through /api/empi puts
it back.  A GB18030 Chinese name
registered from the DICOM demographics (``unknown: register``) is matched (auto-linked) by the EMPI with an
ITI-8 feed of another hospital, and a PIX-style query in that hospital's domain finds the study.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pydicom
import pytest
from sqlalchemy import select, update

from ihehub.actors.dicom_empi import person_names
from ihehub.api import create_token
from ihehub.channels.mllp_wire import mllp_send
from ihehub.channels.registry import Registry
from ihehub.config import DicomActorConfig, load_channels, load_home
from ihehub.dicom import tables as t
from ihehub.dicom.patients import EmpiLinkSettings
from ihehub.empi import Identifier, PersonName
from ihehub.hub import Hub
from tests.actors.support import a01
from tests.api.api_support import LoopThread
from tests.conftest import free_port, loopback_config
from tests.dicom.dicomkit import dcmtk, findscu, make_instance, query, store

T = TypeVar("T")
GB = "GB 18030-2000"
OPTIONS = {
    "domains": [{"namespace": "HOSPA", "universal_id": "1.2.156.1.1"},
                {"namespace": "HOSPB", "universal_id": "1.2.156.1.2"}],
    "facility_domains": {"HA": "HOSPA", "HB": "HOSPB"},
    "enterprise": {"namespace": "IHEHUB", "universal_id": "1.2.156.9"},
}


@dataclasses.dataclass
class LinkedHub:
    hub: Hub
    pix_port: int
    work: Path

    def pix(self, *messages: bytes) -> list[bytes]:
        replies = asyncio.run(mllp_send("127.0.0.1", self.pix_port, list(messages), timeout=20))
        assert all(b"MSA|AA|" in r for r in replies), replies
        return replies

    def find(self, level: str = "STUDY", *, model: str = "-S", charset: str | None = None,
             **keys: Any) -> list[pydicom.Dataset]:
        res, responses = findscu(self.hub.dicom, query(level, charset, **keys), self.work / "find", model=model)
        assert res.returncode == 0, res.stderr
        return responses

    def row(self, patient_id: str, issuer: str = "") -> Any:
        p = t.patients
        with self.hub.engine.connect() as conn:
            return conn.execute(select(p).where(p.c.patient_id == patient_id, p.c.issuer == issuer)).one()

    def http(self, role: str = "operator") -> httpx.Client:
        token = create_token(self.hub.store, role=role, name="dr-wang")
        return httpx.Client(base_url=f"http://127.0.0.1:{self.hub.http_port}", timeout=20,
                            headers={"Authorization": f"Bearer {token}"})


@contextmanager
def linked_hub(tmp_path: Path, empi: dict[str, Any], database: str | None = None) -> Iterator[LinkedHub]:
    home = tmp_path / "home"
    (home / "channels").mkdir(parents=True)
    pix_port = free_port()
    (home / "channels" / "pix.yaml").write_text(
        f'source: {{url: "mllp://127.0.0.1:{pix_port}"}}\n'
        f"actor: {{name: pix-manager, options: {json.dumps(OPTIONS)}}}\n", encoding="utf-8")
    cfg: Any = loopback_config(load_home(home))
    cfg = dataclasses.replace(cfg, actors=dataclasses.replace(
        cfg.actors, dicom=DicomActorConfig(enabled=True, port=0, study_quiet_seconds=600, empi=empi)))
    if database is not None:
        cfg = dataclasses.replace(cfg, database=database)
    registry = Registry()
    hub = Hub(cfg, load_channels(home, registry, hub=cfg), registry=registry)
    loop = LoopThread()
    loop.run(hub.start(), timeout=60)
    try:
        assert hub.dicom.patients is not None, "the image manager was not linked to the EMPI"
        yield LinkedHub(hub=hub, pix_port=pix_port, work=tmp_path / "work")
    finally:
        loop.run(hub.stop(), timeout=60)
        loop.close()


def wait_for(fn: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def instance(path: Path, *, issuer: str | None, **kw: Any) -> pydicom.Dataset:
    ds = make_instance(path, **kw)
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
        ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def test_studies_follow_a40_merge_and_unmerge(db: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    database = None if db == "sqlite" else request.getfixturevalue("pg_database")[1]
    with linked_hub(tmp_path, {"default_issuer": "HOSPA"}, database) as h:
        # a study for P1 (issuer HOSPA) before the EMPI has heard of P1: indexed, left unlinked ("wait")
        study = "1.2.826.0.1.3680043.8.498.4242.1"
        files = [tmp_path / f"p1-{n}.dcm" for n in range(2)]
        for n, f in enumerate(files):
            instance(f, issuer="HOSPA", patient="ZHANG^SAN", patient_id="P1", study_uid=study,
                     series_uid=study + ".1", instance_number=n + 1)
        store(h.hub.dicom, *files)
        assert h.hub.dicom.flush()
        assert wait_for(lambda: h.row("P1", "HOSPA").empi_state == "unknown", "P1 looked up")
        assert h.row("P1", "HOSPA").enterprise_id is None

        # ITI-8 A01 for P1: the row is linked to P1's enterprise patient
        h.pix(a01("M1", "P1^^^HOSPA", "ZHANG^SAN", "19700101"))
        empi = h.hub.services["empi"]
        e1 = empi.cross_reference(Identifier(value="P1", domain="HOSPA")).patient
        assert wait_for(lambda: h.row("P1", "HOSPA").enterprise_id == e1, "P1 linked")
        assert h.row("P1", "HOSPA").empi_state == "linked"

        # P2 registered, with a study of its own; then A40: P1 merged into P2
        h.pix(a01("M2", "P2^^^HOSPA", "ZHANG^SANFENG", "19700101"))
        own = study + ".2"
        instance(tmp_path / "p2.dcm", issuer="HOSPA", patient="ZHANG^SANFENG", patient_id="P2", study_uid=own,
                 study_date="20240301")
        store(h.hub.dicom, tmp_path / "p2.dcm")
        assert h.hub.dicom.flush()
        assert wait_for(lambda: h.row("P2", "HOSPA").empi_state == "linked", "P2 linked")
        assert [s.StudyInstanceUID for s in h.find(PatientID="P2", IssuerOfPatientID="HOSPA",
                                                   StudyInstanceUID="")] == [own]
        h.pix(b"MSH|^~\\&|S|HA|HUB|HUB|20261127||ADT^A40^ADT_A39|M3|P|2.5\rEVN|A40\r"
              b"PID|1||P2^^^HOSPA||ZHANG^SANFENG\rMRG|P1^^^HOSPA\r")
        e2 = empi.cross_reference(Identifier(value="P2", domain="HOSPA")).patient
        assert e2 != e1
        wait_for(lambda: h.row("P1", "HOSPA").empi_state == "merged", "the merge reaching the index")
        row = h.row("P1", "HOSPA")
        assert (row.enterprise_id, row.merged_into, row.patient_id) == (e2, "P2", "P1")

        # C-FIND by P2 in HOSPA finds P1's study, returned under P2
        found = h.find(PatientID="P2", IssuerOfPatientID="HOSPA", StudyInstanceUID="", PatientName="",
                       NumberOfStudyRelatedInstances="")
        assert [(r.StudyInstanceUID, r.PatientID, r.IssuerOfPatientID, r.NumberOfStudyRelatedInstances)
                for r in found] == [(study, "P2", "HOSPA", 2), (own, "P2", "HOSPA", 1)]
        # without an issuer the default issuer (HOSPA) applies; Patient Root at PATIENT level: one patient
        assert [r.StudyInstanceUID for r in h.find(PatientID="P2", StudyInstanceUID="")] == [study, own]
        (pat,) = h.find("PATIENT", model="-P", PatientID="P2", IssuerOfPatientID="",
                        NumberOfPatientRelatedStudies="", NumberOfPatientRelatedInstances="")
        assert (pat.PatientID, pat.IssuerOfPatientID, pat.NumberOfPatientRelatedStudies,
                pat.NumberOfPatientRelatedInstances) == ("P2", "HOSPA", 2, 3)
        # the enterprise id finds every study of the patient
        by_e2 = h.find(PatientID=e2, IssuerOfPatientID="IHEHUB", StudyInstanceUID="")
        assert [(r.StudyInstanceUID, r.PatientID) for r in by_e2] == [(study, e2), (own, e2)]
        # the merged-away id no longer finds it; a query without a patient key shows the survivor (PIR)
        assert h.find(PatientID="P1", IssuerOfPatientID="HOSPA", StudyInstanceUID="") == []
        (by_uid,) = h.find(StudyInstanceUID=study, PatientID="")
        assert by_uid.PatientID == "P2"
        # QIDO-RS answers the same way
        with h.http("readonly") as web:
            r = web.get("/dicomweb/studies", params={"PatientID": "P2", "IssuerOfPatientID": "HOSPA"})
            assert r.status_code == 200, r.text
            assert sorted((s["0020000D"]["Value"][0], s["00100020"]["Value"][0]) for s in r.json()) == [
                (study, "P2"), (own, "P2")]
        # C-GET of patient P2 (Patient Root): both studies, the files as stored — never rewritten
        got = h.work / "got"
        got.mkdir(parents=True)
        res = dcmtk("getscu", "-P", "-aet", "GETSCU", "-aec", "IHEHUB", "-k", "QueryRetrieveLevel=PATIENT",
                    "-k", "PatientID=P2", "-k", "IssuerOfPatientID=HOSPA", "-od", str(got), "127.0.0.1",
                    str(h.hub.dicom.port), timeout=60)
        assert res.returncode == 0, res.stderr
        assert sorted(pydicom.dcmread(f).PatientID for f in got.iterdir()) == ["P1", "P1", "P2"]

        # unmerge through /api/empi: P2 no longer finds the study, P1 does again
        merged = next(ev for ev in empi.events() if ev.type.value == "merged")
        with h.http() as api:
            r = api.post(f"/api/empi/merges/{merged.detail['merge']}/unmerge")
            assert r.status_code == 200, r.text
        wait_for(lambda: h.row("P1", "HOSPA").empi_state == "linked", "the unmerge reaching the index")
        assert h.row("P1", "HOSPA").enterprise_id == e1 and h.row("P1", "HOSPA").merged_into is None
        assert [r.StudyInstanceUID for r in h.find(PatientID="P2", IssuerOfPatientID="HOSPA",
                                                   StudyInstanceUID="")] == [own]
        again = h.find(PatientID="P1", IssuerOfPatientID="HOSPA", StudyInstanceUID="")
        assert [(r.StudyInstanceUID, r.PatientID) for r in again] == [(study, "P1")]


def test_chinese_name_registered_from_dicom_and_found_across_domains(tmp_path: Path) -> None:
    with linked_hub(tmp_path, {"default_issuer": "HOSPA", "unknown": "register", "cross_domain": True}) as h:
        # GB18030 name, no Issuer of Patient ID: registered in the default domain from the DICOM demographics
        study = "1.2.826.0.1.3680043.8.498.4242.2"
        f = tmp_path / "cn.dcm"
        instance(f, issuer=None, patient="Wang^XiaoMing=王^小明", patient_id="C1", charset="GB18030",
                 study_uid=study)
        store(h.hub.dicom, f)
        assert h.hub.dicom.flush()
        wait_for(lambda: h.row("C1").empi_state == "linked", "C1 registered and linked")
        empi = h.hub.services["empi"]
        record = empi.record(Identifier(value="C1", domain="HOSPA"))
        assert PersonName(family="王", given="小明") in record.record.names
        assert str(record.record.birth_date).replace("-", "") == "19700101" and record.record.sex == "M"
        e1 = h.row("C1").enterprise_id
        assert e1 == empi.cross_reference(Identifier(value="C1", domain="HOSPA")).patient

        # another hospital registers 王小明 over ITI-8 (GB 18030): the EMPI scores the DICOM record as its match
        h.pix(a01("C2", "B7^^^HOSPB", "王^小明", "19700101", facility="HB", charset=GB, encoding="gb18030"))
        (best, *_) = empi.candidates(Identifier(value="B7", domain="HOSPB"))
        assert (best.record, best.decision) == (Identifier(value="C1", domain="HOSPA"), "link")
        assert empi.cross_reference(Identifier(value="B7", domain="HOSPB")).patient == e1  # linked automatically

        # PIX-style C-FIND: B7 in HOSPB finds the study received as C1, by ID and by the hanzi name
        found = h.find(PatientID="B7", IssuerOfPatientID="HOSPB", StudyInstanceUID="", PatientName="")
        assert [(r.StudyInstanceUID, r.PatientID, r.IssuerOfPatientID) for r in found] == [(study, "B7", "HOSPB")]
        assert str(found[0].PatientName) == "Wang^XiaoMing=王^小明"
        named = h.find(charset="GB18030", PatientID="B7", IssuerOfPatientID="HOSPB", PatientName="王*",
                       StudyInstanceUID="")
        assert [r.StudyInstanceUID for r in named] == [study]
        # by the OID of HOSPB as issuer as well; an unknown id is not widened
        assert [r.PatientID for r in h.find(PatientID="B7", IssuerOfPatientID="1.2.156.1.2",
                                            StudyInstanceUID="")] == ["B7"]
        assert h.find(PatientID="B8", IssuerOfPatientID="HOSPB", StudyInstanceUID="") == []
        # the history says where the record came from
        assert [v.event for v in empi.history(Identifier(value="C1", domain="HOSPA"))] == ["DICOM"]

        # an issuer the EMPI has no domain for: left unlinked (no-domain), found as received
        g = tmp_path / "other.dcm"
        instance(g, issuer="NOWHERE", patient="LI^SI", patient_id="X1", study_uid=study + ".9")
        store(h.hub.dicom, g)
        assert h.hub.dicom.flush()
        wait_for(lambda: h.row("X1", "NOWHERE").empi_state == "no-domain", "X1 looked up")
        assert [(r.PatientID, r.IssuerOfPatientID) for r in h.find(PatientID="X1", IssuerOfPatientID="NOWHERE",
                                                                   StudyInstanceUID="")] == [("X1", "NOWHERE")]
        assert h.hub.dicom.patients.state_counts() == {"linked": 1, "no-domain": 1}
        # /healthz shows the link states; patients the EMPI could not be read for make it degraded
        health = httpx.get(f"http://127.0.0.1:{h.hub.http_port}/healthz", timeout=20).json()
        assert health["dicom_patients"] == {"linked": 1, "no-domain": 1} and health["checks"]["dicom_patients"] == "ok"
        p = t.patients
        h.hub.writer.run(lambda conn: conn.execute(update(p).where(p.c.patient_id == "X1").values(empi_state="error")))
        health = httpx.get(f"http://127.0.0.1:{h.hub.http_port}/healthz", timeout=20).json()
        assert health["status"] == "degraded" and health["dicom_patients"]["error"] == 1
        assert "1 DICOM patient(s) could not be linked to the EMPI" in health["checks"]["dicom_patients"]


def test_settings_and_names() -> None:
    s = EmpiLinkSettings.from_mapping({"default_issuer": " HOSPA ", "unknown": "register", "cross_domain": True})
    assert (s.default_issuer, s.unknown, s.cross_domain, s.enabled) == ("HOSPA", "register", True, True)
    for bad, msg in (({"unknown": "guess"}, "'wait' or 'register'"), ({"cross_domain": "yes"}, "true or false"),
                     ({"retry_seconds": 0}, "positive"), ({"default_issuer": "A\\B"}, "namespace or OID"),
                     ({"issuer": "X"}, "unknown key(s) issuer")):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            EmpiLinkSettings.from_mapping(bad)
    assert person_names("Wang^XiaoMing=王^小明=ワン^シャオミン") == (
        PersonName(family="Wang", given="XiaoMing"), PersonName(family="王", given="小明"),
        PersonName(family="ワン", given="シャオミン"))
    assert person_names("=李^娜") == (PersonName(family="李", given="娜"),)
    assert person_names("") == () and person_names(None) == ()


def test_linker_catches_up_after_a_restart_and_retries_when_the_empi_is_away(tmp_path: Path) -> None:
    """The linker alone (no threads started: its steps called in turn) on a real EMPI: changes made while it
    was not running are applied from its stored cursor; an EMPI that cannot be reached leaves rows ``error``,
    tried again once it answers."""
    from ihehub.actors.dicom_empi import EmpiDirectory
    from ihehub.bus import schema
    from ihehub.bus.db import Writer, make_engine
    from ihehub.dicom.patients import PatientLinker
    from ihehub.empi import Empi, EmpiConfig, PatientRecord

    engine = make_engine(f"sqlite:///{tmp_path}/hub.sqlite")
    schema.upgrade(engine)
    writer = Writer(engine)
    writer.start()
    try:
        empi = Empi(engine, EmpiConfig(enterprise_namespace="IHEHUB"), writer=writer)
        empi.add_domain("HOSPA", universal_id="1.2.156.1.1")
        for pid, family in (("A1", "LIU"), ("A2", "LIUBEI")):
            empi.register("HOSPA", PatientRecord(pid=pid, names=(PersonName(family=family, given="BEI"),),
                                                 birth_date="19610101", sex="M"))
        now = time.time()
        writer.run(lambda conn: conn.execute(t.patients.insert(), [
            {"patient_id": "A1", "issuer": "1.2.156.1.1", "name": "LIU^BEI", "updated_at": now},
            {"patient_id": "A2", "issuer": "", "name": "LIU^BEI", "updated_at": now}]))

        def rows() -> dict[str, tuple[Any, ...]]:
            with engine.connect() as conn:
                return {r.patient_id: (r.empi_state, r.enterprise_id, r.merged_into)
                        for r in conn.execute(select(t.patients).where(t.patients.c.issuer != "HOSPA"))}

        settings = EmpiLinkSettings(default_issuer="HOSPA", retry_seconds=0.01)
        first = PatientLinker(writer, EmpiDirectory(empi, writer), settings)
        assert first.follow() == 0 and first.link_pending() == 2  # the cursor starts at the newest event
        e1 = empi.cross_reference(Identifier(value="A1", domain="HOSPA")).patient
        e2 = empi.cross_reference(Identifier(value="A2", domain="HOSPA")).patient
        assert rows() == {"A1": ("linked", e1, None), "A2": ("linked", e2, None)}  # issuer by OID and by default

        # merged while no linker runs: the next one reads the events after the stored cursor
        empi.merge(Identifier(value="A1", domain="HOSPA"), Identifier(value="A2", domain="HOSPA"), by="test")
        second = PatientLinker(writer, EmpiDirectory(empi, writer), settings)
        assert second.follow() >= 1
        assert rows() == {"A1": ("linked", e1, None), "A2": ("merged", e1, "A1")}
        assert second.follow() == 0  # nothing read twice

        # an EMPI whose database is away: the row is "error", and linked on a later try
        away = make_engine("postgresql+psycopg://nobody@127.0.0.1:9/none?connect_timeout=2")
        broken = PatientLinker(writer, EmpiDirectory(Empi(away, EmpiConfig(enterprise_namespace="IHEHUB")), writer),
                               settings)
        writer.run(lambda conn: conn.execute(t.patients.insert().values(patient_id="A1", issuer="HOSPA",
                                                                        updated_at=now)))
        assert broken.link_pending() == 1 and broken.errors == 1
        assert rows()["A1"] == ("linked", e1, None) and _state(engine, "A1", "HOSPA") == "error"
        time.sleep(0.02)
        assert second.link_pending() == 1 and _state(engine, "A1", "HOSPA") == "linked"
        away.dispose()
    finally:
        writer.close()
        engine.dispose()


def _state(engine: Any, patient_id: str, issuer: str) -> str | None:
    p = t.patients
    with engine.connect() as conn:
        return conn.execute(select(p.c.empi_state).where(p.c.patient_id == patient_id, p.c.issuer == issuer)).scalar()


@pytest.mark.scaleout
def test_event_committed_late_on_postgresql_is_not_missed(pg_database: tuple[str, str]) -> None:
    """Two writers on PostgreSQL: an event id that commits after a higher one is still handed to the linker."""
    from ihehub.actors.dicom_empi import EmpiDirectory
    from ihehub.bus import schema
    from ihehub.bus.db import Writer, make_engine
    from ihehub.empi import Empi, EmpiConfig, EventType, PatientRecord
    from ihehub.empi import store as empi_store

    engine = make_engine(pg_database[1])
    schema.upgrade(engine)
    writer = Writer(engine)
    writer.start()
    try:
        empi = Empi(engine, EmpiConfig(enterprise_namespace="IHEHUB"), writer=writer)
        empi.add_domain("HOSPA")
        directory = EmpiDirectory(empi, writer)
        cursor, _ = directory.changes(None, 1)
        with engine.connect() as slow:  # another process's feed: its event id is taken, its commit comes later
            tx = slow.begin()
            late = empi_store.add_event(slow, type=EventType.UPDATED, patient="E999", at=time.time(),
                                        record=Identifier(value="L1", domain="HOSPA"),
                                        identifiers=(Identifier(value="L1", domain="HOSPA"),))
            empi.register("HOSPA", PatientRecord(pid="A1", names=(PersonName(family="LIU", given="BEI"),)))
            cursor, changes = directory.changes(cursor, 100)
            assert [c.id for c in changes] == [cursor] and cursor > late.id
            tx.commit()
        cursor2, changes = directory.changes(cursor, 100)
        assert cursor2 == cursor and [(c.id, c.patients) for c in changes] == [(late.id, ("E999",))]
        assert ("L1", "HOSPA") in changes[0].identifiers
        assert directory.changes(cursor, 100) == (cursor, [])  # found once
    finally:
        writer.close()
        engine.dispose()
