"""C-FIND SCP against DCMTK findscu: Patient Root and Study Root, every level, wildcards, date ranges,
Chinese names in ISO_IR 192 and GB18030 (PS3.4 C.2.2.2 matching, C.4.1 C-FIND)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from ihehub.bus.db import make_engine
from ihehub.dicom import DicomSettings, ImageManager
from ihehub.dicom import query as q
from ihehub.dicom.tables import metadata
from tests.dicom.dicomkit import LoopThread, findscu, make_instance, query, sample_file, store

S1, S2, S3, S4, S5 = (f"1.2.826.0.1.3680043.8.498.77.{n}" for n in range(1, 6))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ImageManager, Path]]:
    """One populated manager for all queries of this module."""
    tmp = tmp_path_factory.mktemp("find")
    engine: Engine = make_engine(f"sqlite:///{tmp}/index.sqlite")
    metadata.create_all(engine)
    loop = LoopThread()
    manager = ImageManager(DicomSettings(port=0, host="127.0.0.1"), engine, tmp / "data")
    loop.run(manager.start())
    files = []

    def add(name: str, **kw: object) -> None:
        path = tmp / f"{name}.dcm"
        make_instance(path, **kw)  # type: ignore[arg-type]
        files.append(path)

    add("j1", patient="Doe^John", patient_id="P1", study_uid=S1, series_uid=S1 + ".1", sop_uid=S1 + ".1.1",
        study_date="20240115", modality="CT", accession="ACC1", instance_number=1)
    add("j2", patient="Doe^John", patient_id="P1", study_uid=S1, series_uid=S1 + ".1", sop_uid=S1 + ".1.2",
        study_date="20240115", modality="CT", accession="ACC1", instance_number=2)
    add("j3", patient="Doe^John", patient_id="P1", study_uid=S1, series_uid=S1 + ".2", sop_uid=S1 + ".2.1",
        study_date="20240115", modality="SR", accession="ACC1", series_number=2,
        sop_class="1.2.840.10008.5.1.4.1.1.88.11")
    add("ja", patient="Doe^Jane", patient_id="P2", study_uid=S2, series_uid=S2 + ".1", study_date="20231201",
        modality="MR", accession="ACC2")
    add("an", patient="Smith^Anna", patient_id="P3", study_uid=S3, series_uid=S3 + ".1", study_date="20240131",
        modality="CT", accession="ACC3")
    add("an2", patient="Smith^Anna", patient_id="P3", study_uid=S3, series_uid=S3 + ".2", study_date="20240131",
        modality="US", accession="ACC3", series_number=2)
    add("li", patient="Li^Lei=李^雷", patient_id="C1", study_uid=S4, charset="ISO_IR 192", study_date="20240201")
    add("zh", patient="Zhang^San=张^三", patient_id="C2", study_uid=S5, charset="GB18030", study_date="20240202")
    store(manager, *files, sample_file("chrX1.dcm"), sample_file("chrX2.dcm"))
    assert manager.flush(10)
    yield manager, tmp / "find"
    loop.run(manager.stop())
    loop.close()
    engine.dispose()


def ask(archive: tuple[ImageManager, Path], level: str, *, model: str = "-S", charset: str | None = None,
        **keys: object) -> list:
    manager, work = archive
    res, responses = findscu(manager, query(level, charset, **keys), work, model=model)
    assert res.returncode == 0, res.stderr
    return responses


def test_study_level_date_ranges(archive: tuple[ImageManager, Path]) -> None:
    def uids(date: str) -> set[str]:
        return {r.StudyInstanceUID for r in ask(archive, "STUDY", StudyDate=date, StudyInstanceUID="")}

    assert uids("20240101-20240131") == {S1, S3}
    assert uids("-20231231") == {S2}
    assert uids("20240131-") == {S3, S4, S5}
    assert uids("20240115") == {S1}
    assert uids("") >= {S1, S2, S3, S4, S5}  # universal matching


def test_study_level_wildcards_and_return_keys(archive: tuple[ImageManager, Path]) -> None:
    doe = ask(archive, "STUDY", PatientName="Doe*", StudyInstanceUID="", ModalitiesInStudy="",
              NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="", AccessionNumber="",
              StudyDescription="", PatientBirthDate="")
    assert {r.StudyInstanceUID for r in doe} == {S1, S2}
    john = next(r for r in doe if r.StudyInstanceUID == S1)
    assert list(john.ModalitiesInStudy) == ["CT", "SR"]
    assert (john.NumberOfStudyRelatedSeries, john.NumberOfStudyRelatedInstances) == (2, 3)
    assert john.AccessionNumber == "ACC1" and john.RetrieveAETitle == "IHEHUB" and john.QueryRetrieveLevel == "STUDY"
    assert "StudyDescription" in john and john.PatientBirthDate == "19700101"
    assert {r.StudyInstanceUID for r in ask(archive, "STUDY", PatientName="D?e^J*", StudyInstanceUID="")} == {S1, S2}
    assert {r.StudyInstanceUID for r in ask(archive, "STUDY", PatientName="doe^john", StudyInstanceUID="")} == {S1}
    assert {r.StudyInstanceUID for r in ask(archive, "STUDY", AccessionNumber="ACC?", ModalitiesInStudy="US",
                                            StudyInstanceUID="")} == {S3}
    assert ask(archive, "STUDY", PatientName="Nobody*") == []


def test_patient_root_patient_level(archive: tuple[ImageManager, Path]) -> None:
    found = ask(archive, "PATIENT", model="-P", PatientID="P*", PatientName="", NumberOfPatientRelatedStudies="",
                NumberOfPatientRelatedInstances="")
    by_id = {r.PatientID: r for r in found}
    assert set(by_id) == {"P1", "P2", "P3"}
    assert str(by_id["P1"].PatientName) == "Doe^John"
    assert (by_id["P1"].NumberOfPatientRelatedStudies, by_id["P1"].NumberOfPatientRelatedInstances) == (1, 3)
    studies = ask(archive, "STUDY", model="-P", PatientID="P3", StudyInstanceUID="")
    assert [r.StudyInstanceUID for r in studies] == [S3]


def test_series_and_image_levels(archive: tuple[ImageManager, Path]) -> None:
    series = ask(archive, "SERIES", StudyInstanceUID=S1, SeriesInstanceUID="", Modality="",
                 NumberOfSeriesRelatedInstances="", SeriesNumber="")
    assert {(r.SeriesInstanceUID, r.Modality, r.NumberOfSeriesRelatedInstances) for r in series} == {
        (S1 + ".1", "CT", 2), (S1 + ".2", "SR", 1)}
    assert all(r.StudyInstanceUID == S1 for r in series)
    ct = ask(archive, "SERIES", StudyInstanceUID=S1, Modality="CT", SeriesInstanceUID="")
    assert [r.SeriesInstanceUID for r in ct] == [S1 + ".1"]
    images = ask(archive, "IMAGE", StudyInstanceUID=S1, SeriesInstanceUID=S1 + ".1", SOPInstanceUID="",
                 InstanceNumber="", SOPClassUID="")
    assert [(r.SOPInstanceUID, r.InstanceNumber) for r in images] == [(S1 + ".1.1", 1), (S1 + ".1.2", 2)]
    listed = ask(archive, "IMAGE", model="-P", PatientID="P1", StudyInstanceUID=S1, SeriesInstanceUID=S1 + ".1",
                 SOPInstanceUID=[S1 + ".1.2", S1 + ".9.9"])
    assert [r.SOPInstanceUID for r in listed] == [S1 + ".1.2"]
    assert listed[0].PatientID == "P1"


def test_chinese_names_utf8_query(archive: tuple[ImageManager, Path]) -> None:
    """pydicom's chrX1 (ISO_IR 192) and chrX2 (GB18030) are stored decoded: one UTF-8 query finds both."""
    found = ask(archive, "STUDY", charset="ISO_IR 192", PatientName="王*", PatientID="", StudyInstanceUID="")
    names = {r.PatientID: str(r.PatientName) for r in found}
    assert names == {"X1EXAMPLE": "Wang^XiaoDong=王^小東", "X2EXAMPLE": "Wang^XiaoDong=王^小东"}
    assert all(r.SpecificCharacterSet == "ISO_IR 192" for r in found)
    li = ask(archive, "PATIENT", model="-P", charset="ISO_IR 192", PatientName="李^*", PatientID="")
    assert [(r.PatientID, str(r.PatientName)) for r in li] == [("C1", "Li^Lei=李^雷")]
    # an alphabetic query matches the same patients, answered in the default repertoire's superset
    wang = ask(archive, "STUDY", PatientName="WANG^XIAODONG", PatientID="")
    assert {r.PatientID for r in wang} == {"X1EXAMPLE", "X2EXAMPLE"}
    assert all(r.SpecificCharacterSet == "ISO_IR 192" for r in wang)


