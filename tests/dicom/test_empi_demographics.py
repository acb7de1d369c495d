"""Linked DICOM patients answered with the EMPI's demographics (IHE RAD Patient Information Reconciliation).

On the wire: DCMTK storescu stores studies for P1 and P2 whose files carry other names, birth dates and sexes
than the ITI-8 A01s (MLLP) that register them; findscu (Patient Root and Study Root, every level) and QIDO-RS
answer, and match, with the EMPI's.  An A08 renaming P2 reaches the next C-FIND; after an A40 P1 -> P2 P1's
study is answered as P2 with P2's demographics, after the unmerge as P1 with P1's again.  A Chinese name fed
in GB 18030 is answered as ``Wang^XiaoMing=王^小明`` under GB18030 and ISO_IR 192 (bytes checked).  With
``demographics: false`` the files' values answer; the linker fills or clears the stored demographics of rows
linked before when the setting changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from ihehub.actors.dicom_empi import EmpiDirectory, dicom_demographics, dicom_name
from ihehub.dicom import tables as t
from ihehub.dicom.patients import EmpiLinkSettings, PatientLinker
from ihehub.empi import Identifier, PatientRecord, PersonName
from tests.actors.support import a01
from tests.dicom.dicomkit import store
from tests.dicom.test_empi_link import GB, LinkedHub, instance, linked_hub, wait_for

S1 = "1.2.826.0.1.3680043.8.498.4343.1"  # P1's study (two series)
S2 = "1.2.826.0.1.3680043.8.498.4343.2"  # P2's study
S3 = "1.2.826.0.1.3680043.8.498.4343.3"  # the Chinese patient's study


def demographics(ds: pydicom.Dataset) -> tuple[str, str, str, str]:
    return (str(ds.PatientID), str(ds.PatientName), str(ds.PatientBirthDate), str(ds.PatientSex))


def by_uid(h: LinkedHub, study: str) -> tuple[str, str, str, str]:
    """The patient of ``study`` as a query without patient keys answers it (the stored EMPI demographics)."""
    (r,) = h.find(StudyInstanceUID=study, PatientID="", PatientName="", PatientBirthDate="", PatientSex="")
    return demographics(r)


def store_p1_p2(h: LinkedHub, tmp_path: Path) -> None:
    files = []
    for n in range(2):  # P1: two series of one instance; the files carry a misspelt name and other values
        f = tmp_path / f"p1-{n}.dcm"
        instance(f, issuer="HOSPA", patient="LI^SZE", patient_id="P1", study_uid=S1, series_uid=f"{S1}.{n + 1}",
                 series_number=n + 1)
        files.append(f)
    f = tmp_path / "p2.dcm"
    instance(f, issuer="HOSPA", patient="WANG^WOO", patient_id="P2", study_uid=S2, study_date="20240301")
    files.append(f)
    store(h.hub.dicom, *files)
    assert h.hub.dicom.flush()


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def test_answers_follow_the_empi_demographics(db: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    database = None if db == "sqlite" else request.getfixturevalue("pg_database")[1]
    with linked_hub(tmp_path, {"default_issuer": "HOSPA"}, database) as h:
        store_p1_p2(h, tmp_path)
        h.pix(a01("D1", "P1^^^HOSPA", "LI^SI", "19800202", "F"), a01("D2", "P2^^^HOSPA", "WANG^WU", "19650505"))
        for pid in ("P1", "P2"):
            wait_for(lambda pid=pid: h.row(pid, "HOSPA").empi_state == "linked", f"{pid} linked")
        row = h.row("P1", "HOSPA")  # the file's values stay in the index, the EMPI's beside them
        assert (row.name, row.birth_date, row.sex) == ("LI^SZE", "19700101", "M")
        assert (row.empi_name, row.empi_birth_date, row.empi_sex) == ("LI^SI", "19800202", "F")

        # C-FIND, Study Root, every level, without a patient key: the stored EMPI demographics
        p1 = ("P1", "LI^SI", "19800202", "F")
        assert by_uid(h, S1) == p1 and by_uid(h, S2) == ("P2", "WANG^WU", "19650505", "M")
        keys = {"PatientID": "", "PatientName": "", "PatientBirthDate": "", "PatientSex": ""}
        series = h.find("SERIES", StudyInstanceUID=S1, SeriesInstanceUID="", **keys)
        images = h.find("IMAGE", StudyInstanceUID=S1, SeriesInstanceUID=f"{S1}.1", SOPInstanceUID="", **keys)
        assert [demographics(r) for r in series + images] == [p1, p1, p1]
        # Patient Root: PATIENT and STUDY levels; a Patient ID in the query (its scope) answers the same
        (pat,) = h.find("PATIENT", model="-P", PatientID="P1", IssuerOfPatientID="HOSPA", PatientName="",
                        PatientBirthDate="", PatientSex="", NumberOfPatientRelatedStudies="")
        assert demographics(pat) == p1 and pat.NumberOfPatientRelatedStudies == 1
        (st,) = h.find("STUDY", model="-P", PatientID="P1", StudyInstanceUID="", PatientName="", PatientBirthDate="",
                       PatientSex="")
        assert demographics(st) == p1
        # matching is on the reconciled values: the EMPI's name, birth date and sex find it, the file's do not
        assert [r.StudyInstanceUID for r in h.find(PatientName="LI*", StudyInstanceUID="")] == [S1]
        assert [r.StudyInstanceUID for r in h.find(PatientName="li^si", PatientSex="F", StudyInstanceUID="")] == [S1]
        assert [r.StudyInstanceUID for r in h.find(PatientBirthDate="19800101-19801231", StudyInstanceUID="")] == [S1]
        assert h.find(PatientName="LI^SZE", StudyInstanceUID="") == []
        assert h.find(PatientBirthDate="19700101", StudyInstanceUID="") == []
        assert h.find(PatientID="P1", PatientName="WANG*", StudyInstanceUID="") == []
        assert [r.PatientID for r in h.find("PATIENT", model="-P", PatientName="WANG^WU", PatientID="")] == ["P2"]

        # QIDO-RS: studies, series, instances
        with h.http("readonly") as web:
            r = web.get("/dicomweb/studies", params={"PatientName": "LI*"})
            assert r.status_code == 200, r.text
            (item,) = r.json()
            assert (item["00100010"]["Value"], item["00100030"]["Value"], item["00100040"]["Value"]) == (
                [{"Alphabetic": "LI^SI"}], ["19800202"], ["F"])
            for path in ("/dicomweb/series", "/dicomweb/instances"):
                r = web.get(path, params={"PatientID": "P1", "includefield": "PatientName"})
                assert r.status_code == 200, r.text
                assert [i["00100010"]["Value"] for i in r.json()] == [[{"Alphabetic": "LI^SI"}]] * 2
            assert web.get("/dicomweb/studies", params={"PatientName": "LI^SZE"}).json() == []

        # A08 renames P2 in the EMPI: the next C-FIND shows it (the linker follows the update event)
        h.pix(a01("D3", "P2^^^HOSPA", "WANG^LIU", "19650505", event="A08"))
        p2 = ("P2", "WANG^LIU", "19650505", "M")
        wait_for(lambda: by_uid(h, S2) == p2, "the A08 reaching the answers")
        (st,) = h.find(PatientID="P2", StudyInstanceUID="", PatientName="", PatientBirthDate="", PatientSex="")
        assert demographics(st) == p2

        # A40 P1 -> P2: P1's study is answered as P2, with P2's demographics — the files keep P1 and LI^SZE
        h.pix(b"MSH|^~\\&|S|HA|HUB|HUB|20261127||ADT^A40^ADT_A39|D4|P|2.5\rEVN|A40\r"
              b"PID|1||P2^^^HOSPA||WANG^LIU\rMRG|P1^^^HOSPA\r")
        wait_for(lambda: by_uid(h, S1) == p2, "the merge reaching the answers")
        found = h.find(PatientID="P2", IssuerOfPatientID="HOSPA", StudyInstanceUID="", PatientName="",
                       PatientBirthDate="", PatientSex="")
        assert [(r.StudyInstanceUID, *demographics(r)) for r in found] == [(S1, *p2), (S2, *p2)]
        (pat,) = h.find("PATIENT", model="-P", PatientID="P2", PatientName="", NumberOfPatientRelatedStudies="")
        assert (str(pat.PatientName), pat.NumberOfPatientRelatedStudies) == ("WANG^LIU", 2)
        assert sorted(r.StudyInstanceUID for r in h.find(PatientName="WANG^LIU", StudyInstanceUID="")) == [S1, S2]
        assert h.find(PatientName="LI*", StudyInstanceUID="") == []
        with h.http("readonly") as web:
            r = web.get("/dicomweb/studies", params={"PatientID": "P2"})
            assert sorted((i["0020000D"]["Value"][0], i["00100010"]["Value"][0]["Alphabetic"]) for i in r.json()) == [
                (S1, "WANG^LIU"), (S2, "WANG^LIU")]
        with h.hub.engine.connect() as conn:  # the files are never rewritten
            paths = conn.execute(select(t.instances.c.path).where(t.instances.c.study_uid == S1)).scalars().all()
        assert [demographics(pydicom.dcmread(h.hub.dicom.root / p)) for p in paths] == [
            ("P1", "LI^SZE", "19700101", "M")] * 2

        # unmerge: P1's study is P1's again, with P1's demographics
        empi = h.hub.services["empi"]
        merged = next(ev for ev in empi.events() if ev.type.value == "merged")
        with h.http() as api:
            r = api.post(f"/api/empi/merges/{merged.detail['merge']}/unmerge")
            assert r.status_code == 200, r.text
        wait_for(lambda: by_uid(h, S1) == p1, "the unmerge reaching the answers")
        assert [demographics(r) for r in h.find(PatientID="P2", StudyInstanceUID="", PatientName="",
                                                PatientBirthDate="", PatientSex="")] == [p2]

        # a Chinese name fed in GB 18030; the file has another spelling (晓 for 小)
        f = tmp_path / "cn.dcm"
        instance(f, issuer="HOSPA", patient="Wang^XM=王^晓明", patient_id="C1", charset="GB18030", study_uid=S3)
        store(h.hub.dicom, f)
        assert h.hub.dicom.flush()
        h.pix(a01("D5", "C1^^^HOSPA", "王^小明", "19900303", "F", charset=GB, encoding="gb18030"))
        wait_for(lambda: h.row("C1", "HOSPA").empi_state == "linked", "C1 linked")
        name = "Wang^XiaoMing=王^小明"  # the pinyin group made from the EMPI's hanzi (PS3.5 H.3 convention)
        for charset, codec in (("GB18030", "gb18030"), ("ISO_IR 192", "utf-8")):
            for keys in ({"PatientID": "C1"}, {"PatientName": "王^小明"}, {"PatientName": "*小明"}):
                (r,) = h.find(charset=charset, StudyInstanceUID="", PatientName=keys.get("PatientName", ""),
                              PatientID=keys.get("PatientID", ""), PatientBirthDate="")
                raw = r.get_item("PatientName").value  # the bytes as answered, before pydicom decodes them
                assert isinstance(raw, bytes) and raw.rstrip(b" ") == name.encode(codec), (charset, raw)
                assert (r.SpecificCharacterSet, str(r.PatientName), r.PatientBirthDate) == (
                    charset, name, "19900303"), keys
            assert h.find(charset=charset, PatientName="*晓明", StudyInstanceUID="") == []
        (r,) = h.find(PatientID="C1", StudyInstanceUID="", PatientName="")  # no charset asked: ISO_IR 192
        assert (r.SpecificCharacterSet, str(r.PatientName)) == ("ISO_IR 192", name)
        with h.http("readonly") as web:
            (item,) = web.get("/dicomweb/studies", params={"PatientName": "王*"}).json()
            assert item["00100010"]["Value"] == [{"Alphabetic": "Wang^XiaoMing", "Ideographic": "王^小明"}]
            assert item["00080005"]["Value"] == ["ISO_IR 192"]


def test_setting_off_answers_the_files_and_a_changed_setting_is_caught_up(tmp_path: Path) -> None:
    with linked_hub(tmp_path, {"default_issuer": "HOSPA", "demographics": False}) as h:
        store_p1_p2(h, tmp_path)
        h.pix(a01("D1", "P1^^^HOSPA", "LI^SI", "19800202", "F"))
        wait_for(lambda: h.row("P1", "HOSPA").empi_state == "linked", "P1 linked")
        assert h.row("P1", "HOSPA").empi_read_at is None
        file_p1 = ("P1", "LI^SZE", "19700101", "M")
        assert by_uid(h, S1) == file_p1
        (st,) = h.find(PatientID="P1", StudyInstanceUID="", PatientName="", PatientBirthDate="", PatientSex="")
        assert demographics(st) == file_p1
        assert [r.StudyInstanceUID for r in h.find(PatientName="LI^SZE", StudyInstanceUID="")] == [S1]
        assert h.find(PatientName="LI^SI", StudyInstanceUID="") == []

        # the setting turned on (a linker started with it): the rows linked before get the EMPI's values ...
        assert h.hub.dicom.patients is not None
        directory = EmpiDirectory(h.hub.services["empi"], h.hub.writer)
        on = PatientLinker(h.hub.writer, directory, EmpiLinkSettings(default_issuer="HOSPA"))
        assert on.sync_demographics() == 1  # P1; P2 is not known to the EMPI (unknown)
        assert by_uid(h, S1) == ("P1", "LI^SI", "19800202", "F") and on.sync_demographics() == 0
        # ... and turned off again: cleared, the files answer
        off = PatientLinker(h.hub.writer, directory, EmpiLinkSettings(default_issuer="HOSPA", demographics=False))
        assert off.sync_demographics() == 1
        assert by_uid(h, S1) == file_p1 and h.row("P1", "HOSPA").empi_name is None


def test_unknown_and_unlinked_patients_keep_the_files_demographics(tmp_path: Path) -> None:
    with linked_hub(tmp_path, {"default_issuer": "HOSPA", "unknown": "register"}) as h:
        store_p1_p2(h, tmp_path)  # registered from their files: the EMPI's values are the files'
        wait_for(lambda: h.row("P2", "HOSPA").empi_state == "linked", "P2 registered")
        assert by_uid(h, S2) == ("P2", "WANG^WOO", "19700101", "M")
        f = tmp_path / "x.dcm"  # an issuer the EMPI has no domain for: unlinked, the file answers
        instance(f, issuer="NOWHERE", patient="ZHAO^LIU", patient_id="X1", study_uid=S3)
        store(h.hub.dicom, f)
        assert h.hub.dicom.flush()
        wait_for(lambda: h.row("X1", "NOWHERE").empi_state == "no-domain", "X1 looked up")
        assert by_uid(h, S3) == ("X1", "ZHAO^LIU", "19700101", "M")
        assert h.row("X1", "NOWHERE").empi_read_at is None


def test_dicom_demographics_of_empi_records() -> None:
    assert EmpiLinkSettings().demographics is True
    assert EmpiLinkSettings.from_mapping({"demographics": False}).demographics is False
    with pytest.raises(ValueError, match="demographics must be true or false"):
        EmpiLinkSettings.from_mapping({"demographics": "no"})
    n = PersonName
    assert dicom_name((n(family="王", given="小明"),)) == "Wang^XiaoMing=王^小明"
    assert dicom_name((n(family="欧阳娜娜"),)) == "Ouyang^NaNa=欧阳^娜娜"  # a whole name split on the surname
    assert dicom_name((n(family="王", given="小明"), n(family="WONG", given="SIUMING"))) == "WONG^SIUMING=王^小明"
    assert dicom_name((n(family="Doe", given="Jane", middle="Q", prefix="Dr", suffix="MD"),)) == "Doe^Jane^Q^Dr^MD"
    assert dicom_name((n(family="Alias", use="A"), n(family="Legal", given="Name", use="L"))) == "Legal^Name"
    assert dicom_name(()) is None
    rec = PatientRecord(pid="1", names=(n(family="李", given="娜"),), birth_date="1980-02-02", sex="女")
    d = dicom_demographics(rec)
    assert (d.name, d.birth_date, d.sex) == ("Li^Na=李^娜", "19800202", "F")
    d = dicom_demographics(PatientRecord(pid="1", names=(n(family="X"),), birth_date="1980", sex="A"))
    assert (d.name, d.birth_date, d.sex) == ("X", None, "O")  # DA needs a full date; A (ambiguous) is O
    d = dicom_demographics(PatientRecord(pid="1", sex="U"))
    assert (d.name, d.birth_date, d.sex) == (None, None, None)


def _row(engine: Any, patient_id: str) -> Any:
    p = t.patients
    with engine.connect() as conn:
        return conn.execute(select(p).where(p.c.patient_id == patient_id)).one()


def test_stored_demographics_of_a_merged_row_are_the_survivors(tmp_path: Path) -> None:
    """The linker alone on a real EMPI (no threads): a merged row stores the survivor's demographics, and an
    enterprise id's scope carries none (rows then answer with their own)."""
    from ihehub.bus import schema
    from ihehub.bus.db import Writer, make_engine
    from ihehub.empi import Empi, EmpiConfig

    engine = make_engine(f"sqlite:///{tmp_path}/hub.sqlite")
    schema.upgrade(engine)
    writer = Writer(engine)
    writer.start()
    try:
        empi = Empi(engine, EmpiConfig(enterprise_namespace="IHEHUB"), writer=writer)
        empi.add_domain("HOSPA")
        empi.register("HOSPA", PatientRecord(pid="A1", names=(PersonName(family="LIU", given="BEI"),),
                                             birth_date="19610101", sex="M"))
        empi.register("HOSPA", PatientRecord(pid="A2", names=(PersonName(family="关羽"),), birth_date="19620202",
                                             sex="M"))
        writer.run(lambda conn: conn.execute(t.patients.insert(), [
            {"patient_id": pid, "issuer": "HOSPA", "name": "X", "updated_at": 0.0} for pid in ("A1", "A2")]))
        linker = PatientLinker(writer, EmpiDirectory(empi, writer), EmpiLinkSettings())
        assert linker.follow() == 0 and linker.link_pending() == 2
        assert (_row(engine, "A2").empi_name, _row(engine, "A2").empi_birth_date) == ("Guan^Yu=关^羽", "19620202")
        empi.merge(Identifier(value="A1", domain="HOSPA"), Identifier(value="A2", domain="HOSPA"), by="test")
        assert linker.follow() >= 1
        row = _row(engine, "A2")
        assert (row.empi_state, row.merged_into, row.empi_name, row.empi_birth_date, row.name) == (
            "merged", "A1", "LIU^BEI", "19610101", "X")
        scope = linker.scope("A1", "HOSPA")
        assert scope is not None and scope.demographics is not None and scope.demographics.name == "LIU^BEI"
        e1 = scope.enterprise_id
        by_enterprise = linker.scope(e1, "IHEHUB")
        assert by_enterprise is not None and by_enterprise.demographics is None
    finally:
        writer.close()
        engine.dispose()