def test_chinese_names_gb18030_query(archive: tuple[ImageManager, Path]) -> None:
    """A GB18030 query is decoded as GB18030 and answered in GB18030 (the simplified 东 is not 東)."""
    found = ask(archive, "STUDY", charset="GB18030", PatientName="王^小东", PatientID="")
    assert [(r.PatientID, r.SpecificCharacterSet, str(r.PatientName)) for r in found] == [
        ("X2EXAMPLE", "GB18030", "Wang^XiaoDong=王^小东")]
    zhang = ask(archive, "PATIENT", model="-P", charset="GB18030", PatientName="*=张*", PatientID="")
    assert [(r.PatientID, str(r.PatientName)) for r in zhang] == [("C2", "Zhang^San=张^三")]


def test_identifier_errors_answer_a900(archive: tuple[ImageManager, Path]) -> None:
    manager, work = archive
    res, responses = findscu(manager, query("PATIENT", PatientID=""), work, model="-S",
                                verbose=True)  # no PATIENT in Study Root
    assert responses == [] and "Error: DataSetDoesNotMatchSOPClass" in res.stderr
    res, responses = findscu(manager, query("WARD", PatientID=""), work, model="-P", verbose=True)
    assert responses == [] and "Error: DataSetDoesNotMatchSOPClass" in res.stderr


# -- matching rules, without the network ---------------------------------------------------------


@pytest.mark.parametrize(("pattern", "stored", "hit"), [
    ("Wang*", "Wang^XiaoDong=王^小東", True),
    ("王^小東", "Wang^XiaoDong=王^小東", True),
    ("王^小东", "Wang^XiaoDong=王^小東", False),
    ("*=王*", "Wang^XiaoDong=王^小東", True),
    ("Wang*=李*", "Wang^XiaoDong=王^小東", False),
    ("wang^xiaodong", "Wang^XiaoDong", True),
    ("W?ng^*", "Wang^XiaoDong", True),
    ("Wang", "Wang^XiaoDong", False),
])
def test_person_name_matching(pattern: str, stored: str, hit: bool) -> None:
    assert q._pn_matches(pattern, stored) is hit


def test_time_and_date_ranges() -> None:
    assert q._time_range("0800-0930") == ("0800", "093059.999999")
    assert q._time_range("-08") == (None, "085959.999999")
    assert q._date_range("2024.01.01-") == ("20240101", None)
    assert q._date_range("20240102") == ("20240102", "20240102")


def test_response_charset() -> None:
    assert q.response_charset(("GB18030",), ["王^小东"]) == "GB18030"
    assert q.response_charset(("ISO_IR 100",), ["王"]) == "ISO_IR 192"
    assert q.response_charset((), ["Doe^John"]) is None
    assert q.response_charset(("ISO 2022 IR 87",), ["王"]) == "ISO_IR 192"
